//! Fleet rollouts: the rollout rows, each node's step, and the package (bytes and
//! signature) the coordinator uploads to the agents — types, and the SQL both backends run.
//!
//! The store does not interpret a rollout: its phase is a name, its settings and each
//! node's step are JSON owned by `lockstep-rollout`. What the store guarantees:
//! **at most one running rollout per (env, service)** (checked under the backend's write
//! lock, backed by a partial unique index), and **node steps and phases written by the
//! coordinator only while it holds the leader lease** (checked in the same transaction),
//! so a deposed leader cannot record a step after the new one has read the state.

use time::OffsetDateTime;

/// A rollout to create.
#[derive(Debug, Clone)]
pub struct NewRollout {
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// The release the nodes are updated to.
    pub version_id: String,
    /// The release expected before (what a rollback returns to).
    pub previous_version_id: Option<String>,
    /// The rollout's settings (JSON owned by `lockstep-rollout`).
    pub settings: serde_json::Value,
    /// The first phase's name.
    pub phase: String,
    /// Token name of who started it.
    pub actor: String,
    /// The nodes, in rollout order (canary first).
    pub nodes: Vec<NewRolloutNode>,
    /// The package bytes.
    pub package: Vec<u8>,
    /// Its detached signature.
    pub signature: Option<Vec<u8>>,
    /// The step every node starts with (JSON).
    pub initial_step: serde_json::Value,
}

/// One node of a new rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRolloutNode {
    /// The instance id (or the agent URL when the node was given by URL).
    pub instance_id: String,
    /// The agent's base URL.
    pub endpoint: String,
}

/// A stored rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Id.
    pub id: i64,
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// Target release.
    pub version_id: String,
    /// Release expected before the rollout.
    pub previous_version_id: Option<String>,
    /// Settings (JSON).
    pub settings: serde_json::Value,
    /// Phase name.
    pub phase: String,
    /// Whether it is running (not in a final phase).
    pub running: bool,
    /// A person's pending request (`abort`, `emergency`), picked up by the coordinator.
    pub request: Option<String>,
    /// Who started it.
    pub actor: String,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last changed.
    pub updated_at: OffsetDateTime,
    /// When it reached a final phase (`None` while running).
    pub finished_at: Option<OffsetDateTime>,
    /// Package size in bytes.
    pub package_size: i64,
}

/// One node of a stored rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutNode {
    /// Position in rollout order.
    pub idx: i64,
    /// Instance id.
    pub instance_id: String,
    /// Agent URL.
    pub endpoint: String,
    /// Step (JSON owned by `lockstep-rollout`).
    pub step: serde_json::Value,
    /// Update attempts recorded.
    pub attempts: i64,
    /// Last changed.
    pub updated_at: OffsetDateTime,
}

/// One node of the latest rollout of a service ([`crate::Store::latest_rollout_nodes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LatestRolloutNode {
    /// The rollout's id.
    pub rollout_id: i64,
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// Whether the rollout is running.
    pub running: bool,
    /// Instance id (or the agent URL when the node was given by URL).
    pub instance_id: String,
    /// Agent URL.
    pub endpoint: String,
    /// Step (JSON owned by `lockstep-rollout`).
    pub step: serde_json::Value,
}

pub(crate) type RolloutRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    Option<String>,
    String,
    i64,
    i64,
    Option<i64>,
    i64,
);

pub(crate) fn rollout_from_row(r: RolloutRow) -> Result<Rollout, crate::StoreError> {
    use crate::alerts::from_millis;
    Ok(Rollout {
        id: r.0,
        env: r.1,
        service: r.2,
        version_id: r.3,
        previous_version_id: r.4,
        settings: serde_json::from_str(&r.5)?,
        phase: r.6,
        running: r.7 != 0,
        request: r.8,
        actor: r.9,
        created_at: from_millis(r.10),
        updated_at: from_millis(r.11),
        finished_at: r.12.map(from_millis),
        package_size: r.13,
    })
}

