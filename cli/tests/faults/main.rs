//! Real faults around the binary: SIGKILL mid-ingest, full disks (tmpfs), damaged data dirs,
//! Redis killed, restarted empty or poisoned, strict budgets through outages.

#![allow(clippy::unwrap_used)]

mod crash;
mod faults;
mod fleet_crash;
mod redis_faults;
mod strict;
