//! Provider resolution: which provider (and so which budget) a deployment belongs to.
//!
//! Order, first match wins:
//!
//! 1. an explicit provider ([`Target::provider`], or [`Deployment::provider`]);
//! 2. a `provider/model` prefix (`azure/gpt-4o` → `azure`), as in litellm model names;
//! 3. the built-in table of bare model prefixes, [`BUILTIN_PREFIXES`] (`gpt-4o` → `openai`);
//! 4. the config's `model_providers` (longest prefix wins).
//!
//! The built-in table comes before the config so that a well-known model cannot be moved to
//! another budget by accident; an explicit provider or a `provider/` prefix overrides both.
//!
//! A resolved provider without a budget passes the filter ([`Resolution::NoBudget`]); a
//! deployment that resolves to nothing is [`Resolution::Unknown`] and follows
//! `unknown_provider`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;

use crate::config::Config;

/// Bare model-name prefixes and their provider, checked in order.
pub const BUILTIN_PREFIXES: &[(&str, &str)] = &[
    ("gpt-", "openai"),
    ("chatgpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("text-embedding-", "openai"),
    ("dall-e", "openai"),
    ("whisper-", "openai"),
    ("tts-", "openai"),
    ("davinci", "openai"),
    ("babbage", "openai"),
    ("claude-", "anthropic"),
    ("gemini-", "gemini"),
    ("command-", "cohere"),
    ("mistral-", "mistral"),
    ("mixtral-", "mistral"),
    ("codestral-", "mistral"),
    ("open-mistral-", "mistral"),
    ("deepseek-", "deepseek"),
    ("grok-", "xai"),
];

/// Something `filter` can choose among: a model name, optionally with its provider.
pub trait Deployment {
    /// Model name, e.g. `gpt-4o` or `azure/gpt-4o`.
    fn model(&self) -> &str;
    /// The provider when the router knows it (litellm's `custom_llm_provider`).
    fn provider(&self) -> Option<&str> {
        None
    }
}

impl Deployment for str {
    fn model(&self) -> &str {
        self
    }
}

impl Deployment for String {
    fn model(&self) -> &str {
        self
    }
}

impl<T: Deployment + ?Sized> Deployment for &T {
    fn model(&self) -> &str {
        (**self).model()
    }
    fn provider(&self) -> Option<&str> {
        (**self).provider()
    }
}

/// A deployment with an explicit provider.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Model name.
    pub model: String,
    /// Provider, overriding every other rule when set.
    pub provider: Option<String>,
}

impl Target {
    /// A deployment of `model` on `provider`.
    pub fn new(model: impl Into<String>, provider: impl Into<String>) -> Target {
        Target {
            model: model.into(),
            provider: Some(provider.into()),
        }
    }
}

impl Deployment for Target {
    fn model(&self) -> &str {
        &self.model
    }
    fn provider(&self) -> Option<&str> {
        self.provider.as_deref()
    }
}

/// What a deployment resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// Its provider has this budget (index into the limiter's budgets).
    Budget(u32),
    /// Its provider is known but has no budget: it always passes.
    NoBudget,
    /// No rule matched.
    Unknown,
}

/// Entries kept in the model-name cache before it is cleared (bounds memory when callers
/// pass ever-new names).
const CACHE_LIMIT: usize = 4096;

/// The model-name cache: model → resolution.
pub(crate) type CacheMap = FxHashMap<Box<str>, Resolution>;
/// A loaded snapshot of the cache.
pub(crate) type CacheGuard = arc_swap::Guard<Arc<CacheMap>>;

/// Maps deployments to budgets. Immutable tables plus a copy-on-write cache of model names.
#[derive(Debug)]
pub(crate) struct Resolver {
    budgets: FxHashMap<String, u32>,
    overrides: Vec<(String, String)>,
    /// Model name (without explicit provider) → resolution. Reads are one atomic load;
    /// a miss resolves and publishes a new map (rare: deployment lists change rarely).
    cache: ArcSwap<CacheMap>,
}

impl Resolver {
    pub fn new(config: &Config) -> Resolver {
        let budgets = config
            .budgets
            .iter()
            .enumerate()
            .map(|(i, b)| (b.provider.clone(), i as u32))
            .collect();
        Resolver::with_budgets(config, budgets)
    }

