//! Errors: one enum per layer, plus [`Error`] for everything `Limiter::open` and friends return.
//!
//! "Your input is wrong" ([`ConfigError`](crate::ConfigError), [`MoneyError`](crate::MoneyError),
//! [`RecordError::NoBudget`]) is kept apart from "storage is damaged or busy"
//! ([`StoreError`](crate::StoreError)). Being over budget is not an error: `filter` returns the
//! survivors, and [`NoDeployments`](crate::NoDeployments) when none is left. Every error renders
//! as one line that names the culprit.

use crate::config::ConfigError;
use crate::store::StoreError;

/// Why a `record` was refused. Nothing was counted when this is returned, except for
/// [`RecordError::Storage`] from a durable record: the spend is counted and will be retried,
/// only its durability could not be confirmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The provider has no budget configured, so there is nothing to count it against.
    #[error("provider {provider:?} has no budget configured")]
    NoBudget {
        /// The provider as given.
        provider: String,
    },
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
    #[error("{0}")]
    Replication(String),
    /// A reload was refused (`Limiter::reload`); the running configuration is unchanged.
    #[error("reload: {0}")]
    Reload(String),
}
