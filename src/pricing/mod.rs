//! The cost of a call from its token usage: an exact price catalog.
//!
//! A [`Catalog`] is litellm's `model_prices_and_context_window.json` (the builtin copy, pinned
//! to the litellm release the plugin is tested with, or a file), plus the negotiated prices and
//! the unpriced policy of `provider_budgets.pricing` ([`Pricing`]). [`Catalog::price`] looks a
//! model up as litellm does and returns the exact cost of a [`Usage`], rounded up to the
//! nano-dollar once per call ([`Priced`]), or [`Unpriced`]. Nothing here depends on a
//! [`Limiter`](crate::Limiter): the spend path calls it with the model and the usage it has.
//!
//! * `price`: exact per-token prices ([`Rate`], yocto-dollars per token) and the cost.
//! * `catalog`: loading the JSON (prices read from their decimal text) and the lookup table.
//! * `config`: the types of `provider_budgets.pricing`.
//!
//! Lookup, for each of the names `MODEL`, `MODEL` without an OpenAI fine-tune wrapper
//! (`ft:gpt-4o-mini:org::id` → `gpt-4o-mini`), `MODEL` without a dated snapshot suffix
//! (`-2024-08-06`), in that order: an override of that name, or of its bare model
//! (`provider/x` → `x`); the catalog's key of that name; as `provider/model`, the bare `model`'s
//! entry if its `litellm_provider` matches `provider`; a catalog key equal but for case. An
//! override of a catalog key applies to every name resolving to it. The first hit wins.
//! `docs/guide/pricing.md` lists where this differs from litellm.

mod catalog;
mod config;
pub(crate) mod estimate;
mod price;

use std::borrow::Cow;
use std::path::Path;

use rustc_hash::FxHashMap;

use crate::model::money::Money;
use catalog::Table;

pub use config::{CatalogSource, ModelPrices, Pricing, UnpricedPolicy};
pub use estimate::{
    Counting, EstimateInput, Estimated, Message, Prompt, DEFAULT_MAX_OUTPUT_TOKENS,
    NON_TEXT_PART_TOKENS,
};
pub use price::{Rate, RateError, Rates, Usage};

/// The litellm release the builtin catalog was copied from (`scripts/refresh_catalog.py`).
pub const BUILTIN_CATALOG_LITELLM_VERSION: &str = "1.110.2";
/// The SHA-256 of the builtin catalog's bytes (checked against `catalog.meta` by a test).
pub const BUILTIN_CATALOG_SHA256: &str =
    "8943af58bf9f979c6a4bef815687117ffa341e462a41faed9be17b5c33d3dcc2";
/// The builtin catalog, byte for byte as litellm ships it (MIT licence).
const BUILTIN_JSON: &str = include_str!("data/model_prices_and_context_window.json");

/// Why a catalog could not be loaded. One line, naming the file and the culprit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PricingError {
    /// The file could not be read.
    #[error("pricing: cannot read catalog {path}: {message}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        message: String,
    },
    /// Not a litellm price catalog: bad JSON, or a price that is not a non-negative number.
    #[error("pricing: catalog {origin}: {message}")]
    Malformed {
        /// The file, or `builtin`.
        origin: String,
        /// Where (`gpt-4o.input_cost_per_token`, or a line and column) and what is wrong.
        message: String,
    },
    /// `pricing.unpriced: default` without `pricing.default_per_mtok`.
    #[error("pricing: unpriced: default needs default_per_mtok")]
    NoDefaultPrices,
}

/// A model could not be priced: the value [`Catalog::price`] returns under
/// `pricing.unpriced: deny`, and what the other policies record in [`PriceSource`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model {model:?} is unpriced: {reason}")]
#[non_exhaustive]
pub struct Unpriced {
    /// The model as asked for.
    pub model: String,
    /// Why.
    pub reason: UnpricedReason,
}

/// Why a model is unpriced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnpricedReason {
    /// No override and no catalog entry matches it.
    #[error("no catalog entry or override matches it")]
    NotFound,
    /// Its catalog entry has no token prices (an image, audio-second or per-query model).
    #[error("catalog entry {key:?} has no per-token price")]
    NoTokenPrices {
        /// The catalog key that matched.
        key: String,
    },
    /// Its catalog entry prices tokens by a `tiered_pricing` table, which is not supported
    /// (its flat prices, if any, may be the cheapest tier's).
    #[error("catalog entry {key:?} has a tiered_pricing table (not supported; give an override)")]
    TieredTable {
        /// The catalog key that matched.
        key: String,
    },
}

