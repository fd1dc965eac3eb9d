//! One sync round: plan the windows to send and read ([`Worker::groups`]), exchange them,
//! apply the replies (peers, view, store, acknowledgements, adoption) and persist.

use super::wire::{GrantAsk, KeyReply};
use super::*;

/// The others' last known spend in one window.
#[derive(Debug)]
pub(super) struct PeerWindow {
    pub(super) window: Window,
    /// The others' total: the largest `~total - ours` seen (a Redis that lost data cannot
    /// lower it), at least what the data dir held at open.
    pub(super) others: u64,
    /// The total last written to the data dir.
    pub(super) persisted: u64,
}

/// What Redis acknowledged of our own total in one window (durable in the `acked` tree).
#[derive(Debug, Clone, Copy)]
pub(super) struct Acked {
    pub(super) window: Window,
    pub(super) total: u64,
    /// Written to the data dir.
    pub(super) stored: bool,
}

/// Per (budget, window start).
pub(super) type Peers = FxHashMap<(u32, i64), PeerWindow>;

/// How a round that did not fully succeed ended.
pub(super) enum RoundError {
    /// Nothing (useful) came back: Redis down, timeout, every budget rejected.
    Failed(ReplicationError),
    /// Redis answered and the replies were applied, but another instance holds our lease.
    Duplicate {
        error: ReplicationError,
        problems: Vec<Vec<String>>,
    },
}

impl RoundError {
    pub(super) fn into_error(self) -> ReplicationError {
        match self {
            RoundError::Failed(e) | RoundError::Duplicate { error: e, .. } => e,
        }
    }
}

/// The most windows of one budget in one round (one script call). Measured against a local
/// `redis-server` 7.0: see `docs/guide/failure-model.md` ("A large sync backlog").
pub(super) const MAX_WINDOWS_PER_CALL: usize = 128;

/// The most windows in one round beyond every budget's current window (which always goes).
pub(super) const MAX_EXTRA_WINDOWS_PER_ROUND: usize = 4 * MAX_WINDOWS_PER_CALL;

/// One window of one budget in a round.
#[derive(Debug, Clone, Copy)]
pub(super) struct Item {
    pub(super) window: Window,
    /// Our durable total (0 when we never spent in it).
    pub(super) durable: u64,
    /// Dirty: our total is sent; otherwise only read.
    pub(super) send: bool,
}

/// One round's request: per budget the windows (with our own totals) and their wire groups.
pub(super) struct Groups {
    pub(super) windows: Vec<Vec<Item>>,
    pub(super) wire: Vec<Group>,
}

impl Worker {
    pub(super) async fn exchange(&mut self) -> Result<Vec<Vec<String>>, RoundError> {
        self.round_started = Instant::now();
        self.unchanged = 0;
        // Invalidations received since the last round, before anything is planned.
        if self.tracker.drain() {
            self.on_flush();
        }
        let now = floor_secs(self.parts.clock.now());
        let grace = i64::try_from(self.parts.redis.grace.as_secs()).unwrap_or(i64::MAX / 4);
        // Forget others' windows once their keys have expired in Redis too.
        let view = &self.parts.view;
        self.peers
            .retain(|k, p| expire_at(view, k.0, p.window, grace) > now);
        self.forget_acked(now, grace);
        self.book.prune(&self.parts.keys, now);
        let mut groups = self.groups(now, grace);
        // Marks of keys no longer synced (windows over) go.
        {
            let live: FxHashSet<&str> = groups
                .wire
                .iter()
                .flat_map(|g| g.items.iter().map(|x| x.key.as_str()))
                .collect();
            self.tracker.retain(|k| live.contains(k));
        }
        // A connection kept from an earlier round may have died meanwhile (Redis restarted, a
        // link reset): then one fresh connection gets a second chance within the same round.
        let mut attempts = if self.backend.is_some() { 2 } else { 1 };
        let replies = loop {
            attempts -= 1;
            match self.send(&mut groups).await {
                Ok(replies) => break replies,
                Err((e, dead)) if dead && attempts > 0 => {
                    tracing::debug!(error = %e, "redis connection lost; reconnecting");
                }
                Err((e, _)) => return Err(RoundError::Failed(e)),
            }
        };
        let applied = self.apply(&groups, replies);
        // After the replies (a renewal they made may predate the flush).
        if std::mem::take(&mut self.flushed) {
            self.on_flush();
        }
        // The first rounds verify every key they touch, until a backlog left nothing out.
        if self.deferred == 0 {
            self.verify = false;
        }
        applied
    }

