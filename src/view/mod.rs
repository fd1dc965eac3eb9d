//! Lock-free in-memory totals: what `filter` reads and `record` bumps.
//!
//! Per budget, the view holds one [`Cell`] per live window: this node's own spend and the last
//! known spend of every other node, as two atomics. The list of cells is swapped as a whole
//! (`ArcSwap`) when a window appears or expires, which happens once per window; every other
//! access is a load of that list plus atomic operations on a cell. Cells are shared between
//! successive lists, so an increment racing with a swap still lands in its window's cell.
//!
//! The view is a cache of the durable state: on open it is filled from the store, afterwards the
//! journal and the replicator keep the store in step. It is never the only copy of spend that
//! was acknowledged as durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use arc_swap::ArcSwap;

use crate::model::budget::{Enforcement, Offline, SoftLimit};
use crate::model::money::Money;
use crate::model::unit::Unit;
use crate::model::window::{Schedule, Window};

mod admission;
mod hot;
mod sliding;
mod totals;
pub(crate) use hot::Hot;
pub(crate) use totals::WindowTotals;

/// Spend of one budget in one window.
#[derive(Debug)]
pub(crate) struct Cell {
    window: Window,
    /// This node's own spend, nanos. Only `record` (and loading) increase it.
    own: AtomicU64,
    /// Sum of the other nodes' last known spend, nanos. Only the replicator sets it.
    others: AtomicU64,
    /// Soft limits (bit i: the budget's i-th) already fired in this window on this node.
    fired: AtomicU8,
    /// Estimates held by this node's open reservations in this window, nanos. Raised by
    /// [`View::try_reserve`] (a CAS that checks the room), lowered by [`View::settle`] and
    /// [`View::unreserve`]. Counted by `filter` and by admission, never by `status` spend.
    reserved: AtomicU64,
    /// Strict budgets: this node's grant in this window, nanos (what the fleet gave it to
    /// spend; `own + reserved` never passes it through a reservation). 0 until the first grant.
    grant: AtomicU64,
    /// Corrections: the fleet's credit total in this window as known here, nanos (own plus
    /// others of the budget's credit series, mirrored by [`View::mirror_credit`]). Spend is
    /// counted net of it, never below zero. Only grows, like the series it mirrors.
    credit: AtomicU64,
}

impl Cell {
    fn new(window: Window) -> Cell {
        Cell {
            window,
            own: AtomicU64::new(0),
            others: AtomicU64::new(0),
            fired: AtomicU8::new(0),
            reserved: AtomicU64::new(0),
            grant: AtomicU64::new(0),
            credit: AtomicU64::new(0),
        }
    }

    /// Net spend plus what open reservations hold: what admission and `filter` compare.
    #[inline]
    fn committed(&self) -> u64 {
        self.net()
            .saturating_add(self.reserved.load(Ordering::Relaxed))
    }

    /// Spend net of credits, never below zero.
    #[inline]
    fn net(&self) -> u64 {
        self.total()
            .saturating_sub(self.credit.load(Ordering::Relaxed))
    }

    #[inline]
    fn total(&self) -> u64 {
        self.own
            .load(Ordering::Relaxed)
            .saturating_add(self.others.load(Ordering::Relaxed))
    }
}

/// The in-memory totals of one budget.
#[derive(Debug)]
struct BudgetView {
    schedule: Schedule,
    /// Nanos; changed in place by a reload.
    limit: AtomicU64,
    /// The window total at which the budget's bit in [`Hot`] is set and `peak` is raised:
    /// the limit for a fixed budget, half of it (rounded up) for a sliding one.
    ///
    /// Why half: a sliding budget counts two windows (the current one and a weighted part of
    /// the previous one, at most all of it), so it can be spent while each window is below
    /// the limit; while every window total stays below `ceil(limit / 2)`, two of them sum
    /// to at most `limit - 1`, so the fast path (`peak < gate`) stays exact. A fixed budget
    /// compares with this field instead of `limit`: it costs nothing more.
    gate: AtomicU64,
    /// `window: sliding` (changed in place by a reload, see [`View::set_sliding`]).
    sliding: AtomicBool,
    /// Live windows, newest first: the current window is at or near the front, so the request
    /// path finds it in one or two steps even when many older windows are kept for `status`.
    cells: ArcSwap<Vec<Arc<Cell>>>,
    /// Serialises the (rare) list swaps so that two threads opening the same window cannot
    /// install two cells for it.
    swap: Mutex<()>,
    /// Shadow mode: never blocks; counts the calls it would have denied. Set by a reload.
    shadow: AtomicBool,
    /// Filter calls a shadow budget would have denied (since open).
    would_deny: AtomicU64,
    /// `enforcement: strict`: admission also keeps `own + reserved` within this node's grant
    /// of the window. Cleared while an offline mode other than `grant_only` applies.
    strict: AtomicBool,
    /// The configured `enforcement`/`offline` pair (see `policy_code`), which `strict`
    /// follows while Redis answers; set at open and by a reload.
    policy: AtomicU8,
    /// What it counts ([`Unit::code`]): the charge path takes each budget's own amount of a
    /// spend by it. Part of the budget's identity, so set once (open, reload, a template's
    /// first use); an atomic only because it is set after the slot is shared.
    unit: AtomicU8,
    /// The largest reservation refused by this node's grant alone since the replicator last
    /// looked: the next (out-of-cycle) grant round asks for at least that much more.
    starved: AtomicU64,
    /// Soft limits, increasing (swapped by a reload; read only when a charge lands).
    soft: ArcSwap<Vec<SoftLimit>>,
    /// Whether `soft` is not empty (spares its load on the charge path).
    has_soft: AtomicBool,
    /// An upper bound of every window total that ever reached the limit (and of every total
    /// raised by loading or replication, and of the live totals when the limit changed).
    /// While it is below the limit no window can be spent: `exhausted` answers from two
    /// plain atomic loads, without loading the window list (the request path's fast path).
    /// Written only through [`BudgetView::raise_peak`] and [`View::set_limit`], which keep
    /// the budget's bit in [`Hot`] set once the peak reaches the limit.
    peak: AtomicU64,
    /// The view's set of budgets that may be spent, and this budget's slot in it.
    hot: Arc<Hot>,
    slot: u32,
    /// A budget: the slot of its credit series (see [`View::link_credit`]). Set once, at open
    /// or when a reload adds the budget.
    credit_series: OnceLock<u32>,
    /// A credit series: the slot of the budget it credits. Its totals are mirrored into that
    /// budget's cells (`Cell::credit`) whenever they change.
    credit_of: OnceLock<u32>,
    /// A template's series: no gauge of its own (the template's aggregates count it).
    templated: bool,
}

