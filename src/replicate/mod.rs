//! Redis G-counter replication.
mod wire;