    /// Redis dropped its whole data set (an invalidation without keys): every clean key is
    /// read again (the tracker dropped its marks), so the reads find our fields gone and the
    /// windows dirty, as without tracking; and every lease is renewed at the next clean round
    /// (whose `PEXPIRE` then finds it gone: the script takes it again).
    ///
    /// Decision: the windows are not made dirty at once. That would save one round only when
    /// the invalidation reached us before the round started (a race with the network), while
    /// the reads heal deterministically one round later, exactly as a Redis restart does.
    pub(super) fn on_flush(&mut self) {
        tracing::debug!(url = %self.url(), "redis dropped its data set; reading every window again");
        self.lease_set.clear();
    }

    /// Drops the acknowledgements of windows whose keys have expired in Redis (memory and
    /// data dir).
    pub(super) fn forget_acked(&mut self, now: i64, grace: i64) {
        let keys = &self.parts.keys;
        let gone = &mut self.acked_gone;
        let view = &self.parts.view;
        self.acked.retain(|&(b, start), a| {
            let live = expire_at(view, b, a.window, grace) > now;
            if !live && a.stored {
                gone.push(store_key(keys, b, start));
            }
            live
        });
    }

    /// The identity of this round's script calls.
    pub(super) fn identity(&self) -> Identity<'_> {
        Identity {
            node: &self.parts.node_id,
            instance: &self.instance,
            lease_ms: u64::try_from(lease_ttl(&self.parts.redis).as_millis()).unwrap_or(u64::MAX),
            read_lease_ms: u64::try_from(read_lease_ttl(&self.parts.redis).as_millis())
                .unwrap_or(u64::MAX),
            release: self.release,
            verify: self.verify,
            guard_ms: u64::try_from(guard(&self.parts.redis).as_millis()).unwrap_or(u64::MAX),
            grant_lease_ms: self
                .parts
                .redis
                .grant_lease
                .map_or(0, |l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The windows of this round, grouped per budget (one script call each):
    ///
    /// * **dirty** (our durable total differs from what Redis last acknowledged): sent;
    /// * **clean and live** (the window has not ended): only read, so that we learn the
    ///   others' spend; the current window of every budget is always read;
    /// * **clean and closed**: neither sent nor read (`status` and late records use local
    ///   data; a late record makes the window dirty, so it is sent again).
    pub(super) fn groups(&mut self, now: i64, grace: i64) -> Groups {
        let keys = self.parts.keys.snapshot();
        let mut windows = self.windows_to_sync(keys.len(), now, grace);
        let asks = self.plan_current(&mut windows, now);
        // Budgets with nothing to write are read with plain commands, unless the script has
        // work there: this process's first (verifying) round, the last one (it releases the
        // leases), a lease not known to be ours (the script takes it), a key a plain read
        // found in need of repair.
        let modes: Vec<Mode> = windows
            .iter()
            .enumerate()
            .map(|(b, list)| self.mode_of(b, list, asks[b].is_some()))
            .collect();
        let prefix = &self.parts.redis.prefix;
        let node = &self.parts.node_id;
        let wire = windows
            .iter()
            .enumerate()
            .map(|(b, list)| {
                let budget = &keys[b];
                Group {
                    mode: modes[b],
                    lease: lease_key(prefix, budget, node),
                    marker: strict_key(prefix, budget),
                    items: list
                        .iter()
                        .map(|x| SyncItem {
                            key: window_key(prefix, budget, x.window.start_secs()),
                            own: if x.send { x.durable } else { 0 },
                            expire_at: self.expire_at(b as u32, x.window, grace),
                            grant: asks[b]
                                .as_ref()
                                .filter(|(w, _)| *w == x.window)
                                .map(|(_, ask)| ask.clone()),
                            skip: false,
                        })
                        .collect(),
                }
            })
            .collect();
        Groups { windows, wire }
    }

    /// When a window's key may expire in Redis: `grace` after its end, and for a sliding
    /// budget `grace` after the end of the next window (which still counts it).
    fn expire_at(&self, budget: u32, window: Window, grace: i64) -> i64 {
        expire_at(&self.parts.view, budget, window, grace)
    }

    /// Per budget (of `n`), the durable windows that are dirty or live (see [`Self::groups`]).
    fn windows_to_sync(&self, n: usize, now: i64, grace: i64) -> Vec<Vec<Item>> {
        let mut windows: Vec<Vec<Item>> = vec![Vec::new(); n];
        for (b, w, total) in self.parts.durable.snapshot() {
            // A slot added by a reload after `keys` was read waits for the next round.
            let Some(list) = windows.get_mut(b as usize) else {
                continue;
            };
            if self.expire_at(b, w, grace) <= now {
                continue;
            }
            let acked = self.acked.get(&(b, w.start_secs())).map(|a| a.total);
            let dirty = total > 0 && acked != Some(total);
            let live = w.end_secs() > now;
            if dirty || live {
                list.push(Item {
                    window: w,
                    durable: total,
                    send: dirty,
                });
            }
        }
        windows
    }

    /// Adds every budget's current window (read at least), plans its grant request (strict
    /// budgets), orders the windows newest first and counts what is sent and read.
    fn plan_current(
        &mut self,
        windows: &mut [Vec<Item>],
        now: i64,
    ) -> Vec<Option<(Window, GrantAsk)>> {
        let mut asks = vec![None; windows.len()];
        for (b, list) in windows.iter_mut().enumerate() {
            let current = self.parts.view.schedule(b as u32).window_at_secs(now);
            if !list.iter().any(|x| x.window == current) {
                list.push(Item {
                    window: current,
                    durable: 0,
                    send: false,
                });
            }
            // A sliding budget still counts the previous window: read it too, so that what
            // the others spent in it late (after our last read) is learnt.
            let view = &self.parts.view;
            if view.is_sliding(b as u32) {
                let previous = view
                    .schedule(b as u32)
                    .window_at_secs(current.start_secs() - 1);
                if !list.iter().any(|x| x.window == previous) {
                    list.push(Item {
                        window: previous,
                        durable: 0,
                        send: false,
                    });
                }
            }
            asks[b] = self
                .book
                .plan(
                    &self.parts.view,
                    &self.parts.store,
                    &self.parts.keys,
                    b as u32,
                    current,
                    now,
                    self.parts.redis.sync_interval,
                    self.release,
                )
                .map(|ask| (current, ask));
            // The current window first (always sent: enforcement is never starved by a
            // backlog), then the oldest (nearest to expiring in Redis), writes before reads.
            list.sort_by_key(|x| (x.window != current, !x.send, x.window.start_secs()));
        }
        self.deferred = self.bound_work(windows);
        for x in windows.iter().flatten() {
            if x.send {
                self.sent.0 += 1;
            } else {
                self.sent.1 += 1;
            }
        }
        asks
    }

    /// Bounds one round's work (invariant 6): at most [`MAX_WINDOWS_PER_CALL`]
    /// windows per budget (one script call) and [`MAX_EXTRA_WINDOWS_PER_ROUND`] beyond the
    /// budgets' current windows in the whole round. Each list holds its current window
    /// first, which always stays. What is left out stays dirty (or unread) and goes in a
    /// later round; the budgets take turns at the round's allowance. Returns how many
    /// windows were left out.
    fn bound_work(&mut self, windows: &mut [Vec<Item>]) -> u64 {
        let n = windows.len();
        let mut allowance = MAX_EXTRA_WINDOWS_PER_ROUND;
        let mut deferred = 0u64;
        let first = if n == 0 { 0 } else { self.turn % n };
        for i in 0..n {
            let list = &mut windows[(first + i) % n];
            let keep = list.len().min(MAX_WINDOWS_PER_CALL).min(allowance + 1);
            allowance -= keep.saturating_sub(1);
            deferred += (list.len() - keep) as u64;
            list.truncate(keep);
        }
        if deferred > 0 {
            // The next round starts its allowance one budget further.
            self.turn = self.turn.wrapping_add(1);
            tracing::debug!(
                deferred,
                "sync backlog: windows left for the next rounds (work per round is bounded)"
            );
        }
        deferred
    }

    /// How budget `b` is sent this round (see [`Self::groups`]); `asks`: it requests a grant.
    fn mode_of(&mut self, b: usize, list: &[Item], asks: bool) -> Mode {
        let started = self.round_started;
        let ours = self.lease_ours.get(b).copied().unwrap_or(false);
        let script = self.verify
            || self.release
            || asks
            || !ours
            || list.iter().any(|x| x.send)
            || self.script_next.contains(&(b as u32));
        let set = self.lease_set.get(b).copied().flatten();
        if script {
            self.script_next.remove(&(b as u32));
            // A dirty budget renews its lease like a clean one, once a third of it has
            // passed (a `SET` per script call was ~1 µs of Redis CPU); a
            // lease last given the longer read lease is set back to the script's at
            // once, so a node that crashes while dirty is taken over as soon as before.
            let renew = set.is_none_or(|(at, ttl)| {
                ttl != lease_ttl(&self.parts.redis)
                    || started.saturating_duration_since(at) >= ttl / 3
            });
            Mode::Script { renew }
        } else {
            // Once a third of what we last gave the lease has passed (measured from
            // the start of the round that set it: Redis set it later): rounds come
            // at most ~1.1 intervals apart, so two thirds are a wide margin.
            let due = set.is_none_or(|(at, ttl)| started.saturating_duration_since(at) >= ttl / 3);
            Mode::Read { renew: due }
        }
    }

    /// Merges a round's replies into the peers, the view, the store, the acknowledgements and
    /// (adoption) the journal. Returns the problems per budget, or the duplicate node id
    /// error (after applying everything that was read).
    pub(super) fn apply(
        &mut self,
        groups: &Groups,
        replies: Vec<GroupOutcome>,
    ) -> Result<Vec<Vec<String>>, RoundError> {
        let mut acc = Applied::new(groups.windows.len());
        for (b, (windows, reply)) in groups.windows.iter().zip(replies).enumerate() {
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    let e = self.protocol(&e.to_string());
                    acc.problems[b].push(e.to_string());
                    acc.failed_groups += 1;
                    acc.first_failure.get_or_insert(e);
                    continue;
                }
            };
            let group = &groups.wire[b];
            let held = self.apply_lease(b, group, reply.lease, &mut acc);
            for (item, key) in windows.iter().zip(reply.keys) {
                acc.keys += 1;
                match key {
                    Ok(state) => self.apply_key(b as u32, group.mode, held, item, state, &mut acc),
                    Err(p) => {
                        self.script_next.insert(b as u32);
                        let p = flat(&scrub(&p, &self.parts.redis.url));
                        acc.first_key_failure.get_or_insert_with(|| p.clone());
                        acc.failed_keys += 1;
                        acc.problems[b].push(p);
                    }
                }
            }
        }
        for (b, window, total) in std::mem::take(&mut acc.adopt) {
            self.adopt(b, window, total);
        }
        self.persist(&acc.changed, acc.acked_changed);
        self.outcome(acc)
    }