/// Where the prices of a [`Priced`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PriceSource {
    /// The catalog entry of this key.
    Catalog {
        /// The key that matched.
        key: String,
    },
    /// `pricing.overrides` of this model name.
    Override {
        /// The override's model name.
        key: String,
    },
    /// Unpriced, billed at `pricing.default_per_mtok` (`pricing.unpriced: default`).
    UnpricedDefault(Unpriced),
    /// Unpriced, billed as zero (`pricing.unpriced: allow_zero`).
    UnpricedZero(Unpriced),
}

/// The cost of one call, and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Priced {
    /// The exact cost, rounded up to the nano-dollar.
    pub cost: Money,
    /// The entry, override or policy used.
    pub source: PriceSource,
    /// The rates billed (after the context tier).
    pub rates: Rates,
    /// The context tier used: billed at the `_above_N_tokens` prices of this N.
    pub tier: Option<u64>,
}

/// A price catalog with its overrides and unpriced policy. Cheap to query (a few hash
/// probes; it allocates the key it reports, and a lowercase copy of a name the exact lookups
/// miss); build it once (loading the builtin one parses 3.5 MB of JSON, see
/// `docs/performance.md`).
#[derive(Debug)]
pub struct Catalog {
    table: Table,
    origin: String,
    overrides: FxHashMap<String, Rates>,
    unpriced: Option<Rates>,
    policy: UnpricedPolicy,
}

impl Catalog {
    /// The builtin catalog, without overrides, unpriced models denied.
    ///
    /// # Errors
    ///
    /// [`PricingError::Malformed`] only if the compiled-in file were broken (a test checks it
    /// is not).
    pub fn builtin() -> Result<Catalog, PricingError> {
        Catalog::from_json_str(BUILTIN_JSON, "builtin")
    }

    /// A catalog read from a litellm-format JSON file.
    ///
    /// # Errors
    ///
    /// [`PricingError::Io`] when it cannot be read; [`PricingError::Malformed`] naming the
    /// file and the key or line at fault.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Catalog, PricingError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| PricingError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Catalog::from_json_str(&text, &path.display().to_string())
    }

    /// A catalog from JSON text; `origin` names it in errors and in [`Catalog::origin`].
    ///
    /// # Errors
    ///
    /// [`PricingError::Malformed`] naming `origin` and the key or line at fault.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Catalog, PricingError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let table: Table =
            serde_path_to_error::deserialize(&mut de).map_err(|e| malformed(origin, &e))?;
        de.end().map_err(|e| PricingError::Malformed {
            origin: origin.to_owned(),
            message: crate::model::text::one_line(&e.to_string()),
        })?;
        Ok(Catalog {
            table,
            origin: origin.to_owned(),
            overrides: FxHashMap::default(),
            unpriced: None,
            policy: UnpricedPolicy::Deny,
        })
    }

    /// The catalog `pricing` configures, with its overrides and unpriced policy. A relative
    /// `catalog` path is read relative to the working directory.
    ///
    /// # Errors
    ///
    /// As [`Catalog::from_path`]; [`PricingError::NoDefaultPrices`] for `unpriced: default`
    /// without `default_per_mtok` (config validation refuses that already).
    pub fn load(pricing: &Pricing) -> Result<Catalog, PricingError> {
        let catalog = match &pricing.catalog {
            CatalogSource::Builtin => Catalog::builtin()?,
            CatalogSource::Path(p) => Catalog::from_path(p)?,
        };
        catalog.with_pricing(pricing)
    }

    /// This catalog with `pricing`'s overrides and unpriced policy (its `catalog` is not read).
    ///
    /// # Errors
    ///
    /// [`PricingError::NoDefaultPrices`] for `unpriced: default` without `default_per_mtok`.
    pub fn with_pricing(mut self, pricing: &Pricing) -> Result<Catalog, PricingError> {
        self.overrides = pricing
            .overrides
            .iter()
            .map(|(model, p)| (model.clone(), p.rates()))
            .collect();
        self.policy = pricing.unpriced;
        self.unpriced = match (pricing.unpriced, &pricing.default_per_mtok) {
            (UnpricedPolicy::Default, None) => return Err(PricingError::NoDefaultPrices),
            (UnpricedPolicy::Default, Some(p)) => Some(p.rates()),
            (UnpricedPolicy::AllowZero, _) => Some(Rates::flat(Rate::ZERO)),
            (_, _) => None,
        };
        Ok(self)
    }

    /// `builtin` or the file it was read from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The number of catalog entries (overrides not counted).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the catalog has no entry.
    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }

    /// The cost of `usage` on `model` (see the module docs for the lookup).
    ///
    /// # Errors
    ///
    /// [`Unpriced`] when no override or catalog entry with token prices matches and the
    /// policy is `deny`; under `allow_zero` and `default` that is an `Ok` whose
    /// [`Priced::source`] says so.
    pub fn price(&self, model: &str, usage: &Usage) -> Result<Priced, Unpriced> {
        let mut reason = UnpricedReason::NotFound;
        for name in candidates(model) {
            if let Some((key, rates)) = self.override_of(&name) {
                return Ok(priced(rates, usage, PriceSource::Override { key }, None));
            }
            let Some((key, entry)) = self.table.find(&name) else {
                continue;
            };
            if let Some(rates) = self.overrides.get(key) {
                let source = PriceSource::Override {
                    key: key.to_owned(),
                };
                return Ok(priced(*rates, usage, source, None));
            }
            if entry.prices_tokens() {
                let (rates, tier) = entry.rates(usage);
                let source = PriceSource::Catalog {
                    key: key.to_owned(),
                };
                return Ok(priced(rates, usage, source, tier));
            }
            if reason == UnpricedReason::NotFound {
                let key = key.to_owned();
                reason = if entry.tier_table {
                    UnpricedReason::TieredTable { key }
                } else {
                    UnpricedReason::NoTokenPrices { key }
                };
            }
        }
        let unpriced = Unpriced {
            model: model.to_owned(),
            reason,
        };
        match (self.policy, self.unpriced) {
            (UnpricedPolicy::Default, Some(r)) => Ok(priced(
                r,
                usage,
                PriceSource::UnpricedDefault(unpriced),
                None,
            )),
            (UnpricedPolicy::AllowZero, Some(r)) => {
                Ok(priced(r, usage, PriceSource::UnpricedZero(unpriced), None))
            }
            _ => Err(unpriced),
        }
    }

    /// The most output tokens of one call of `model`, as its catalog entry says (looked up
    /// as [`Catalog::price`] looks it up); `None` when the catalog does not say.
    pub fn max_output_tokens(&self, model: &str) -> Option<u64> {
        candidates(model).find_map(|name| self.table.find(&name).and_then(|(_, e)| e.max_output))
    }

    /// The override of `name`, or of its bare model when it is `provider/model`.
    fn override_of(&self, name: &str) -> Option<(String, Rates)> {
        if self.overrides.is_empty() {
            return None;
        }
        let bare = name.split_once('/').map(|(_, b)| b);
        [Some(name), bare]
            .into_iter()
            .flatten()
            .find_map(|n| self.overrides.get(n).map(|r| (n.to_owned(), *r)))
    }
}

