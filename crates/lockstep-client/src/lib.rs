//! The lockstep client library: what tools and Rust workers link to talk to the registry.
//!
//! [`RegistryClient`] speaks the v1 API with the wire types of `lockstep-api`, tries several
//! registry URLs in order, and sorts failures into "could not reach any registry"
//! ([`ClientError::Unreachable`]) and "the registry said no" ([`ClientError::Api`]) so that
//! callers can fail open on the first and act on the second.

mod registry;
pub mod sse;

pub use registry::{ClientError, RegistryClient};
