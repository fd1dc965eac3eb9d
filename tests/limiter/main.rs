//! The limiter on one node: money and windows through the API, filter and charge, scoped
//! budgets, identity budgets, live reload, runtime budgets, reservations, idempotency records,
//! litellm's documented behaviour.
//! No Redis.

#![allow(clippy::unwrap_used)]

mod adjust;
mod basics;
mod cache;
mod estimates;
mod idempotency;
mod identity;
mod litellm_behaviour;
mod pricing;
mod reload;
mod reserve;
mod runtime;
mod scopes;
mod sliding;
mod templates;
mod units;
mod units_model;
