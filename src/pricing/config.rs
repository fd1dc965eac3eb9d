//! `provider_budgets.pricing`: which catalog, negotiated prices, and what an unpriced model
//! costs. Parsed by the module `config` (`config/pricing.rs`) into these types.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::price::{Rate, Rates};

/// `provider_budgets.pricing`.
///
/// ```yaml
/// provider_budgets:
///   pricing:
///     catalog: builtin                  # or a path to a litellm-format JSON file
///     overrides:
///       gpt-4o: { input_per_mtok: "2.50", output_per_mtok: "10" }
///     unpriced: deny                    # or allow_zero, or default (with default_per_mtok)
///     default_per_mtok: { input_per_mtok: "5", output_per_mtok: "15" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Pricing {
    /// Where the prices come from. Default: the builtin catalog.
    pub catalog: CatalogSource,
    /// Negotiated prices by model name: they replace the catalog's entry of that name (and
    /// of every name that resolves to it) wholesale.
    pub overrides: BTreeMap<String, ModelPrices>,
    /// What a model without token prices costs. Default: [`UnpricedPolicy::Deny`].
    pub unpriced: UnpricedPolicy,
    /// The prices of [`UnpricedPolicy::Default`] (required with it, refused without it).
    pub default_per_mtok: Option<ModelPrices>,
}

/// `pricing.catalog`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CatalogSource {
    /// The catalog compiled into the library (litellm's, pinned: see
    /// [`BUILTIN_CATALOG_LITELLM_VERSION`](crate::BUILTIN_CATALOG_LITELLM_VERSION)).
    #[default]
    Builtin,
    /// A JSON file in litellm's `model_prices_and_context_window.json` format.
    Path(PathBuf),
}

/// `pricing.unpriced`: what pricing a model that has no token prices returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnpricedPolicy {
    /// `deny`: [`Catalog::price`](crate::Catalog::price) returns
    /// [`Unpriced`](crate::Unpriced). The default: a budget must not count an unknown cost
    /// as nothing without being told to.
    #[default]
    Deny,
    /// `allow_zero`: a cost of zero, marked [`PriceSource::UnpricedZero`](crate::PriceSource).
    AllowZero,
    /// `default`: priced at `pricing.default_per_mtok`, marked
    /// [`PriceSource::UnpricedDefault`](crate::PriceSource).
    Default,
}

impl std::str::FromStr for UnpricedPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<UnpricedPolicy, String> {
        match s {
            "deny" => Ok(UnpricedPolicy::Deny),
            "allow_zero" => Ok(UnpricedPolicy::AllowZero),
            "default" => Ok(UnpricedPolicy::Default),
            _ => Err("expected `deny`, `allow_zero` or `default`".into()),
        }
    }
}

/// One model's prices in USD per million tokens, as `pricing.overrides` and
/// `pricing.default_per_mtok` give them (`input_per_mtok`, `output_per_mtok`,
/// `cache_read_per_mtok`, `cache_creation_per_mtok`, `reasoning_per_mtok`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModelPrices {
    /// Uncached prompt tokens.
    pub input: Rate,
    /// Completion tokens.
    pub output: Rate,
    /// Cached prompt tokens read; `None`: the input price.
    pub cache_read: Option<Rate>,
    /// Cached prompt tokens written; `None`: the input price.
    pub cache_creation: Option<Rate>,
    /// Reasoning tokens; `None`: the output price.
    pub reasoning: Option<Rate>,
}

impl ModelPrices {
    /// `input` and `output` prices; the cache prices are the input price, reasoning the output
    /// price.
    pub const fn new(input: Rate, output: Rate) -> ModelPrices {
        ModelPrices {
            input,
            output,
            cache_read: None,
            cache_creation: None,
            reasoning: None,
        }
    }

    /// Every token kind at `rate` (`default_per_mtok: "5"`).
    pub const fn flat(rate: Rate) -> ModelPrices {
        ModelPrices::new(rate, rate)
    }

    /// The rates every call is billed at.
    pub fn rates(&self) -> Rates {
        let mut r = Rates::flat(self.input);
        r.output = self.output;
        r.cache_read = self.cache_read.unwrap_or(self.input);
        r.cache_creation = self.cache_creation.unwrap_or(self.input);
        r.reasoning = self.reasoning.unwrap_or(self.output);
        r
    }
}
