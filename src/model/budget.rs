//! The budget model: a budget is (scope, name, period, limit) plus options, and one budget
//! identity maps to one series of stored windows.
//!
//! # Scopes
//!
//! * [`Scope::Provider`]: every deployment of a provider (`openai`), as litellm's
//!   `provider_budget_config`.
//! * [`Scope::Deployment`]: one litellm deployment, by its `model_info.id`.
//! * [`Scope::Model`]: the model name after the provider prefix (`gpt-4o` for
//!   `openai/gpt-4o`, `azure/gpt-4o` and bare `gpt-4o`).
//! * [`Scope::Tag`]: every request carrying the tag, whatever the deployment.
//! * The identity scopes [`Scope::Key`], [`Scope::User`], [`Scope::Team`], [`Scope::Org`] and
//!   [`Scope::Customer`]: every request made for that API key, user, team, organisation or
//!   customer (end user), whatever the deployment, as the request's
//!   [`Identity`](crate::Identity) names them.
//!
//! A scope name may have any number of budgets (one per period and zone).
//!
//! # Identity
//!
//! A budget series is one [`BudgetKey`](crate::model::key::BudgetKey): see the module `key` for
//! how its sled and Redis keys are derived.

use std::fmt;

/// What a budget applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Scope {
    /// Every deployment of a provider.
    Provider,
    /// One deployment, by id (litellm's `model_info.id`).
    Deployment,
    /// Every deployment of a model name (after the provider prefix).
    Model,
    /// Every request carrying the tag.
    Tag,
    /// Every request made with the API key (litellm's hashed virtual key).
    Key,
    /// Every request of the user.
    User,
    /// Every request of the team.
    Team,
    /// Every request of the organisation.
    Org,
    /// Every request made for the customer (litellm's end user).
    Customer,
}

impl Scope {
    /// All scopes, in the order budgets are listed.
    pub const ALL: [Scope; 9] = [
        Scope::Provider,
        Scope::Deployment,
        Scope::Model,
        Scope::Tag,
        Scope::Key,
        Scope::User,
        Scope::Team,
        Scope::Org,
        Scope::Customer,
    ];

    /// The identity scopes, in the order of [`Scope::ALL`]: what an
    /// [`Identity`](crate::Identity) names.
    pub const IDENTITY: [Scope; 5] = [
        Scope::Key,
        Scope::User,
        Scope::Team,
        Scope::Org,
        Scope::Customer,
    ];

    /// The number of scopes (the resolver keeps one table per scope).
    pub(crate) const COUNT: usize = Scope::ALL.len();

    /// `provider`, `deployment`, `model`, `tag`, `key`, `user`, `team`, `org` or `customer`:
    /// the config key and the JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Provider => "provider",
            Scope::Deployment => "deployment",
            Scope::Model => "model",
            Scope::Tag => "tag",
            Scope::Key => "key",
            Scope::User => "user",
            Scope::Team => "team",
            Scope::Org => "org",
            Scope::Customer => "customer",
        }
    }

    /// Whether it is one of the identity scopes ([`Scope::IDENTITY`]).
    pub fn is_identity(self) -> bool {
        self.identity_index().is_some()
    }

    /// The position in [`Scope::IDENTITY`], for the identity scopes.
    pub(crate) fn identity_index(self) -> Option<usize> {
        (self as usize).checked_sub(Scope::Key as usize)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl Scope {
    /// Every scope's name, for messages: `provider, deployment, …, org or customer`.
    pub(crate) const LIST: &'static str =
        "provider, deployment, model, tag, key, user, team, org or customer";
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown scope {s:?} ({})", Scope::LIST))
    }
}

/// Whether a budget filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Deployments (or requests) over the budget are filtered out. The default.
    #[default]
    Enforce,
    /// Counted, replicated and reported (with the calls it would have denied), never
    /// filtering: for rolling a budget out safely.
    Shadow,
}

impl Mode {
    /// `enforce` or `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "shadow" => Ok(Mode::Shadow),
            _ => Err("expected `enforce` or `shadow`".into()),
        }
    }
}

