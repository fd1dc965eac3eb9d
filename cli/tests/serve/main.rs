//! The HTTP sidecar (`provider-budgets serve`) as a child process: routes, errors,
//! idempotency, reservations, runtime budgets and paging, limits, signals.

#![allow(clippy::unwrap_used)]

mod api;
mod budgets;
mod edge;
