//! Loading a litellm price catalog (`model_prices_and_context_window.json`) and looking a
//! model up in it.
//!
//! Only what prices tokens is kept per entry: `litellm_provider`, the five per-token prices
//! (`input_cost_per_token`, `output_cost_per_token`, `cache_read_input_token_cost`,
//! `cache_creation_input_token_cost`, `output_cost_per_reasoning_token`) and the context
//! tiers of the first four (`…_above_128k_tokens`, `…_above_200k_tokens`, any
//! `_above_N[k]_tokens` without a further suffix). Every other key is skipped unread. Prices
//! are read from the JSON number's text ([`serde_json::value::RawValue`]), never as `f64`.

use std::borrow::Cow;
use std::fmt;

use rustc_hash::FxHashMap;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::price::{Rate, Rates, Usage};

/// The per-token prices of the base rate or of one context tier, each as given (or not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Given {
    pub(crate) input: Option<Rate>,
    pub(crate) output: Option<Rate>,
    pub(crate) cache_read: Option<Rate>,
    pub(crate) cache_creation: Option<Rate>,
}

impl Given {
    /// This tier's prices where it has them, `below`'s elsewhere.
    fn over(self, below: Given) -> Given {
        Given {
            input: self.input.or(below.input),
            output: self.output.or(below.output),
            cache_read: self.cache_read.or(below.cache_read),
            cache_creation: self.cache_creation.or(below.cache_creation),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Given::default()
    }
}

/// One model's prices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    /// `litellm_provider`, if given.
    pub(crate) provider: Option<String>,
    pub(crate) base: Given,
    pub(crate) reasoning: Option<Rate>,
    /// Context tiers: (prompt tokens above which it applies, its prices), ascending.
    pub(crate) tiers: Vec<(u64, Given)>,
    /// The most output tokens of one call (`max_output_tokens`, else `max_tokens`): what a
    /// reservation estimate assumes when the request sets no `max_tokens`.
    pub(crate) max_output: Option<u64>,
    /// The entry has a `tiered_pricing` table (prices by prompt-size range, which litellm
    /// bills instead of the flat prices): not supported, so the entry is unpriced rather
    /// than billed at its flat price, which may be the cheapest tier.
    pub(crate) tier_table: bool,
}

impl Entry {
    /// Whether the entry prices tokens at all (image, audio-second or per-query models
    /// do not: those are unpriced here rather than free).
    pub(crate) fn prices_tokens(&self) -> bool {
        (self.base.input.is_some() || self.base.output.is_some()) && !self.tier_table
    }

    /// Prices litellm fills in for one provider before pricing: a Fireworks entry without a
    /// cache-read price reads the cache at half the input price
    /// (`FIREWORKS_AI_DEFAULT_CACHE_READ_RATE_RATIO`), tiers included.
    fn provider_defaults(&mut self) {
        if self.provider.as_deref() == Some("fireworks_ai") && self.base.cache_read.is_none() {
            self.base.cache_read = self.base.input.map(Rate::half);
        }
    }

    /// The rates `usage` is billed at, and the tier threshold used (if any).
    ///
    /// As litellm's `_get_token_base_cost`: every tier whose threshold the prompt exceeds
    /// (`input_tokens > threshold`; `>=` for the `xai` provider) overrides the prices it
    /// gives, in ascending order, so the highest tier reached wins and falls back to lower
    /// ones for prices it lacks. Then an absent input or output price is zero, an absent
    /// cache price is the (tiered) input price, an absent reasoning price the (tiered)
    /// output price.
    pub(crate) fn rates(&self, usage: &Usage) -> (Rates, Option<u64>) {
        let inclusive = self.provider.as_deref() == Some("xai");
        let mut given = self.base;
        let mut tier = None;
        for (threshold, prices) in &self.tiers {
            let reached =
                usage.input_tokens > *threshold || (inclusive && usage.input_tokens == *threshold);
            if reached {
                given = prices.over(given);
                tier = Some(*threshold);
            }
        }
        let input = given.input.unwrap_or(Rate::ZERO);
        let output = given.output.unwrap_or(Rate::ZERO);
        let mut rates = Rates::flat(input);
        rates.output = output;
        rates.cache_read = given.cache_read.unwrap_or(input);
        rates.cache_creation = given.cache_creation.unwrap_or(input);
        rates.reasoning = self.reasoning.unwrap_or(output);
        (rates, tier)
    }
}

/// The four tiered price kinds, by key prefix.
const TIERED: [&str; 4] = [
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
];