    /// Records budget `b`'s lease state from its reply; returns whether this instance holds it.
    fn apply_lease(&mut self, b: usize, group: &Group, lease: Lease, acc: &mut Applied) -> bool {
        if self.lease_ours.len() <= b {
            self.lease_ours.resize(b + 1, false);
        }
        self.lease_ours[b] = lease == Lease::Held;
        if self.lease_set.len() <= b {
            self.lease_set.resize(b + 1, None);
        }
        let redis = &self.parts.redis;
        self.lease_set[b] = match (&lease, group.mode) {
            (Lease::Held, Mode::Script { renew: true }) => {
                Some((self.round_started, lease_ttl(redis)))
            }
            // Not renewed (unless it was gone: then it lives longer than this says).
            (Lease::Held, Mode::Script { renew: false }) => self.lease_set[b],
            (Lease::Held, Mode::Read { renew: true }) => {
                Some((self.round_started, read_lease_ttl(redis)))
            }
            (Lease::Held, Mode::Read { renew: false }) => self.lease_set[b],
            _ => None,
        };
        match lease {
            Lease::Held => true,
            Lease::Free => {
                // The next round's script takes it.
                self.script_next.insert(b as u32);
                false
            }
            Lease::Refused { holder } => {
                acc.refused_by.get_or_insert(holder);
                false
            }
            Lease::Broken(e) => {
                acc.problems[b].push(format!(
                    "lease key {}: {} (this data dir's spend is kept apart under its instance id)",
                    group.lease,
                    flat(&e)
                ));
                false
            }
        }
    }