/// Budget series a running process may add to those it opened with (reloads and runtime
/// budgets, `Limiter::reload`, `Limiter::put_budget`); each takes two slots (the budget and
/// its credit series). The slots are preallocated empty (`OnceLock`s, so an index is valid
/// without a lock): 8 192 empty slots take 1.5 MB (184 bytes each on x86-64, checked by
/// `tests::preallocated_slots_stay_small`); a slot in use adds its windows.
pub const RELOAD_SLOTS: usize = 4096;

/// Slots a running process may add past [`RELOAD_SLOTS`] for the series of templates (two
/// per series, as reloads take), in segments of [`SEGMENT`] allocated when first needed: a
/// process that uses no template pays 24 bytes per segment (12 KB) for the room.
pub const TEMPLATE_SLOTS: usize = 2 * (1 << 20);

/// Slots per segment of the template room.
const SEGMENT: usize = 4096;

/// One segment of template slots.
type Segment = Box<[OnceLock<BudgetView>]>;

/// In-memory totals of every budget slot (`Config::budgets` at open, then the slots added by
/// reloads and templates: slots are never removed while the limiter runs, so indices stay
/// valid).
#[derive(Debug)]
pub(crate) struct View {
    /// Preallocated: a slot is set once; the first `len` are set.
    budgets: Box<[OnceLock<BudgetView>]>,
    /// Slots past `budgets`, by segment (set when the first of its slots is pushed). Why
    /// segments: template series come and go by the hundred thousand, and a flat array
    /// preallocated for them would cost 340 MB before the first one.
    more: Box<[OnceLock<Segment>]>,
    len: AtomicUsize,
    /// Slots pushed for template series ([`View::push_templated`]): the room of reloads
    /// ([`View::reload_room`]) does not count them.
    templated: AtomicUsize,
    /// Shared with every slot.
    hot: Arc<Hot>,
    /// `max_estimate` of the budgets that set one (slot → cap), read by admission only. Why
    /// not a field of each slot: few budgets cap, and 8 more bytes per slot would cost every
    /// template series; a lock is fine beside the reservation's own registry lock.
    caps: Mutex<rustc_hash::FxHashMap<u32, u64>>,
    /// Whether `caps` has any: admission skips the lock otherwise.
    any_caps: AtomicBool,
    /// Whether any slot counts another unit than USD ([`View::has_units`]).
    any_units: AtomicBool,
}

impl View {
    pub fn new(budgets: impl IntoIterator<Item = (Schedule, Money)>) -> View {
        let budgets: Vec<(Schedule, Money)> = budgets.into_iter().collect();
        let len = budgets.len();
        let slots: Box<[OnceLock<BudgetView>]> = (0..len + 2 * RELOAD_SLOTS)
            .map(|_| OnceLock::new())
            .collect();
        let hot = Arc::new(Hot::default());
        for (i, (slot, (schedule, limit))) in slots.iter().zip(budgets).enumerate() {
            let _ = slot.set(BudgetView::new(schedule, limit, Arc::clone(&hot), i as u32));
        }
        View {
            budgets: slots,
            more: (0..TEMPLATE_SLOTS / SEGMENT)
                .map(|_| OnceLock::new())
                .collect(),
            len: AtomicUsize::new(len),
            templated: AtomicUsize::new(0),
            hot,
            caps: Mutex::new(rustc_hash::FxHashMap::default()),
            any_caps: AtomicBool::new(false),
            any_units: AtomicBool::new(false),
        }
    }

