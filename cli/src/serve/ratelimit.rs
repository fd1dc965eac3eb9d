//! The `RateLimit-Policy` and `RateLimit` headers of a 429 (IETF draft
//! `draft-ietf-httpapi-ratelimit-headers`), one list item per refusing budget, beside
//! `Retry-After`:
//!
//! ```text
//! RateLimit-Policy: "deployment:gpt4o-east:1m:tokens";q=100000;qu="tokens";w=60
//! RateLimit: "deployment:gpt4o-east:1m:tokens";r=0;t=42
//! ```
//!
//! * the item's name is the budget: `scope:name:period:unit` (a Structured Field string:
//!   characters outside printable ASCII become `_`, `"` and `\` are escaped);
//! * `q` is the limit and `r` what is left of it, in the budget's unit: tokens, requests,
//!   slots, and **nano-dollars** for USD budgets (`qu="usd-nanos"`): Structured Field
//!   integers are whole numbers of at most 15 digits, so values are capped at 10^15 − 1;
//! * `qu`: `tokens`, `input_tokens`, `output_tokens`, `requests` (the draft's own unit),
//!   `concurrent-requests` (the draft's own unit), `usd-nanos`;
//! * `w`: the window's length in seconds (absent for a concurrent budget, which has none);
//! * `t`: seconds until the budget may admit again (as `Retry-After` for that budget).

use axum::http::{HeaderMap, HeaderValue};
use jiff::Timestamp;
use provider_budgets::{Exceeded, Unit};

/// The largest Structured Field integer.
const SF_MAX: u64 = 999_999_999_999_999;

/// The draft's quota unit of a budget unit.
fn quota_unit(unit: Unit) -> &'static str {
    match unit {
        Unit::Usd => "usd-nanos",
        Unit::Requests => "requests",
        Unit::Concurrent => "concurrent-requests",
        other => other.as_str(),
    }
}

/// The budget's name as a Structured Field string (quoted).
fn sf_name(e: &Exceeded) -> String {
    let text = match e.unit {
        Unit::Concurrent => format!("{}:{}:concurrent", e.scope, e.name),
        Unit::Usd => format!("{}:{}:{}", e.scope, e.name, e.period),
        unit => format!("{}:{}:{}:{unit}", e.scope, e.name, e.period),
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// Adds both headers for `exceeded`, each budget's `t` from `retry_at(e)`.
pub(super) fn insert(
    headers: &mut HeaderMap,
    exceeded: &[Exceeded],
    now: Timestamp,
    retry_at: impl Fn(&Exceeded) -> Timestamp,
) {
    if exceeded.is_empty() {
        return;
    }
    let mut policy = Vec::with_capacity(exceeded.len());
    let mut state = Vec::with_capacity(exceeded.len());
    for e in exceeded {
        let name = sf_name(e);
        let q = e.limit.as_nanos().min(SF_MAX);
        let mut item = format!("{name};q={q};qu=\"{}\"", quota_unit(e.unit));
        if e.unit != Unit::Concurrent {
            let w = e.resets_at.duration_since(e.window_start).as_secs().max(1);
            item.push_str(&format!(";w={w}"));
        }
        policy.push(item);
        let left = match e.grant {
            Some(_) => 0,
            None => e.limit.as_nanos().saturating_sub(e.spend.as_nanos()),
        };
        let nanos = u128::try_from(retry_at(e).duration_since(now).as_nanos()).unwrap_or(0);
        let t = u64::try_from(nanos.div_ceil(1_000_000_000)).unwrap_or(SF_MAX);
        state.push(format!("{name};r={};t={}", left.min(SF_MAX), t.min(SF_MAX)));
    }
    for (header, items) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(v) = HeaderValue::from_str(&items.join(", ")) {
            headers.insert(header, v);
        }
    }
}
