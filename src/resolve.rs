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

use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;

use crate::config::{Config, TEMPLATE_NAME};
use crate::model::budget::{model_part, Scope};
pub use crate::model::prefixes::BUILTIN_PREFIXES;
use crate::template::{Rule, Template};

/// Something `filter` can choose among: a model name, optionally with its provider and its
/// deployment id.
pub trait Deployment {
    /// Model name, e.g. `gpt-4o` or `azure/gpt-4o`.
    fn model(&self) -> &str;
    /// The provider when the router knows it (litellm's `custom_llm_provider`).
    fn provider(&self) -> Option<&str> {
        None
    }
    /// The deployment's id (litellm's `model_info.id`), for deployment budgets.
    fn id(&self) -> Option<&str> {
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
    fn id(&self) -> Option<&str> {
        (**self).id()
    }
}

/// A deployment with an explicit provider and/or id (build it with [`Target::new`],
/// [`Target::parse`] or [`Target::with_id`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Target {
    /// Model name.
    pub model: String,
    /// Provider, overriding every other rule when set.
    pub provider: Option<String>,
    /// Deployment id (litellm's `model_info.id`).
    pub id: Option<String>,
}

impl Target {
    /// A deployment of `model` on `provider`.
    pub fn new(model: impl Into<String>, provider: impl Into<String>) -> Target {
        Target {
            model: model.into(),
            provider: Some(provider.into()),
            id: None,
        }
    }

    /// A deployment of `model` (provider resolved from the name) with id `id`.
    pub fn with_id(id: impl Into<String>, model: impl Into<String>) -> Target {
        Target {
            model: model.into(),
            provider: None,
            id: Some(id.into()),
        }
    }

    /// A deployment from its three parts, each optional but the model (empty when only the
    /// provider is known: a spend or reservation named by provider).
    pub fn from_parts(
        model: impl Into<String>,
        provider: Option<String>,
        id: Option<String>,
    ) -> Target {
        Target {
            model: model.into(),
            provider,
            id,
        }
    }