    /// The budgets (below 128) that may be spent: bit `b` clear means budget `b` is not (see
    /// [`Hot`]). One read per request-path call.
    #[inline]
    pub fn hot(&self) -> u128 {
        self.hot.load()
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Slots in use plus spare ones.
    pub fn capacity(&self) -> usize {
        self.budgets.len() + self.more.len() * SEGMENT
    }

    /// (Slots used by configured, reloaded and runtime budgets, the most they may use): what
    /// reloads check their new series against ([`RELOAD_SLOTS`] per process, whatever the
    /// templates took).
    pub fn reload_room(&self) -> (usize, usize) {
        let used = self.len() - self.templated.load(Ordering::Relaxed);
        (used, self.budgets.len())
    }

    /// [`View::push`] for a template's series (not counted against the reload room).
    pub fn push_templated(&self, schedule: Schedule, limit: Money) -> Option<u32> {
        let slot = self.push_kind(schedule, limit, true)?;
        self.templated.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    /// The slot of a budget index handed out by `new` or `push`.
    #[inline]
    fn budget(&self, budget: u32) -> &BudgetView {
        let i = budget as usize;
        // The configured budgets and reload slots first: the request path's common case is
        // one bounds check and one load, as before templates.
        let slot = match self.budgets.get(i) {
            Some(slot) => slot,
            None => self.template_slot(i - self.budgets.len()),
        };
        slot.get().expect("budget index of a slot in use")
    }

    /// Slot `i` of the template room (allocated: `i` was handed out by `push`).
    #[inline(never)]
    fn template_slot(&self, i: usize) -> &OnceLock<BudgetView> {
        &self.more[i / SEGMENT]
            .get()
            .expect("segment of a slot in use")[i % SEGMENT]
    }

    /// The empty slot `i` (the next one `push` fills), allocating its segment if need be.
    fn free_slot(&self, i: usize) -> Option<&OnceLock<BudgetView>> {
        if let Some(slot) = self.budgets.get(i) {
            return Some(slot);
        }
        let i = i - self.budgets.len();
        let segment = self
            .more
            .get(i / SEGMENT)?
            .get_or_init(|| (0..SEGMENT).map(|_| OnceLock::new()).collect());
        segment.get(i % SEGMENT)
    }

    /// Adds a budget slot (reload, template); `None` when every spare slot is used. Callers
    /// serialise.
    pub fn push(&self, schedule: Schedule, limit: Money) -> Option<u32> {
        self.push_kind(schedule, limit, false)
    }

    fn push_kind(&self, schedule: Schedule, limit: Money, templated: bool) -> Option<u32> {
        let i = self.len();
        let slot = u32::try_from(i).ok()?;
        let hot = Arc::clone(&self.hot);
        self.free_slot(i)?
            .set(BudgetView::with_kind(schedule, limit, hot, slot, templated))
            .ok()?;
        self.len.store(i + 1, Ordering::Release);
        Some(slot)
    }

    /// Whether a slot is a template's series (pushed by [`View::push_templated`]).
    pub fn is_templated(&self, budget: u32) -> bool {
        self.budget(budget).templated
    }

    /// Changes a budget's limit in place (reload).
    pub fn set_limit(&self, budget: u32, limit: Money) {
        let b = self.budget(budget);
        b.limit.store(limit.as_nanos(), Ordering::Relaxed);
        b.set_gate();
    }

    pub fn schedule(&self, budget: u32) -> &Schedule {
        &self.budget(budget).schedule
    }

    pub fn limit(&self, budget: u32) -> Money {
        Money::from_nanos(self.budget(budget).limit.load(Ordering::Relaxed))
    }

    /// Adds to this node's own spend in the window containing `at_secs` and returns that window.
    #[inline]
    #[cfg(test)]
    pub fn add_own(&self, budget: u32, at_secs: i64, amount: Money) -> Window {
        let cell = self.cell_at(budget, at_secs);
        saturating_add(&cell.own, amount.as_nanos());
        self.budget(budget).note_total(cell.total());
        cell.window
    }

    /// Sets a budget's mode (open, reload).
    pub fn set_shadow(&self, budget: u32, shadow: bool) {
        self.budget(budget).shadow.store(shadow, Ordering::Relaxed);
    }

    pub fn is_shadow(&self, budget: u32) -> bool {
        self.budget(budget).shadow.load(Ordering::Relaxed)
    }

    /// Filter calls a shadow budget would have denied since open.
    pub fn would_deny(&self, budget: u32) -> u64 {
        self.budget(budget).would_deny.load(Ordering::Relaxed)
    }

    /// Sets a budget's soft limits (open, reload); those already crossed in the live windows
    /// are marked fired without firing (a restart or reload does not repeat an alert).
    pub fn set_soft_limits(&self, budget: u32, soft: Vec<SoftLimit>) {
        let b = self.budget(budget);
        let limit = b.limit.load(Ordering::Relaxed);
        for c in b.cells.load().iter() {
            c.fired
                .store(crossed_bits(&soft, limit, c.total()), Ordering::Relaxed);
        }
        b.has_soft.store(!soft.is_empty(), Ordering::Relaxed);
        b.soft.store(if soft.is_empty() {
            no_soft_limits()
        } else {
            Arc::new(soft)
        });
    }

    pub fn soft_limits(&self, budget: u32) -> Arc<Vec<SoftLimit>> {
        self.budget(budget).soft.load_full()
    }

    /// [`View::add_own`] that also reports the soft limits this charge is the first (on this
    /// node, in this window) to find crossed. Each bit is handed out once per window.
    #[inline]
    pub fn add_own_checked(
        &self,
        budget: u32,
        at_secs: i64,
        amount: Money,
    ) -> (Window, Option<Crossed>) {
        let b = self.budget(budget);
        let charge = |cell: &Cell| {
            saturating_add(&cell.own, amount.as_nanos());
            b.note_total(cell.committed());
            (cell.window, b.fire_bits(cell, at_secs))
        };
        // The current window through the loaded list (no `Arc` count traffic on the charge
        // path); a new window through `cell_at`.
        if let Some(c) = b
            .cells
            .load()
            .iter()
            .find(|c| c.window.contains_secs(at_secs))
        {
            return charge(c);
        }
        charge(&self.cell_at(budget, at_secs))
    }

    /// Whether an enforced budget is spent at the instant (a spent shadow budget counts a
    /// would-be denial and does not block).
    #[inline]
    pub fn blocks(&self, budget: u32, now_secs: i64) -> bool {
        let b = self.budget(budget);
        if !b.exhausted(now_secs) {
            return false;
        }
        if b.shadow.load(Ordering::Relaxed) {
            b.would_deny.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// [`View::blocks`] without counting (error reports).
    pub fn blocks_quietly(&self, budget: u32, now_secs: i64) -> bool {
        self.exhausted(budget, now_secs) && !self.is_shadow(budget)
    }

    /// Whether the budget is spent at the instant: `spend >= limit`, as in the reference.
    #[inline]
    pub fn exhausted(&self, budget: u32, now_secs: i64) -> bool {
        self.budget(budget).exhausted(now_secs)
    }

    /// Totals of the window containing the instant (zero when nothing was spent in it).
    pub fn totals_at(&self, budget: u32, at_secs: i64) -> WindowTotals {
        let b = self.budget(budget);
        let cells = b.cells.load();
        match cells.iter().find(|c| c.window.contains_secs(at_secs)) {
            Some(c) => snapshot(c),
            None => WindowTotals {
                window: b.schedule.window_at_secs(at_secs),
                own: Money::ZERO,
                others: Money::ZERO,
                reserved: Money::ZERO,
                grant: Money::ZERO,
                credit: Money::ZERO,
            },
        }
    }

    /// Every live window of the budget, newest first.
    pub fn windows(&self, budget: u32) -> Vec<WindowTotals> {
        self.budget(budget)
            .cells
            .load()
            .iter()
            .map(|c| snapshot(c))
            .collect()
    }

    /// Sets whether a budget is strict (open, reload, offline modes).
    /// Sets a budget's configured enforcement (open, reload). A strict budget admits within
    /// its grant from now on (the replicator clears that while an offline mode other than
    /// `grant_only` applies).
    pub fn set_policy(&self, budget: u32, enforcement: Enforcement, offline: Offline) {
        let b = self.budget(budget);
        b.policy
            .store(policy_code(enforcement, offline), Ordering::Relaxed);
        b.strict
            .store(enforcement == Enforcement::Strict, Ordering::Relaxed);
    }

    /// Sets what a budget counts (open, reload, a template's first use).
    pub fn set_unit(&self, budget: u32, unit: Unit) {
        if unit != Unit::Usd {
            // Before the slot's unit: a charge that sees the unit also sees the flag.
            self.any_units.store(true, Ordering::Release);
        }
        self.budget(budget)
            .unit
            .store(unit.code(), Ordering::Release);
    }

    /// Whether any budget ever counted another unit than USD (never cleared: a slot keeps
    /// its unit for the life of the view).
    #[inline]
    pub fn has_units(&self) -> bool {
        self.any_units.load(Ordering::Acquire)
    }

    /// Sets the most a reservation holds in a budget (`None`: no cap).
    pub fn set_cap(&self, budget: u32, cap: Option<Money>) {
        let mut caps = self.caps.lock().unwrap_or_else(PoisonError::into_inner);
        match cap {
            Some(c) => caps.insert(budget, c.as_nanos()),
            None => caps.remove(&budget),
        };
        self.any_caps.store(!caps.is_empty(), Ordering::Release);
    }

    /// `amount` capped by the budget's `max_estimate`.
    #[inline]
    pub fn capped(&self, budget: u32, amount: u64) -> u64 {
        if !self.any_caps.load(Ordering::Acquire) {
            return amount;
        }
        let caps = self.caps.lock().unwrap_or_else(PoisonError::into_inner);
        caps.get(&budget).map_or(amount, |&c| amount.min(c))
    }

    /// What a budget counts.
    #[inline]
    pub fn unit(&self, budget: u32) -> Unit {
        Unit::from_code(self.budget(budget).unit.load(Ordering::Acquire))
    }

    /// The configured `(enforcement, offline)` of a budget.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn policy(&self, budget: u32) -> (Enforcement, Offline) {
        match self.budget(budget).policy.load(Ordering::Relaxed) {
            1 => (Enforcement::Strict, Offline::GrantOnly),
            2 => (Enforcement::Strict, Offline::LocalShare),
            3 => (Enforcement::Strict, Offline::Open),
            _ => (Enforcement::Shared, Offline::GrantOnly),
        }
    }

    /// Raises this node's own total of a window to at least `own` (loading from the store).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn raise_own(&self, budget: u32, window: Window, own: Money) {
        let cell = self.cell_for(budget, window);
        cell.own.fetch_max(own.as_nanos(), Ordering::Relaxed);
        self.budget(budget).raise_peak(cell.total());
        self.mirror_credit(budget, &cell);
    }

    /// Sets the other nodes' total of a window (replication). It only grows: the replicator
    /// merges with `max` per node, so a smaller value would be a stale read.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn raise_others(&self, budget: u32, window: Window, others: Money) {
        let cell = self.cell_for(budget, window);
        cell.others.fetch_max(others.as_nanos(), Ordering::Relaxed);
        self.budget(budget).raise_peak(cell.total());
        self.mirror_credit(budget, &cell);
    }

    /// Bulk [`View::raise_own`] for loading at open: one list swap per budget instead of one
    /// copy-on-write insert per window (quadratic: 10 000 stored windows took ~0.5 s).
    pub fn raise_own_many(&self, items: impl IntoIterator<Item = (u32, Window, Money)>) {
        self.raise_many(items, |c| &c.own);
    }

    /// Bulk [`View::raise_others`] for loading at open.
    pub fn raise_others_many(&self, items: impl IntoIterator<Item = (u32, Window, Money)>) {
        self.raise_many(items, |c| &c.others);
    }

    fn raise_many(
        &self,
        items: impl IntoIterator<Item = (u32, Window, Money)>,
        field: fn(&Cell) -> &AtomicU64,
    ) {
        // Grouped by budget in a map, not a vector of every slot: a reload that adds
        // thousands of series calls this per series, mostly with nothing to raise.
        let mut by_budget: BTreeMap<u32, Vec<(Window, u64)>> = BTreeMap::new();
        for (budget, window, amount) in items {
            by_budget
                .entry(budget)
                .or_default()
                .push((window, amount.as_nanos()));
        }
        for (budget, items) in by_budget {
            let b = self.budget(budget);
            let guard = b.swap.lock().unwrap_or_else(|p| p.into_inner());
            let mut cells: BTreeMap<(i64, i64), Arc<Cell>> = b
                .cells
                .load()
                .iter()
                .map(|c| ((c.window.start_secs(), c.window.end_secs()), Arc::clone(c)))
                .collect();
            for (window, amount) in items {
                let cell = cells
                    .entry((window.start_secs(), window.end_secs()))
                    .or_insert_with(|| Arc::new(Cell::new(window)));
                field(cell).fetch_max(amount, Ordering::Relaxed);
                b.raise_peak(cell.total());
            }
            // Newest first, like `cell_for` keeps it.
            b.cells.store(Arc::new(cells.into_values().rev().collect()));
            drop(guard);
            if b.credit_of.get().is_some() {
                for cell in b.cells.load().iter() {
                    self.mirror_credit(b.slot, cell);
                }
            }
        }
    }

    /// Links a budget to its credit series (open, reload): the series' totals count as
    /// credit of the budget's windows from now on.
    pub fn link_credit(&self, budget: u32, series: u32) {
        let _ = self.budget(budget).credit_series.set(series);
        let _ = self.budget(series).credit_of.set(budget);
        for cell in self.budget(series).cells.load().iter() {
            self.mirror_credit(series, cell);
        }
    }

    /// The budget a credit series credits (`None`: `slot` is a budget).
    pub fn credited_budget(&self, slot: u32) -> Option<u32> {
        self.budget(slot).credit_of.get().copied()
    }

    /// The slot of a budget's credit series.
    pub fn credit_series(&self, budget: u32) -> Option<u32> {
        self.budget(budget).credit_series.get().copied()
    }

    /// Adds `amount` to this node's credit total of a credit series in the window containing
    /// `at_secs` (a correction) and returns that window.
    pub fn add_credit(&self, series: u32, at_secs: i64, amount: Money) -> Window {
        let cell = self.cell_at(series, at_secs);
        saturating_add(&cell.own, amount.as_nanos());
        self.mirror_credit(series, &cell);
        cell.window
    }

    /// Copies a credit series' window total into the credited budget's cell of that window
    /// (`fetch_max`: both only grow, and racing mirrors of one window keep the larger).
    fn mirror_credit(&self, series: u32, cell: &Cell) {
        if let Some(&budget) = self.budget(series).credit_of.get() {
            let total = cell.total();
            if total > 0 {
                self.cell_for(budget, cell.window)
                    .credit
                    .fetch_max(total, Ordering::Relaxed);
            }
        }
    }

    /// Drops every window that ended at or before `cutoff_secs`.
    pub fn prune(&self, cutoff_secs: i64, now_secs: i64) {
        for b in self.slots() {
            // A sliding budget keeps the window before the current one (it still counts).
            let cutoff_secs = b.keep_cutoff(cutoff_secs, now_secs);
            if !b
                .cells
                .load()
                .iter()
                .any(|c| c.window.end_secs() <= cutoff_secs)
            {
                continue;
            }
            let _guard = b.swap.lock().unwrap_or_else(|p| p.into_inner());
            let kept: Vec<Arc<Cell>> = b
                .cells
                .load()
                .iter()
                .filter(|c| c.window.end_secs() > cutoff_secs)
                .cloned()
                .collect();
            b.cells.store(Arc::new(kept));
        }
    }

    /// Whether a budget is idle at `now_secs`: every window it has ended (a sliding budget:
    /// also the window before the current one, which still counts), and no reservation holds
    /// anything in it (a template's series may then leave the template's table).
    pub fn is_idle(&self, budget: u32, now_secs: i64) -> bool {
        let b = self.budget(budget);
        let horizon = b.keep_cutoff(now_secs, now_secs);
        b.cells
            .load()
            .iter()
            .all(|c| c.window.end_secs() <= horizon && c.reserved.load(Ordering::Relaxed) == 0)
    }

    /// The cell of the window containing `at_secs`, created on first use.
    #[inline]
    fn cell_at(&self, budget: u32, at_secs: i64) -> Arc<Cell> {
        let b = self.budget(budget);
        if let Some(c) = b
            .cells
            .load()
            .iter()
            .find(|c| c.window.contains_secs(at_secs))
        {
            return Arc::clone(c);
        }
        self.cell_for(budget, b.schedule.window_at_secs(at_secs))
    }

    /// The cell of `window`, created if missing (slow path: once per window).
    fn cell_for(&self, budget: u32, window: Window) -> Arc<Cell> {
        let b = self.budget(budget);
        if let Some(c) = b.cells.load().iter().find(|c| c.window == window) {
            return Arc::clone(c);
        }
        let _guard = b.swap.lock().unwrap_or_else(|p| p.into_inner());
        let current = b.cells.load_full();
        if let Some(c) = current.iter().find(|c| c.window == window) {
            return Arc::clone(c);
        }
        let cell = Arc::new(Cell::new(window));
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend(current.iter().cloned());
        let pos = next
            .iter()
            .position(|c| c.window.start_secs() < window.start_secs())
            .unwrap_or(next.len());
        next.insert(pos, Arc::clone(&cell));
        b.cells.store(Arc::new(next));
        cell
    }
}

impl View {
    /// The slots in use.
    fn slots(&self) -> impl Iterator<Item = &BudgetView> {
        (0..self.len()).map(|i| self.budget(i as u32))
    }
}

impl BudgetView {
    /// The soft limits of the budget that the cell's spend has crossed and that were not yet
    /// handed out in this window on this node (each bit once).
    #[inline]
    fn fire_bits(&self, cell: &Cell, at_secs: i64) -> Option<Crossed> {
        if !self.has_soft.load(Ordering::Relaxed) {
            return None;
        }
        let soft = self.soft.load();
        let mut spend = cell.total();
        if self.sliding.load(Ordering::Relaxed) {
            // The instant within the cell's window (a settle may come after it ended).
            let at = at_secs.clamp(cell.window.start_secs(), cell.window.end_secs() - 1);
            let cells = self.cells.load();
            spend = spend.saturating_add(self.previous_part(
                &cells,
                Some(cell.window),
                at,
                Cell::total,
            ));
        }
        let bits = crossed_bits(&soft, self.limit.load(Ordering::Relaxed), spend);
        let already = cell.fired.load(Ordering::Relaxed);
        if bits & !already == 0 {
            return None;
        }
        let before = cell.fired.fetch_or(bits, Ordering::Relaxed);
        let new = bits & !before;
        (new != 0).then_some(Crossed {
            window: cell.window,
            spend,
            bits: new,
        })
    }
    /// Keeps `peak` above every total that reaches the limit (one load when it does not).
    #[inline]
    fn note_total(&self, total: u64) {
        if total >= self.gate.load(Ordering::Relaxed) {
            self.peak.fetch_max(total, Ordering::Relaxed);
            self.hot.mark(self.slot);
        }
    }

