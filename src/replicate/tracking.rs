//! Server-assisted client-side caching of clean windows: Redis tells us when a key we read
//! has changed, so a clean budget whose windows nobody touched costs Redis no command at all.
//!
//! **How** (Redis ≥ 6): every replication connection speaks RESP3 and has `CLIENT TRACKING ON
//! NOLOOP`. Redis then remembers the keys each plain read (`HMGET`, [`super::wire::Mode::Read`])
//! fetched on that connection and sends one `invalidate` push message per key when it changes
//! (written by another client, deleted, expired, evicted), or one with no key list when the
//! whole data set goes (`FLUSHALL`, `FLUSHDB`). A window key is **fresh** when our last plain
//! read of it ran on the connection we still use, with tracking on, and no invalidation for it
//! came since: its `HMGET` is skipped ([`super::wire::SyncItem::skip`]): nothing in it changed,
//! so nothing we derived from it did. Every other clean key is read, as before.
//!
//! **Decisions** (each for correctness first: skipping a read that was needed would hide the
//! others' spend; a needless read costs one command):
//!
//! * *Only plain reads make a key fresh.* Verified against redis-server 7.0.15
//!   (`wire::tests::tracking_covers_plain_reads_not_keys_the_script_writes`): keys read inside
//!   the merge script *are* tracked for the calling client, but a key the script also writes
//!   (every key it merges into: the field, `~total`, `EXPIREAT`) loses our tracking without
//!   any message, since NOLOOP suppresses the invalidation of our own write while Redis still
//!   drops the key from its table. So a budget that turns clean is read once more with
//!   `HMGET`, then skipped.
//! * *The connection is checked every round.* Each round's pipeline starts with `CLIENT
//!   TRACKING ON NOLOOP` and `CLIENT ID` (two O(1) commands per master, in the same round
//!   trip). Fresh marks carry the **epoch** of the connection they were made on (a number per
//!   connection this process opened): a reconnect (the same server restarted, a Cluster
//!   failover to another master, a new slot owner) opens a new epoch, so no earlier mark
//!   counts on it. The replicator reconnects by itself (plain `MultiplexedConnection`s, no
//!   `ConnectionManager` that would reconnect behind its back), so every reconnect is one
//!   it sees. Should the server answer another client id on the same connection (a proxy
//!   that reconnected behind our back, whose new upstream connection may have missed
//!   invalidations) or refuse tracking, the marks of that connection are dropped and the
//!   skipped keys are read in a second round trip of the same round (never otherwise).
//! * *Ordering.* The crate hands push messages to our channel synchronously while it reads
//!   the connection, so every invalidation that Redis sent before a reply is in the channel
//!   when the reply reaches us. The replicator drains the channel before planning a round,
//!   then again right after marking the keys the round read: an invalidation that arrives
//!   while a read is in flight may concern a write before or after it, so it always wins (the
//!   key is read again next round: conservative, never missing one). A key the round skipped
//!   whose invalidation turns up with the replies (changed before Redis ran our pipeline, the
//!   message still on its way when the round was planned) is read in a second round trip of
//!   the same round: a round sees every change Redis made before it ran the round's
//!   pipeline, exactly as when every key was read (the second trip is rare: it needs a change
//!   within the round trip before the round).
//! * *Flush.* An invalidation without keys (`FLUSHALL`, `FLUSHDB`) drops every mark: every
//!   clean key is read again, the reads find our fields gone and the windows dirty, and the
//!   next round sends them, as after a Redis restart (which closes the connection: new
//!   epoch, everything read).
//! * *Safety net.* A mark vouches for its key for at most 60 sync intervals; then the key is
//!   read again even without an invalidation. With a server that delivers its invalidations
//!   (Redis does) this only costs 1/60 of a read per clean key per round; with a server or
//!   proxy that accepted tracking but lost an invalidation (none is known), a change would
//!   be seen late by at most that much, not never.
//! * *Memory.* Redis caps its tracking table (`tracking-table-max-keys`, 1 M keys by default;
//!   0 = unlimited). When it evicts a key from the table it sends that key's invalidation
//!   first, so the cap costs reads, never correctness. Our side holds one entry per fresh
//!   live window key.
//! * *Fallback.* A server or proxy that refuses `HELLO 3` (the connection is then opened in
//!   RESP2) or `CLIENT TRACKING` (some managed services, `rename-command CLIENT ""`) gets
//!   the previous behaviour: every clean key read every round. One warning is logged, and
//!   `status` shows `replication.tracking: false`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::{PushInfo, PushKind, Value};
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;

/// A push message and the epoch of the connection it came from.
type Push = (u64, PushInfo);

/// The fresh window keys and the invalidations that Redis sent.
#[derive(Debug)]
pub(crate) struct Tracker {
    /// Cloned (tagged with an epoch) into every connection's push sender: unbounded, because
    /// the crate's sender must never block its connection; the replicator drains it every
    /// round.
    tx: mpsc::UnboundedSender<Push>,
    rx: mpsc::UnboundedReceiver<Push>,
    /// Window key → epoch of the connection whose tracking covers our last plain read of it,
    /// and when that read was.
    fresh: FxHashMap<String, (u64, Instant)>,
    /// How long a mark vouches for its key without an invalidation (the safety net).
    max_age: Duration,
    /// The next connection's epoch (never reused, so a stale mark never matches). Atomic:
    /// connections are opened from `&self` methods of the replicator.
    next_epoch: AtomicU64,
    /// Whether the last round's connections all had tracking on (for `status`).
    on: bool,
    /// The refusal was logged (once per process). Atomic: connections are opened from
    /// `&self` methods.
    warned: AtomicBool,
}

