//! Opening and repairing a data dir: [`Limiter::open`], and [`Limiter::builder`] for the
//! same with another clock or for [`LimiterBuilder::repair`] (one shape for both).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError};
use crate::durable::definitions::Definitions;
use crate::durable::journal::{DurableTotals, Journal, JournalSettings};
use crate::durable::restore::{restore, RepairReport, Restored, Verify};
use crate::durable::store::Store;
use crate::error::Error;
use crate::limiter::fleet::{DefinitionLink, DefinitionLinkParts, Fleet, FleetParts};
use crate::limiter::runtime::{runtime_config, Notes};
use crate::limiter::{set_policy, Inner, Limiter};
use crate::model::budget::{Mode, SoftLimitHandler, WindowShape};
use crate::model::clock::{Clock, SystemClock};
use crate::resolve::Resolver;

/// How to open (or repair) a limiter: [`Limiter::builder`]`(config)`, optionally
/// [`.clock(..)`](LimiterBuilder::clock), then [`.open()`](LimiterBuilder::open) or
/// [`.repair(accept_loss)`](LimiterBuilder::repair).
#[derive(Debug)]
#[must_use = "a builder does nothing until .open() or .repair()"]
pub struct LimiterBuilder {
    config: Config,
    clock: Arc<dyn Clock>,
}

impl LimiterBuilder {
    pub(crate) fn new(config: Config) -> LimiterBuilder {
        LimiterBuilder {
            config,
            clock: Arc::new(SystemClock),
        }
    }

    /// Another clock than the system's (tests use [`FakeClock`](crate::FakeClock)).
    pub fn clock(self, clock: Arc<dyn Clock>) -> LimiterBuilder {
        LimiterBuilder { clock, ..self }
    }

    /// Opens the data dir of `config.storage.dir`, restores the stored totals and starts the
    /// journal (and the replicator when Redis is configured).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid config (or no data dir), [`Error::Storage`] when the
    /// data dir is locked, unreadable, belongs to another node id, or lost acknowledged spend
    /// ([`StoreError::Corrupt`](crate::StoreError::Corrupt) of tree `high-water`: run
    /// `provider-budgets repair`), [`Error::Thread`] when a thread cannot start.
    pub fn open(self) -> Result<Limiter, Error> {
        open_verified(self.config, self.clock, Verify::Strict)
    }

    /// Repairs a data dir that fails to open because it lost acknowledged spend
    /// ([`StoreError::Corrupt`](crate::StoreError::Corrupt) of tree `high-water`): opens what
    /// sled still holds, takes back from Redis (when configured) this node's own totals that
    /// are larger (one replication round), and compares the result with the high-water
    /// record. When nothing acknowledged is missing any more, the record is brought up to
    /// date and the data dir opens again. When spend is still missing, the record keeps
    /// claiming it (the data dir keeps failing to open) unless `accept_loss` is set, which
    /// accepts the loss.
    ///
    /// # Errors
    ///
    /// Those of [`LimiterBuilder::open`] (except the high-water mismatch).
    pub fn repair(self, accept_loss: bool) -> Result<RepairReport, Error> {
        self.config.validate()?;
        let dir = self
            .config
            .storage
            .dir
            .clone()
            .ok_or(ConfigError::NoDataDir)?;
        let start = crate::durable::restore::repair_begin(&dir)?;
        let limiter = open_verified(self.config, self.clock, Verify::Repair)?;
        let synced = limiter
            .inner
            .fleet
            .sync()
            .map(|r| r.map_err(|e| e.to_string()));
        limiter.shutdown()?;
        // Releases the data dir before the last step opens it.
        drop(limiter);
        Ok(crate::durable::restore::repair_finish(
            &dir,
            start,
            accept_loss,
            synced,
        )?)
    }
}

