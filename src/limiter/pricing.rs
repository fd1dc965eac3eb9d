//! The limiter's price catalog: what prices a spend given as token usage
//! ([`Spend::deployment_usage`](crate::Spend::deployment_usage)), [`Limiter::price`].
//!
//! When it is loaded (decision): at open when `provider_budgets.pricing` is configured (is not
//! the default section), so that a broken catalog file fails the open with its error; else
//! lazily, at the first price asked for. Loading the builtin catalog parses 3.5 MB of JSON
//! (~15 ms): a limiter that never prices (every spend given as a cost) never pays it.
//!
//! A reload loads the new catalog before anything changes and refuses the reload (the old
//! config and catalog keep running) when it cannot be loaded or, read from the same source
//! (`builtin` or the same path), has fewer than half the entries of the running one (a
//! truncated download). Another source is a new catalog, taken whatever its size. The new catalog is
//! swapped in with the config: a request prices with the old one or the new one, never fails
//! for the swap.
//!
//! Every unpriced model (whatever the policy) is counted in
//! `provider_budgets_unpriced_total{model, policy}` and logged (`warn`) once per model per
//! process: never a silent zero.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use rustc_hash::FxHashSet;

use crate::error::Error;
use crate::pricing::estimate::{self, EstimateInput, Estimated};
use crate::pricing::{Catalog, PriceSource, Priced, Pricing, Unpriced, Usage};
use crate::Limiter;

/// How many distinct unpriced models get their own log line and metric label; later ones
/// are labelled `_other` (model names come from clients: the label set must stay bounded).
const MAX_UNPRICED_MODELS: usize = 1000;

/// The loaded catalog (if loaded yet) and the unpriced models already reported.
#[derive(Debug, Default)]
pub(crate) struct Prices {
    catalog: ArcSwapOption<Catalog>,
    /// Serialises the lazy load (one parse, not one per concurrent first caller).
    loading: Mutex<()>,
    reported: Mutex<FxHashSet<String>>,
}

impl Prices {
    /// Loaded at once when `pricing` is configured, lazily otherwise (module docs).
    pub(crate) fn open(pricing: &Pricing) -> Result<Prices, Error> {
        let prices = Prices::default();
        if *pricing != Pricing::default() {
            let catalog = Catalog::load(pricing).map_err(pricing_error)?;
            prices.catalog.store(Some(Arc::new(catalog)));
        }
        Ok(prices)
    }

    /// The catalog, loading it from `pricing` on first use; `None` when that load failed
    /// (logged). Only the default section is loaded lazily (a configured one is loaded at
    /// open and by every reload), so its policy is `deny`: a failed load prices nothing.
    fn get(&self, pricing: &Pricing) -> Option<Arc<Catalog>> {
        if let Some(c) = self.catalog.load_full() {
            return Some(c);
        }
        let _once = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = self.catalog.load_full() {
            return Some(c);
        }
        match Catalog::load(pricing) {
            Ok(c) => {
                let c = Arc::new(c);
                self.catalog.store(Some(Arc::clone(&c)));
                Some(c)
            }
            Err(e) => {
                tracing::error!("{e}; every model is unpriced");
                None
            }
        }
    }

    /// The catalog a reload to `pricing` would run with, checked against the running one;
    /// `None`: nothing to load (not configured, and never loaded: stays lazy).
    pub(crate) fn prepare(&self, pricing: &Pricing) -> Result<Option<Arc<Catalog>>, Error> {
        let running = self.catalog.load_full();
        if running.is_none() && *pricing == Pricing::default() {
            return Ok(None);
        }
        let next = Catalog::load(pricing).map_err(|e| Error::Reload(e.to_string()))?;
        if let Some(old) = running {
            // Only the same source can shrink: switching from the builtin catalog to a file
            // of one's own models (or between files) is a new catalog, not a truncated one.
            if next.origin() == old.origin() && next.len() < old.len().div_ceil(2) {
                return Err(Error::Reload(format!(
                    "pricing: catalog {} has {} entries, fewer than half of the running one's {} (refused as truncated; the running catalog is kept)",
                    next.origin(),
                    next.len(),
                    old.len()
                )));
            }
        }
        Ok(Some(Arc::new(next)))
    }