/// Which price a catalog key gives: `(kind, tier threshold)`, kind indexing [`TIERED`] or 4
/// for reasoning; `None` for every other key.
fn price_key(key: &str) -> Option<(usize, Option<u64>)> {
    if key == "output_cost_per_reasoning_token" {
        return Some((4, None));
    }
    let (kind, rest) = TIERED
        .iter()
        .enumerate()
        .find_map(|(i, p)| key.strip_prefix(p).map(|rest| (i, rest)))?;
    if rest.is_empty() {
        return Some((kind, None));
    }
    // `_above_128k_tokens` or `_above_1000_tokens`, nothing after (`_priority`, `_batches`
    // and the like are service tiers and batch prices, which we do not price).
    let n = rest.strip_prefix("_above_")?.strip_suffix("_tokens")?;
    let (digits, scale) = match n.strip_suffix('k') {
        Some(d) => (d, 1000),
        None => (n, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let threshold = digits.parse::<u64>().ok()?.checked_mul(scale)?;
    Some((kind, Some(threshold)))
}

/// A key that may or may not borrow from the input.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A price value: the JSON number's text parsed exactly. `null` is no price (as litellm
/// reads it); anything but a number is an error naming the key.
struct Price(Option<Rate>);

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Price, D::Error> {
        use serde::de::Error;
        let raw = <&'de RawValue>::deserialize(d)?;
        let text = raw.get();
        if text == "null" {
            return Ok(Price(None));
        }
        if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            return Err(D::Error::custom(format!(
                "expected a number (USD per token), got {}",
                super::shorten(text)
            )));
        }
        Rate::parse_per_token(text)
            .map(|r| Price(Some(r)))
            .map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of a model's prices")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
                let mut entry = Entry::default();
                let mut tiers: Vec<(u64, Given)> = Vec::new();
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    if key == "litellm_provider" {
                        entry.provider = map.next_value::<Option<String>>()?;
                        continue;
                    }
                    if key == "tiered_pricing" {
                        entry.tier_table = !map.next_value::<serde_json::Value>()?.is_null();
                        continue;
                    }
                    if key == "max_output_tokens" || key == "max_tokens" {
                        // A count, or anything else (litellm has strings and nulls here):
                        // only a whole number is kept; `max_output_tokens` wins.
                        let n = map.next_value::<serde_json::Value>()?.as_u64();
                        if key == "max_output_tokens" || entry.max_output.is_none() {
                            entry.max_output = n.or(entry.max_output);
                        }
                        continue;
                    }
                    let Some((kind, threshold)) = price_key(&key) else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    let Price(rate) = map.next_value::<Price>()?;
                    let given = match threshold {
                        None => &mut entry.base,
                        Some(t) => {
                            let i = match tiers.iter().position(|(x, _)| *x == t) {
                                Some(i) => i,
                                None => {
                                    tiers.push((t, Given::default()));
                                    tiers.len() - 1
                                }
                            };
                            &mut tiers[i].1
                        }
                    };
                    set(given, &mut entry.reasoning, kind, rate);
                }
                tiers.retain(|(_, g)| !g.is_empty());
                tiers.sort_by_key(|(t, _)| *t);
                entry.tiers = tiers;
                entry.provider_defaults();
                Ok(entry)
            }
        }
        d.deserialize_map(V)
    }
}

/// Stores `rate` as price `kind` (see [`price_key`]).
fn set(given: &mut Given, reasoning: &mut Option<Rate>, kind: usize, rate: Option<Rate>) {
    match kind {
        0 => given.input = rate,
        1 => given.output = rate,
        2 => given.cache_read = rate,
        3 => given.cache_creation = rate,
        _ => *reasoning = rate,
    }
}

/// The catalog's entries by key, and its keys by their lowercase form (litellm looks a model
/// up case-insensitively when the exact key misses).
#[derive(Debug, Default)]
pub(crate) struct Table {
    entries: FxHashMap<String, Entry>,
    lower: FxHashMap<String, String>,
}

impl<'de> Deserialize<'de> for Table {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Table, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Table;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of model names to their prices")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Table, A::Error> {
                let mut entries = FxHashMap::default();
                entries.reserve(map.size_hint().unwrap_or(5000));
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    // litellm's documentation of the format, not a model.
                    if key == "sample_spec" {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    let entry = map.next_value::<Entry>()?;
                    // A key given twice: the last wins, as Python's `json` reads it.
                    entries.insert(key.into_owned(), entry);
                }
                Ok(Table::new(entries))
            }
        }
        d.deserialize_map(V)
    }
}

