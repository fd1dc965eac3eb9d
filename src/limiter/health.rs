//! [`Health`]: what a health check needs to know about a limiter.

use crate::limiter::status::ReplicationStatus;

/// Health of a limiter's storage and replication.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The current storage fault (a full disk, an I/O error, a dead journal): while set,
    /// records are counted in memory but not durable. `None` when storage works.
    pub storage_fault: Option<String>,
    /// Whether the journal thread runs (false after shutdown or when it died).
    pub journal_running: bool,
    /// Replication state.
    pub replication: ReplicationStatus,
    /// Reservations open on this node.
    pub open_reservations: usize,
}

impl Health {
    /// Storage works and the journal runs.
    pub fn storage_ok(&self) -> bool {
        self.storage_fault.is_none() && self.journal_running
    }
}
