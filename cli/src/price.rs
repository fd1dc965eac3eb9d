//! `provider-budgets price MODEL --input-tokens N --output-tokens M [--cache-read-tokens N]
//! [--cache-creation-tokens N] [--reasoning-tokens N] [--config FILE]`: the cost of one call
//! and the catalog entry it was priced with, so an operator can check a price.
//!
//! It reads no data dir, so it runs without the global `--config`/`--data-dir`
//! (`provider-budgets price gpt-4o …`: the builtin catalog, unpriced models refused), with
//! its own `--config FILE`, or after the global flags (`provider-budgets --config F price …`).
//! The config's `provider_budgets.pricing` applies (catalog, overrides, unpriced policy).
//!
//! Exit codes as the rest of the CLI: `2` a usage error (a bad flag value, cached tokens
//! exceeding the input), `1` a bad config or catalog file, or an unpriced model under
//! `unpriced: deny`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use provider_budgets::{Catalog, Config, PriceSource, Priced, Usage};

/// The flags of `price`.
#[derive(Debug, clap::Args)]
pub(crate) struct PriceArgs {
    /// The model as a router names it (`gpt-4o`, `openai/gpt-4o`, `claude-sonnet-4-5`).
    #[arg(value_name = "MODEL")]
    model: String,
    /// Prompt tokens, cached ones included (litellm's `prompt_tokens`).
    #[arg(long, value_name = "N")]
    input_tokens: u64,
    /// Completion tokens, reasoning ones included (litellm's `completion_tokens`).
    #[arg(long, value_name = "N")]
    output_tokens: u64,
    /// Prompt tokens read from the provider's cache (part of --input-tokens).
    #[arg(long, value_name = "N", default_value_t = 0)]
    cache_read_tokens: u64,
    /// Prompt tokens written to the provider's cache (part of --input-tokens).
    #[arg(long, value_name = "N", default_value_t = 0)]
    cache_creation_tokens: u64,
    /// Reasoning tokens (part of --output-tokens).
    #[arg(long, value_name = "N", default_value_t = 0)]
    reasoning_tokens: u64,
    /// Config file whose `provider_budgets.pricing` applies (default: the global --config,
    /// else `PROVIDER_BUDGETS_CONFIG`, else the builtin catalog with unpriced models refused).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// `price` run on its own: `provider-budgets price …` without the global flags.
#[derive(Debug, clap::Parser)]
#[command(
    name = "provider-budgets price",
    about = "Print the cost of one call and the catalog entry that priced it"
)]
struct Standalone {
    #[command(flatten)]
    args: PriceArgs,
}

