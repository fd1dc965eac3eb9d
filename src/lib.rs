//! Spend budgets for LLM routers — per provider, deployment, model and request tag, over time
//! windows (several per budget name, each in its own time zone if need be): exact, durable,
//! shared across a fleet through Redis, and nearly free on the request path. See [`Scope`],
//! [`Limiter::filter`] and [`Limiter::charge`] for the budget model.
//!
//! ```
//! use provider_budgets::{Config, Limiter, Money, Spend, StatusQuery, NO_TAGS};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let config = Config::from_yaml_str(
//!     "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n",
//! )?
//! .data_dir(dir.path());
//! let limiter = Limiter::open(config)?;
//!
//! let deployments = ["gpt-4o", "azure/gpt-4o", "claude-3-5-sonnet"];
//! assert_eq!(limiter.filter(&deployments, NO_TAGS)?.len(), 3);
//!
//! for _ in 0..10 {
//!     let cost = "0.1".parse::<Money>()?;
//!     limiter.charge(Spend::provider("openai", cost))?; // exactly $1.00 after ten
//! }
//! let left: Vec<&&str> = limiter.filter(&deployments, NO_TAGS)?;
//! assert_eq!(left, [&"azure/gpt-4o", &"claude-3-5-sonnet"]); // no budget: they pass
//!
//! drop(limiter); // flushes what is queued and releases the data dir
//! let limiter = Limiter::open(Config::from_yaml_str(
//!     "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n",
//! )?.data_dir(dir.path()))?;
//! assert_eq!(limiter.status(StatusQuery::all())[0].spend, Money::from_nanos(1_000_000_000));
//! # Ok(()) }
//! ```
//!
//! # How one record travels
//!
//! * [`Limiter::charge`] (module `limiter`, the facade; the [`Spend`] says against what)
//!   resolves the budgets that apply, adds the cost to the in-memory **view** (`view`: per budget, the live windows with an atomic
//!   own total and an atomic total of the other nodes) and queues an event for the journal.
//! * The **journal** (`journal`) is one thread fed by a bounded crossbeam channel. It drains a
//!   batch, coalesces it per window into this node's absolute totals, writes them in one sled
//!   batch and flushes once (group commit), then acknowledges waited [`Receipt`]s
//!   ([`Receipt::wait`], or `.await`) and publishes the durable totals for replication.
//! * The **store** (`store`) is the sled layout: tree `own` (this node's totals per
//!   provider/period/window), tree `peers` (the sum of the other nodes' last known totals),
//!   tree `meta` (node id, instance id). Values carry a version byte and decode with bounds.
//! * With Redis configured, the **replicator** (`replicate`) ships the durable own totals
//!   each `sync_interval` in one round trip that merges them with `max` per node and returns
//!   the others' totals, which raise the view and are kept in `peers`.
//! * [`Limiter::filter`] reads the clock once, resolves each deployment once (`provider`: its
//!   provider, model and deployment budgets; the request's tags give tag budgets) and compares
//!   the view's total of each budget's current window with its limit (one loop in `filter`,
//!   shared by `filter`, `filter_in_place` and [`Prepared`]). [`Limiter::charge`] adds to the
//!   same budgets. The budget model and its keys are in `budget`.
//!
//! [`Limiter::reserve`] (module `reserve`) holds an estimate in the same budgets before a call,
//! atomically per budget, and journals it; [`Reservation::commit`] counts the actual cost,
//! [`Reservation::release`] nothing, a drop or an expiry the estimate (so does a crash, at the
//! next open: module `restore`).
//!
//! Runtime budgets ([`Limiter::put_budget`], module `limiter::runtime`) are budgets defined
//! while the limiter runs: stored in the data dir (`durable::definitions`), replicated through
//! Redis (`replicate::definitions`), merged into the configuration the limiter applies.
//!
//! Windows (`window`) are aligned to an anchor, so every node computes the same window from
//! its clock alone ([`Clock`], faked in tests). Money (`money`) is integer nano-dollars.
//! Configuration (`config`) reads litellm's `provider_budget_config` as it is.
//! Pricing (`pricing`: [`Catalog`], [`Usage`], [`Priced`]) turns a call's token usage into its
//! exact cost from litellm's price catalog; it is independent of the [`Limiter`].

