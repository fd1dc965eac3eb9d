//! `provider-budgets`: the command line of the provider-budgets crate. See
//! `provider-budgets --help`; the logic lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    provider_budgets::cli::run()
}
