//! The HTTP sidecar (`provider-budgets serve`) as a child process: routes, errors,
//! idempotency, reservations, identities, limits, signals.

#![allow(clippy::unwrap_used)]

mod api;
mod deploy;
mod edge;
mod identity;
mod logs;
mod page;