    /// Parses the CLI form: `MODEL` or `ID=MODEL` (`gpt4o-east=openai/gpt-4o`).
    pub fn parse(text: &str) -> Target {
        match text.split_once('=') {
            Some((id, model)) if !id.is_empty() => Target::with_id(id, model),
            _ => Target {
                model: text.to_owned(),
                provider: None,
                id: None,
            },
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
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

/// What a deployment resolved to: the budget slots that apply to it, in up to three slices
/// borrowed from the resolver (no allocation), and whether its provider is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resolved<'a> {
    /// No provider could be determined (`unknown_provider` decides).
    pub unknown: bool,
    /// Budget slots: provider and model budgets (and the deployment's).
    pub slots: [&'a [u32]; 3],
    /// The same slots as a bit set (bit `b` for slot `b`) when every slot is below 128: the
    /// filter then checks a deployment with a few `u128` operations instead of a loop over
    /// its slots (see `filter::Memo::blocked_mask`). Set by the cache of
    /// [`Resolver::resolve_in`]; `None` elsewhere.
    pub mask: Option<u128>,
}

impl<'a> Resolved<'a> {
    /// Resolved slots without a bit set.
    pub fn new(unknown: bool, slots: [&'a [u32]; 3]) -> Resolved<'a> {
        Resolved {
            unknown,
            slots,
            mask: None,
        }
    }

    /// Every slot, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().flat_map(|s| s.iter().copied())
    }
}

/// A deployment's cached resolution: unknown provider, and the slots of its provider, model
/// and deployment budgets, concatenated (and as a bit set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cached {
    unknown: bool,
    /// Up to four slots inline (no pointer to chase on the request path), more in `spill`.
    len: u8,
    inline: [u32; 4],
    spill: Box<[u32]>,
    /// Every slot as a bit, when all are below 128.
    mask: Option<u128>,
    /// `mask` when the provider is known (`None` when unknown).
    known_mask: Option<u128>,
}

impl Cached {
    fn new(unknown: bool, slots: impl Iterator<Item = u32>) -> Cached {
        let all: Vec<u32> = slots.collect();
        let mut inline = [0; 4];
        let (len, spill) = if all.len() <= inline.len() {
            inline[..all.len()].copy_from_slice(&all);
            (all.len() as u8, Box::default())
        } else {
            (u8::MAX, all.clone().into_boxed_slice())
        };
        let mask = all
            .iter()
            .try_fold(0u128, |m, &b| (b < 128).then(|| m | 1u128 << b));
        Cached {
            unknown,
            len,
            inline,
            spill,
            mask,
            known_mask: mask.filter(|_| !unknown),
        }
    }

    #[inline]
    fn slots(&self) -> &[u32] {
        match self.inline.get(..usize::from(self.len)) {
            Some(s) => s,
            None => &self.spill,
        }
    }

    /// As a [`Resolved`] (borrowing the slots).
    #[inline]
    pub fn resolved(&self) -> Resolved<'_> {
        Resolved {
            unknown: self.unknown,
            slots: [self.slots(), &[], &[]],
            mask: self.mask,
        }
    }

    /// The slots as a bit set when the provider is known and every slot is below 128: the
    /// filter's fast path (`filter::Check::passes_in`) needs nothing else.
    #[inline]
    pub fn known_mask(&self) -> Option<u128> {
        self.known_mask
    }
}

/// Entries the published resolution cache holds at most (bounds memory and the cost of one
/// publish when callers pass ever-new names); see [`Resolver::note_misses`].
pub(crate) const CACHE_LIMIT: usize = 4096;

/// One entry of the resolution cache: a deployment's model name and id, owned, their hash
/// ([`key_hash`]) and their resolution.
///
/// Why a [`hashbrown::HashTable`] of these rather than a map with a `Hash` key: the request
/// path hashes the borrowed (model, id) once with [`key_hash`] and probes with a closure that
/// compares the stored hash before the names, inlined into the filter loop (the map's
/// generic `get` was a call per deployment plus a `Hash` walk over an `Option`).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    hash: u64,
    model: Box<str>,
    id: Option<Box<str>>,
    cached: Cached,
}

/// The hash of a (model, id) cache key: rustc-hash's string hash (for names of up to 16
/// bytes: the first and last 8 bytes and the length, one multiply) of the model, and of the
/// id when there is one. Collisions only cost a comparison: a hit also compares the names.
#[inline]
fn key_hash(model: &str, id: Option<&str>) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    h.write(model.as_bytes());
    if let Some(id) = id {
        h.write(id.as_bytes());
    }
    h.finish()
}

/// String equality without a `memcmp` call for names of up to 64 bytes (model names and
/// ids): 8-byte words, the last one overlapping. A call to libc's `memcmp` per compared name
/// was 7 % of the plain filter.
#[inline]
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    let half = |s: &[u8], at: usize| -> u32 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&s[at..at + 4]);
        u32::from_ne_bytes(w)
    };
    match n {
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        // Two overlapping 4-byte words (ids such as `dep-12`).
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=64 => {
            let mut at = 0;
            while at + 8 < n {
                if word(a, at) != word(b, at) {
                    return false;
                }
                at += 8;
            }
            word(a, n - 8) == word(b, n - 8)
        }
        _ => a == b,
    }
}

/// The resolution cache: (model, deployment id) → resolution.
pub(crate) type CacheMap = hashbrown::HashTable<Entry>;
/// A loaded snapshot of the cache.
pub(crate) type CacheGuard = arc_swap::Guard<Arc<CacheMap>>;

/// Scope name → budget slots, one map per scope.
pub(crate) type ScopeTables = [FxHashMap<Box<str>, Box<[u32]>>; Scope::COUNT];

/// Maps deployments and tags to budget slots. Immutable tables plus a copy-on-write cache of
/// model names.
#[derive(Debug)]
pub(crate) struct Resolver {
    tables: ScopeTables,
    /// Per identity scope (in the order of [`Scope::IDENTITY`]), its templates and the names
    /// that have series: a reload starts them empty (module `template`).
    templates: [Option<Box<Template>>; 5],
    /// Whether one of `templates` is set (read once per request with identities).
    any_template: bool,
    overrides: Vec<(String, String)>,
    /// `unknown_provider: deny`.
    pub deny_unknown: bool,
    /// (Model name, deployment id) of deployments without explicit provider → resolution.
    /// Reads are one atomic load; a miss resolves without it, and the misses are published
    /// in batches (see [`Resolver::note_misses`]).
    cache: ArcSwap<CacheMap>,
    /// Misses waiting to be published.
    pending: Mutex<Pending>,
    /// Entries the published map holds at most ([`CACHE_LIMIT`]; smaller in tests).
    cap: usize,
    /// Maps published since the resolver was made (a figure for tests).
    publishes: AtomicU64,
}

