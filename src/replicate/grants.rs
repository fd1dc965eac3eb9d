//! This node's side of strict budgets (escrow): what it asks the fleet for, what it gives
//! back, and how a grant becomes spendable (durable first). The protocol and the argument for
//! the bound are in `docs/strict-budgets.md`; the Redis side is in `merge.lua`.
//!
//! Per strict budget, only the **current** window is negotiated: a past window's spend is
//! closed (its grant no longer matters), a future one has none yet.
//!
//! * **Sizing**: the node keeps the last rounds' own spend; its headroom `h` is the larger of
//!   4 sync intervals of its recent spend rate, the largest reservation refused by its grant
//!   since the last round (`View::take_starved`), the largest amount it held reserved
//!   recently, and 1 % of the limit. When what is left of its grant (`grant − own −
//!   reserved`) falls below `h`, it asks for `own + reserved + 2h`.
//! * **Give-back**: idle ([`IDLE_ROUNDS`] rounds without spend and nothing reserved), at the
//!   last round (shutdown) and when a budget stops being strict: the view's grant is lowered
//!   first (`View::lower_grant`, never below what is spent and held), then the disk, then
//!   Redis is told.
//! * **Raise**: the grant Redis returns is written to the `grants` tree and flushed before
//!   `View::set_grant` lets it be spent. A failed write leaves the view's grant where it was
//!   (the next round gets the same grant back from Redis and retries).
//! * **Offline** (a round failed): `grant_only` changes nothing; `local_share` lets the view
//!   admit up to `limit / holders` (holders as last seen; not written to disk: it is no
//!   grant); `open` clears the view's strict flag. The next successful round restores the
//!   durable grant and the flag.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::durable::store::{GrantValue, HoldersValue, Store, WindowKey};
use crate::model::budget::{Enforcement, Offline};
use crate::model::money::Money;
use crate::model::slots::SlotKeys;
use crate::model::unit::Unit;
use crate::model::window::Window;
use crate::view::View;

use super::store_key;
use super::wire::{GrantAsk, GrantReply};

/// Rounds without any spend or hold after which a node gives its unused grant back.
pub(crate) const IDLE_ROUNDS: u32 = 5;

/// Own spend samples kept per budget for the spend rate.
const RATE_SAMPLES: usize = 8;

/// This node's grant of one strict window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    pub window: Window,
    /// On disk: what the view may let be spent (and what Redis must keep at least).
    pub durable: u64,
    /// The fleet's sum of grants in the window, as last seen.
    pub granted: u64,
    /// Nodes holding a grant field in the window, as last seen.
    pub holders: u64,
    /// Raises frozen by the guard after a Redis loss, as last seen.
    pub frozen: bool,
}

/// What `status` shows of a strict budget's current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrantStatus {
    pub window: Window,
    pub grant: Money,
    pub granted_total: Money,
}

/// Per strict budget: recent spend, to size the asks.
#[derive(Debug, Default)]
struct Pace {
    samples: VecDeque<(Instant, u64)>,
    /// Largest amount held reserved over the samples.
    peak_reserved: u64,
    idle_rounds: u32,
    last_used: u64,
}

impl Pace {
    /// Records this round's spend (`own`), reservations and refused demand (`starved`) and
    /// returns the headroom a grant should have over what is used: four sync intervals of
    /// spend at the recent rate, at least the refused demand, the peak held reserved and a
    /// hundredth of the limit.
    fn headroom(
        &mut self,
        own: u64,
        reserved: u64,
        starved: u64,
        limit: u64,
        interval: Duration,
    ) -> u64 {
        let used = own.saturating_add(reserved);
        let now = Instant::now();
        self.samples.push_back((now, own));
        while self.samples.len() > RATE_SAMPLES {
            self.samples.pop_front();
        }
        // A new window restarts the spend series.
        if self.samples.iter().any(|&(_, o)| o > own) {
            self.samples.clear();
            self.samples.push_back((now, own));
            self.peak_reserved = 0;
        }
        self.peak_reserved = self.peak_reserved.max(reserved);
        // A refused reservation is demand too: without this, a node idle before it would give
        // back, in the very next round, the grant just raised for that reservation.
        if used == self.last_used && reserved == 0 && starved == 0 {
            self.idle_rounds = self.idle_rounds.saturating_add(1);
        } else {
            self.idle_rounds = 0;
        }
        self.last_used = used;
        let rate = match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, o0)), Some(&(t1, o1))) if t1 > t0 => {
                (o1.saturating_sub(o0)) as f64 / (t1 - t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let by_rate = (rate * 4.0 * interval.as_secs_f64()).min(limit as f64) as u64;
        by_rate
            .max(starved)
            .max(self.peak_reserved)
            .max(limit / 100)
            .max(1)
    }

    /// Whether the budget has been idle long enough to give its grant back.
    fn idle(&self) -> bool {
        self.idle_rounds >= IDLE_ROUNDS
    }
}