    /// Raises `peak` to at least `total` (loading, replication), keeping [`Hot`] in step.
    #[inline]
    fn raise_peak(&self, total: u64) {
        let peak = self.peak.fetch_max(total, Ordering::Relaxed).max(total);
        if peak >= self.gate.load(Ordering::Relaxed) {
            self.hot.mark(self.slot);
        }
    }

    #[inline]
    fn exhausted(&self, now_secs: i64) -> bool {
        if self.peak.load(Ordering::Relaxed) < self.gate.load(Ordering::Relaxed) {
            return false;
        }
        let cells = self.cells.load();
        let current = cells.iter().find(|c| c.window.contains_secs(now_secs));
        let mut spend = current.map_or(0, |c| c.committed());
        if self.sliding.load(Ordering::Relaxed) {
            let window = current.map(|c| c.window);
            spend =
                spend.saturating_add(self.previous_part(&cells, window, now_secs, Cell::committed));
        }
        spend >= self.limit.load(Ordering::Relaxed)
    }

    fn new(schedule: Schedule, limit: Money, hot: Arc<Hot>, slot: u32) -> BudgetView {
        BudgetView::with_kind(schedule, limit, hot, slot, false)
    }

    fn with_kind(
        schedule: Schedule,
        limit: Money,
        hot: Arc<Hot>,
        slot: u32,
        templated: bool,
    ) -> BudgetView {
        if limit == Money::ZERO {
            // Spent from the start (`0 >= 0`, as in the reference).
            hot.mark(slot);
        }
        BudgetView {
            schedule,
            limit: AtomicU64::new(limit.as_nanos()),
            gate: AtomicU64::new(limit.as_nanos()),
            sliding: AtomicBool::new(false),
            cells: ArcSwap::new(empty_cells()),
            swap: Mutex::new(()),
            shadow: AtomicBool::new(false),
            strict: AtomicBool::new(false),
            policy: AtomicU8::new(0),
            unit: AtomicU8::new(0),
            starved: AtomicU64::new(0),
            would_deny: AtomicU64::new(0),
            soft: ArcSwap::new(no_soft_limits()),
            has_soft: AtomicBool::new(false),
            peak: AtomicU64::new(0),
            hot,
            slot,
            credit_series: OnceLock::new(),
            credit_of: OnceLock::new(),
            templated,
        }
    }
}

/// The empty window list every budget starts with, shared: a template may have a hundred
/// thousand series (and as many credit series, most never credited), and an allocation of
/// its own per list would cost each 48 bytes for nothing.
fn empty_cells() -> Arc<Vec<Arc<Cell>>> {
    static EMPTY: OnceLock<Arc<Vec<Arc<Cell>>>> = OnceLock::new();
    Arc::clone(EMPTY.get_or_init(|| Arc::new(Vec::new())))
}

/// The empty soft-limit list, shared (see [`empty_cells`]).
fn no_soft_limits() -> Arc<Vec<SoftLimit>> {
    static NONE: OnceLock<Arc<Vec<SoftLimit>>> = OnceLock::new();
    Arc::clone(NONE.get_or_init(|| Arc::new(Vec::new())))
}

/// The `policy` byte of a budget view: 0 shared, then strict with each offline mode.
fn policy_code(enforcement: Enforcement, offline: Offline) -> u8 {
    match (enforcement, offline) {
        (Enforcement::Strict, Offline::GrantOnly) => 1,
        (Enforcement::Strict, Offline::LocalShare) => 2,
        (Enforcement::Strict, Offline::Open) => 3,
        _ => 0,
    }
}

/// Why [`View::try_reserve`] found no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `spend + reserved + amount` would pass the limit (fleet view).
    Limit(Window),
    /// A strict budget: this node's `own + reserved + amount` would pass its grant (more may
    /// be granted by the fleet: the replicator can ask out of cycle).
    Grant(Window),
}

