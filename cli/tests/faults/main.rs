//! Real faults around the binary: SIGKILL mid-ingest, SIGKILL of the sidecar between a
//! keyed spend's fsync and its answer, full disks (tmpfs), damaged data dirs, Redis killed,
//! restarted empty or poisoned, strict budgets through outages.

#![allow(clippy::unwrap_used)]

mod crash;
mod faults;
mod fleet_crash;
mod idempotency;
mod redis_faults;
mod strict;