/// How a budget is shared by the fleet (`enforcement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Enforcement {
    /// Every node admits against the fleet total it knows (a G-counter replicated every
    /// sync interval): the fleet may overshoot by what is spent during the replication lag.
    /// The default.
    #[default]
    Shared,
    /// Escrow: each node admits reservations only within a **grant** the fleet gave it in
    /// Redis, and the grants never sum above the limit (see `docs/strict-budgets.md`).
    Strict,
}

impl Enforcement {
    /// `shared` or `strict`.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Shared => "shared",
            Enforcement::Strict => "strict",
        }
    }
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Enforcement {
    type Err = String;
    fn from_str(s: &str) -> Result<Enforcement, String> {
        match s {
            "shared" => Ok(Enforcement::Shared),
            "strict" => Ok(Enforcement::Strict),
            _ => Err("expected `shared` or `strict`".into()),
        }
    }
}

/// What a strict budget does while Redis is unreachable (`offline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Offline {
    /// Spend only what is left of this node's grant: the fleet bound holds. The default.
    #[default]
    GrantOnly,
    /// Spend up to `limit / nodes` (the nodes that held a grant in the window, as last seen)
    /// in total: keeps serving through a long outage, **breaks the fleet bound by design**
    /// (up to `limit` per partitioned node group).
    LocalShare,
    /// Behave as `shared` (admit against the last known fleet total): no bound at all.
    Open,
}

impl Offline {
    /// `grant_only`, `local_share` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Offline::GrantOnly => "grant_only",
            Offline::LocalShare => "local_share",
            Offline::Open => "open",
        }
    }
}

impl fmt::Display for Offline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Offline {
    type Err = String;
    fn from_str(s: &str) -> Result<Offline, String> {
        match s {
            "grant_only" => Ok(Offline::GrantOnly),
            "local_share" => Ok(Offline::LocalShare),
            "open" => Ok(Offline::Open),
            _ => Err("expected `grant_only`, `local_share` or `open`".into()),
        }
    }
}

/// How a budget's windows count (`window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum WindowShape {
    /// Aligned windows: each window starts from zero. The default.
    #[default]
    Fixed,
    /// The current window plus the previous window weighted by how much of it still lies in
    /// the trailing period ending now (see `docs/budget-model.md`, "Sliding windows"): no
    /// burst of twice the limit across a boundary.
    Sliding,
}

impl WindowShape {
    /// `fixed` or `sliding`.
    pub fn as_str(self) -> &'static str {
        match self {
            WindowShape::Fixed => "fixed",
            WindowShape::Sliding => "sliding",
        }
    }
}

impl fmt::Display for WindowShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WindowShape {
    type Err = String;
    fn from_str(s: &str) -> Result<WindowShape, String> {
        match s {
            "fixed" => Ok(WindowShape::Fixed),
            "sliding" => Ok(WindowShape::Sliding),
            _ => Err("expected `fixed` or `sliding`".into()),
        }
    }
}

/// A soft limit: a fraction of the limit, exact to a millionth (`0.5`, `0.9`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SoftLimit(u32);

/// Millionths in one.
const PPM: u64 = 1_000_000;

impl SoftLimit {
    /// `fraction` (0 < fraction ≤ 1), rounded to a millionth; `None` outside that range.
    pub fn new(fraction: f64) -> Option<SoftLimit> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return None;
        }
        let ppm = (fraction * PPM as f64).round() as u32;
        (ppm > 0).then_some(SoftLimit(ppm))
    }

    /// The fraction.
    pub fn fraction(self) -> f64 {
        f64::from(self.0) / PPM as f64
    }

    /// The fraction in millionths (exact: what runtime budgets store and replicate).
    pub(crate) fn millionths(self) -> u32 {
        self.0
    }

    /// A soft limit of `ppm` millionths; `None` outside (0, 1 000 000].
    pub(crate) fn from_millionths(ppm: u32) -> Option<SoftLimit> {
        (ppm > 0 && u64::from(ppm) <= PPM).then_some(SoftLimit(ppm))
    }

    /// The spend (nanos) at which it is crossed for `limit` nanos (rounded up).
    pub(crate) fn threshold(self, limit: u64) -> u64 {
        let t = (u128::from(limit) * u128::from(self.0)).div_ceil(u128::from(PPM));
        u64::try_from(t).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for SoftLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.fraction())
    }
}

