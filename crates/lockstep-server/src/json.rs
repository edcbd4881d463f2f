//! A JSON body extractor whose every rejection is a lockstep error body: 400 for malformed
//! JSON or a missing field (with serde's explanation), 413 beyond the body cap, 415 for a
//! multipart body, 400 for anything but an object. An empty body (or `null`) reads as `{}`
//! where the type allows it.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `JsonBody<T>`: the parsed body.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Any content type is read as JSON: `curl -d` sends form-urlencoded by default and
        // refusing it would only teach people to add a header. Multipart is surely a mistake.
        if req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("multipart/"))
        {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest(format!("could not read the body: {rej}"))
            }
        })?;
        // No body, or a JSON `null` (an optional body sent as "nothing" by a generated
        // client), reads as `{}`.
        let slice: &[u8] =
            if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null" {
                b"{}"
            } else {
                &bytes
            };
        // Every body of the API is an object; serde would also read a struct from an array
        // (`[]` as "every field absent"), which the description forbids.
        if slice.trim_ascii_start().first() != Some(&b'{') {
            return Err(ApiError::BadRequest(
                "malformed JSON body: expected a JSON object".into(),
            ));
        }
        serde_json::from_slice(slice)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
    }
}
