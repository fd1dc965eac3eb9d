//! `"usage"` of `/v1/spend` and `/v1/commit`: a call's token counts, priced by the limiter's
//! catalog when no `"cost"` is given (a given cost wins; the usage is still accepted).
//!
//! Our names (`input_tokens`, `output_tokens`, `cache_read_tokens`, `cache_creation_tokens`,
//! `reasoning_tokens`), OpenAI's (`prompt_tokens`, `completion_tokens`, `total_tokens`
//! (ignored), `prompt_tokens_details.cached_tokens`,
//! `completion_tokens_details.reasoning_tokens`) and Anthropic's as litellm passes them on
//! (`cache_read_input_tokens`, `cache_creation_input_tokens`), so that litellm's `usage` can
//! be posted as it is. `input_tokens` / `prompt_tokens` count the whole prompt, cached tokens
//! included (see [`Usage`]).

use provider_budgets::{Money, PriceSource, Receipt, Usage};
use serde::Deserialize;

/// The body's `usage`. Unknown keys at its top are refused (a typo must not price as zero);
/// the `_details` objects take any others (OpenAI adds kinds such as `audio_tokens`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageIn {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_tokens: Option<u64>,
    cache_creation_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    #[allow(dead_code)] // accepted, not needed: the parts are given
    total_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
    cache_creation_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

/// The one value of a count given under several names (`None` when none is); names that
/// disagree are an error naming both.
fn one_of(names: &[(&str, Option<u64>)]) -> Result<Option<u64>, String> {
    let mut found: Option<(&str, u64)> = None;
    for (name, value) in names {
        let Some(v) = *value else { continue };
        match found {
            Some((first, w)) if w != v => {
                return Err(format!(
                    "usage: {first} ({w}) and {name} ({v}) disagree; give one"
                ))
            }
            Some(_) => {}
            None => found = Some((name, v)),
        }
    }
    Ok(found.map(|(_, v)| v))
}

impl UsageIn {
    /// The checked usage: a prompt or a completion count is required.
    pub(super) fn usage(&self) -> Result<Usage, String> {
        let prompt = self.prompt_tokens_details.as_ref();
        let completion = self.completion_tokens_details.as_ref();
        let input = one_of(&[
            ("input_tokens", self.input_tokens),
            ("prompt_tokens", self.prompt_tokens),
        ])?;
        let output = one_of(&[
            ("output_tokens", self.output_tokens),
            ("completion_tokens", self.completion_tokens),
        ])?;
        if input.is_none() && output.is_none() {
            return Err(
                "usage: give input_tokens and output_tokens (or prompt_tokens and completion_tokens)"
                    .into(),
            );
        }
        let cache_read = one_of(&[
            ("cache_read_tokens", self.cache_read_tokens),
            ("cache_read_input_tokens", self.cache_read_input_tokens),
            (
                "prompt_tokens_details.cached_tokens",
                prompt.and_then(|p| p.cached_tokens),
            ),
        ])?;
        let cache_creation = one_of(&[
            ("cache_creation_tokens", self.cache_creation_tokens),
            (
                "cache_creation_input_tokens",
                self.cache_creation_input_tokens,
            ),
            (
                "prompt_tokens_details.cache_creation_tokens",
                prompt.and_then(|p| p.cache_creation_tokens),
            ),
        ])?;
        let reasoning = one_of(&[
            ("reasoning_tokens", self.reasoning_tokens),
            (
                "completion_tokens_details.reasoning_tokens",
                completion.and_then(|c| c.reasoning_tokens),
            ),
        ])?;
        Ok(Usage::new(input.unwrap_or(0), output.unwrap_or(0))
            .cache_read(cache_read.unwrap_or(0))
            .cache_creation(cache_creation.unwrap_or(0))
            .reasoning(reasoning.unwrap_or(0)))
    }
}

/// Appends `usage` to a request's canonical encoding (idempotency fingerprint): `u` after a
/// given cost, `U` when the cost is to be priced (so that `cost: 0` with usage and usage
/// alone differ). Nothing for a request without usage: its encoding is what earlier versions
/// stored.
pub(super) fn encode(out: &mut Vec<u8>, usage: Option<&Usage>, cost_given: bool) {
    let Some(u) = usage else { return };
    out.push(if cost_given { b'u' } else { b'U' });
    for n in [
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens,
        u.cache_creation_tokens,
        u.reasoning_tokens,
    ] {
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// What a spend or commit counted, for its answer: `cost` (decimal USD), `cost_nanos`,
/// `priced` (the cost was priced from the usage by a catalog entry or override) and
/// `price_source` (`given`, `catalog`, `override`, `unpriced_zero`, `unpriced_default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counted {
    pub cost: Money,
    pub priced: bool,
    pub source: &'static str,
}

impl Counted {
    /// A cost the client gave.
    pub(crate) fn given(cost: Money) -> Counted {
        Counted {
            cost,
            priced: false,
            source: "given",
        }
    }

    /// What a receipt counted.
    pub(crate) fn of(receipt: &Receipt<'_>) -> Counted {
        Counted::priced(receipt.cost(), receipt.price_source())
    }

    /// `cost`, priced as `source` (`None`: given).
    pub(crate) fn priced(cost: Money, source: Option<&PriceSource>) -> Counted {
        let source = match source {
            None => "given",
            Some(PriceSource::Catalog { .. }) => "catalog",
            Some(PriceSource::Override { .. }) => "override",
            Some(PriceSource::UnpricedZero(_)) => "unpriced_zero",
            Some(PriceSource::UnpricedDefault(_)) => "unpriced_default",
            Some(_) => "unpriced",
        };
        Counted {
            cost,
            priced: matches!(source, "catalog" | "override"),
            source,
        }
    }

    /// Adds the fields to an answer.
    pub(crate) fn write(&self, body: &mut serde_json::Value) {
        body["cost"] = self.cost.to_string().into();
        body["cost_nanos"] = self.cost.as_nanos().into();
        body["priced"] = self.priced.into();
        body["price_source"] = self.source.into();
    }

    /// The fields of a commit with usage: as [`Counted::write`], so `cost` is the decimal
    /// string there too (a commit without usage keeps its JSON-number `cost`, as before).
    pub(crate) fn write_commit(&self, body: &mut serde_json::Value) {
        self.write(body);
    }
}

/// The `"uncounted"` entries of an answer: each budget that applied and could not count the
/// spend (`scope`, `name`, `period`, `unit`).
pub(crate) fn uncounted_json(receipt: &Receipt<'_>) -> Vec<serde_json::Value> {
    receipt
        .uncounted()
        .into_iter()
        .map(|u| {
            serde_json::json!({
                "scope": u.scope.as_str(),
                "name": u.name,
                "period": u.period,
                "unit": u.unit.as_str(),
            })
        })
        .collect()
}
