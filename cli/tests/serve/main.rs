//! The HTTP sidecar (`provider-budgets serve`) as a child process: routes, errors,
//! idempotency, reservations, limits, signals.

#![allow(clippy::unwrap_used)]

mod api;
mod deploy;
mod edge;
mod logs;
mod page;