/// Soft limits newly crossed by a charge: the budget's soft limits whose bit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Crossed {
    pub window: Window,
    /// Spend after the charge, nanos.
    pub spend: u64,
    pub bits: u8,
}

fn snapshot(c: &Cell) -> WindowTotals {
    WindowTotals {
        window: c.window,
        own: Money::from_nanos(c.own.load(Ordering::Relaxed)),
        others: Money::from_nanos(c.others.load(Ordering::Relaxed)),
        reserved: Money::from_nanos(c.reserved.load(Ordering::Relaxed)),
        grant: Money::from_nanos(c.grant.load(Ordering::Relaxed)),
        credit: Money::from_nanos(c.credit.load(Ordering::Relaxed)),
    }
}

/// Bits of the soft limits that `spend` has reached for `limit`.
pub(crate) fn crossed_bits(soft: &[SoftLimit], limit: u64, spend: u64) -> u8 {
    let mut bits = 0u8;
    for (i, s) in soft.iter().enumerate().take(8) {
        if spend >= s.threshold(limit) {
            bits |= 1 << i;
        }
    }
    bits
}

/// `fetch_sub` that stops at zero instead of wrapping.
#[inline]
fn saturating_sub(a: &AtomicU64, v: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}

/// `fetch_add` that stops at `u64::MAX` instead of wrapping.
#[inline]
fn saturating_add(a: &AtomicU64, v: u64) {
    // The closure always returns Some, so fetch_update cannot fail.
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_add(v))
    });
}

