//! Errors: each layer keeps its own enum in its folder ([`ConfigError`](crate::ConfigError) in
//! `config/error.rs`, [`StoreError`](crate::StoreError) in `durable/error.rs`, the wire's in
//! `replicate/wire`, [`MoneyError`](crate::MoneyError) and [`PeriodError`](crate::PeriodError)
//! in `model`); this file holds [`Error`] for everything `Limiter::open` and friends return,
//! [`RecordError`], and [`ReplicationError`] (here because it exists without the `redis`
//! feature too).
//!
//! "Your input is wrong" ([`ConfigError`](crate::ConfigError), [`MoneyError`](crate::MoneyError),
//! [`RecordError::Expired`]) is kept apart from "storage is damaged or busy"
//! ([`StoreError`](crate::StoreError)). Being over budget is not an error: `filter` returns the
//! survivors, and [`NoDeployments`](crate::NoDeployments) when none is left. Every error renders
//! as one line that names the culprit.

use crate::config::ConfigError;
use crate::durable::error::StoreError;

/// Why a spend (`Limiter::charge`) was refused. Nothing was counted when this is returned,
/// except for [`RecordError::Storage`] from a waited `Receipt`: the spend is counted and
/// will be retried, only its durability could not be confirmed.
///
/// A spend that no budget applies to is not an error: its `Receipt` counts 0 budgets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The record's window ended longer ago than `storage.retention`: it is no longer kept,
    /// so the spend could not be enforced nor stored. Nothing was counted.
    #[error("record for provider {provider:?} at {at} is in a window that ended more than the retention ({retention}) ago; not counted")]
    Expired {
        /// The provider as given.
        provider: String,
        /// The record's timestamp.
        at: jiff::Timestamp,
        /// The configured retention, human readable.
        retention: String,
    },
    /// The record's timestamp is later than the clock plus [`MAX_FUTURE_SKEW`](crate::MAX_FUTURE_SKEW):
    /// each distinct future window would be kept and replicated. Nothing was
    /// counted.
    #[error("record for {provider:?} at {at} is later than the latest accepted time {limit} (now plus {skew}); not counted")]
    Future {
        /// The provider (or model) as given.
        provider: String,
        /// The record's timestamp.
        at: jiff::Timestamp,
        /// The latest timestamp accepted when it was refused.
        limit: jiff::Timestamp,
        /// The allowed skew, human readable.
        skew: String,
    },
    /// A spend given as token usage names a model without a price, and `pricing.unpriced`
    /// is `deny`. Nothing was counted.
    #[error("{0} (pricing.unpriced: deny); not counted")]
    Unpriced(#[from] crate::pricing::Unpriced),
    /// The limiter was shut down.
    #[error("the limiter is shut down")]
    Closed,
    /// The journal could not make the record durable (it stays queued and is retried).
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data dir is unusable or damaged.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// A record was refused.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A background thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Replication with Redis failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// A reload was refused (`Limiter::reload`); the running configuration is unchanged.
    #[error("reload: {0}")]
    Reload(String),
}

/// Why a replication round (or replication as a whole) failed. Every variant renders as one
/// line; a Redis URL in it is always redacted (`redis://:***@host:port/`).
///
/// A round that fails leaves nothing half-done that matters: only absolute totals travel, so
/// the next successful round ships everything. Problems of single keys (a poisoned field, a
/// key of the wrong type) are not errors of the round: they are reported per budget in
/// [`BudgetStatus::replication_problem`](crate::BudgetStatus::replication_problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// No Redis is configured.
    #[error("no Redis configured (pass --redis URL or set provider_budgets.redis.url)")]
    NotConfigured,
    /// Redis is configured but this build has no `redis` feature.
    #[error("Redis is configured but this build has no `redis` feature")]
    NotBuilt,
    /// The Redis URL cannot be parsed.
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS settings cannot be used (an unreadable CA file, one without certificates).
    #[error("redis TLS: {what}: {reason}")]
    Tls {
        /// The setting, e.g. `provider_budgets.redis.tls.ca_file /etc/ca.pem`.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection could be established (refused, DNS, authentication, ...).
    #[error("redis: cannot connect to {url}: {reason}")]
    Unreachable {
        /// The URL, redacted.
        url: String,
        /// Why, as reported by the client library (redacted).
        reason: String,
    },
    /// Redis did not answer within the configured timeout.
    #[error("redis: no answer from {url} within {after}")]
    Timeout {
        /// The URL, redacted.
        url: String,
        /// The timeout, human readable.
        after: String,
    },
    /// Another live instance (another data dir) holds this node id's lease in Redis: two
    /// data dirs share one node id. The node id's field was not written; this data dir's
    /// spend is kept apart in Redis under its own instance id, so the fleet total stays exact,
    /// but the configuration is wrong and must be fixed.
    #[error("duplicate node id {node_id:?}: another live data dir (instance {holder}) holds its lease in Redis; this one's spend is kept apart under its own instance id (nothing lost or doubled); give each data dir its own node_id")]
    DuplicateNodeId {
        /// The node id both use.
        node_id: String,
        /// The other instance's id (from its data dir).
        holder: String,
    },
    /// Redis answered with an error or an unexpected reply for the whole round.
    #[error("{message}")]
    Protocol {
        /// One line, redacted.
        message: String,
    },
    /// The replicator thread is stopped (the limiter was shut down).
    #[error("replication is stopped")]
    Stopped,
}