impl Tracker {
    /// A tracker whose marks last at most `max_age` (see the module doc, "Safety net").
    pub(crate) fn new(max_age: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Tracker {
            tx,
            rx,
            fresh: FxHashMap::default(),
            max_age,
            next_epoch: AtomicU64::new(1),
            on: false,
            warned: AtomicBool::new(false),
        }
    }

    /// A new connection's epoch and the push sender to give it.
    pub(crate) fn connection(&self) -> (u64, impl redis::aio::AsyncPushSender) {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let tx = self.tx.clone();
        let sender = move |info: PushInfo| tx.send((epoch, info)).map_err(drop);
        (epoch, sender)
    }

    /// Applies the push messages received so far. Returns `true` when Redis dropped its whole
    /// data set (an invalidation without keys; every mark is gone).
    pub(crate) fn drain(&mut self) -> bool {
        let mut flushed = false;
        while let Ok((epoch, push)) = self.rx.try_recv() {
            match push.kind {
                PushKind::Invalidate => {
                    for value in push.data {
                        match value {
                            Value::Nil => {
                                flushed = true;
                                self.fresh.clear();
                            }
                            Value::Array(keys) | Value::Set(keys) => {
                                for key in keys {
                                    self.invalidate(&key);
                                }
                            }
                            key => self.invalidate(&key),
                        }
                    }
                }
                // The connection is gone: its marks can never be used again.
                PushKind::Disconnection => self.forget_epoch(epoch),
                _ => {}
            }
        }
        flushed
    }

    fn invalidate(&mut self, key: &Value) {
        let name = match key {
            Value::BulkString(b) => String::from_utf8_lossy(b),
            Value::SimpleString(s) => s.as_str().into(),
            _ => return,
        };
        self.fresh.remove(name.as_ref());
    }

    /// Whether `key`'s last plain read is tracked on the connection of `epoch`, unchanged,
    /// and recent enough to skip it.
    pub(crate) fn is_fresh(&self, key: &str, epoch: u64) -> bool {
        self.fresh
            .get(key)
            .is_some_and(|&(e, at)| e == epoch && at.elapsed() < self.max_age)
    }

    /// Whether `key` is still marked on the connection of `epoch` (no invalidation since),
    /// whatever the mark's age.
    pub(crate) fn is_marked(&self, key: &str, epoch: u64) -> bool {
        self.fresh.get(key).is_some_and(|&(e, _)| e == epoch)
    }

    /// `key` was just read with a plain read on the connection of `epoch`, tracking on.
    pub(crate) fn mark(&mut self, key: &str, epoch: u64) {
        let now = Instant::now();
        match self.fresh.get_mut(key) {
            Some(mark) => *mark = (epoch, now),
            None => {
                self.fresh.insert(key.to_owned(), (epoch, now));
            }
        }
    }

    /// `key` is not (or no longer) tracked: read it next time.
    pub(crate) fn unmark(&mut self, key: &str) {
        self.fresh.remove(key);
    }

    /// The connection of `epoch` cannot vouch for its marks (another client id, tracking off).
    pub(crate) fn forget_epoch(&mut self, epoch: u64) {
        self.fresh.retain(|_, (e, _)| *e != epoch);
    }

    /// Drops the marks of keys that no longer matter (windows over, budgets removed).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.fresh.retain(|k, _| keep(k));
    }

    /// Records a connection's refusal of tracking (logged once per process).
    pub(crate) fn refused(&self, label: &str, reason: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                redis = %label,
                reason = %reason,
                "redis refuses client-side tracking (CLIENT TRACKING / HELLO 3): every clean budget is read every round"
            );
        }
    }

    /// Whether the last round's connections all tracked (`status`'s `replication.tracking`).
    pub(crate) fn on(&self) -> bool {
        self.on
    }

    pub(crate) fn set_on(&mut self, on: bool) {
        self.on = on;
    }

    /// How many window keys are fresh (tests, figures).
    #[cfg(test)]
    pub(crate) fn fresh_keys(&self) -> usize {
        self.fresh.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(kind: PushKind, data: Vec<Value>) -> PushInfo {
        PushInfo { kind, data }
    }

    #[test]
    fn invalidations_unmark_keys_a_flush_unmarks_all_and_reports_it() {
        let mut t = Tracker::new(Duration::from_secs(3600));
        let (e1, s1) = t.connection();
        let (e2, s2) = t.connection();
        assert_ne!(e1, e2);
        for k in ["a", "b", "c"] {
            t.mark(k, e1);
        }
        t.mark("d", e2);
        use redis::aio::AsyncPushSender;
        let key = |k: &str| Value::BulkString(k.as_bytes().to_vec());
        s1.send(push(
            PushKind::Invalidate,
            vec![Value::Array(vec![key("a")])],
        ))
        .unwrap();
        assert!(!t.drain());
        assert!(!t.is_fresh("a", e1) && t.is_fresh("b", e1));
        // A mark counts only on its own connection.
        assert!(!t.is_fresh("b", e2) && t.is_fresh("d", e2));
        // The first connection closes: its marks go, the other's stay.
        s1.send(push(PushKind::Disconnection, vec![])).unwrap();
        assert!(!t.drain());
        assert!(!t.is_fresh("b", e1) && t.is_fresh("d", e2));
        s2.send(push(PushKind::Invalidate, vec![Value::Nil]))
            .unwrap();
        assert!(t.drain(), "a flush is reported");
        assert_eq!(t.fresh_keys(), 0);
    }

    #[test]
    fn a_mark_vouches_only_for_its_maximum_age() {
        let mut t = Tracker::new(Duration::ZERO);
        let (e, _sender) = t.connection();
        t.mark("a", e);
        assert!(!t.is_fresh("a", e), "too old: read it again");
        assert!(t.is_marked("a", e), "but no invalidation came");
    }
}
