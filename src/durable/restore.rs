//! The restore step: what `Limiter::open` finds in a data dir, checked and turned into the
//! in-memory state the journal, the view and the replicator start from.
//!
//! In order:
//!
//! 1. the node id ([`Store::node_id`]: a data dir keeps its id);
//! 2. this node's own totals; those of budgets still configured fill the view, the others
//!    ("orphans") stay stored until their retention ends;
//! 3. the high-water check ([`crate::durable::highwater`]): sled must hold at least what the journal
//!    acknowledged, else [`StoreError::Corrupt`] of tree `high-water` (unless repairing);
//! 4. the other nodes' last known totals (the `peers` cache) raise the view;
//! 5. this node's grants of strict budgets (tree `grants`) set the view's grants: a grant is
//!    durable before it is spent, so after a crash the node may spend exactly what remains.
//!
//! The slot table built here ([`slot_keys`]) maps a budget index to its [`BudgetKey`]; stored
//! windows are mapped back by looking their key text up in it.
//!
//! [`BudgetKey`]: crate::model::key::BudgetKey

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::durable::highwater::{Found, Mark};
use crate::durable::journal::JournalStart;
use crate::durable::store::{
    summarize, window_of, GrantValue, PeersValue, Store, StoreError, WindowKey,
};
use crate::model::money::Money;
use crate::model::slots::SlotKeys;
use crate::view::View;

/// Whether the high-water check may fail the open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// A mismatch is [`StoreError::Corrupt`] (tree `high-water`).
    Strict,
    /// `repair`: open whatever is there; the journal keeps the acknowledged mark as a floor.
    Repair,
}

/// The slot table of a config's budgets, in the config's order, then their credit series
/// in the same order (budget `i`'s series is slot `n + i`).
pub(crate) fn slot_keys(config: &Config) -> SlotKeys {
    let budgets = config
        .budgets
        .iter()
        .map(crate::config::BudgetConfig::budget_key);
    let credits = budgets.clone().map(|k| k.credit());
    SlotKeys::new(budgets.chain(credits).collect())
}

/// The view of a config's budgets and their credit series (laid out as [`slot_keys`]), each
/// budget linked to its series. A credit series never limits anything.
fn view_of(config: &Config) -> View {
    let schedules = || config.budgets.iter().map(|b| config.budget_schedule(b));
    let view = View::new(
        schedules()
            .zip(config.budgets.iter().map(|b| b.limit))
            .chain(schedules().map(|s| (s, Money::MAX))),
    );
    let n = config.budgets.len() as u32;
    for i in 0..n {
        view.link_credit(i, n + i);
    }
    view
}

/// The budget stored under `key`, if it is configured (a lookup, never a parse).
fn budget_of(keys: &SlotKeys, key: &WindowKey) -> Option<u32> {
    keys.stored(&key.provider, &key.period)
}

/// What a data dir restores to.
#[derive(Debug)]
pub(crate) struct Restored {
    pub node_id: String,
    pub keys: SlotKeys,
    pub view: Arc<View>,
    pub journal: JournalStart,
    /// Other nodes' totals as stored (for the replicator).
    pub peers: Vec<(WindowKey, PeersValue)>,
    /// This node's durable grants (for the replicator: what it re-registers in Redis).
    pub grants: Vec<(WindowKey, GrantValue)>,
}

