//! `provider-budgets`: the command line and the HTTP sidecar of the provider-budgets library.
//! See `provider-budgets --help`.
//!
//! * `cli`: the flags (clap) and one function per subcommand;
//! * `price`: `provider-budgets price MODEL …`, the cost of a call from its token usage;
//! * `budget`: `provider-budgets budget put|delete|get` (runtime budgets);
//! * `remote`: `status` asked of a running sidecar;
//! * `serve`: `provider-budgets serve`, the HTTP sidecar (axum on hyper, Prometheus metrics);
//! * `status_json`: the JSON document of `status --json` and `GET /v1/budgets`;
//! * `status_table`: the table of `status` and of `GET /` for `Accept: text/plain`.

// Unit tests may unwrap: a panic there is a test failure with a message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod budget;
mod cli;
mod price;
mod remote;
mod serve;
mod status_json;
mod status_table;

fn main() -> std::process::ExitCode {
    cli::run()
}
