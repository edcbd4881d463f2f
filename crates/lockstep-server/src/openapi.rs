//! `GET /openapi.json`: the OpenAPI 3 description, generated from the handlers' `#[utoipa::path]`
//! attributes and the wire types' schemas, so it cannot drift from the code.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{admin, alerts, dashboard, instances, releases, rollouts, status, stream};

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
        dashboard::dashboard,
        alerts::list, alerts::ack, alerts::get_channels, alerts::put_channels,
        rollouts::start, rollouts::list, rollouts::get, rollouts::abort, rollouts::retry,
    ),
    components(schemas(
        lockstep_api::ErrorBody, lockstep_api::PutRelease, lockstep_api::RollbackRequest,
        lockstep_api::Heartbeat, lockstep_api::HeartbeatAnswer, lockstep_api::StatusReport,
        lockstep_api::EnvStatus, lockstep_api::ServiceStatus, lockstep_api::InstanceStatus,
        lockstep_api::InstanceRollout, lockstep_api::RolloutStep,
        lockstep_api::ReleaseHistory, lockstep_api::Event, lockstep_api::EventPage,
        lockstep_api::CreateToken, lockstep_api::CreatedToken, lockstep_api::TokenInfo,
        lockstep_api::TokenList, lockstep_api::Health, lockstep_api::ServiceIndex,
        lockstep_api::EnvServices, lockstep_api::InstanceSnapshot, lockstep_api::InstanceRemoved,
        lockstep_api::DashboardReport, lockstep_api::ServiceCounts, lockstep_api::Deploy,
        lockstep_api::InstancePage, crate::dashboard::DashboardDocument,
        crate::dashboard::RolloutCard, crate::dashboard::RolloutCounts,
        crate::dashboard::RolloutNodeStep,
        lockstep_core::Release, lockstep_core::StoredRelease, lockstep_core::Instance,
        lockstep_core::Status, lockstep_core::StatusCounts, lockstep_core::Role,
        lockstep_core::RegistrationKind,
        lockstep_api::Alert, lockstep_api::AlertList, lockstep_api::AlertState,
        lockstep_api::AckRequest, lockstep_api::AlertChannels, lockstep_api::ChannelSchema,
        lockstep_api::WebhookChannel, lockstep_api::SlackChannel, lockstep_api::EmailChannel, lockstep_core::Severity, lockstep_core::Condition,
        rollouts::RolloutList, rollouts::StartRolloutForm,
        crate::service::rollout::RolloutView, crate::service::rollout::NodeView,
        crate::service::rollout::StartRollout,
    )),
    modifiers(&BearerAuth, &ForGenerators),
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

/// Describes what the derive cannot say precisely enough for client generators
/// (openapi-typescript, openapi-python-client), which CI runs against this document
/// (`.ci/clients-check.sh`):
/// - free maps (`Release.metadata`, `Event.data`) take any property: without
///   `additionalProperties` TypeScript types them as `Record<string, never>`;
/// - `Heartbeat.env` is optional and says its default only in prose: a `default` makes
///   openapi-typescript require the field in the generated type;
/// - the rollback body is an optional `RollbackRequest`, not `oneOf [RollbackRequest, null]`
///   (with which openapi-python-client sends an unset body and crashes when called without
///   one);
/// - `StoredRelease.rollback_safe` is left out of answers when true, so it declares
///   `default: true` (on the stored release only: a request may still omit it).
///
/// Done on the generated document as JSON so each rule is one line, whatever shape the
/// derive gives the surrounding schema.
struct ForGenerators;

impl Modify for ForGenerators {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Ok(mut doc) = serde_json::to_value(&*openapi) else {
            return;
        };
        for_generators(&mut doc);
        match serde_json::from_value(doc) {
            Ok(patched) => *openapi = patched,
            Err(e) => tracing::error!(error = %e, "openapi: generator fixes not applied"),
        }
    }
}

fn for_generators(doc: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let schemas = &mut doc["components"]["schemas"];
    for (schema, field) in [("Release", "metadata"), ("Event", "data")] {
        if let Some(p) = schemas[schema]["properties"][field].as_object_mut() {
            p.insert("additionalProperties".into(), Value::Bool(true));
        }
    }
    if let Some(env) = schemas["Heartbeat"]["properties"]["env"].as_object_mut() {
        env.remove("default");
    }
    if let Some(parts) = schemas["StoredRelease"]["allOf"].as_array_mut() {
        parts.push(json!({
            "type": "object",
            "properties": {"rollback_safe": {
                "type": "boolean",
                "default": true,
                "description": "False when this release ran a migration that an older release cannot read; left out of answers when true."
            }}
        }));
    }
    let body = &mut doc["paths"]["/v1/envs/{env}/services/{svc}/rollback"]["post"]["requestBody"];
    if let Some(b) = body.as_object_mut() {
        b.insert("required".into(), Value::Bool(false));
        b.insert(
            "content".into(),
            json!({"application/json": {"schema": {"$ref": "#/components/schemas/RollbackRequest"}}}),
        );
    }
}

/// Serves the document.
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_says_what_client_generators_need() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("json");
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["Release"]["properties"]["metadata"]["additionalProperties"],
            true
        );
        assert_eq!(
            schemas["Event"]["properties"]["data"]["additionalProperties"],
            true
        );
        let env = &schemas["Heartbeat"]["properties"]["env"];
        assert!(env.get("default").is_none(), "{env}");
        assert!(
            !schemas["Heartbeat"]["required"]
                .to_string()
                .contains("\"env\"")
        );
        let stored = schemas["StoredRelease"].to_string();
        assert!(
            stored.contains(r#""rollback_safe":{"default":true"#),
            "{stored}"
        );
        // The request side keeps it optional without a default.
        assert!(
            schemas["Release"]["properties"]["rollback_safe"]
                .get("default")
                .is_none()
        );
        let body = &doc["paths"]["/v1/envs/{env}/services/{svc}/rollback"]["post"]["requestBody"];
        assert_eq!(body["required"], false);
        assert_eq!(
            body["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/RollbackRequest"
        );
    }
}