#[cfg(test)]
mod tests {
    /// What one preallocated slot costs before it is used.
    const SLOT_BYTES: usize = 184;

    #[test]
    fn preallocated_slots_stay_small() {
        let each = std::mem::size_of::<OnceLock<BudgetView>>();
        assert!(each <= SLOT_BYTES, "{each} bytes per slot");
        let view = View::new(std::iter::empty());
        assert_eq!(view.reload_room(), (0, 2 * RELOAD_SLOTS));
        assert_eq!(view.capacity(), 2 * RELOAD_SLOTS + TEMPLATE_SLOTS);
        // The template room is segments allocated on first use: 24 bytes each until then.
        assert!(std::mem::size_of::<OnceLock<Segment>>() <= 24);
    }

    use super::*;
    use jiff::Timestamp;

    fn view() -> View {
        let s = Schedule::new("10s".parse().unwrap(), Timestamp::UNIX_EPOCH);
        View::new([(s, Money::from_nanos(100))])
    }

    #[test]
    fn spend_lands_in_its_window_and_resets_at_the_boundary() {
        let v = view();
        assert_eq!(
            v.add_own(0, 15, Money::from_nanos(60)),
            Window::from_secs(10, 20)
        );
        v.add_own(0, 19, Money::from_nanos(40));
        assert!(v.exhausted(0, 10));
        assert!(v.exhausted(0, 19));
        assert!(!v.exhausted(0, 20));
        assert!(!v.exhausted(0, 9));
        // A record for an older window does not disturb the current one.
        v.add_own(0, 3, Money::from_nanos(7));
        assert_eq!(v.totals_at(0, 5).own, Money::from_nanos(7));
        assert_eq!(v.totals_at(0, 12).own, Money::from_nanos(100));
        let starts: Vec<i64> = v.windows(0).iter().map(|w| w.window.start_secs()).collect();
        assert_eq!(starts, vec![10, 0]);
        v.prune(10, 25);
        assert_eq!(v.windows(0).len(), 1);
    }