/// Misses noted since the last publish: how many (every occurrence counts, repeats
/// included) and their entries (at most the cap, possibly repeated).
#[derive(Debug, Default)]
struct Pending {
    misses: usize,
    entries: Vec<Entry>,
}

/// One call's cache misses, each resolved without the cache, handed to the resolver once
/// at the end of the call ([`Resolver::note_misses`]). Empty (nothing allocated) when every
/// deployment hit.
#[derive(Debug, Default)]
pub(crate) struct Misses {
    count: usize,
    entries: Vec<Entry>,
}

impl Misses {
    /// No miss noted.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The misses of one call that end up with the resolver when it is dropped (whatever way
/// the call returns): for the paths with several exits (`reserve`, `charge`).
#[derive(Debug)]
pub(crate) struct MissLog<'r> {
    resolver: &'r Resolver,
    pub misses: Misses,
}

impl<'r> MissLog<'r> {
    pub fn new(resolver: &'r Resolver) -> MissLog<'r> {
        MissLog {
            resolver,
            misses: Misses::default(),
        }
    }
}

impl Drop for MissLog<'_> {
    fn drop(&mut self) {
        if !self.misses.is_empty() {
            self.resolver.note_misses(std::mem::take(&mut self.misses));
        }
    }
}

impl Resolver {
    pub fn new(config: &Config) -> Resolver {
        let slots = config
            .budgets
            .iter()
            .enumerate()
            .map(|(i, b)| (b.scope, b.name.clone(), i as u32));
        Resolver::with_budgets(config, slots)
    }

    /// A resolver whose budgets map to the given slots (reload): (scope, name, slot).
    pub fn with_budgets(
        config: &Config,
        slots: impl IntoIterator<Item = (Scope, String, u32)>,
    ) -> Resolver {
        let mut grouped: [FxHashMap<Box<str>, Vec<u32>>; Scope::COUNT] =
            std::array::from_fn(|_| FxHashMap::default());
        let mut rules: [Vec<Rule>; 5] = Default::default();
        // The templates in the config's order, as `slots` lists them.
        let mut templates = config.budgets.iter().filter(|b| b.is_template());
        for (scope, name, slot) in slots {
            if let (Some(i), true) = (scope.identity_index(), name == TEMPLATE_NAME) {
                if let Some(budget) = templates.next() {
                    rules[i].push(Rule {
                        budget: budget.clone(),
                    });
                }
                continue;
            }
            grouped[scope.index()]
                .entry(name.into_boxed_str())
                .or_default()
                .push(slot);
        }
        let tables = grouped.map(|m| {
            m.into_iter()
                .map(|(k, v)| (k, v.into_boxed_slice()))
                .collect()
        });
        let mut overrides = config.model_providers.clone();
        overrides.sort_by_key(|o| std::cmp::Reverse(o.0.len()));
        let templates = rules.map(|r| (!r.is_empty()).then(|| Box::new(Template::new(r))));
        Resolver {
            tables,
            any_template: templates.iter().any(Option::is_some),
            templates,
            overrides,
            deny_unknown: config.unknown_provider == crate::config::UnknownProvider::Deny,
            cache: ArcSwap::from_pointee(CacheMap::new()),
            pending: Mutex::new(Pending::default()),
            cap: CACHE_LIMIT,
            publishes: AtomicU64::new(0),
        }
    }

    /// The same resolver with a smaller cache (tests: a working set larger than the cap).
    #[cfg(test)]
    pub fn with_cache_cap(mut self, cap: usize) -> Resolver {
        self.cap = cap.max(1);
        self
    }

    /// Maps published since the resolver was made, and the published map's size.
    pub fn cache_figures(&self) -> (u64, usize) {
        (
            self.publishes.load(Ordering::Relaxed),
            self.cache.load().len(),
        )
    }