    /// A resolver whose providers map to the given budget slots (reload).
    pub fn with_budgets(config: &Config, budgets: FxHashMap<String, u32>) -> Resolver {
        let mut overrides = config.model_providers.clone();
        overrides.sort_by_key(|o| std::cmp::Reverse(o.0.len()));
        Resolver {
            budgets,
            overrides,
            cache: ArcSwap::from_pointee(FxHashMap::default()),
        }
    }

    /// The budget of a provider name.
    #[inline]
    pub fn budget_of_provider(&self, provider: &str) -> Option<u32> {
        self.budgets.get(provider).copied()
    }

    fn of_provider(&self, provider: &str) -> Resolution {
        match self.budget_of_provider(provider) {
            Some(b) => Resolution::Budget(b),
            None => Resolution::NoBudget,
        }
    }

    /// The provider name a model resolves to, if any (no cache).
    pub fn provider_of_model<'a>(&'a self, model: &'a str) -> Option<&'a str> {
        if let Some((provider, rest)) = model.split_once('/') {
            if !provider.is_empty() && !rest.is_empty() {
                return Some(provider);
            }
        }
        if let Some((_, p)) = BUILTIN_PREFIXES
            .iter()
            .find(|(pre, _)| model.starts_with(pre))
        {
            return Some(p);
        }
        self.overrides
            .iter()
            .find(|(pre, _)| model.starts_with(pre.as_str()))
            .map(|(_, p)| p.as_str())
    }

    /// Resolves without touching the cache.
    pub fn resolve(&self, d: &(impl Deployment + ?Sized)) -> Resolution {
        if let Some(p) = d.provider() {
            return self.of_provider(p);
        }
        match self.provider_of_model(d.model()) {
            Some(p) => self.of_provider(p),
            None => Resolution::Unknown,
        }
    }

    /// Resolves through the cache: the request path's form.
    #[inline]
    pub fn resolve_cached(&self, d: &(impl Deployment + ?Sized)) -> Resolution {
        self.resolve_in(&self.cache(), d)
    }

    /// One load of the model-name cache, to resolve a whole deployment list with
    /// [`Resolver::resolve_in`] (an `ArcSwap` load per deployment was a fifth of `filter`).
    #[inline]
    pub fn cache(&self) -> CacheGuard {
        self.cache.load()
    }

    /// [`Resolver::resolve_cached`] with a cache loaded once by the caller.
    #[inline]
    pub fn resolve_in(&self, cache: &CacheMap, d: &(impl Deployment + ?Sized)) -> Resolution {
        if let Some(p) = d.provider() {
            return self.of_provider(p);
        }
        let model = d.model();
        if let Some(r) = cache.get(model) {
            return *r;
        }
        let r = self.resolve(d);
        self.cache.rcu(|old| {
            let mut map = if old.len() >= CACHE_LIMIT {
                FxHashMap::default()
            } else {
                (**old).clone()
            };
            map.insert(model.into(), r);
            Arc::new(map)
        });
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Money, Period};

    fn resolver() -> Resolver {
        let p: Period = "1d".parse().expect("period");
        let mut c = Config::new()
            .budget("openai", Money::from_nanos(1), p)
            .budget("azure", Money::from_nanos(1), p)
            .budget("together", Money::from_nanos(1), p);
        c.model_providers = vec![
            ("llama-".into(), "together".into()),
            ("llama-3-special".into(), "groq".into()),
        ];
        Resolver::new(&c)
    }

    #[test]
    fn precedence() {
        let r = resolver();
        assert_eq!(r.resolve("gpt-4o"), Resolution::Budget(0));
        assert_eq!(r.resolve("azure/gpt-4o"), Resolution::Budget(1));
        assert_eq!(
            r.resolve(&Target::new("gpt-4o", "azure")),
            Resolution::Budget(1)
        );
        assert_eq!(r.resolve("claude-3-5-sonnet"), Resolution::NoBudget);
        assert_eq!(r.resolve("llama-3-70b"), Resolution::Budget(2));
        assert_eq!(r.resolve("llama-3-special-1"), Resolution::NoBudget);
        assert_eq!(r.resolve("my-fine-tune"), Resolution::Unknown);
        assert_eq!(r.resolve("/gpt"), Resolution::Unknown);
        for m in ["gpt-4o", "azure/x", "nothing", "nothing"] {
            assert_eq!(r.resolve_cached(m), r.resolve(m));
        }
    }
}
