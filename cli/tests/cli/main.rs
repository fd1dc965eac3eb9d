//! The `provider-budgets` command line, run as a child process: every subcommand (runtime
//! budgets too), config errors, time zones, litellm config forms.

#![allow(clippy::unwrap_used)]

mod budgets;
mod charge;
mod commands;
mod config_errors;
mod litellm_scopes;
mod price;
mod zones;