    /// Applies one window key's reply of budget `b32` (sent in `mode`; `held`: our lease).
    fn apply_key(
        &mut self,
        b32: u32,
        mode: Mode,
        held: bool,
        item: &Item,
        mut state: KeyReply,
        acc: &mut Applied,
    ) {
        if state.unread {
            // Not read: Redis reported no change since our last read.
            return;
        }
        if state.needs_script {
            // A plain read found what only the script repairs: use it next round,
            // and do not trust these values meanwhile.
            self.script_next.insert(b32);
            return;
        }
        if !state.problems.is_empty() {
            // Keep reporting it (only the script sees bad fields).
            self.script_next.insert(b32);
        }
        acc.problems[b32 as usize].extend(std::mem::take(&mut state.problems));
        if let Some(owner) = state.owner.as_ref().filter(|o| **o != self.instance) {
            let known = self.foreign_owners.entry(b32).or_default();
            if !known.contains(owner) {
                match mode {
                    // Another data dir wrote our node's field since we last looked:
                    // the script's lease check runs next round.
                    Mode::Read { .. } => {
                        self.script_next.insert(b32);
                    }
                    // Seen while we hold the lease: written before we took it.
                    Mode::Script { .. } if held => known.push(owner.clone()),
                    Mode::Script { .. } => {}
                }
            }
        }
        if let Some(g) = state.grant.clone() {
            self.book.apply(
                &self.parts.view,
                &self.parts.store,
                &self.parts.keys,
                b32,
                item.window,
                g,
            );
        }
        // Our field: recorded as written by this data dir, or (written before owners
        // were recorded) ours when we hold the lease.
        let field = state
            .field
            .filter(|_| match &state.owner {
                Some(owner) => *owner == self.instance,
                None => held,
            })
            .unwrap_or(0);
        self.merge_window(b32, item, field, &state, acc);
    }