    /// The slots of a scope name (empty when it has no budget).
    #[inline]
    pub fn slots(&self, scope: Scope, name: &str) -> &[u32] {
        let t = &self.tables[scope.index()];
        if t.is_empty() {
            return &[];
        }
        t.get(name).map_or(&[], |s| s)
    }

    /// The templates of an identity scope, if it has any.
    #[inline]
    pub fn template(&self, scope: Scope) -> Option<&Template> {
        self.templates[scope.identity_index()?].as_deref()
    }

    /// Whether any identity scope has a template.
    #[inline]
    pub fn has_templates(&self) -> bool {
        self.any_template
    }

    /// The slots of a provider's budgets.
    #[inline]
    pub fn provider_slots(&self, provider: &str) -> &[u32] {
        self.slots(Scope::Provider, provider)
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
    pub fn resolve<'a>(&'a self, d: &(impl Deployment + ?Sized)) -> Resolved<'a> {
        let provider = match d.provider() {
            Some(p) => Some(p),
            None => self.provider_of_model(d.model()),
        };
        Resolved::new(
            provider.is_none(),
            [
                provider.map_or(&[][..], |p| self.provider_slots(p)),
                self.slots(Scope::Model, model_part(d.model())),
                d.id()
                    .map_or(&[][..], |id| self.slots(Scope::Deployment, id)),
            ],
        )
    }

    /// One load of the model-name cache, to resolve a whole deployment list with
    /// [`Resolver::resolve_in`] (an `ArcSwap` load per deployment was a fifth of `filter`).
    #[inline]
    pub fn cache(&self) -> CacheGuard {
        self.cache.load()
    }

    /// The cached resolution of a deployment without explicit provider, if there is one: the
    /// request path's lookup (one hash of (model, id), one probe; nothing allocated). `None`
    /// for a deployment with an explicit provider (resolved without the cache) and on a miss.
    #[inline]
    pub fn cached<'c>(
        &self,
        cache: &'c CacheMap,
        d: &(impl Deployment + ?Sized),
    ) -> Option<&'c Cached> {
        if d.provider().is_some() {
            return None;
        }
        lookup(cache, d.model(), d.id())
    }

    /// Resolves through a cache loaded once by the caller, a miss without the cache (and
    /// without noting it: the error paths, which resolve a list a second time).
    #[inline]
    pub fn resolve_in<'a>(
        &'a self,
        cache: &'a CacheMap,
        d: &(impl Deployment + ?Sized),
    ) -> Resolved<'a> {
        if d.provider().is_some() {
            return self.resolve(d);
        }
        if let Some(c) = lookup(cache, d.model(), d.id()) {
            return c.resolved();
        }
        self.resolve(d)
    }

    /// [`Resolver::resolve_in`] that notes a miss in `misses` (to publish with
    /// [`Resolver::note_misses`] at the end of the call).
    #[inline]
    pub fn resolve_noting<'a>(
        &'a self,
        cache: &'a CacheMap,
        d: &(impl Deployment + ?Sized),
        misses: &mut Misses,
    ) -> Resolved<'a> {
        if d.provider().is_some() {
            return self.resolve(d);
        }
        if let Some(c) = lookup(cache, d.model(), d.id()) {
            return c.resolved();
        }
        self.resolve_miss(d, misses)
    }

    /// A cache miss: resolves without the cache and notes the entry (cold path; O(1), the
    /// name's resolution is a few prefix comparisons and hash lookups).
    #[cold]
    #[inline(never)]
    fn resolve_miss<'a>(
        &'a self,
        d: &(impl Deployment + ?Sized),
        misses: &mut Misses,
    ) -> Resolved<'a> {
        let r = self.resolve(d);
        misses.count += 1;
        if misses.entries.len() < self.cap {
            let (model, id) = (d.model(), d.id());
            misses.entries.push(Entry {
                hash: key_hash(model, id),
                model: model.into(),
                id: id.map(Into::into),
                cached: Cached::new(r.unknown, r.iter()),
            });
        }
        r
    }

    /// Takes one call's misses; publishes a new map once enough misses have been noted
    /// since the last publish: at least half the published map's size. A publish copies
    /// the map (≤ the cap) and adds the pending entries, so its cost is paid for by the
    /// misses that led to it: O(1) amortised per miss whatever the working set, and one
    /// call publishes at most once (≤ cap + its own misses).
    ///
    /// The map holds at most the cap: a publish that would pass it keeps at most half of
    /// the old entries (any half) and then the new ones, so a working set larger than the
    /// cap keeps most of it cached and still pays O(1) per miss. Nothing blocks: when
    /// another thread is noting or publishing, the call's misses are dropped (a deployment
    /// that is used again misses again and is noted then).
    #[cold]
    #[inline(never)]
    pub fn note_misses(&self, misses: Misses) {
        let mut pending = match self.pending.try_lock() {
            Ok(p) => p,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        pending.misses = pending.misses.saturating_add(misses.count);
        let room = self.cap.saturating_sub(pending.entries.len());
        pending
            .entries
            .extend(misses.entries.into_iter().take(room));
        let old = self.cache.load_full();
        if pending.misses < (old.len() / 2).max(1) {
            return;
        }
        let batch = std::mem::take(&mut *pending);
        self.cache
            .store(Arc::new(grown(&old, batch.entries, self.cap)));
        self.publishes.fetch_add(1, Ordering::Relaxed);
    }
}

