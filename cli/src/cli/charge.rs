//! `charge`: a spend by cost or by token usage (priced by the catalog when no cost is given),
//! and its answer.

use std::io::{self, Write};

use jiff::Timestamp;

use provider_budgets::{Limiter, Money, PriceSource, Spend, StatusQuery, Target, Unit, Usage};

use super::{sync_after_record, usage_failure, Failure, Outcome, Request};

/// `charge`'s token usage, priced when no cost is given.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(super) struct TokenArgs {
    /// Prompt tokens, cached ones included (litellm's `prompt_tokens`).
    #[arg(long, value_name = "N")]
    input_tokens: Option<u64>,
    /// Completion tokens, reasoning ones included (litellm's `completion_tokens`).
    #[arg(long, value_name = "N")]
    output_tokens: Option<u64>,
    /// Prompt tokens read from the provider's cache (part of --input-tokens).
    #[arg(long, value_name = "N")]
    cache_read_tokens: Option<u64>,
    /// Prompt tokens written to the provider's cache (part of --input-tokens).
    #[arg(long, value_name = "N")]
    cache_creation_tokens: Option<u64>,
    /// Reasoning tokens (part of --output-tokens).
    #[arg(long, value_name = "N")]
    reasoning_tokens: Option<u64>,
}

impl TokenArgs {
    /// The usage, if any token count is given; parts larger than their whole are a usage
    /// error (exit 2), as for `price`.
    pub(super) fn usage(&self) -> Result<Option<Usage>, Failure> {
        let t = *self;
        if t.input_tokens.is_none() && t.output_tokens.is_none() {
            if t.cache_read_tokens.is_some()
                || t.cache_creation_tokens.is_some()
                || t.reasoning_tokens.is_some()
            {
                return Err(usage_failure(
                    "give --input-tokens and --output-tokens with the cache or reasoning tokens",
                ));
            }
            return Ok(None);
        }
        let (input, output) = (t.input_tokens.unwrap_or(0), t.output_tokens.unwrap_or(0));
        let (read, created) = (
            t.cache_read_tokens.unwrap_or(0),
            t.cache_creation_tokens.unwrap_or(0),
        );
        let reasoning = t.reasoning_tokens.unwrap_or(0);
        if read.saturating_add(created) > input {
            return Err(usage_failure(format!(
                "--cache-read-tokens {read} + --cache-creation-tokens {created} exceed --input-tokens {input} (the input counts the cached tokens)"
            )));
        }
        if reasoning > output {
            return Err(usage_failure(format!(
                "--reasoning-tokens {reasoning} exceed --output-tokens {output} (the output counts the reasoning tokens)"
            )));
        }
        Ok(Some(
            Usage::new(input, output)
                .cache_read(read)
                .cache_creation(created)
                .reasoning(reasoning),
        ))
    }
}

/// What priced a charge given as tokens, in a few words.
fn describe(source: &PriceSource) -> String {
    match source {
        PriceSource::Catalog { key } => format!("catalog key {key:?}"),
        PriceSource::Override { key } => format!("override {key:?}"),
        PriceSource::UnpricedDefault(u) => format!("{u}: pricing.default_per_mtok"),
        PriceSource::UnpricedZero(u) => format!("{u}: zero (allow_zero)"),
        other => format!("{other:?}"),
    }
}

/// `charge`: a cost, or token usage priced by the catalog (`(cost, usage)`, one at least;
/// a given cost wins). Its first line says what was counted, and for usage how it was priced
/// (`priced: true`, a catalog entry or an override; `priced: false`, an unpriced model under
/// `allow_zero` or `default`).
pub(super) fn charge(
    limiter: &Limiter,
    deployment: &str,
    (cost, usage): (Option<Money>, Option<Usage>),
    (tags, identity): Request<'_>,
    at: Option<Timestamp>,
    durable: bool,
    replicate: bool,
) -> Outcome {
    let target = Target::parse(deployment);
    let at = at.unwrap_or_else(|| limiter.now());
    let spend = match (cost, usage) {
        (Some(c), Some(u)) => Spend::deployment(&target, c).usage(u),
        (Some(c), None) => Spend::deployment(&target, c),
        (None, Some(u)) => Spend::deployment_usage(&target, u),
        (None, None) => return Err(usage_failure("give COST or --input-tokens/--output-tokens")),
    };
    let spend = spend.tags(tags).identity(identity);
    let receipt = limiter.charge(spend.at(at))?;
    let cost = receipt.cost();
    let how = match (usage, receipt.price_source()) {
        (None, _) => String::new(),
        (Some(_), None) => " (given; the tokens are not priced)".to_owned(),
        (Some(_), Some(source)) => format!(" (priced: {}, {})", receipt.priced(), describe(source)),
    };
    let uncounted = receipt.uncounted();
    let n = if durable {
        receipt.wait()?
    } else {
        receipt.budgets()
    };
    let synced = sync_after_record(limiter, replicate);
    let mut out = io::stdout().lock();
    writeln!(out, "charged {cost} USD to {n} budgets{how}")?;
    for u in &uncounted {
        writeln!(
            out,
            "  not counted in {} {} {} ({}): no token usage given (--input-tokens/--output-tokens)",
            u.scope, u.name, u.period, u.unit
        )?;
    }
    let query = StatusQuery::deployment(&target)
        .tags(tags)
        .identity(identity);
    for s in limiter.status(query.at(at)) {
        let unit = match s.unit {
            Unit::Usd => "USD".to_owned(),
            u => u.to_string(),
        };
        writeln!(
            out,
            "  {} {} {} in window {} .. {}: spend {} of {} {unit}",
            s.scope,
            s.name,
            s.period,
            s.window.start(),
            s.window.end(),
            s.unit.format_amount(s.spend.as_nanos()),
            s.unit.format_amount(s.limit.as_nanos()),
        )?;
    }
    synced
}
