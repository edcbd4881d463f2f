//! `GET /openapi.json`: the OpenAPI 3 description, generated from the handlers' `#[utoipa::path]`
//! attributes and the wire types' schemas, so it cannot drift from the code.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{admin, instances, releases, status, stream};

/// The generated document.
#[derive(OpenApi)]
#[openapi(
    info(title = "lockstep registry", description = "Keeps a fleet of workers on the version that was deployed."),
    paths(
        releases::get_release, releases::put_release, releases::history, releases::rollback,
        stream::watch, stream::event_stream,
        instances::heartbeat, instances::deregister, crate::instance_stream::watch_instances,
        status::status, status::services,
        admin::events, admin::create_token, admin::list_tokens, admin::revoke_token,
        admin::healthz, admin::readyz, crate::metrics::metrics,
    ),
    components(schemas(
        lockstep_api::ErrorBody, lockstep_api::PutRelease, lockstep_api::RollbackRequest,
        lockstep_api::Heartbeat, lockstep_api::HeartbeatAnswer, lockstep_api::StatusReport,
        lockstep_api::EnvStatus, lockstep_api::ServiceStatus, lockstep_api::InstanceStatus,
        lockstep_api::ReleaseHistory, lockstep_api::Event, lockstep_api::EventPage,
        lockstep_api::CreateToken, lockstep_api::CreatedToken, lockstep_api::TokenInfo,
        lockstep_api::TokenList, lockstep_api::Health, lockstep_api::ServiceIndex,
        lockstep_api::EnvServices, lockstep_api::InstanceSnapshot, lockstep_api::InstanceRemoved,
        lockstep_core::Release, lockstep_core::StoredRelease, lockstep_core::Instance,
        lockstep_core::Status, lockstep_core::StatusCounts, lockstep_core::Role,
        lockstep_core::RegistrationKind,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Serves the document.
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
