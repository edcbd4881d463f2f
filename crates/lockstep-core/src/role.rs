//! Token roles: `admin` ⊃ `deployer` ⊃ `operator` ⊃ `viewer`; `worker` stands apart.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::CoreError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including tokens and alert channels.
    Admin,
    /// Register and roll back releases, plus everything an operator may do.
    Deployer,
    /// Acknowledge alerts, plus everything a viewer may do.
    Operator,
    /// Read status, history and events.
    Viewer,
    /// Read the expected release, watch it and heartbeat: what a running worker needs.
    Worker,
}

impl Role {
    fn rank(self) -> u8 {
        match self {
            Role::Admin => 4,
            Role::Deployer => 3,
            Role::Operator => 2,
            Role::Viewer => 1,
            Role::Worker => 0,
        }
    }

    /// Whether a token of this role may call an endpoint that requires `required`.
    ///
    /// Every role may do what a worker does (read the release, watch, heartbeat); a worker
    /// may do nothing else.
    pub fn allows(self, required: Role) -> bool {
        match required {
            Role::Worker => true,
            _ => self != Role::Worker && self.rank() >= required.rank(),
        }
    }

    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "admin" => Role::Admin,
            "deployer" => Role::Deployer,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            "worker" => Role::Worker,
            other => return Err(CoreError::UnknownRole(other.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    #[test]
    fn roles_nest_and_worker_stands_apart() {
        let table = [
            (Admin, Deployer, true),
            (Deployer, Deployer, true),
            (Operator, Deployer, false),
            (Viewer, Viewer, true),
            (Viewer, Operator, false),
            (Worker, Worker, true),
            (Worker, Viewer, false),
            (Worker, Deployer, false),
            (Viewer, Worker, true),
            (Admin, Admin, true),
            (Deployer, Admin, false),
        ];
        for (have, need, ok) in table {
            assert_eq!(have.allows(need), ok, "{have} -> {need}");
        }
    }

    #[test]
    fn roles_parse_from_their_wire_names() {
        for r in [Admin, Deployer, Operator, Viewer, Worker] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