/// What a node wants of a strict `concurrent` budget's grant, `used` being the slots it
/// holds. Slots are taken and given back at every reservation, never spent, so a margin a busy
/// node keeps would strand the limit's last slots for as long as it stays busy (it never goes
/// idle): it asks only when a reservation was refused by the grant (`starved`, for twice
/// that), keeps at most that margin, and keeps none while the whole limit is granted
/// (`full`: another node may be waiting for a slot).
fn slots_want(used: u64, durable: u64, starved: u64, full: bool, release: bool) -> u64 {
    let margin = starved.max(1).saturating_mul(2);
    let left = durable.saturating_sub(used);
    if release {
        used
    } else if starved > left {
        used.saturating_add(margin)
    } else if full {
        used
    } else if left > margin {
        used.saturating_add(margin)
    } else {
        durable
    }
}

/// The grant book of one node.
#[derive(Debug, Default)]
pub(crate) struct Book {
    held: FxHashMap<(u32, i64), Held>,
    pace: FxHashMap<u32, Pace>,
    /// Grants of ended windows to remove from the disk.
    gone: Vec<WindowKey>,
    /// Budgets whose offline mode is applied in the view (cleared by a successful round).
    offline: FxHashMap<u32, Offline>,
    /// Per strict window: the node ids seen holding a grant field (sorted; durable in the
    /// `holders` tree before it is kept here). Sent with every ask: after a Redis data loss
    /// the script grants nothing from the window until each has re-registered.
    known: FxHashMap<(u32, i64), HoldersValue>,
    /// Holder lists of ended windows to remove from the disk.
    gone_holders: Vec<WindowKey>,
}

impl Book {
    /// The book as the data dir left it.
    pub fn load(
        keys: &SlotKeys,
        grants: Vec<(WindowKey, GrantValue)>,
        holders: Vec<(WindowKey, HoldersValue)>,
    ) -> Book {
        let mut book = Book::default();
        for (key, value) in holders {
            match keys.stored(&key.provider, &key.period) {
                Some(b) => {
                    book.known.insert((b, key.start), value);
                }
                None => book.gone_holders.push(key),
            }
        }
        for (key, value) in grants {
            if let Some(b) = keys.stored(&key.provider, &key.period) {
                book.held.insert(
                    (b, key.start),
                    Held {
                        window: crate::durable::store::window_of(&key, value.end),
                        durable: value.grant,
                        granted: 0,
                        holders: 0,
                        frozen: false,
                    },
                );
            }
        }
        book
    }

    /// Forgets (memory and, at the next write, disk) the grants of windows that ended.
    pub fn prune(&mut self, keys: &SlotKeys, now: i64) {
        let gone = &mut self.gone;
        self.held.retain(|&(b, start), h| {
            let live = h.window.end_secs() > now;
            if !live {
                gone.push(store_key(keys, b, start));
            }
            live
        });
        let gone = &mut self.gone_holders;
        self.known.retain(|&(b, start), h| {
            let live = h.end > now;
            if !live {
                gone.push(store_key(keys, b, start));
            }
            live
        });
    }