    /// Installs a catalog [`Prices::prepare`] made.
    pub(crate) fn install(&self, catalog: Option<Arc<Catalog>>) {
        if let Some(c) = catalog {
            self.catalog.store(Some(c));
        }
    }

    /// Counts and (once per model) logs an unpriced model.
    fn report(&self, unpriced: &Unpriced, policy: &'static str) {
        let label = {
            let mut seen = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.contains(&unpriced.model) {
                Some(unpriced.model.clone())
            } else if seen.len() < MAX_UNPRICED_MODELS {
                seen.insert(unpriced.model.clone());
                tracing::warn!(
                    model = %unpriced.model,
                    policy,
                    "{unpriced}; pricing.unpriced: {policy} (logged once per model)"
                );
                Some(unpriced.model.clone())
            } else {
                None
            }
        };
        let model = label.unwrap_or_else(|| "_other".to_owned());
        metrics::counter!("provider_budgets_unpriced_total", "model" => model, "policy" => policy)
            .increment(1);
    }
}

fn pricing_error(e: crate::pricing::PricingError) -> Error {
    Error::Config(crate::config::ConfigError::Invalid {
        key: "provider_budgets.pricing.catalog",
        message: e.to_string(),
    })
}

impl Limiter {
    /// The cost of `usage` on `model` by the running catalog, its overrides and the
    /// `pricing.unpriced` policy (see [`Catalog::price`]). Loads the catalog on first use
    /// when `pricing` is not configured. An unpriced model is counted in
    /// `provider_budgets_unpriced_total{model, policy}` and logged once per model, under
    /// every policy.
    ///
    /// # Errors
    ///
    /// [`Unpriced`] when the model has no price and `pricing.unpriced` is `deny`.
    pub fn price(&self, model: &str, usage: &Usage) -> Result<Priced, Unpriced> {
        let config = self.inner.config.load();
        let result = match self.inner.prices.get(&config.pricing) {
            Some(catalog) => catalog.price(model, usage),
            None => Err(Unpriced {
                model: model.to_owned(),
                reason: crate::pricing::UnpricedReason::NotFound,
            }),
        };
        match &result {
            Err(u) => self.inner.prices.report(u, "deny"),
            Ok(Priced {
                source: PriceSource::UnpricedZero(u),
                ..
            }) => self.inner.prices.report(u, "allow_zero"),
            Ok(Priced {
                source: PriceSource::UnpricedDefault(u),
                ..
            }) => self.inner.prices.report(u, "default"),
            Ok(_) => {}
        }
        result
    }

    /// The estimate of a call to `model` made from its request (prompt and `max_tokens`:
    /// see the module `pricing::estimate` for how tokens are counted), priced as
    /// [`Limiter::price`] prices a usage (overrides and `pricing.unpriced` included).
    ///
    /// # Errors
    ///
    /// [`Unpriced`] when the model has no price and `pricing.unpriced` is `deny`.
    pub fn estimate(&self, model: &str, input: &EstimateInput) -> Result<Estimated, Unpriced> {
        let (prompt, counting) = estimate::prompt_tokens(model, &input.prompt);
        let config = self.inner.config.load();
        let catalog_max = self
            .inner
            .prices
            .get(&config.pricing)
            .and_then(|c| c.max_output_tokens(model));
        let output = estimate::output_tokens(input.max_tokens, catalog_max);
        let priced = self.price(model, &Usage::new(prompt, output))?;
        Ok(Estimated {
            estimate: estimate::estimate(priced.cost, prompt, output),
            counting,
            source: priced.source,
        })
    }
}