/// A soft limit crossed: what [`Limiter::on_soft_limit`](crate::Limiter::on_soft_limit)
/// handlers receive, once per window per threshold.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SoftLimitCrossed {
    /// The budget's scope.
    pub scope: Scope,
    /// Its provider, deployment id, model, tag or identity name (key, user, team, org, customer).
    pub name: String,
    /// Its period part (with `@Zone` when it has its own zone).
    pub period: String,
    /// The soft limit crossed.
    pub soft_limit: SoftLimit,
    /// The spend (fleet total known here) that crossed it.
    pub spend: crate::Money,
    /// The budget's limit.
    pub limit: crate::Money,
    /// The window it was crossed in.
    pub window: crate::Window,
}

/// A soft-limit callback.
#[derive(Clone)]
pub(crate) struct SoftLimitHandler(pub std::sync::Arc<dyn Fn(&SoftLimitCrossed) + Send + Sync>);

impl fmt::Debug for SoftLimitHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SoftLimitHandler")
    }
}

/// Most soft limits per budget (a byte of "fired" bits per window).
pub const MAX_SOFT_LIMITS: usize = 8;

/// The model part of a model name: what follows a `provider/` prefix, else the whole name.
pub(crate) fn model_part(model: &str) -> &str {
    match model.split_once('/') {
        Some((p, rest)) if !p.is_empty() && !rest.is_empty() => rest,
        _ => model,
    }
}

/// Delivers a crossed soft limit on this node: metric, `tracing` event, callback.
pub(crate) fn deliver_soft_limit(
    handler: &std::sync::Mutex<Option<SoftLimitHandler>>,
    key: &str,
    e: &SoftLimitCrossed,
) {
    metrics::counter!(
        "provider_budgets_soft_limit_crossed_total",
        "budget" => key.to_owned(),
        "period" => e.period.clone(),
        "fraction" => e.soft_limit.to_string()
    )
    .increment(1);
    tracing::warn!(
        scope = %e.scope,
        name = %e.name,
        period = %e.period,
        fraction = e.soft_limit.fraction(),
        spend = %e.spend,
        limit = %e.limit,
        window_start = %e.window.start(),
        "soft limit crossed"
    );
    let h = handler
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Some(h) = h {
        (h.0)(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limits() {
        assert_eq!(SoftLimit::new(0.5).map(|s| s.threshold(10)), Some(5));
        assert_eq!(SoftLimit::new(0.9).map(|s| s.threshold(1)), Some(1));
        assert!(SoftLimit::new(0.0).is_none());
        assert!(SoftLimit::new(1.5).is_none());
        assert!(SoftLimit::new(f64::NAN).is_none());
        assert_eq!(
            SoftLimit::new(0.25).map(|s| s.to_string()),
            Some("0.25".into())
        );
    }

    #[test]
    fn scopes_read_back_and_identity_positions_follow_all() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>(), Ok(s));
            assert_eq!(s.index(), Scope::ALL.iter().position(|x| *x == s).unwrap());
            assert_eq!(
                s.identity_index(),
                Scope::IDENTITY.iter().position(|x| *x == s),
                "{s}"
            );
        }
        assert!(Scope::Team.is_identity() && !Scope::Tag.is_identity());
        assert!("teams".parse::<Scope>().unwrap_err().contains(Scope::LIST));
    }

    #[test]
    fn model_parts() {
        assert_eq!(model_part("openai/gpt-4o"), "gpt-4o");
        assert_eq!(model_part("gpt-4o"), "gpt-4o");
        assert_eq!(model_part("openrouter/meta/llama"), "meta/llama");
        assert_eq!(model_part("/x"), "/x");
    }
}