    #[test]
    fn the_peak_fast_path_never_hides_a_spent_window() {
        let v = view(); // limit 100 per 10 s
        v.add_own(0, 1, Money::from_nanos(99));
        assert!(!v.exhausted(0, 1));
        v.add_own(0, 2, Money::from_nanos(1));
        assert!(v.exhausted(0, 2));
        assert!(!v.exhausted(0, 12), "the next window is fresh (slow path)");
        // Replication and loading raise it too.
        let w = view();
        w.raise_others(0, Window::from_secs(10, 20), Money::from_nanos(100));
        assert!(w.exhausted(0, 15));
        let w = view();
        w.raise_own_many([(0, Window::from_secs(10, 20), Money::from_nanos(150))]);
        assert!(w.exhausted(0, 15));
        // A lower limit: totals below the old one count against the new one.
        let w = view();
        w.add_own(0, 1, Money::from_nanos(60));
        assert!(!w.exhausted(0, 1));
        w.set_limit(0, Money::from_nanos(50));
        assert!(w.exhausted(0, 1));
        w.set_limit(0, Money::from_nanos(70));
        assert!(!w.exhausted(0, 1));
        w.add_own(0, 1, Money::from_nanos(10));
        assert!(w.exhausted(0, 1));
    }

    #[test]
    fn every_way_of_spending_a_budget_marks_it_hot() {
        // Budget 1 of two: its bit, not budget 0's, must be set by each path; below the limit
        // nothing is set (the request path then reads nothing).
        let two = || {
            let s = Schedule::new("10s".parse().unwrap(), Timestamp::UNIX_EPOCH);
            View::new([
                (s.clone(), Money::from_nanos(100)),
                (s, Money::from_nanos(100)),
            ])
        };
        const W: Window = Window::from_secs(10, 20);
        type Spend = fn(&View);
        let cases: [(&str, Spend); 7] = [
            ("charge", |v| {
                let _ = v.add_own_checked(1, 15, Money::from_nanos(100));
            }),
            ("replication", |v| {
                v.raise_others(1, W, Money::from_nanos(100))
            }),
            ("adoption", |v| v.raise_own(1, W, Money::from_nanos(100))),
            ("load", |v| {
                v.raise_others_many([(1, W, Money::from_nanos(100))]);
            }),
            ("lower limit", |v| {
                v.add_own(1, 15, Money::from_nanos(60));
                v.set_limit(1, Money::from_nanos(50));
            }),
            ("reservation", |v| {
                v.try_reserve(1, 15, Money::from_nanos(99)).expect("room");
            }),
            ("settle", |v| {
                let w = v.try_reserve(1, 15, Money::from_nanos(10)).expect("room");
                let _ = v.settle(1, w, Money::from_nanos(10), Money::from_nanos(100), 15);
            }),
        ];
        for (what, spend) in cases {
            let v = two();
            v.add_own(1, 15, Money::from_nanos(1));
            v.raise_others(0, W, Money::from_nanos(99));
            assert_eq!(v.hot(), 0, "{what}: nothing spent yet");
            spend(&v);
            assert!(v.exhausted(1, 15), "{what}");
            assert_eq!(v.hot(), 0b10, "{what}");
        }
        // A zero limit is spent from the start, whether configured or reloaded.
        let s = Schedule::new("10s".parse().unwrap(), Timestamp::UNIX_EPOCH);
        let v = View::new([(s.clone(), Money::from_nanos(1)), (s, Money::ZERO)]);
        assert_eq!(v.hot(), 0b10);
        v.set_limit(0, Money::ZERO);
        assert_eq!(v.hot(), 0b11);
        // A slot added by a reload has its own bit.
        let v = two();
        let s = Schedule::new("10s".parse().unwrap(), Timestamp::UNIX_EPOCH);
        let i = v.push(s.clone(), Money::from_nanos(5)).expect("spare slot");
        v.add_own_checked(i, 1, Money::from_nanos(5));
        assert_eq!(v.hot(), 1 << i);
        let j = v.push(s, Money::ZERO).expect("spare slot");
        assert_eq!(v.hot(), 1 << i | 1 << j);
    }

    #[test]
    fn others_count_toward_the_limit_and_only_grow() {
        let v = view();
        let w = Window::from_secs(0, 10);
        v.raise_others(0, w, Money::from_nanos(90));
        v.raise_others(0, w, Money::from_nanos(50));
        assert_eq!(v.totals_at(0, 1).others, Money::from_nanos(90));
        assert!(!v.exhausted(0, 1));
        v.add_own(0, 1, Money::from_nanos(10));
        assert!(v.exhausted(0, 1));
    }

    #[test]
    fn bulk_raise_matches_one_by_one() {
        let (a, b) = (view(), view());
        a.add_own(0, 25, Money::from_nanos(5));
        b.add_own(0, 25, Money::from_nanos(5));
        let items = [(40, 7), (0, 3), (20, 9), (40, 2), (10, 4)];
        for (start, n) in items {
            a.raise_own(
                0,
                Window::from_secs(start, start + 10),
                Money::from_nanos(n),
            );
            a.raise_others(
                0,
                Window::from_secs(start, start + 10),
                Money::from_nanos(n + 1),
            );
        }
        let w = |(start, n): (i64, u64), d: u64| {
            (
                0,
                Window::from_secs(start, start + 10),
                Money::from_nanos(n + d),
            )
        };
        b.raise_own_many(items.iter().map(|&i| w(i, 0)));
        b.raise_others_many(items.iter().map(|&i| w(i, 1)));
        assert_eq!(a.windows(0), b.windows(0));
        let starts: Vec<i64> = b.windows(0).iter().map(|t| t.window.start_secs()).collect();
        assert_eq!(starts, vec![40, 20, 10, 0]);
        assert_eq!(b.totals_at(0, 25).own, Money::from_nanos(9));
    }