// Unit tests may unwrap: a panic there is a test failure with a message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod config;
mod durable;
mod error;
mod limiter;
mod model;
mod pricing;
#[cfg(feature = "redis")]
mod replicate;
mod resolve;
mod template;
mod view;

pub use config::{
    parse_duration, AlertsConfig, BudgetConfig, BudgetFields, Config, ConfigError, RedisConfig,
    RedisTls, StorageConfig, UnknownProvider, Webhook, WebhookFormat, CONCURRENT_PERIOD,
    DEFAULT_MAX_SERIES, MAX_MAX_SERIES, TEMPLATE_NAME,
};
pub use durable::audit::{AuditEntry, MAX_ENTRIES as MAX_AUDIT_ENTRIES};
pub use durable::error::StoreError;
/// The sidecar's idempotency across restarts: not part of the stable API.
#[doc(hidden)]
pub use durable::idempotency::{
    IdempotencyRecord, Remembered, IDEMPOTENCY_CAPACITY, IDEMPOTENCY_TTL,
};
pub use durable::restore::RepairReport;
pub use durable::store::fuzz_decode_value;
pub use error::{Error, RecordError, ReplicationError};
pub use limiter::adjust::{AdjustError, Adjustment, Credited, MAX_REASON_BYTES};
pub use limiter::filter::{Exceeded, NoDeployments};
pub use limiter::health::Health;
pub use limiter::open::LimiterBuilder;
pub use limiter::reload::ReloadSummary;
pub use limiter::reserve::{Reservation, ReserveError, ReserveRequest};
pub use limiter::runtime::{BudgetChange, BudgetError, RuntimeBudget};
pub use limiter::spend::{Durable, Receipt, Spend, Uncounted, MAX_FUTURE_SKEW};
pub use limiter::status::{BudgetStatus, ReplicationStatus, RoundFigures, StatusQuery};
pub use limiter::template_status::TemplateStatus;
#[doc(hidden)]
pub use limiter::testing;
pub use limiter::{Limiter, Prepared, NO_TAGS};
pub use model::budget::WindowShape;
pub use model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit, SoftLimitCrossed};
pub use model::clock::{Clock, FakeClock, SystemClock};
pub use model::identity::Identity;
pub use model::money::{Money, MoneyError};
pub use model::text::redact_urls;
pub use model::unit::{Estimate, Unit};
pub use model::window::{Period, PeriodError, Schedule, Window};
pub use pricing::{
    Catalog, CatalogSource, Counting, EstimateInput, Estimated, Message, ModelPrices, PriceSource,
    Priced, Pricing, PricingError, Prompt, Rate, RateError, Rates, Unpriced, UnpricedPolicy,
    UnpricedReason, Usage, BUILTIN_CATALOG_LITELLM_VERSION, BUILTIN_CATALOG_SHA256,
    DEFAULT_MAX_OUTPUT_TOKENS, NON_TEXT_PART_TOKENS,
};
pub use resolve::{Deployment, Target, BUILTIN_PREFIXES};
pub use template::MAX_TEMPLATED_NAME;
pub use view::{RELOAD_SLOTS, TEMPLATE_SLOTS};

/// The sync round's wire protocol, for the live-Redis tests in `tests/fleet/wire.rs` only: not part
/// of the API (no stability promise).
#[cfg(feature = "redis")]
#[doc(hidden)]
pub mod __wire {
    pub use crate::model::key::BudgetKey;
    pub use crate::replicate::wire::{
        lease_key, strict_key, text, window_key, GrantAsk, GrantReply, Group, GroupReply, Identity,
        KeyReply, Lease, Mode, SyncItem, TrackReply, Wire, WireError, SCRIPT,
    };
}
