//! Helpers shared by the workspace's tests, benches and examples (the crate
//! `provider-budgets-test-support`, a dev-dependency of the library and of the CLI crate).
//!
//! * [`redis_server`]: private `redis-server` processes (standalone, Cluster, TLS) on free
//!   loopback ports, to kill, restart, FLUSHALL or poison;
//! * [`proxy`]: a TCP proxy that can delay, cut or blackhole a connection;
//! * [`tmpfs`]: a small tmpfs for disk-full tests;
//! * [`child`]: a child process fed on stdin and SIGKILLed;
//! * [`cli`]: the `provider-budgets` binary with a config file and a data dir;
//! * [`fuzz_checks`]: the checks the fuzz targets run, replayed over the committed corpus;
//! * [`open`]: a limiter on a fake clock, a config from YAML.

#![allow(
    clippy::unwrap_used,
    clippy::missing_errors_doc,
    missing_debug_implementations
)]

pub mod child;
pub mod cli;
pub mod fuzz_checks;
pub mod open;
pub mod proxy;
pub mod redis_server;
pub mod tmpfs;