impl Table {
    pub(crate) fn new(entries: FxHashMap<String, Entry>) -> Table {
        let mut lower: FxHashMap<String, String> = FxHashMap::default();
        lower.reserve(entries.len());
        for key in entries.keys() {
            // Two keys equal but for case: the smaller one, so the choice is deterministic.
            let slot = lower
                .entry(key.to_lowercase())
                .or_insert_with(|| key.clone());
            if key < slot {
                slot.clone_from(key);
            }
        }
        Table { entries, lower }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry of exactly `key`.
    pub(crate) fn get(&self, key: &str) -> Option<(&str, &Entry)> {
        self.entries
            .get_key_value(key)
            .map(|(k, e)| (k.as_str(), e))
    }

    /// The entry of `name`: exactly; as `provider/model` the bare `model` of that provider;
    /// then case-insensitively. See [`provider_matches`].
    pub(crate) fn find(&self, name: &str) -> Option<(&str, &Entry)> {
        if let Some(hit) = self.get(name) {
            return Some(hit);
        }
        if let Some((provider, bare)) = name.split_once('/') {
            let hit = self.get(bare).or_else(|| self.get_ignoring_case(bare));
            if let Some((k, e)) = hit {
                if provider_matches(provider, e.provider.as_deref()) {
                    return Some((k, e));
                }
            }
        }
        self.get_ignoring_case(name)
    }

    fn get_ignoring_case(&self, name: &str) -> Option<(&str, &Entry)> {
        let key = self.lower.get(&name.to_lowercase())?;
        self.get(key)
    }
}

/// Whether a model asked for as `provider/…` may use an entry of `entry_provider`, as
/// litellm's `_check_provider_match`: the same provider; an entry without one; `vertex_ai`,
/// `fireworks_ai` and `bedrock*` families; `azure_ai` using `azure` or `openai` entries;
/// `litellm_proxy`, `github` and `nadir` using any.
pub(crate) fn provider_matches(provider: &str, entry_provider: Option<&str>) -> bool {
    let Some(entry) = entry_provider else {
        return true;
    };
    entry == provider
        || (provider == "vertex_ai" || provider == "fireworks_ai") && entry.starts_with(provider)
        || provider.starts_with("bedrock") && entry.starts_with("bedrock")
        || provider == "azure_ai" && (entry == "azure" || entry == "openai")
        || matches!(provider, "litellm_proxy" | "github" | "nadir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_keys() {
        assert_eq!(price_key("input_cost_per_token"), Some((0, None)));
        assert_eq!(
            price_key("output_cost_per_token_above_200k_tokens"),
            Some((1, Some(200_000)))
        );
        assert_eq!(
            price_key("cache_read_input_token_cost_above_128_tokens"),
            Some((2, Some(128)))
        );
        assert_eq!(
            price_key("output_cost_per_reasoning_token"),
            Some((4, None))
        );
        for other in [
            "input_cost_per_token_priority",
            "input_cost_per_token_above_272k_tokens_priority",
            "input_cost_per_token_batches",
            "cache_creation_input_token_cost_above_1hr",
            "cache_creation_input_token_cost_above_1hr_above_200k_tokens",
            "input_cost_per_token_above_k_tokens",
            "input_cost_per_character",
            "mode",
        ] {
            assert_eq!(price_key(other), None, "{other}");
        }
    }

    #[test]
    fn tiers_and_defaults() {
        let t: Table = serde_json::from_str(
            r#"{"m": {"litellm_provider": "p", "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6, "cache_read_input_token_cost": 1e-7,
                "input_cost_per_token_above_200k_tokens": 3e-6,
                "output_cost_per_token_above_128k_tokens": 4e-6,
                "mode": "chat", "supports_vision": true, "x": {"y": [1, 2]}}}"#,
        )
        .unwrap();
        let (_, e) = t.find("m").unwrap();
        let mtok = |s: &str| Rate::parse_per_mtok(s).unwrap();
        let (r, tier) = e.rates(&Usage::new(128_000, 0));
        assert_eq!(tier, None);
        assert_eq!(
            (r.input, r.output, r.cache_read),
            (mtok("1"), mtok("2"), mtok("0.1"))
        );
        assert_eq!((r.cache_creation, r.reasoning), (mtok("1"), mtok("2")));
        let (r, tier) = e.rates(&Usage::new(128_001, 0));
        assert_eq!(tier, Some(128_000));
        assert_eq!((r.input, r.output), (mtok("1"), mtok("4")));
        let (r, tier) = e.rates(&Usage::new(200_001, 0));
        assert_eq!(tier, Some(200_000));
        // The 200k tier has no output price: the 128k tier's stands; no cache-creation price:
        // the tier's input price.
        assert_eq!((r.input, r.output), (mtok("3"), mtok("4")));
        assert_eq!((r.cache_read, r.cache_creation), (mtok("0.1"), mtok("3")));
    }

    #[test]
    fn lookup_forms() {
        let t: Table = serde_json::from_str(
            r#"{"gpt-4o": {"litellm_provider": "openai", "input_cost_per_token": 1e-6},
                "azure/gpt-4o": {"litellm_provider": "azure", "input_cost_per_token": 2e-6},
                "gemini-pro": {"litellm_provider": "vertex_ai-language-models"},
                "sample_spec": {"input_cost_per_token": "not a number"}}"#,
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.find("gpt-4o").unwrap().0, "gpt-4o");
        assert_eq!(t.find("openai/gpt-4o").unwrap().0, "gpt-4o");
        assert_eq!(t.find("azure/gpt-4o").unwrap().0, "azure/gpt-4o");
        assert_eq!(t.find("azure_ai/gpt-4o").unwrap().0, "gpt-4o");
        assert_eq!(t.find("GPT-4o").unwrap().0, "gpt-4o");
        assert_eq!(t.find("vertex_ai/gemini-pro").unwrap().0, "gemini-pro");
        assert!(t.find("anthropic/gpt-4o").is_none());
        assert!(t.find("gpt-5").is_none());
    }
}
