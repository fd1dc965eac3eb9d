//! [`Limiter::health`]: what a health check reports.
//!
//! STUB (branch `serve`): storage-fault tracking is being added to the library in parallel;
//! this file only fixes the interface the sidecar codes against (`storage_fault` is always
//! `None` here). The merge replaces it with the real implementation.

use crate::limiter::Limiter;
use crate::status::ReplicationStatus;

/// The limiter's health: whether its store accepts writes, and the replication state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Health {
    /// Why the store cannot take writes (disk full, journal dead), `None` while it can.
    pub storage_fault: Option<String>,
    /// Whether the journal thread runs (false after shutdown or when it died).
    pub journal_running: bool,
    /// Replication state.
    pub replication: ReplicationStatus,
}

impl Health {
    /// Storage works and the journal runs.
    pub fn storage_ok(&self) -> bool {
        self.storage_fault.is_none() && self.journal_running
    }
}

impl Limiter {
    /// The limiter's health now.
    pub fn health(&self) -> Health {
        Health {
            storage_fault: None,
            journal_running: true,
            replication: self
                .status()
                .into_iter()
                .next()
                .map(|s| s.replication)
                .unwrap_or_default(),
        }
    }
}