/// When this process was started as `provider-budgets price …`, runs it and returns the exit
/// code; `None` for every other command line (the main parser takes it). `usage_error` reports
/// a flag clap refused as the rest of the CLI does (passed in: `cli` depends on this module,
/// not the reverse).
pub(crate) fn standalone(usage_error: fn(&clap::Error) -> ExitCode) -> Option<ExitCode> {
    let mut argv = std::env::args_os().skip(1);
    if argv.next()? != "price" {
        return None;
    }
    let name = OsString::from("provider-budgets price");
    let parsed = <Standalone as clap::Parser>::try_parse_from(std::iter::once(name).chain(argv));
    Some(match parsed {
        Err(e) => usage_error(&e),
        Ok(s) => {
            // An empty variable counts as unset, as for the global flags.
            let from_env = std::env::var_os("PROVIDER_BUDGETS_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from);
            match run(&s.args, from_env.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err((code, message)) => {
                    eprintln!("error: {message}");
                    ExitCode::from(code)
                }
            }
        }
    })
}

/// Prices the call; `Err((exit code, one-line message))`.
pub(crate) fn run(args: &PriceArgs, config: Option<&Path>) -> Result<(), (u8, String)> {
    let usage = usage(args).map_err(|m| (2, m))?;
    let config_path = args.config.as_deref().or(config);
    let pricing = match config_path {
        Some(path) => {
            Config::from_path(path)
                .map_err(|e| (1, format!("{}: {e}", path.display())))?
                .pricing
        }
        None => provider_budgets::Pricing::default(),
    };
    let catalog = Catalog::load(&pricing).map_err(|e| (1, e.to_string()))?;
    let priced = catalog.price(&args.model, &usage).map_err(|e| {
        let policy = match config_path {
            Some(p) => format!(
                "provider_budgets.pricing.unpriced of {} is deny",
                p.display()
            ),
            None => "no --config: unpriced models are refused".to_owned(),
        };
        (1, format!("{e} ({}; {policy})", describe_origin(&catalog)))
    })?;
    print!("{}", report(args, &usage, &catalog, &priced));
    Ok(())
}

/// The usage the flags give, refused when a part exceeds its whole (a typo, most likely:
/// litellm would silently bill the cached tokens only).
fn usage(a: &PriceArgs) -> Result<Usage, String> {
    let cached = a.cache_read_tokens.saturating_add(a.cache_creation_tokens);
    if cached > a.input_tokens {
        return Err(format!(
            "--cache-read-tokens {} + --cache-creation-tokens {} exceed --input-tokens {} (the input counts the cached tokens)",
            a.cache_read_tokens, a.cache_creation_tokens, a.input_tokens
        ));
    }
    if a.reasoning_tokens > a.output_tokens {
        return Err(format!(
            "--reasoning-tokens {} exceed --output-tokens {} (the output counts the reasoning tokens)",
            a.reasoning_tokens, a.output_tokens
        ));
    }
    Ok(Usage::new(a.input_tokens, a.output_tokens)
        .cache_read(a.cache_read_tokens)
        .cache_creation(a.cache_creation_tokens)
        .reasoning(a.reasoning_tokens))
}

fn describe_origin(catalog: &Catalog) -> String {
    match catalog.origin() {
        "builtin" => format!(
            "builtin catalog of litellm {}",
            provider_budgets::BUILTIN_CATALOG_LITELLM_VERSION
        ),
        path => format!("catalog {path}"),
    }
}

/// `name: value` lines: the model, what priced it, the tier, the prices, the tokens, the cost.
fn report(args: &PriceArgs, usage: &Usage, catalog: &Catalog, p: &Priced) -> String {
    let origin = describe_origin(catalog);
    let entry = match &p.source {
        PriceSource::Catalog { key } => format!("catalog key {key:?} ({origin})"),
        PriceSource::Override { key } => {
            format!("override {key:?} (provider_budgets.pricing.overrides)")
        }
        PriceSource::UnpricedDefault(u) => {
            format!("unpriced ({}): pricing.default_per_mtok", u.reason)
        }
        PriceSource::UnpricedZero(u) => format!("unpriced ({}): zero (allow_zero)", u.reason),
        other => format!("{other:?}"),
    };
    let tier = match p.tier {
        Some(t) => format!("above {t} input tokens"),
        None => "base".to_owned(),
    };
    let r = &p.rates;
    let uncached = usage
        .input_tokens
        .saturating_sub(usage.cache_read_tokens + usage.cache_creation_tokens);
    format!(
        "model: {}\nentry: {entry}\ntier: {tier}\nusd_per_mtok: input {}, output {}, cache_read {}, cache_creation {}, reasoning {}\ntokens: uncached_input {uncached}, cache_read {}, cache_creation {}, non_reasoning_output {}, reasoning {}\ncost: {} USD\n",
        args.model,
        r.input.per_mtok(),
        r.output.per_mtok(),
        r.cache_read.per_mtok(),
        r.cache_creation.per_mtok(),
        r.reasoning.per_mtok(),
        usage.cache_read_tokens,
        usage.cache_creation_tokens,
        usage.output_tokens - usage.reasoning_tokens,
        usage.reasoning_tokens,
        p.cost,
    )
}