/// `old` with `new` added (one entry per key), at most `cap` entries: when both do not fit,
/// at most half the cap of the old entries are kept, then the new ones.
fn grown(old: &CacheMap, new: Vec<Entry>, cap: usize) -> CacheMap {
    let mut map = if old.len() + new.len() <= cap {
        old.clone()
    } else {
        let keep = cap.saturating_sub(new.len()).min(cap / 2);
        let mut map = CacheMap::with_capacity(cap);
        for e in old.iter().take(keep) {
            map.insert_unique(e.hash, e.clone(), |e| e.hash);
        }
        map
    };
    for e in new {
        if map.len() >= cap {
            break;
        }
        if lookup(&map, &e.model, e.id.as_deref()).is_none() {
            map.insert_unique(e.hash, e, |e| e.hash);
        }
    }
    map
}

/// The entry of (model, id) in a loaded cache.
#[inline]
fn lookup<'c>(cache: &'c CacheMap, model: &str, id: Option<&str>) -> Option<&'c Cached> {
    let hash = key_hash(model, id);
    cache
        .find(hash, |e| {
            e.hash == hash
                && same(model, &e.model)
                && match (id, e.id.as_deref()) {
                    (Some(a), Some(b)) => same(a, b),
                    (a, b) => a.is_none() && b.is_none(),
                }
        })
        .map(|e| &e.cached)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BudgetConfig, Money, Period};

    fn resolver() -> Resolver {
        let p: Period = "1d".parse().expect("period");
        let mut c = Config::new()
            .budget("openai", Money::from_nanos(1), p)
            .budget("azure", Money::from_nanos(1), p)
            .budget("together", Money::from_nanos(1), p)
            .with_budget(BudgetConfig::new(
                Scope::Model,
                "gpt-4o",
                Money::from_nanos(1),
                p,
            ))
            .with_budget(BudgetConfig::new(
                Scope::Deployment,
                "east",
                Money::from_nanos(1),
                p,
            ))
            .with_budget(BudgetConfig::new(
                Scope::Tag,
                "team-a",
                Money::from_nanos(1),
                p,
            ));
        c.model_providers = vec![
            ("llama-".into(), "together".into()),
            ("llama-3-special".into(), "groq".into()),
        ];
        Resolver::new(&c)
    }

    fn slots(r: Resolved<'_>) -> (bool, Vec<u32>) {
        let mut v: Vec<u32> = r.iter().collect();
        v.sort_unstable();
        (r.unknown, v)
    }

    #[test]
    fn precedence_and_scopes() {
        let r = resolver();
        // Sorted: providers azure(0) openai(1) together(2), deployment east(3), model(4), tag(5).
        assert_eq!(slots(r.resolve("gpt-4o")), (false, vec![1, 4]));
        assert_eq!(slots(r.resolve("azure/gpt-4o")), (false, vec![0, 4]));
        assert_eq!(
            slots(r.resolve(&Target::new("gpt-4o", "azure"))),
            (false, vec![0, 4])
        );
        assert_eq!(
            slots(r.resolve(&Target::with_id("east", "azure/gpt-4o-mini"))),
            (false, vec![0, 3])
        );
        assert_eq!(slots(r.resolve("claude-3-5-sonnet")), (false, vec![]));
        assert_eq!(slots(r.resolve("llama-3-70b")), (false, vec![2]));
        assert_eq!(slots(r.resolve("llama-3-special-1")), (false, vec![]));
        assert_eq!(slots(r.resolve("my-fine-tune")), (true, vec![]));
        assert_eq!(slots(r.resolve("/gpt")), (true, vec![]));
        assert_eq!(r.slots(Scope::Tag, "team-a"), &[5]);
        let noted = |d: &dyn Deployment| {
            let cache = r.cache();
            let mut misses = Misses::default();
            let out = slots(r.resolve_noting(&cache, d, &mut misses));
            assert_eq!(out, slots(r.resolve_in(&cache, d)));
            r.note_misses(misses);
            out
        };
        for m in ["gpt-4o", "azure/x", "nothing", "nothing", "gpt-4o"] {
            assert_eq!(noted(&m), slots(r.resolve(m)));
        }
        let d = Target::with_id("east", "gpt-4o");
        // One entry per (model, id): no id, an empty id and an id are three keys.
        let empty = Target::with_id("", "gpt-4o");
        for _ in 0..4 {
            assert_eq!(noted(&d), (false, vec![1, 3, 4]));
            assert_eq!(noted(&"gpt-4o"), (false, vec![1, 4]));
            assert_eq!(noted(&empty), (false, vec![1, 4]));
        }
        let cache = r.cache();
        assert!(r.cached(&cache, &d).is_some());
        assert!(r.cached(&cache, &empty).is_some());
        assert!(r.cached(&cache, &"gpt-4o").is_some());
        assert!(r.cached(&cache, &Target::new("gpt-4o", "azure")).is_none());
    }

    #[test]
    fn misses_publish_in_batches_within_the_cap_and_resolve_exactly() {
        let r = resolver().with_cache_cap(64);
        let ids: Vec<Target> = (0..600)
            .map(|i| {
                Target::with_id(
                    if i % 7 == 0 {
                        "east".into()
                    } else {
                        format!("d{i}")
                    },
                    "gpt-4o",
                )
            })
            .collect();
        let mut missed = 0;
        for round in 0..5 {
            for chunk in ids.chunks(10 + round) {
                let cache = r.cache();
                let mut misses = Misses::default();
                for d in chunk {
                    let got = slots(r.resolve_noting(&cache, d, &mut misses));
                    assert_eq!(got, slots(r.resolve(d)), "{d:?}");
                }
                let before = r.cache_figures().0;
                missed += misses.count;
                r.note_misses(misses);
                assert!(r.cache_figures().0 - before <= 1);
                assert!(r.cache_figures().1 <= 64);
            }
        }
        // Each publish (a copy of at most 64 entries) is paid for by at least half the map's
        // size in misses (a quarter of the cap once full): O(1) per miss.
        let (publishes, len) = r.cache_figures();
        let publishes = usize::try_from(publishes).unwrap();
        assert!(
            publishes * 16 <= missed + 64,
            "{publishes} publishes for {missed} misses"
        );
        assert!(len > 16, "the cache keeps part of the working set: {len}");
    }

    #[test]
    fn word_wise_equality_agrees_with_str_eq() {
        let names = [
            "",
            "a",
            "dep-1",
            "dep-2",
            "dep-12",
            "gpt-4o",
            "gpt-4o-",
            "openai/g",
            "openai/gpt-4o",
            "openai/gpt-4p",
            "anthropic/claude-3-5-sonnet",
            "anthropic/claude-3-5-sonneT",
            "Anthropic/claude-3-5-sonnet",
            "anthropic/claudX-3-5-sonnet",
        ];
        let long = "x".repeat(70);
        let long2 = format!("{}y", "x".repeat(69));
        for a in names.iter().copied().chain([long.as_str(), long2.as_str()]) {
            for b in names.iter().copied().chain([long.as_str(), long2.as_str()]) {
                assert_eq!(same(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn cli_form() {
        assert_eq!(
            Target::parse("a=openai/gpt-4o"),
            Target::with_id("a", "openai/gpt-4o")
        );
        assert_eq!(Target::parse("gpt-4o").id, None);
    }
}