/// Runs the restore step on an open store.
pub(crate) fn restore(
    store: &Store,
    config: &Config,
    proposed_node_id: &str,
    verify: Verify,
) -> Result<Restored, StoreError> {
    let node_id = store.node_id(config.node_id.as_deref(), proposed_node_id)?;
    let keys = slot_keys(config);
    let view = Arc::new(view_of(config));

    let mut seq = store.seq()?;
    let mut own = store.load_own()?;
    let found = summarize(seq, own.iter().map(|(_, v)| v.total));
    let acknowledged = check_high_water(store, &found, verify)?;
    if verify == Verify::Strict {
        if let Some(s) = count_open_reservations(store, &mut own, seq, acknowledged)? {
            seq = s;
        }
    }

    let mut loaded = Vec::new();
    let mut orphans = Vec::new();
    for (key, value) in own {
        match budget_of(&keys, &key) {
            Some(b) => loaded.push((b, window_of(&key, value.end), value.total)),
            None => orphans.push((key, value)),
        }
    }
    // In bulk: one view list swap per budget, not one per window (linear in windows).
    view.raise_own_many(loaded.iter().map(|&(b, w, t)| (b, w, Money::from_nanos(t))));

    let peers = store.load_peers()?;
    let mut others = Vec::new();
    for (key, value) in &peers {
        if let Some(b) = budget_of(&keys, key) {
            // The cache holds the others' sum (this node is never in it).
            others.push((
                b,
                window_of(key, value.end),
                Money::from_nanos(value.others),
            ));
        }
    }
    view.raise_others_many(others);

    let mut grants = store.load_grants()?;
    for (key, value) in &mut grants {
        if let Some(b) = budget_of(&keys, key) {
            // A concurrent budget's grant covers slots, and a restart frees every slot this
            // data dir held (a dead process holds none): the grant restarts at 0. Restoring
            // it would re-register it by max after the fleet reclaimed it (`grant_lease`),
            // and the fleet could then hold more slots than the limit.
            if keys.get(b).unit() == crate::model::unit::Unit::Concurrent {
                value.grant = 0;
            }
            view.set_grant(b, window_of(key, value.end), Money::from_nanos(value.grant));
        }
    }

    // The holder lists are read by the replicator; one that does not decode fails
    // the open here, naming its key.
    store.load_holders()?;

    Ok(Restored {
        node_id,
        keys,
        view,
        journal: JournalStart {
            loaded,
            orphans,
            seq: seq.max(acknowledged.map_or(0, |m| m.seq)),
            floor: match verify {
                Verify::Strict => None,
                Verify::Repair => acknowledged,
            },
        },
        peers,
        grants,
    })
}

/// Step 3b: every reservation a crash (or a shutdown) left open counts its estimate as own
/// spend in each of its windows, and is removed, in ONE sled batch (a crash during this step
/// leaves either the reservations or the spend, never both nor neither); then the high-water
/// record is brought to the new totals (a crash between the two leaves sled ahead of the
/// record, which the check accepts). Skipped while repairing: `repair` must not change what
/// it compares; the next normal open counts them. Returns the batch sequence written.
fn count_open_reservations(
    store: &Store,
    own: &mut Vec<(WindowKey, crate::durable::store::OwnValue)>,
    seq: u64,
    acknowledged: Option<Mark>,
) -> Result<Option<u64>, StoreError> {
    let open = store.load_reservations()?;
    if open.is_empty() {
        return Ok(None);
    }
    let mut totals: std::collections::BTreeMap<WindowKey, crate::durable::store::OwnValue> =
        own.drain(..).collect();
    let mut changed = std::collections::BTreeSet::new();
    let mut counted = 0u64;
    for (_, r) in &open {
        for ((provider, period, start, end), &count) in r.windows.iter().zip(&r.counts) {
            let key = WindowKey {
                provider: provider.clone(),
                period: period.clone(),
                start: *start,
            };
            let v = totals
                .entry(key.clone())
                .or_insert(crate::durable::store::OwnValue {
                    end: *end,
                    total: 0,
                });
            v.total = v.total.saturating_add(count);
            counted = counted.saturating_add(count);
            changed.insert(key);
        }
    }
    let next = seq.max(acknowledged.map_or(0, |m| m.seq)) + 1;
    store.write_own_and_reservations(
        next,
        changed
            .iter()
            .filter_map(|k| totals.get(k).map(|v| (k, *v))),
        std::iter::empty(),
        open.iter().map(|(id, _)| (id.as_str(), None)),
    )?;
    store.flush()?;
    store.mark(&summarize(next, totals.values().map(|v| v.total)))?;
    tracing::warn!(
        dir = %store.dir().display(),
        reservations = open.len(),
        counted = %Money::from_nanos(counted),
        "reservations left open by the last run count their estimate"
    );
    metrics::counter!("provider_budgets_reservations_recovered_total").increment(open.len() as u64);
    own.extend(totals);
    Ok(Some(next))
}

/// Compares what sled returned with the high-water record. Returns the record (if any).
fn check_high_water(
    store: &Store,
    found: &Mark,
    verify: Verify,
) -> Result<Option<Mark>, StoreError> {
    let lost = |detail: String| {
        StoreError::Corrupt {
        tree: "high-water",
        key: crate::durable::highwater::FILE_NAME.to_owned(),
        reason: format!(
            "data dir {} lost acknowledged spend: {detail}; run `provider-budgets repair` (see the README's failure model)",
            store.dir().display()
        ),
    }
    };
    match store.read_mark()? {
        Found::Absent => {
            // A new data dir, or one written before the record existed: start it now.
            store.mark(found)?;
            Ok(None)
        }
        Found::Unreadable(why) if verify == Verify::Strict => Err(lost(format!(
            "its high-water record {} is unreadable ({why}), so what was acknowledged cannot be checked",
            crate::durable::highwater::FILE_NAME
        ))),
        Found::Unreadable(_) => Ok(None),
        Found::Mark(mark) => {
            let missing = mark.sum.saturating_sub(found.sum);
            let short = found.seq < mark.seq
                || (found.seq == mark.seq && (found.sum, found.entries) != (mark.sum, mark.entries));
            if short && verify == Verify::Strict {
                return Err(lost(format!(
                    "batch {} was acknowledged but the store ends at batch {}; {} USD of own spend in {} windows acknowledged, {} USD in {} windows found ({} USD missing)",
                    mark.seq,
                    found.seq,
                    usd(mark.sum),
                    mark.entries,
                    usd(found.sum),
                    found.entries,
                    usd(missing),
                )));
            }
            Ok(Some(mark))
        }
    }
}