    /// Raises the others' spend of one window and records what Redis holds of ours (`field`,
    /// our node's field as far as it is ours).
    fn merge_window(
        &mut self,
        b32: u32,
        item: &Item,
        field: u64,
        state: &KeyReply,
        acc: &mut Applied,
    ) {
        let window = item.window;
        let ours = field.saturating_add(state.mine);
        let others = state.total.saturating_sub(ours);
        let entry = self
            .peers
            .entry((b32, window.start_secs()))
            .or_insert_with(|| PeerWindow {
                window,
                others: 0,
                persisted: 0,
            });
        entry.others = entry.others.max(others);
        self.parts
            .view
            .raise_others(b32, window, Money::from_nanos(entry.others));
        if entry.others > entry.persisted {
            acc.changed.push((b32, window.start_secs()));
        }
        if field > item.durable {
            acc.adopt.push((b32, window, field));
        }
        // What Redis holds of our counter covers our durable total: acknowledged.
        // Otherwise (Redis lost it, or it was never sent) the window is dirty.
        let k = (b32, window.start_secs());
        let in_redis = field.max(state.mine);
        if item.durable > 0 && in_redis >= item.durable {
            if self.acked.get(&k).map(|a| a.total) != Some(item.durable) {
                self.acked.insert(
                    k,
                    Acked {
                        window,
                        total: item.durable,
                        stored: false,
                    },
                );
                acc.acked_changed = true;
            }
        } else if let Some(a) = self.acked.remove(&k) {
            // Whoever the recorded writer: Redis holds less of our node than it acknowledged.
            let found = state.field.unwrap_or(0).max(state.mine);
            if found < a.total {
                self.data_loss(b32, window, a.total, found);
            }
            if a.stored {
                self.acked_gone.push(store_key(&self.parts.keys, b32, k.1));
            }
        }
    }