    /// The ask for budget `b`'s current window `window`, or `None` when the budget is not
    /// strict. Gives back first (view, then disk) when the node is idle or `closing`.
    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        &mut self,
        view: &View,
        store: &Store,
        keys: &SlotKeys,
        b: u32,
        window: Window,
        now_secs: i64,
        interval: Duration,
        closing: bool,
    ) -> Option<GrantAsk> {
        if view.policy(b).0 != Enforcement::Strict {
            return None;
        }
        let limit = view.limit(b).as_nanos();
        let t = view.totals_at(b, now_secs);
        let own = t.own.as_nanos();
        let reserved = t.reserved.as_nanos();
        let used = own.saturating_add(reserved);
        let starved = view.take_starved(b).as_nanos();
        let durable = self
            .held
            .get(&(b, window.start_secs()))
            .map_or(0, |h| h.durable);

        // What the script may grant against: the limit plus the credits that offset spend
        // (the window counts `max(0, spend - credits)`). Both figures as known here are at
        // most the fleet's, and `min` only grows with them: never more room than the truth.
        let script_limit = limit.saturating_add(t.credit.min(t.gross()).as_nanos());
        let pace = self.pace.entry(b).or_default();
        let headroom = pace.headroom(own, reserved, starved, limit, interval);
        let left = durable.saturating_sub(used);
        let idle = pace.idle();

        let want = if view.unit(b) == Unit::Concurrent {
            let granted = self
                .held
                .get(&(b, window.start_secs()))
                .map_or(0, |h| h.granted);
            slots_want(used, durable, starved, limit <= granted, closing || idle)
        } else if closing || idle {
            used
        } else if left < headroom || starved > left {
            used.saturating_add(headroom.saturating_mul(2))
        } else {
            durable
        };
        if want < durable {
            // Give-back: the view first (never below what is spent and held), then the
            // disk, then Redis (this round).
            let kept = view
                .lower_grant(b, window, Money::from_nanos(want))
                .as_nanos();
            if kept < durable {
                self.persist(store, keys, b, window, kept);
            }
            // Only what the disk no longer promises is given back (a failed write keeps it).
            let durable = self
                .held
                .get(&(b, window.start_secs()))
                .map_or(0, |h| h.durable);
            return Some(GrantAsk {
                limit: script_limit,
                durable,
                want: durable,
                known: self.known_list(b, window),
            });
        }
        Some(GrantAsk {
            limit: script_limit,
            durable,
            want,
            known: self.known_list(b, window),
        })
    }

    /// The ask's `known`: the window's holders as this node's disk knows them.
    fn known_list(&self, b: u32, window: Window) -> String {
        self.known
            .get(&(b, window.start_secs()))
            .map(|h| h.ids.join(","))
            .unwrap_or_default()
    }

    /// Learns the window's holders from a reply (only ever adds: a holder of a window stays
    /// one until the window ends). Durable before it is kept; a failed write is retried at
    /// the next round (the reply lists the holders again while the sizes differ).
    fn learn(&mut self, store: &Store, keys: &SlotKeys, b: u32, window: Window, ids: Vec<String>) {
        let k = (b, window.start_secs());
        let old = self.known.get(&k).map_or(&[][..], |h| h.ids.as_slice());
        let mut all: Vec<String> = old.iter().cloned().chain(ids).collect();
        all.sort_unstable();
        all.dedup();
        if all.len() == old.len() && self.gone_holders.is_empty() {
            return;
        }
        let key = store_key(keys, b, window.start_secs());
        let value = HoldersValue {
            end: window.end_secs(),
            ids: all,
        };
        match store.write_holders([(&key, &value)], self.gone_holders.iter()) {
            Ok(()) => {
                self.gone_holders.clear();
                self.known.insert(k, value);
            }
            Err(e) => {
                tracing::warn!(error = %e, budget = %key, "cannot make the strict holder list durable");
            }
        }
    }

    /// Applies Redis's answer for budget `b`'s strict window: a raise is made durable, then
    /// spendable.
    pub fn apply(
        &mut self,
        view: &View,
        store: &Store,
        keys: &SlotKeys,
        b: u32,
        window: Window,
        reply: GrantReply,
    ) {
        let k = (b, window.start_secs());
        if let Some(ids) = reply.holder_ids {
            self.learn(store, keys, b, window, ids);
        }
        let durable = self.held.get(&k).map_or(0, |h| h.durable);
        if reply.grant > durable && !self.persist(store, keys, b, window, reply.grant) {
            return;
        }
        let durable = self.held.get(&k).map_or(0, |h| h.durable);
        if let Some(h) = self.held.get_mut(&k) {
            h.granted = reply.granted;
            h.holders = reply.holders;
            h.frozen = reply.frozen;
        } else {
            self.held.insert(
                k,
                Held {
                    window,
                    durable,
                    granted: reply.granted,
                    holders: reply.holders,
                    frozen: reply.frozen,
                },
            );
        }
        // Online again, or never offline: the view spends the durable grant.
        self.offline.remove(&b);
        if view.policy(b).0 == Enforcement::Strict {
            view.set_strict(b, true);
        }
        view.set_grant(b, window, Money::from_nanos(durable));
        // No gauge per templated series (see `journal::update_gauges`), and none in dollars
        // for a budget of another unit (its grant counts tokens, requests or slots).
        if view.is_templated(b) || view.unit(b).is_count() {
            return;
        }
        let (provider, period) = keys.get(b).store_parts();
        metrics::gauge!("provider_budgets_grant_usd", "provider" => provider.clone(), "period" => period.clone())
            .set(Money::from_nanos(durable).as_usd());
        metrics::gauge!("provider_budgets_granted_total_usd", "provider" => provider, "period" => period)
            .set(Money::from_nanos(reply.granted).as_usd());
    }

    /// Writes a grant to disk (flushed). `false` (logged) when the disk refused it.
    fn persist(
        &mut self,
        store: &Store,
        keys: &SlotKeys,
        b: u32,
        window: Window,
        grant: u64,
    ) -> bool {
        let key = store_key(keys, b, window.start_secs());
        let value = GrantValue {
            end: window.end_secs(),
            grant,
        };
        match store.write_grants([(&key, value)], self.gone.iter()) {
            Ok(()) => {
                self.gone.clear();
                let h = self.held.entry((b, window.start_secs())).or_insert(Held {
                    window,
                    durable: 0,
                    granted: 0,
                    holders: 0,
                    frozen: false,
                });
                h.durable = grant;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, budget = %key, "cannot make a grant durable; it is not spent until it is");
                false
            }
        }
    }

    /// A round failed (Redis unreachable): applies each strict budget's offline mode.
    pub fn go_offline(&mut self, view: &View, now_secs: i64) {
        for b in 0..view.len() as u32 {
            let (enforcement, offline) = view.policy(b);
            if enforcement != Enforcement::Strict {
                continue;
            }
            let window = view.schedule(b).window_at_secs(now_secs);
            match offline {
                Offline::GrantOnly => {}
                Offline::LocalShare => {
                    let held = self.held.get(&(b, window.start_secs()));
                    let holders = held.map_or(0, |h| h.holders).max(1);
                    let durable = held.map_or(0, |h| h.durable);
                    let share = view.limit(b).as_nanos() / holders;
                    view.set_grant(b, window, Money::from_nanos(share.max(durable)));
                }
                Offline::Open => view.set_strict(b, false),
            }
            self.offline.insert(b, offline);
        }
    }

    /// The current window's grant figures of a budget, for `status`.
    pub fn status(&self, b: u32, now_secs: i64) -> Option<GrantStatus> {
        self.held
            .iter()
            .find(|(&(bb, _), h)| bb == b && h.window.contains_secs(now_secs))
            .map(|(_, h)| GrantStatus {
                window: h.window,
                grant: Money::from_nanos(h.durable),
                granted_total: Money::from_nanos(h.granted),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::slots_want;

    #[test]
    fn a_slot_grant_is_asked_on_refusal_and_keeps_no_margin_a_full_fleet_needs() {
        // (used, durable, starved, full, release) -> want
        // Refused with nothing left: ask for twice the refusal.
        assert_eq!(slots_want(3, 3, 1, false, false), 5);
        assert_eq!(slots_want(3, 3, 1, true, false), 5);
        // Nothing refused: keep a margin of 2 at most, none while the limit is all granted.
        assert_eq!(slots_want(3, 4, 0, false, false), 4);
        assert_eq!(slots_want(3, 9, 0, false, false), 5);
        assert_eq!(slots_want(3, 4, 0, true, false), 3);
        // Idle or closing: everything not held goes back.
        assert_eq!(slots_want(2, 6, 0, false, true), 2);
        // No slot held and nothing asked: nothing kept past the margin.
        assert_eq!(slots_want(0, 0, 0, false, false), 0);
    }
}