/// The SQL of rollouts for one backend's transaction and pool types (the lease check and
/// the write lock stay in each backend).
macro_rules! rollout_ops {
    ($db:ty) => {
        use crate::alerts::from_millis;
        use crate::rollouts::{
            NewRollout, Rollout, RolloutNode, RolloutRow, rollout_from_row,
        };
        use crate::{StoreError, millis};
        use sqlx::{Pool, Transaction};
        use time::OffsetDateTime;

        type Tx<'a> = Transaction<'a, $db>;

        fn now_ms() -> i64 {
            millis(OffsetDateTime::now_utc())
        }

        async fn running_of(
            tx: &mut Tx<'_>,
            env: &str,
            service: &str,
            except: i64,
        ) -> Result<Option<i64>, StoreError> {
            Ok(sqlx::query_scalar(
                "SELECT id FROM rollouts WHERE env = $1 AND service = $2 AND running = 1 \
                 AND id <> $3",
            )
            .bind(env)
            .bind(service)
            .bind(except)
            .fetch_optional(&mut **tx)
            .await?)
        }

        fn conflict(id: i64, env: &str, service: &str) -> StoreError {
            StoreError::Conflict(format!("running rollout {id} of {env}/{service}"))
        }

        pub(crate) async fn create(tx: &mut Tx<'_>, r: NewRollout) -> Result<i64, StoreError> {
            if let Some(id) = running_of(tx, &r.env, &r.service, -1).await? {
                return Err(conflict(id, &r.env, &r.service));
            }
            let now = now_ms();
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO rollouts (env, service, version_id, previous_version_id, settings, \
                 phase, running, request, actor, created_ms, updated_ms, finished_ms, \
                 package_size) VALUES ($1, $2, $3, $4, $5, $6, 1, NULL, $7, $8, $8, NULL, $9) \
                 RETURNING id",
            )
            .bind(&r.env)
            .bind(&r.service)
            .bind(&r.version_id)
            .bind(&r.previous_version_id)
            .bind(serde_json::to_string(&r.settings)?)
            .bind(&r.phase)
            .bind(&r.actor)
            .bind(now)
            .bind(r.package.len() as i64)
            .fetch_one(&mut **tx)
            .await?;
            sqlx::query(
                "INSERT INTO rollout_packages (rollout_id, package, signature) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(&r.package)
            .bind(&r.signature)
            .execute(&mut **tx)
            .await?;
            let step = serde_json::to_string(&r.initial_step)?;
            for (i, n) in r.nodes.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO rollout_nodes (rollout_id, idx, instance_id, endpoint, step, \
                     attempts, updated_ms) VALUES ($1, $2, $3, $4, $5, 0, $6)",
                )
                .bind(id)
                .bind(i as i64)
                .bind(&n.instance_id)
                .bind(&n.endpoint)
                .bind(&step)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            }
            Ok(id)
        }

        pub(crate) async fn get(pool: &Pool<$db>, id: i64) -> Result<Option<Rollout>, StoreError> {
            let row: Option<RolloutRow> = sqlx::query_as(
                "SELECT id, env, service, version_id, previous_version_id, settings, phase, \
                 running, request, actor, created_ms, updated_ms, finished_ms, package_size \
                 FROM rollouts WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            row.map(rollout_from_row).transpose()
        }

        pub(crate) async fn list(
            pool: &Pool<$db>,
            running_only: bool,
            limit: u32,
        ) -> Result<Vec<Rollout>, StoreError> {
            let rows: Vec<RolloutRow> = sqlx::query_as(
                "SELECT id, env, service, version_id, previous_version_id, settings, phase, \
                 running, request, actor, created_ms, updated_ms, finished_ms, package_size \
                 FROM rollouts WHERE running >= $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(i64::from(running_only))
            .bind(i64::from(limit.max(1)))
            .fetch_all(pool)
            .await?;
            rows.into_iter().map(rollout_from_row).collect()
        }

        pub(crate) async fn nodes(
            pool: &Pool<$db>,
            id: i64,
        ) -> Result<Vec<RolloutNode>, StoreError> {
            let rows: Vec<(i64, String, String, String, i64, i64)> = sqlx::query_as(
                "SELECT idx, instance_id, endpoint, step, attempts, updated_ms \
                 FROM rollout_nodes WHERE rollout_id = $1 ORDER BY idx",
            )
            .bind(id)
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(RolloutNode {
                        idx: r.0,
                        instance_id: r.1,
                        endpoint: r.2,
                        step: serde_json::from_str(&r.3)?,
                        attempts: r.4,
                        updated_at: from_millis(r.5),
                    })
                })
                .collect()
        }

        /// The nodes of the latest rollout of every (env, service) — the running one, else
        /// the newest — in one query.
        pub(crate) async fn latest_nodes(
            pool: &Pool<$db>,
        ) -> Result<Vec<crate::rollouts::LatestRolloutNode>, StoreError> {
            let rows: Vec<(i64, String, String, i64, String, String, String)> = sqlx::query_as(
                "SELECT r.id, r.env, r.service, r.running, n.instance_id, n.endpoint, n.step \
                 FROM rollouts r JOIN rollout_nodes n ON n.rollout_id = r.id \
                 WHERE r.id IN (SELECT COALESCE(MAX(CASE WHEN running = 1 THEN id END), \
                 MAX(id)) FROM rollouts GROUP BY env, service) \
                 ORDER BY r.id, n.idx",
            )
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    Ok(crate::rollouts::LatestRolloutNode {
                        rollout_id: r.0,
                        env: r.1,
                        service: r.2,
                        running: r.3 != 0,
                        instance_id: r.4,
                        endpoint: r.5,
                        step: serde_json::from_str(&r.6)?,
                    })
                })
                .collect()
        }

        pub(crate) async fn package(
            pool: &Pool<$db>,
            id: i64,
        ) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, StoreError> {
            Ok(sqlx::query_as(
                "SELECT package, signature FROM rollout_packages WHERE rollout_id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?)
        }

        /// Records a node's step (`attempt`: counts one more update attempt); false when
        /// there is no such node.
        pub(crate) async fn set_step(
            tx: &mut Tx<'_>,
            id: i64,
            idx: i64,
            step: &serde_json::Value,
            attempt: bool,
        ) -> Result<bool, StoreError> {
            let n = sqlx::query(
                "UPDATE rollout_nodes SET step = $1, attempts = attempts + $2, updated_ms = $3 \
                 WHERE rollout_id = $4 AND idx = $5",
            )
            .bind(serde_json::to_string(step)?)
            .bind(i64::from(attempt))
            .bind(now_ms())
            .bind(id)
            .bind(idx)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(n > 0)
        }

        /// Moves a rollout to `phase`; `running: false` finishes it. `clear_request`: the
        /// coordinator has acted on the pending request.
        pub(crate) async fn set_phase(
            tx: &mut Tx<'_>,
            id: i64,
            phase: &str,
            running: bool,
            clear_request: bool,
        ) -> Result<bool, StoreError> {
            let now = now_ms();
            let n = sqlx::query(
                "UPDATE rollouts SET phase = $1, running = $2, updated_ms = $3, \
                 finished_ms = CASE WHEN $2 = 0 THEN $3 ELSE NULL END, \
                 request = CASE WHEN $4 = 1 THEN NULL ELSE request END WHERE id = $5",
            )
            .bind(phase)
            .bind(i64::from(running))
            .bind(now)
            .bind(i64::from(clear_request))
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(n > 0)
        }

        /// Records a person's request on a running rollout; false when it is not running.
        pub(crate) async fn request(
            tx: &mut Tx<'_>,
            id: i64,
            request: &str,
        ) -> Result<bool, StoreError> {
            let n = sqlx::query(
                "UPDATE rollouts SET request = $1, updated_ms = $2 WHERE id = $3 AND running = 1",
            )
            .bind(request)
            .bind(now_ms())
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(n > 0)
        }

        /// Starts a finished rollout again in `phase` with the given node steps; `Conflict`
        /// when another rollout of the service runs.
        pub(crate) async fn restart(
            tx: &mut Tx<'_>,
            id: i64,
            phase: &str,
            steps: &[(i64, serde_json::Value)],
        ) -> Result<bool, StoreError> {
            let have: Option<(String, String)> =
                sqlx::query_as("SELECT env, service FROM rollouts WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?;
            let Some((env, service)) = have else {
                return Ok(false);
            };
            if let Some(other) = running_of(tx, &env, &service, id).await? {
                return Err(conflict(other, &env, &service));
            }
            for (idx, step) in steps {
                set_step(tx, id, *idx, step, false).await?;
            }
            sqlx::query(
                "UPDATE rollouts SET phase = $1, running = 1, request = NULL, \
                 finished_ms = NULL, updated_ms = $2 WHERE id = $3",
            )
            .bind(phase)
            .bind(now_ms())
            .bind(id)
            .execute(&mut **tx)
            .await?;
            Ok(true)
        }
    };
}
pub(crate) use rollout_ops;