    /// The round's result once every reply is applied.
    fn outcome(&self, acc: Applied) -> Result<Vec<Vec<String>>, RoundError> {
        // Nothing at all synced (every budget or every key failed, e.g. Redis out of memory
        // or NOAUTH): that is a failed round, not a list of per-budget problems.
        if acc.keys == acc.failed_keys && (acc.failed_groups > 0 || acc.failed_keys > 0) {
            let e = acc
                .first_failure
                .unwrap_or_else(|| ReplicationError::Protocol {
                    message: acc.first_key_failure.unwrap_or_default(),
                });
            return Err(RoundError::Failed(e));
        }
        match acc.refused_by {
            Some(holder) => Err(RoundError::Duplicate {
                error: ReplicationError::DuplicateNodeId {
                    node_id: self.parts.node_id.clone(),
                    holder,
                },
                problems: acc.problems,
            }),
            None => Ok(acc.problems),
        }
    }

    /// This node's field in Redis is ahead of its disk: the data dir lost spend. Take it back.
    pub(super) fn adopt(&self, budget: u32, window: Window, total: u64) {
        tracing::warn!(
            budget = %self.parts.keys.get(budget).key_name(),
            window = %window.start(),
            total,
            "redis holds more own spend than the data dir; adopting it"
        );
        self.parts
            .view
            .raise_own(budget, window, Money::from_nanos(total));
        // A full channel only delays this to the next round, which sees the same difference.
        let _ = self.parts.journal.try_send(Event::Adopt {
            budget,
            window,
            total,
            urgent: true,
        });
    }

    /// Keeps the others' totals and the acknowledgements in the data dir, one flush.
    /// Failure only costs freshness (or one more send) after a restart.
    pub(super) fn persist(&mut self, changed: &[(u32, i64)], acked_changed: bool) {
        if changed.is_empty() && !acked_changed && self.acked_gone.is_empty() {
            return;
        }
        let items: Vec<(WindowKey, PeersValue)> = changed
            .iter()
            .filter_map(|k| self.peers.get(k).map(|p| (k.0, p.window, p.others)))
            .map(|(b, w, others)| {
                (
                    store_key(&self.parts.keys, b, w.start_secs()),
                    PeersValue {
                        end: w.end_secs(),
                        others,
                    },
                )
            })
            .collect();
        let acked: Vec<(WindowKey, AckedValue)> = self
            .acked
            .iter()
            .filter(|(_, a)| !a.stored)
            .map(|(&(b, start), a)| {
                (
                    store_key(&self.parts.keys, b, start),
                    AckedValue {
                        end: a.window.end_secs(),
                        total: a.total,
                    },
                )
            })
            .collect();
        let store = &self.parts.store;
        let written = store
            .write_peers(items.iter().map(|(k, v)| (k, v)))
            .and_then(|()| {
                store.write_acked(acked.iter().map(|(k, v)| (k, *v)), self.acked_gone.iter())
            })
            .and_then(|()| store.flush());
        match written {
            Ok(()) => {
                for k in changed {
                    if let Some(p) = self.peers.get_mut(k) {
                        p.persisted = p.others;
                    }
                }
                for a in self.acked.values_mut() {
                    a.stored = true;
                }
                self.acked_gone.clear();
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not keep the other nodes' spend in the data dir")
            }
        }
    }
}

/// What applying a round's replies gathers before it persists and decides the outcome.
#[derive(Default)]
pub(super) struct Applied {
    /// Per budget.
    problems: Vec<Vec<String>>,
    /// Peer windows whose others' total rose (to persist).
    changed: Vec<(u32, i64)>,
    acked_changed: bool,
    /// Windows whose field in Redis is ahead of our disk.
    adopt: Vec<(u32, Window, u64)>,
    refused_by: Option<String>,
    failed_groups: usize,
    first_failure: Option<ReplicationError>,
    keys: usize,
    failed_keys: usize,
    first_key_failure: Option<String>,
}

impl Applied {
    fn new(budgets: usize) -> Applied {
        Applied {
            problems: vec![Vec::new(); budgets],
            ..Applied::default()
        }
    }
}

/// When a window's key may expire in Redis: `grace` after its end, and for a sliding budget
/// `grace` after the end of the next window (which still counts it).
fn expire_at(view: &crate::view::View, budget: u32, window: Window, grace: i64) -> i64 {
    let end = if view.is_sliding(budget) {
        view.schedule(budget)
            .window_at_secs(window.end_secs())
            .end_secs()
    } else {
        window.end_secs()
    };
    end.saturating_add(grace)
}