fn open_verified(config: Config, clock: Arc<dyn Clock>, verify: Verify) -> Result<Limiter, Error> {
    config.validate()?;
    let dir = config.storage.dir.clone().ok_or(ConfigError::NoDataDir)?;
    if config.redis.as_ref().is_some_and(|r| r.url.is_empty()) {
        return Err(ConfigError::NoRedisUrl.into());
    }
    Fleet::check(config.redis.as_ref())?;
    // Before the store: a broken catalog file fails the open with nothing started.
    let prices = crate::limiter::pricing::Prices::open(&config.pricing)?;
    let store = Arc::new(Store::open(&dir)?);
    // The runtime budgets stored here are part of the config from the start (each gets its
    // slot at open, like the file's budgets).
    let definitions = Arc::new(Definitions::load(&store)?);
    let notes = Notes::default();
    let base = config;
    let config = runtime_config(&base, &definitions, &notes, |_, _| true);
    let restored = restore(&store, &config, &generate_node_id(), verify)?;
    let Restored {
        node_id,
        keys,
        view,
        journal: start,
        peers,
        grants,
    } = restored;
    for (i, b) in config.budgets.iter().enumerate() {
        view.set_shadow(i as u32, b.mode == Mode::Shadow);
        view.init_sliding(i as u32, b.window == WindowShape::Sliding);
        set_policy(&view, i as u32, b, config.redis.is_some());
        // Crossed before this start: marked fired, not fired again.
        view.set_soft_limits(i as u32, b.soft_limits.clone());
    }
    let durable = Arc::new(DurableTotals::default());
    let slot_keys = Arc::new(keys);
    let journal = start_journal(&store, &view, &durable, &slot_keys, &config, &clock, start)?;
    let soft_handler: Arc<Mutex<Option<SoftLimitHandler>>> = Arc::default();
    let fleet = match &config.redis {
        Some(redis) => Fleet::start(FleetParts {
            redis,
            node_id: &node_id,
            keys: &slot_keys,
            clock: &clock,
            view: &view,
            store: &store,
            durable: &durable,
            journal: journal.sender(),
            peers,
            grants,
            soft_handler: &soft_handler,
        })?,
        None => Fleet::none(),
    };
    let limiter = Limiter {
        inner: Arc::new(Inner {
            fleet,
            resolver: Arc::new(ArcSwap::from_pointee(Resolver::new(&config))),
            config: ArcSwap::from_pointee(config),
            base: ArcSwap::from_pointee(base),
            definitions,
            runtime_link: DefinitionLink::none(),
            notes,
            keys: slot_keys,
            reload_lock: Mutex::new(()),
            adjust_lock: Mutex::new(()),
            generation: Arc::new(AtomicU64::new(0)),
            soft_handler,
            store,
            clock,
            view,
            journal,
            node_id,
            reservations: crate::limiter::reserve::Registry::new(),
            closed: AtomicBool::new(false),
            prices,
        }),
    };
    limiter.restore_templated()?;
    start_runtime_link(&limiter)?;
    Ok(limiter)
}

/// Starts the journal thread on the restored totals.
fn start_journal(
    store: &Arc<Store>,
    view: &Arc<crate::view::View>,
    durable: &Arc<DurableTotals>,
    keys: &Arc<crate::model::slots::SlotKeys>,
    config: &Config,
    clock: &Arc<dyn Clock>,
    start: crate::durable::journal::JournalStart,
) -> Result<Journal, Error> {
    Journal::start(
        Arc::clone(store),
        Arc::clone(view),
        Arc::clone(durable),
        JournalSettings {
            keys: Arc::clone(keys),
            max_delay: config.storage.max_delay,
            retention: config.storage.retention,
            clock: Arc::clone(clock),
            idempotency_capacity: crate::durable::idempotency::IDEMPOTENCY_CAPACITY,
        },
        start,
    )
    .map_err(|source| Error::Thread {
        what: "journal",
        source,
    })
}

/// Starts the exchange of runtime budgets with Redis (when configured); a change it takes is
/// applied through the limiter, which it does not keep alive (a weak reference: dropping
/// every `Limiter` still stops everything).
fn start_runtime_link(limiter: &Limiter) -> Result<(), Error> {
    let config = limiter.config();
    let Some(redis) = &config.redis else {
        return Ok(());
    };
    let inner = &limiter.inner;
    let weak = Arc::downgrade(inner);
    let applier: crate::limiter::fleet::Applier = Arc::new(move || {
        if let Some(inner) = weak.upgrade() {
            Limiter { inner }.apply_runtime();
        }
    });
    inner.runtime_link.start(
        DefinitionLinkParts {
            redis,
            table: &inner.definitions,
            store: &inner.store,
            clock: &inner.clock,
            retention: crate::durable::definitions::tombstone_retention(config.storage.retention),
        },
        applier,
    )
}

/// A node id unlikely to collide: time, process and the std hasher's random keys.
fn generate_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("node-{:016x}", h.finish())
}