fn priced(rates: Rates, usage: &Usage, source: PriceSource, tier: Option<u64>) -> Priced {
    Priced {
        cost: rates.cost(usage),
        source,
        rates,
        tier,
    }
}

/// The names a model is looked up under, in order: as given, without an OpenAI fine-tune
/// wrapper, without a dated snapshot suffix (lazy but for the fine-tune check, which allocates
/// only for `ft:` names).
fn candidates(model: &str) -> impl Iterator<Item = Cow<'_, str>> {
    std::iter::once(Cow::Borrowed(model))
        .chain(strip_finetune(model).map(Cow::Owned))
        .chain(strip_dated(model).map(Cow::Borrowed))
}

/// `ft:gpt-4o-mini:org:suffix:id` → `gpt-4o-mini` (a provider prefix is kept:
/// `openai/ft:gpt-4o:…` → `openai/gpt-4o`).
fn strip_finetune(model: &str) -> Option<String> {
    let (prefix, rest) = match model.rsplit_once("/ft:") {
        Some((p, rest)) => (format!("{p}/"), rest),
        None => (String::new(), model.strip_prefix("ft:")?),
    };
    let base = rest.split(':').next().filter(|b| !b.is_empty())?;
    Some(format!("{prefix}{base}"))
}

/// `gpt-4o-2024-08-06` → `gpt-4o` (litellm's `-\d{4}-\d{2}-\d{2}$`).
fn strip_dated(model: &str) -> Option<&str> {
    let split = model.len().checked_sub(11)?;
    let (head, tail) = (model.get(..split)?, model.get(split..)?.as_bytes());
    let shape = b"-dddd-dd-dd";
    let fits = tail.iter().zip(shape).all(|(c, s)| {
        if *s == b'd' {
            c.is_ascii_digit()
        } else {
            c == s
        }
    });
    (fits && !head.is_empty()).then_some(head)
}

/// A serde error as [`PricingError::Malformed`]: the key path (if any) and the parser's words.
fn malformed(origin: &str, e: &serde_path_to_error::Error<serde_json::Error>) -> PricingError {
    let path = e.path().to_string();
    let message = crate::model::text::one_line(&e.inner().to_string());
    let message = if path == "." || path.is_empty() {
        message
    } else {
        format!("{}: {message}", shorten(&path))
    };
    PricingError::Malformed {
        origin: origin.to_owned(),
        message,
    }
}

/// At most 80 characters of `s` (a culprit quoted in an error), one line.
pub(crate) fn shorten(s: &str) -> String {
    let flat = crate::model::text::flat(s);
    match flat.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

#[cfg(test)]
mod tests;
