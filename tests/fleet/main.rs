//! The fleet through Redis: replication rounds and their faults, Redis Cluster, TLS,
//! client-side tracking, soft limits once per fleet, identity budgets, runtime budgets, and the wire protocol
//! (the merge script) against a live server. Each test starts its own private `redis-server`s on free loopback
//! ports (`provider_budgets_test_support::redis_server`).

#![allow(clippy::unwrap_used)]

mod backlog;
mod cluster;
mod corrections;
mod eviction;
mod identity;
mod replication;
mod runtime;
mod sliding;
mod soft_fleet;
mod templates;
mod tls;
mod tracking;
mod units;
mod units_concurrent;
mod wire;
