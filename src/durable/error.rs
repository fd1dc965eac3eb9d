//! [`StoreError`]: the durable layer's error (the data dir is unusable or its content damaged).

use std::path::PathBuf;

/// Storage failures: the data dir is unusable or its content damaged. Distinct from bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (or another `Limiter` in this one) has the data dir open.
    #[error("data dir {dir} is in use by another process (its lock is held)")]
    Locked {
        /// The data dir.
        dir: PathBuf,
    },
    /// An I/O error (a full disk, a read-only file system, ...), or sled failed internally.
    #[error("storage error in {dir}: {message}")]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// What failed, one line.
        message: String,
    },
    /// A stored key or value cannot be decoded, or the data dir lost spend that was
    /// acknowledged as durable (`tree` is then `high-water`: sled holds less than the
    /// high-water record says was made durable; `reason` names what is missing). Run
    /// `provider-budgets repair`.
    #[error("corrupt {tree} entry {key}: {reason}")]
    Corrupt {
        /// Which tree (`own`, `peers`, `meta`).
        tree: &'static str,
        /// The key, rendered readably.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The data dir belongs to another node id than the one configured.
    #[error("data dir {dir} belongs to node id {stored:?}, but node id {configured:?} is configured; a data dir keeps its node id (use a fresh data dir for a new id, or configure {stored:?})")]
    NodeIdChanged {
        /// The data dir.
        dir: PathBuf,
        /// The id kept in the data dir.
        stored: String,
        /// The id in the config or on the command line.
        configured: String,
    },
    /// The journal thread is gone: nothing more can be made durable.
    #[error("the journal of {dir} stopped: {reason}")]
    JournalStopped {
        /// The data dir.
        dir: PathBuf,
        /// Why (a panic message, or "shut down").
        reason: String,
    },
}