    #[test]
    fn concurrent_adds_into_new_windows_are_all_counted() {
        let v = Arc::new(view());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let v = Arc::clone(&v);
                std::thread::spawn(move || {
                    for i in 0..1000i64 {
                        v.add_own(0, (i * 7 + t) % 50, Money::from_nanos(1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let sum: u64 = v.windows(0).iter().map(|w| w.own.as_nanos()).sum();
        assert_eq!(sum, 4000);
        assert_eq!(v.windows(0).len(), 5);
    }

    #[test]
    fn reservations_never_share_the_last_nano() {
        // Limit 100 nanos; 8 threads each try 50 reservations of 3: exactly 33 fit.
        let v = Arc::new(view());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let v = Arc::clone(&v);
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| v.try_reserve(0, 5, Money::from_nanos(3)).is_ok())
                        .count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 33);
        let w = v.totals_at(0, 5);
        assert_eq!(w.reserved.as_nanos(), 99);
        assert_eq!(w.own.as_nanos(), 0);
        assert!(!v.exhausted(0, 5), "99 of 100 held: one nano of room");
        assert!(v.try_reserve(0, 5, Money::from_nanos(1)).is_ok());
        assert!(v.exhausted(0, 5), "held money blocks the filter");
    }

    #[test]
    fn settle_counts_the_actual_and_frees_the_estimate() {
        let v = view();
        let w = v.try_reserve(0, 5, Money::from_nanos(60)).unwrap();
        assert!(v.try_reserve(0, 5, Money::from_nanos(50)).is_err());
        v.settle(0, w, Money::from_nanos(60), Money::from_nanos(20), 5);
        let t = v.totals_at(0, 5);
        assert_eq!((t.own.as_nanos(), t.reserved.as_nanos()), (20, 0));
        let w2 = v.try_reserve(0, 5, Money::from_nanos(80)).unwrap();
        v.unreserve(0, w2, Money::from_nanos(80));
        assert_eq!(v.totals_at(0, 5).reserved, Money::ZERO);
        // A reservation in the next window does not see this one's spend.
        assert!(v.try_reserve(0, 15, Money::from_nanos(100)).is_ok());
    }

    #[test]
    fn strict_admission_stays_within_the_grant() {
        let v = view();
        v.set_strict(0, true);
        assert!(
            matches!(
                v.try_reserve(0, 5, Money::from_nanos(1)),
                Err(Refused::Grant(_))
            ),
            "no grant yet"
        );
        let w = v.schedule(0).window_at_secs(5);
        v.set_grant(0, w, Money::from_nanos(30));
        assert!(v.try_reserve(0, 5, Money::from_nanos(20)).is_ok());
        assert!(v.try_reserve(0, 5, Money::from_nanos(11)).is_err());
        assert!(v.try_reserve(0, 5, Money::from_nanos(10)).is_ok());
        v.set_strict(0, false);
        assert!(
            v.try_reserve(0, 5, Money::from_nanos(70)).is_ok(),
            "shared: the limit"
        );
    }

    #[test]
    fn a_give_back_keeps_what_is_held_and_racing_reservations_stay_within_it() {
        let v = view();
        v.set_policy(0, Enforcement::Strict, Offline::GrantOnly);
        let w = v.schedule(0).window_at_secs(5);
        v.set_grant(0, w, Money::from_nanos(90));
        v.try_reserve(0, 5, Money::from_nanos(60)).unwrap();
        assert_eq!(v.lower_grant(0, w, Money::from_nanos(10)).as_nanos(), 60);
        assert!(matches!(
            v.try_reserve(0, 5, Money::from_nanos(1)),
            Err(Refused::Grant(_))
        ));
        // Concurrent: reservations race with give-backs; what is held never passes the grant
        // in force once both are done.
        for _ in 0..20 {
            let v = Arc::new(view());
            v.set_policy(0, Enforcement::Strict, Offline::GrantOnly);
            v.set_grant(0, w, Money::from_nanos(100));
            let takers: Vec<_> = (0..3)
                .map(|_| {
                    let v = Arc::clone(&v);
                    std::thread::spawn(move || {
                        for _ in 0..40 {
                            let _ = v.try_reserve(0, 5, Money::from_nanos(1));
                        }
                    })
                })
                .collect();
            let mut kept = 0;
            for target in [50u64, 20, 0] {
                kept = v.lower_grant(0, w, Money::from_nanos(target)).as_nanos();
            }
            for t in takers {
                t.join().unwrap();
            }
            let held = v.totals_at(0, 5).reserved.as_nanos();
            let grant = v.totals_at(0, 5).grant.as_nanos();
            assert!(held <= grant, "held {held} > grant {grant}");
            assert!(kept <= grant);
        }
    }

    #[test]
    fn a_shadow_budget_holds_but_never_refuses() {
        let v = view();
        v.set_shadow(0, true);
        assert!(v.try_reserve(0, 5, Money::from_nanos(150)).is_ok());
        assert_eq!(v.would_deny(0), 1);
    }

    #[test]
    fn a_shadow_budget_counts_each_would_be_denial_once_under_contention() {
        // Limit 100; 8 threads × 100 reservations of 1: every success raises `reserved` by
        // exactly 1, so exactly the 700 that took it past 100 would have been denied,
        // however often a CAS had to retry.
        let v = Arc::new(view());
        v.set_shadow(0, true);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let v = Arc::clone(&v);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        assert!(v.try_reserve(0, 5, Money::from_nanos(1)).is_ok());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(v.totals_at(0, 5).reserved.as_nanos(), 800);
        assert_eq!(v.would_deny(0), 700);
    }
}