/// A u128 sum of nanos as USD text.
pub(crate) fn usd(nanos: u128) -> Money {
    Money::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// What [`LimiterBuilder::repair`](crate::LimiterBuilder::repair) found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// Own spend the high-water record says was acknowledged (zero when it was unreadable or
    /// absent).
    pub acknowledged: Money,
    /// Own spend sled held before the repair.
    pub found: Money,
    /// Own spend held after the repair (sled plus what Redis gave back).
    pub restored: Money,
    /// `acknowledged - restored`: still missing.
    pub missing: Money,
    /// The loss was accepted (`--accept-loss`): the data dir opens again despite `missing`.
    pub accepted_loss: bool,
    /// The high-water record could not be read.
    pub record_unreadable: bool,
    /// The replication round's outcome, when Redis is configured.
    pub redis: Option<Result<(), String>>,
}

impl RepairReport {
    /// Whether the data dir opens again.
    pub fn opens(&self) -> bool {
        self.missing == Money::ZERO || self.accepted_loss
    }
}

/// What the repair found in the data dir before the facade re-opened it ([`repair_begin`]).
#[derive(Debug)]
pub(crate) struct RepairStart {
    record: Found,
    acknowledged: Option<Mark>,
    before: Mark,
}

/// The repair's first step: what the data dir at `dir` holds, and what its high-water record
/// says was acknowledged. The facade then opens the limiter in repair mode (which runs a
/// replication round when Redis is configured, taking back this node's larger totals) and
/// shuts it down, and calls [`repair_finish`].
pub(crate) fn repair_begin(dir: &Path) -> Result<RepairStart, StoreError> {
    let store = Store::open(dir)?;
    let own = store.load_own()?;
    let before = summarize(store.seq()?, own.iter().map(|(_, v)| v.total));
    let record = store.read_mark()?;
    let acknowledged = match &record {
        Found::Mark(m) => Some(*m),
        _ => None,
    };
    Ok(RepairStart {
        record,
        acknowledged,
        before,
    })
}

/// The repair's last step: compares what the data dir holds now with what was acknowledged
/// and writes the high-water record (keeping the claim of what is still missing unless
/// `accept_loss`). `redis` is the replication round's outcome, reported as it is.
pub(crate) fn repair_finish(
    dir: &Path,
    start: RepairStart,
    accept_loss: bool,
    redis: Option<Result<(), String>>,
) -> Result<RepairReport, StoreError> {
    let RepairStart {
        record,
        acknowledged,
        before,
    } = start;
    let store = Store::open(dir)?;
    // A sequence past both sled's and the record's, so that the new mark is the newest slot.
    let seq = store.seq()?.max(acknowledged.map_or(0, |m| m.seq)) + 1;
    store.write_own(seq, std::iter::empty(), std::iter::empty())?;
    store.flush()?;
    let own = store.load_own()?;
    let after = summarize(seq, own.iter().map(|(_, v)| v.total));
    let ack_sum = acknowledged.map_or(0, |m| m.sum);
    let missing = ack_sum.saturating_sub(after.sum);
    let mark = match acknowledged {
        Some(m) if missing > 0 && !accept_loss => Mark {
            seq,
            entries: m.entries,
            sum: m.sum,
        },
        _ => after,
    };
    store.mark(&mark)?;
    if missing > 0 && accept_loss {
        tracing::warn!(dir = %dir.display(), missing = %usd(missing), "repair accepted the loss of acknowledged spend");
    }
    Ok(RepairReport {
        acknowledged: usd(ack_sum),
        found: usd(before.sum),
        restored: usd(after.sum),
        missing: usd(missing),
        accepted_loss: accept_loss && missing > 0,
        record_unreadable: matches!(record, Found::Unreadable(_)),
        redis,
    })
}
