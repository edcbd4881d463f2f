//! Reading the fleet for a scope an operator typed: `--env` and `--service` must name
//! something the registry knows, or the answer says so and lists what it does know — so
//! `verify --service apii` fails loudly instead of finding "no instances" and passing
//! with `--allow-empty`.
//!
//! Shared by `lockstep status`, `verify`, `history` and `forget`. [`check_scope`] is the
//! pure rule; [`status_of`] and [`history_of`] fetch and apply it.
//!
//! ```
//! use lockstep_api::{EnvStatus, ServiceStatus, StatusReport};
//! use lockstep_client::fleet::{check_scope, UnknownScope};
//! let svc = |name: &str| ServiceStatus {
//!     name: name.into(), expected: None, instances: vec![], counts: Default::default(),
//! };
//! let report = StatusReport {
//!     environments: vec![EnvStatus { name: "production".into(), services: vec![svc("api")] }],
//!     ..StatusReport::default()
//! };
//! assert!(check_scope(&report, Some("production"), Some("api")).is_ok());
//! let err = check_scope(&report, None, Some("apii")).unwrap_err();
//! assert!(matches!(err, UnknownScope::Service { .. }));
//! assert!(err.to_string().contains("known services: api"));
//! ```

use lockstep_api::{ReleaseHistory, StatusReport};
use lockstep_core::{Instance, Status};

use crate::{ClientError, RegistryClient};

/// A scope that names nothing the registry knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownScope {
    /// No environment of that name.
    #[error("no environment named {env:?}; known environments: {}", list(known))]
    Environment {
        /// The name asked for.
        env: String,
        /// The environments the registry knows.
        known: Vec<String>,
    },
    /// No service of that name (in the environment, when one was given).
    #[error("no service named {service:?}{}; known services{}: {}{}",
        env.as_ref().map(|e| format!(" in {e}")).unwrap_or_default(),
        if env.is_some() { " there" } else { "" },
        list(known),
        if elsewhere.is_empty() { String::new() } else {
            format!(" ({service} exists in: {})", elsewhere.join(", "))
        })]
    Service {
        /// The name asked for.
        service: String,
        /// The environment it was looked for in.
        env: Option<String>,
        /// The services known there (or anywhere, without an environment).
        known: Vec<String>,
        /// Other environments where the service does exist.
        elsewhere: Vec<String>,
    },
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none yet".into()
    } else {
        names.join(", ")
    }
}

/// Why a scoped read failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The registry could not be asked, or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The scope names nothing the registry knows.
    #[error(transparent)]
    Unknown(#[from] UnknownScope),
}

/// Checks that `env` and `service` name something in `all`, a status report of the whole
/// registry. A service counts as known when it has an expected release or an instance.
pub fn check_scope(
    all: &StatusReport,
    env: Option<&str>,
    service: Option<&str>,
) -> Result<(), UnknownScope> {
    let envs: Vec<String> = all.environments.iter().map(|e| e.name.clone()).collect();
    if let Some(e) = env
        && !envs.iter().any(|n| n == e)
    {
        return Err(UnknownScope::Environment {
            env: e.to_string(),
            known: envs,
        });
    }
    let Some(s) = service else {
        return Ok(());
    };
    let mut known: Vec<String> = all
        .environments
        .iter()
        .filter(|e| env.is_none_or(|n| n == e.name))
        .flat_map(|e| e.services.iter().map(|s| s.name.clone()))
        .collect();
    known.sort();
    known.dedup();
    if known.iter().any(|n| n == s) {
        return Ok(());
    }
    let elsewhere = all
        .environments
        .iter()
        .filter(|e| e.services.iter().any(|x| x.name == s))
        .map(|e| e.name.clone())
        .collect();
    Err(UnknownScope::Service {
        service: s.to_string(),
        env: env.map(str::to_string),
        known,
        elsewhere,
    })
}

/// The status of `env`/`service` (each optional); [`FleetError::Unknown`] when either names
/// nothing the registry knows. One call when the scope exists; a second, unfiltered one
/// only to name the known environments and services when it does not.
pub async fn status_of(
    client: &RegistryClient,
    env: Option<&str>,
    service: Option<&str>,
) -> Result<StatusReport, FleetError> {
    let report = client.status(env, service).await?;
    if (env.is_none() && service.is_none()) || !report.environments.is_empty() {
        return Ok(report);
    }
    let all = client.status(None, None).await?;
    check_scope(&all, env, service)?;
    Ok(report)
}

/// The release history of `env`/`service`, newest first; [`FleetError::Unknown`] when the
/// service has no history there and the registry does not know it (a typo).
pub async fn history_of(
    client: &RegistryClient,
    env: &str,
    service: &str,
    limit: u32,
) -> Result<ReleaseHistory, FleetError> {
    let history = client.history(env, service, limit).await?;
    if history.releases.is_empty() {
        let all = client.status(None, None).await?;
        check_scope(&all, Some(env), Some(service))?;
    }
    Ok(history)
}

/// The instances of `report` that stopped heartbeating (`missing`), in report order: what
/// `lockstep forget --missing` removes.
pub fn missing_instances(report: &StatusReport) -> Vec<&Instance> {
    report
        .environments
        .iter()
        .flat_map(|e| &e.services)
        .flat_map(|s| &s.instances)
        .filter(|i| i.status == Status::Missing)
        .map(|i| &i.instance)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::{EnvStatus, ServiceStatus};

    fn report(envs: &[(&str, &[&str])]) -> StatusReport {
        StatusReport {
            environments: envs
                .iter()
                .map(|(e, svcs)| EnvStatus {
                    name: e.to_string(),
                    services: svcs
                        .iter()
                        .map(|s| ServiceStatus {
                            name: s.to_string(),
                            expected: None,
                            instances: vec![],
                            counts: Default::default(),
                        })
                        .collect(),
                })
                .collect(),
            ..StatusReport::default()
        }
    }

    /// `(env, service)` against a registry with production {api, extractor} and staging
    /// {api, beta} → `Ok` or the error message.
    fn check(scope: (Option<&str>, Option<&str>), expect: Result<(), &str>) {
        let r = report(&[
            ("production", &["api", "extractor"]),
            ("staging", &["api", "beta"]),
        ]);
        let got = check_scope(&r, scope.0, scope.1).map_err(|e| e.to_string());
        assert_eq!(
            got.as_ref().map(|_| ()).map_err(String::as_str),
            expect,
            "{scope:?}"
        );
    }

    #[test]
    fn known_scopes_pass() {
        check((None, None), Ok(()));
        check((Some("staging"), None), Ok(()));
        check((Some("production"), Some("api")), Ok(()));
        check((None, Some("beta")), Ok(()));
    }

    #[test]
    fn unknown_scopes_are_named_with_the_known_ones() {
        check(
            (Some("prod"), None),
            Err("no environment named \"prod\"; known environments: production, staging"),
        );
        check(
            (Some("production"), Some("apii")),
            Err("no service named \"apii\" in production; known services there: api, extractor"),
        );
        check(
            (None, Some("apii")),
            Err("no service named \"apii\"; known services: api, beta, extractor"),
        );
        check(
            (Some("production"), Some("beta")),
            Err(
                "no service named \"beta\" in production; known services there: api, extractor \
                 (beta exists in: staging)",
            ),
        );
    }

    #[test]
    fn an_empty_registry_says_none_yet() {
        let err = check_scope(&report(&[]), None, Some("api")).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "no service named \"api\"; known services: none yet"
        );
    }
}
