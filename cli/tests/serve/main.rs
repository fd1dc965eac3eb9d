//! The HTTP sidecar (`provider-budgets serve`) as a child process: routes, errors,
//! idempotency, reservations, identities, runtime budgets and paging, limits, signals.

#![allow(clippy::unwrap_used)]

mod api;
mod batch;
mod budgets;
mod deploy;
mod edge;
mod identity;
mod logs;
mod page;
mod priced;
mod templates;
mod units;
mod webhooks;
