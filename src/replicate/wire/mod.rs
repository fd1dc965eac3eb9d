//! Redis wire protocol for one sync round.
//!
//! Spend is a grow-only counter per (budget, window), kept per node (a G-counter). In Redis, one
//! budget window is one hash whose fields are node ids and whose values are that node's
//! *absolute* total in nano-dollars, as a canonical decimal string (no sign, no leading zeros).
//! A node only ever writes its own field and only ever raises it (`max` merge), so sending
//! twice, late, or again after Redis lost its data is harmless; the fleet total is the sum of
//! the fields.
//!
//! Reserved fields start with `~`, which no node id can (node ids are `[A-Za-z0-9._-]`):
//!
//! * `~total`: the running sum of every contribution field of the hash (below), kept by the
//!   script: every raise of a field raises it by exactly the same amount, in exact decimal
//!   arithmetic on strings, by limbs of 15 digits (totals exceed 2^53, Lua numbers are
//!   doubles: a limb and a sum of two stay below 2^53; see `merge.lua`). So a round reads **one
//!   number per key** whatever the fleet's size; the others' spend is `~total` minus our own
//!   contribution. A total that cannot be right (missing beside fields, malformed, below our
//!   own field, or an arithmetic underflow) is recomputed from the fields, server side;
//! * `~owner:{node}`: the instance (data dir, see `Store::instance_id`) that last wrote the
//!   field `{node}`;
//! * `~retired:{node}:{instance}`: the total that another instance wrote under `{node}` before
//!   the current owner took the field over. When a data dir takes over a node id that another
//!   data dir used (a wiped disk, a copied config once the duplicate stopped), the old total
//!   is not merged by `max` into the new one (that would lose the smaller one) but kept beside
//!   it: every contribution is one `(node, instance)` counter that only grows, so `~total`
//!   sums them all. An instance that takes its field back removes its own retired field (its
//!   total includes it).
//!
//! Contribution fields are the node fields and the `~retired:` fields; `~total` is their sum.
//!
//! **Lease**: per budget, key `{prefix}:{{provider:period}}:lease:{node}` holds the instance id
//! of the data dir that uses the node id, for a few sync intervals (`lease_ms`, set by a
//! script call when the lease is absent or the caller says a renewal is due:
//! [`Mode::Script`]'s `renew`, once a third of what it last set has passed or when it last
//! set the longer lease), or for longer (`read_lease_ms`) once a clean budget renewed it.
//! So after a dirty round the lease has between two thirds of `lease_ms` and `lease_ms`
//! left, never the longer read lease: a node that crashes while dirty is taken over as soon
//! as when every call set it. When another
//! instance holds it, the script leaves the node's field alone,
//! keeps our total apart under `~retired:{node}:{our instance}` (a contribution only we
//! write, so nothing is undercounted) and reports `refused`: two live data dirs share the
//! node id. The lease shares the budget's hash tag, so a script call still touches one
//! Cluster slot. A clean stop releases it.
//!
//! A sync round is **one network round trip**: one pipeline carrying one `EVALSHA` of
//! [`SCRIPT`] per budget (every window key of a budget shares the budget's Redis Cluster hash
//! tag, so one script call never spans slots). Per key the script merges our total when we
//! send one (own `0` only reads) and returns our field, its owner, our kept-apart field and
//! `~total`: a constant-size reply. When Redis answers `NOSCRIPT` (its script cache was
//! flushed or it restarted), the failed calls are sent again behind a `SCRIPT LOAD` in a
//! second pipeline, so that rare round costs two round trips. `SCRIPT LOAD` rather than
//! `EVAL`: since Redis 7.4, scripts that only arrived through `EVAL` may be evicted from the
//! cache, loaded ones are not.
//!
//! A budget with nothing to write ([`Mode::Read`], only while this instance held its lease at
//! the last look) skips the script: a `PEXPIRE` of its lease to the longer read lease
//! ([`Identity::read_lease_ms`]) once a third of what we last gave it has passed (a reply of
//! 0: the lease is gone, [`Lease::Free`]) and one `HMGET` of our field, its owner, our
//! kept-apart field, `~total` and `~bad` per window, in the same pipeline, except for the
//! windows Redis's client-side tracking reports unchanged since our last read
//! ([`SyncItem::skip`], see `super::tracking`): they cost no command at all, and a round
//! whose budgets are all clean and unchanged is the tracking prelude alone (`CLIENT TRACKING
//! ON NOLOOP`, `CLIENT ID`: [`Wire::sync_round_tracked`]). No `GET` of the lease: the
//! `~owner:{node}` field of each window says whether another data dir wrote our node's field
//! (the caller then sends the budget through the script, whose lease check reports a
//! duplicate); such a write changes the key, so its invalidation makes us read it. What only
//! the script handles (a lease to take, a total to repair, flagged fields) is reported back
//! ([`KeyReply::needs_script`], [`Lease::Free`]) and the caller sends that budget through the
//! script next round.
//!
//! **Failures are isolated per key**: the script runs each window key under `pcall`, so a key
//! of the wrong type fails only that window; a contribution field that is not a canonical u64
//! is left out of the total and reported when the total is recomputed; a budget whose script
//! call fails does not hide the other budgets' replies. Only a failure of the whole exchange
//! (connection, timeout) fails the round.
//!
//! **Expiry** (`EXPIREAT key expire_at`, window end + grace): set by a script call that
//! creates the field it raises (our node field, or our kept-apart field without the lease),
//! by a repair or a verifying round (every process's first), and by every strict call; not
//! by every write (issue 11: a command less per dirty key). Invariant: a key that holds our
//! field has an expiry, because the call that created the field set it in the same atomic
//! script. A `FLUSHALL`, an expired key or a failover that lost the key: the key is gone,
//! so our next write finds our field missing and sets it again. A failover that kept the key
//! kept its expiry: a script's writes replicate as one `MULTI`/`EXEC` (effects replication),
//! so a replica has our field only with the expiry set by the same call, and an AOF replay
//! drops a truncated transaction whole. A key that lost its expiry otherwise (an operator's
//! `PERSIST`, a `RESTORE` without TTL) gets it back from the next verifying round or
//! repair, or when another node creates its field. The price: a later `expire_at` for the
//! same window (a changed `grace`) moves the expiry only at those moments, not at the next
//! write.
//!
//! **Rolling upgrade of the script** (issue 11): every binary loads and calls its own script
//! (by its SHA), and parses only that script's replies, so old and new scripts run side by
//! side. They keep the same data: the same fields, the same `~total` (exact in both), the
//! same lease key and value with the same duplicate check; the new one only writes less
//! often (the expiry at creation, the lease when due) and replies with four elements per
//! key when nothing was repaired and the window is not strict. Mixing them is safe: every
//! key still gets its expiry from the call that creates it, and a live holder's lease is
//! renewed before it lapses by whichever script it runs.
//!
//! **Rolling upgrade from the previous wire** (every field, `HGETALL`): old nodes ignore
//! `~total` (they skip reserved fields they do not know) and keep summing the fields, so they
//! count new nodes exactly. A key written only by old nodes has no `~total`: the first new
//! node to touch it computes it from the fields. But an old node's raise of its field does
//! not raise `~total`, so while old nodes still run, new nodes may undercount the old nodes'
//! spend made after a key got its total. Every replicator's first round after start verifies
//! (recomputes server side) the total of every key it touches, so the restart that upgrades
//! the last old node repairs every live window: upgrade all nodes within a short time.

use std::sync::atomic::{AtomicU64, Ordering};

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

/// The merge script (`merge.lua`). `KEYS[1]` is the budget's lease key, `KEYS[2]` its strict
/// marker ([`strict_key`]), `KEYS[3..]` its window keys. `ARGV[1]` is the node id, `ARGV[2]`
/// the instance id, `ARGV[3]` the lease time in ms, `ARGV[4]` `1` to release the lease (last
/// round) or `0`, `ARGV[5]` `1` to recompute every key's total from its fields (verify) or
/// `0`, `ARGV[6]` the guard after a strict marker's (re)creation in ms, `ARGV[7]` the grant
/// lease in ms (`0`: never reclaim), `ARGV[8]` `1` to renew a lease we hold or `0` (then it
/// is set only when absent); then five per window key `KEYS[i]`, from
/// `ARGV[8 + 5(i-3) + 1]`: the node's own total (canonical decimal u64; `0` only reads), the
/// unix second at which the key expires, and for a strict window the limit, the node's durable
/// grant and the grant it wants (`''`, `0`, `0` otherwise). Grants: see
/// `docs/strict-budgets.md` (the reply per key gains `grant, granted, holders, frozen`).
///
/// 1. Lease: held by another instance -> `refused`; unreadable -> `broken`; else ours,
///    set at the end when absent or `ARGV[8]` is `1` (or released).
/// 2. Per window key, under `pcall`: check (or repair) `~total`; when the own total is not
///    `0`: with the lease, retire another instance's total (see the module doc), take back
///    our own retired total, raise our field to the max of what we know (a non-canonical
///    value in our field is replaced: we are its only writer) and mark us its owner; without
///    it, leave the node's field alone and raise our own instance's field
///    `~retired:{node}:{instance}` instead. `~total` moves by exactly the net change of the
///    contribution fields, in one `HSET` with the fields. Then `EXPIREAT key expire_at`
///    (callers pass window end + grace) when the raised field was created, on a repair or
///    verify, and for strict windows (see "Expiry" in the module doc).
///
/// Returns `{lease, per_key}`: `lease` is `'held'` (a string), `{'refused', holder}` or
/// `{'broken', error}`; `per_key[i]` is `{field, owner, mine, total, repaired, bad, grant,
/// granted, holders, frozen}` (the last four `''` unless strict and the lease is ours; `''`
/// for an absent field; `bad` the skipped `field, value` pairs of a recomputation), only its
/// first four when the key was neither repaired nor strict, or `{'err', error}`. Every table
/// of the reply costs Redis to convert: the common reply has three (issue 11).
pub(crate) const SCRIPT: &str = include_str!("merge.lua");

/// Redis key of one budget window: `{prefix}:{{provider:period}}:{window_start_unix_secs}`.
///
/// The braces are a Redis Cluster hash tag per budget: all windows of one budget live in one
/// slot, so the script that merges them in one call is valid on a cluster too.
pub(crate) fn window_key(prefix: &str, provider: &str, period: &str, window_start: i64) -> String {
    format!("{}:{window_start}", budget_tag(prefix, provider, period))
}

/// Redis key of a strict budget's marker: `{prefix}:{{provider:period}}:strict`, the Redis
/// time (ms) of the first strict call after the key was absent (first use, or Redis lost its
/// data) or after a node re-registered a grant that Redis had forgotten. For a guard time
/// after it, no grant of that budget is raised (the holders re-register first). No expiry.
pub(crate) fn strict_key(prefix: &str, provider: &str, period: &str) -> String {
    format!("{}:strict", budget_tag(prefix, provider, period))
}

/// Redis key of a node id's lease for one budget: `{prefix}:{{provider:period}}:lease:{node}`
/// (same hash tag as the budget's windows).
pub(crate) fn lease_key(prefix: &str, provider: &str, period: &str, node: &str) -> String {
    format!("{}:lease:{node}", budget_tag(prefix, provider, period))
}

/// The one place where a budget's identity becomes Redis key text: `{prefix}:{{provider:period}}`,
/// the braces being the budget's Redis Cluster hash tag.
fn budget_tag(prefix: &str, provider: &str, period: &str) -> String {
    format!("{prefix}:{{{provider}:{period}}}")
}

/// One window of one budget to merge: our absolute own total and when the key may expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncItem {
    /// The window key (see [`window_key`]).
    pub key: String,
    /// This node's absolute total for the window, nano-dollars. `0` only reads.
    pub own: u64,
    /// Unix seconds for `EXPIREAT` (window end plus a grace period).
    pub expire_at: i64,
    /// A strict budget's current window: the grant request.
    pub grant: Option<GrantAsk>,
    /// [`Mode::Read`] only: not read this round, because Redis tracks our last plain read of
    /// the key on this connection and has not reported a change since (see
    /// [`super::tracking`]); its reply is [`KeyReply::unread`].
    pub skip: bool,
}

/// What a node sends about its grant of one strict window (all nano-dollars, absolute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrantAsk {
    /// The budget's limit (as this node is configured).
    pub limit: u64,
    /// This node's durable grant: Redis keeps at least this (rebuild after a loss).
    pub durable: u64,
    /// The grant the node wants: more is raised within what is free, less is given back
    /// (never below the node's spend in Redis).
    pub want: u64,
}

/// The grant part of a strict key's reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GrantReply {
    /// This node's grant now.
    pub grant: u64,
    /// `~granted`: the sum of every node's grant in the window.
    pub granted: u64,
    /// `~holders`: how many nodes hold a grant field in the window.
    pub holders: u64,
    /// Raises are frozen (the guard after a loss).
    pub frozen: bool,
}

/// One budget's part of a round: its lease key and its windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    /// See [`lease_key`].
    pub lease: String,
    /// See [`strict_key`].
    pub marker: String,
    pub items: Vec<SyncItem>,
    /// How the group is read and written.
    pub mode: Mode,
}

/// How one budget's part of a round is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// One `EVALSHA` of the merge script: writes, lease taking, repairs. `renew`: the script
    /// sets the lease to [`Identity::lease_ms`] even when this instance holds it (`false`:
    /// only when it is absent; the caller set it recently enough).
    Script { renew: bool },
    /// Nothing to write, and our instance held the lease at the last look: plain commands, no
    /// script (a clean budget costs Redis at most one `HMGET` per window, none for a window
    /// whose item is [`SyncItem::skip`]). `renew`: `PEXPIRE` to [`Identity::read_lease_ms`]
    /// keeps the lease alive (its reply says whether it still exists; without it the lease
    /// is taken as still ours).
    Read { renew: bool },
}

/// Who is syncing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity<'a> {
    pub node: &'a str,
    /// This data dir's instance id.
    pub instance: &'a str,
    /// How long the lease lives without renewal (set by the script: writes).
    pub lease_ms: u64,
    /// How long a [`Mode::Read`] renewal (`PEXPIRE`) makes it live: longer, so that clean
    /// budgets renew rarely (see `read_lease_ttl` in the replicator).
    pub read_lease_ms: u64,
    /// Release the lease in this round (the last one).
    pub release: bool,
    /// Recompute every touched key's `~total` from its fields (server side).
    pub verify: bool,
    /// How long after a strict marker's (re)creation grants are not raised, ms.
    pub guard_ms: u64,
    /// Reclaim the unused grants of nodes not seen for this long, ms (0: never).
    pub grant_lease_ms: u64,
}

/// One window key's reply: constant size, whatever the number of nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyReply {
    /// This node id's field, when present and a canonical total.
    pub field: Option<u64>,
    /// The instance recorded as the writer of the field (`~owner:{node}`).
    pub owner: Option<String>,
    /// Our instance's kept-apart total (`~retired:{node}:{instance}`), 0 when absent.
    pub mine: u64,
    /// `~total`: the sum of every contribution (saturating at `u64::MAX`).
    pub total: u64,
    /// The script recomputed the total from the fields in this call.
    pub repaired: bool,
    /// Read without the script, the key's state needs it (a missing, malformed or too low
    /// total, malformed or flagged fields): the values are not to be used; send the budget
    /// through the script next round.
    pub needs_script: bool,
    /// One line per problem: skipped fields, an unusable own field.
    pub problems: Vec<String>,
    /// Not read this round ([`SyncItem::skip`]): nothing changed since the last read, the
    /// values are not to be used.
    pub unread: bool,
    /// Strict windows (sent with a [`GrantAsk`]): the grant state.
    pub grant: Option<GrantReply>,
}

impl KeyReply {
    /// The reply of a key that was not read ([`SyncItem::skip`]).
    pub(crate) fn unread() -> KeyReply {
        KeyReply {
            unread: true,
            ..KeyReply::default()
        }
    }
}

/// The state of a budget's lease after the script ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lease {
    /// Ours (taken, renewed or released).
    Held,
    /// Nobody holds it (seen by a plain read, which does not take it).
    Free,
    /// Another live instance holds it: nothing was written.
    Refused { holder: String },
    /// The lease key is unusable (e.g. of the wrong type): nothing was written.
    Broken(String),
}

/// One budget's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupReply {
    pub lease: Lease,
    /// Per item: its reply, or why that key failed (one line naming the key).
    pub keys: Vec<Result<KeyReply, String>>,
}

/// Why a sync round, or one budget's part of it, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum WireError {
    /// Redis could not be reached or refused the whole exchange.
    #[error("redis: {}", one_line(.0))]
    Redis(RedisError),
    /// Redis ran the exchange but the script call for one budget failed.
    #[error("redis rejected the sync of {key}: {}", one_line(.error))]
    Rejected { key: String, error: RedisError },
    /// A Redis Cluster master failed as a whole (unreachable, timed out): only the budgets
    /// it serves fail.
    #[error("redis cluster master {shard}: {message}")]
    Shard { shard: String, message: String },
    /// The reply does not have the shape the script returns (a different script under our
    /// SHA, a proxy in the way, ...).
    #[error("unexpected redis reply for {key}: {detail}")]
    Reply { key: String, detail: String },
}

impl From<RedisError> for WireError {
    fn from(error: RedisError) -> Self {
        WireError::Redis(error)
    }
}

impl WireError {
    /// True when Redis is unreachable or temporarily unable to serve (I/O, timeouts, loading,
    /// failover), as opposed to bad data: the caller should keep its totals and retry later,
    /// and may report "Redis down" rather than "Redis corrupt".
    pub(crate) fn is_connection_error(&self) -> bool {
        let error = match self {
            WireError::Redis(error) | WireError::Rejected { error, .. } => error,
            WireError::Reply { .. } => return false,
            WireError::Shard { .. } => return true,
        };
        error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || matches!(
                error.kind(),
                ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
            )
    }
}

impl WireError {
    /// A Redis Cluster redirect (`MOVED`, `ASK`): the slot map is out of date.
    pub(crate) fn is_redirect(&self) -> bool {
        match self {
            WireError::Redis(error) | WireError::Rejected { error, .. } => matches!(
                error.kind(),
                ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
            ),
            _ => false,
        }
    }
}

/// Renders an error on one line: server details (Lua tracebacks) may contain line breaks.
fn one_line(error: &RedisError) -> String {
    flat(&error.to_string())
}

fn flat(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Per budget: its reply, or why its script call failed.
pub(crate) type GroupOutcome = Result<GroupReply, WireError>;

/// The sync protocol: the merge script's SHA and a round-trip counter.
#[derive(Debug)]
pub(crate) struct Wire {
    script: redis::Script,
    round_trips: AtomicU64,
    /// Request bytes (exact RESP encoding) and reply bytes (RESP size of the parsed values,
    /// an estimate within a few bytes per value) sent and received so far.
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
}

impl Default for Wire {
    fn default() -> Self {
        Self::new()
    }
}

impl Wire {
    pub(crate) fn new() -> Self {
        Wire {
            script: redis::Script::new(SCRIPT),
            round_trips: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
        }
    }

    /// Pipelines sent so far (each is one network round trip), failed ones included. Lets
    /// tests and benches prove that a sync costs one round trip.
    pub(crate) fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Bytes sent to and received from Redis so far: `(out, in)`.
    pub(crate) fn traffic(&self) -> (u64, u64) {
        (
            self.bytes_out.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
        )
    }

    /// The SHA1 under which Redis caches [`SCRIPT`].
    #[cfg(test)]
    pub(crate) fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    /// Merges our totals and reads back, per key, our field and the total, in one round trip.
    ///
    /// `groups` holds one budget each (all keys of a group share a hash tag). The result
    /// mirrors `groups`. Empty groups cost nothing; when every group is empty nothing is sent.
    /// On `NOSCRIPT` the failed groups are retried once behind a `SCRIPT LOAD` (two round
    /// trips). Re-sending is always safe: the merge is a max. `Err` only when the exchange as
    /// a whole failed; a budget whose call failed gets its own `Err` in the result.
    pub(crate) async fn sync_round<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        id: &Identity<'_>,
        groups: &[Group],
    ) -> Result<Vec<GroupOutcome>, WireError> {
        self.sync_round_tracked(conn, id, groups, false)
            .await
            .map(|(out, _)| out)
    }

    /// [`Wire::sync_round`], the pipeline starting with `CLIENT TRACKING ON NOLOOP` and
    /// `CLIENT ID` when `track` (sent even when nothing else is: the round trip also proves
    /// the connection alive, and the id says it is the one our skipped reads were tracked
    /// on). Returns their outcome beside the replies.
    pub(crate) async fn sync_round_tracked<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        id: &Identity<'_>,
        groups: &[Group],
        track: bool,
    ) -> Result<(Vec<GroupOutcome>, Option<TrackReply>), WireError> {
        let mut results: Vec<Option<GroupOutcome>> = groups
            .iter()
            .map(|g| {
                (commands(g) == 0).then(|| {
                    Ok(GroupReply {
                        lease: Lease::Held,
                        keys: g.items.iter().map(|_| Ok(KeyReply::unread())).collect(),
                    })
                })
            })
            .collect();
        let pending: Vec<usize> = (0..groups.len())
            .filter(|&i| results[i].is_none())
            .collect();
        if pending.is_empty() && !track {
            return Ok((filled(results), None));
        }

        let (no_script, tracked) = self
            .send(conn, id, groups, &pending, false, track, &mut results)
            .await?;
        if !no_script.is_empty() {
            tracing::debug!(
                groups = no_script.len(),
                "redis lost the sync script (NOSCRIPT); loading it and retrying once"
            );
            let (still_missing, _) = self
                .send(conn, id, groups, &no_script, true, false, &mut results)
                .await?;
            for i in still_missing {
                results[i] = Some(Err(WireError::Reply {
                    key: first_key(&groups[i]),
                    detail: "NOSCRIPT right after SCRIPT LOAD".into(),
                }));
            }
        }
        Ok((filled(results), tracked))
    }

    /// Sends one pipeline with one `EVALSHA` per group in `which` (preceded by `SCRIPT LOAD`
    /// when `load`, by the tracking prelude when `track`), stores the outcomes in `results`
    /// and returns the groups that failed with `NOSCRIPT`.
    #[allow(clippy::too_many_arguments)]
    async fn send<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        id: &Identity<'_>,
        groups: &[Group],
        which: &[usize],
        load: bool,
        track: bool,
        results: &mut [Option<GroupOutcome>],
    ) -> Result<(Vec<usize>, Option<TrackReply>), WireError> {
        let mut pipe = redis::pipe();
        // Per-command results: one budget's failure must not hide the others' replies, and
        // NOSCRIPT has to be told apart from other errors.
        pipe.ignore_errors();
        if track {
            pipe.cmd("CLIENT").arg("TRACKING").arg("ON").arg("NOLOOP");
            pipe.cmd("CLIENT").arg("ID");
        }
        if load {
            pipe.cmd("SCRIPT").arg("LOAD").arg(SCRIPT);
        }
        for &i in which {
            let group = &groups[i];
            if let Mode::Read { renew } = group.mode {
                if renew {
                    pipe.cmd("PEXPIRE")
                        .arg(&group.lease)
                        .arg(id.read_lease_ms.max(1));
                }
                let owner = format!("~owner:{}", id.node);
                let mine = format!("~retired:{}:{}", id.node, id.instance);
                for item in group.items.iter().filter(|x| !x.skip) {
                    pipe.cmd("HMGET")
                        .arg(&item.key)
                        .arg(id.node)
                        .arg(&owner)
                        .arg(&mine)
                        .arg("~total")
                        .arg("~bad");
                }
                continue;
            }
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(group.items.len() + 2)
                .arg(&group.lease)
                .arg(&group.marker);
            for item in &group.items {
                cmd.arg(&item.key);
            }
            cmd.arg(id.node)
                .arg(id.instance)
                .arg(id.lease_ms.max(1).to_string())
                .arg(if id.release { "1" } else { "0" })
                .arg(if id.verify { "1" } else { "0" })
                .arg(id.guard_ms.to_string())
                .arg(id.grant_lease_ms.to_string())
                .arg(match group.mode {
                    Mode::Script { renew: false } => "0",
                    _ => "1",
                });
            for item in &group.items {
                // Decimal strings, not integers: the script compares them as strings.
                cmd.arg(item.own.to_string())
                    .arg(item.expire_at.to_string());
                match item.grant {
                    Some(ask) => cmd
                        .arg(ask.limit.to_string())
                        .arg(ask.durable.to_string())
                        .arg(ask.want.to_string()),
                    None => cmd.arg("").arg("0").arg("0"),
                };
            }
        }

        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.bytes_out
            .fetch_add(pipe.get_packed_pipeline().len() as u64, Ordering::Relaxed);
        let replies = pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(conn)
            .await?;
        let received: usize = replies
            .iter()
            .map(|r| match r {
                Ok(v) => resp_len(v),
                Err(e) => e.to_string().len() + 3,
            })
            .sum();
        self.bytes_in.fetch_add(received as u64, Ordering::Relaxed);
        let mut replies = replies.into_iter();
        let tracked = if track {
            let on = replies.next();
            let client = replies.next();
            Some(TrackReply {
                error: match on {
                    Some(Ok(Value::Okay)) => None,
                    Some(Ok(Value::SimpleString(s))) if s == "OK" => None,
                    Some(Err(e)) => Some(one_line(&e)),
                    other => Some(format!("CLIENT TRACKING answered {other:?}")),
                },
                client_id: match client {
                    Some(Ok(Value::Int(i))) => Some(i),
                    _ => None,
                },
            })
        } else {
            None
        };

        if load {
            match replies.next() {
                Some(Ok(Value::BulkString(sha))) if sha == self.script.get_hash().as_bytes() => {}
                Some(Err(error)) => return Err(WireError::Redis(error)),
                other => {
                    return Err(WireError::Reply {
                        key: first_key(&groups[which[0]]),
                        detail: format!(
                            "SCRIPT LOAD answered {other:?}, expected {}",
                            self.script.get_hash()
                        ),
                    })
                }
            }
        }

        let mut no_script = Vec::new();
        for &i in which {
            let group = &groups[i];
            if let Mode::Read { renew } = group.mode {
                results[i] = Some(parse_read(group, renew, &mut replies));
                continue;
            }
            results[i] = match replies.next() {
                Some(Ok(value)) => Some(parse_group(&group.items, value)),
                Some(Err(error))
                    if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                {
                    no_script.push(i);
                    None
                }
                Some(Err(error)) => Some(Err(WireError::Rejected {
                    key: first_key(group),
                    error,
                })),
                None => Some(Err(WireError::Reply {
                    key: first_key(group),
                    detail: "the pipeline returned fewer replies than commands".into(),
                })),
            };
        }
        Ok((no_script, tracked))
    }
}

/// What the tracking prelude of a pipeline answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrackReply {
    /// Why `CLIENT TRACKING ON NOLOOP` failed (e.g. `unknown command`: a proxy or a managed
    /// Redis without it), `None` when tracking is on.
    pub error: Option<String>,
    /// `CLIENT ID`: the server side of our connection (a different id than last round means
    /// another connection, which tracks none of our earlier reads).
    pub client_id: Option<i64>,
}

/// Commands a group puts into a pipeline (0: it is answered without Redis).
fn commands(group: &Group) -> usize {
    match group.mode {
        Mode::Script { .. } if group.items.is_empty() => 0,
        Mode::Script { .. } => 1,
        Mode::Read { renew } => usize::from(renew) + group.items.iter().filter(|x| !x.skip).count(),
    }
}

/// Turns the per-group slots, all filled once a round succeeded, into the result.
fn filled(results: Vec<Option<GroupOutcome>>) -> Vec<GroupOutcome> {
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(WireError::Reply {
                    key: String::new(),
                    detail: "no reply".into(),
                })
            })
        })
        .collect()
}

fn first_key(group: &Group) -> String {
    group
        .items
        .first()
        .map(|i| i.key.clone())
        .unwrap_or_default()
}

/// Parses one script reply: `{lease, per_key}`.
fn parse_group(items: &[SyncItem], value: Value) -> GroupOutcome {
    let first = || items.first().map(|i| i.key.clone()).unwrap_or_default();
    let bad = |detail: String| WireError::Reply {
        key: first(),
        detail,
    };
    let (lease, per_key) = match value {
        Value::Array(mut parts) if parts.len() == 2 => {
            let per_key = parts.pop();
            let lease = parts.pop();
            match (lease, per_key) {
                (Some(lease), Some(Value::Array(per_key))) if per_key.len() == items.len() => {
                    (lease, per_key)
                }
                other => return Err(bad(format!("expected {{lease, per-key}}, got {other:?}"))),
            }
        }
        other => return Err(bad(format!("expected {{lease, per-key}}, got {other:?}"))),
    };
    let lease = {
        // `'held'` alone is a plain string (the common case: no table to convert).
        let lease = match lease {
            Value::Array(words) => words,
            word => vec![word],
        };
        let mut words = lease.into_iter().map(|v| text(v).unwrap_or_default());
        match (words.next().as_deref(), words.next()) {
            (Some("held"), _) => Lease::Held,
            (Some("refused"), Some(holder)) => Lease::Refused { holder },
            (Some("broken"), Some(error)) => Lease::Broken(flat(&error)),
            other => return Err(bad(format!("unexpected lease state {other:?}"))),
        }
    };
    let keys = items
        .iter()
        .zip(per_key)
        .map(|(item, reply)| parse_key(&item.key, reply))
        .collect();
    Ok(GroupReply { lease, keys })
}

/// One key's state (`{field, owner, mine, total}` or the ten of [`SCRIPT`]) or
/// `{'err', error}`.
fn parse_key(key: &str, reply: Value) -> Result<KeyReply, String> {
    let Value::Array(mut parts) = reply else {
        return Err(format!("key {key}: unexpected reply {reply:?}"));
    };
    if parts.len() == 10 || parts.len() == 4 {
        return parse_state(key, parts);
    }
    let body = if parts.len() == 2 { parts.pop() } else { None };
    let tag = parts.pop().and_then(|v| text(v).ok());
    match (tag.as_deref(), body) {
        (Some("err"), Some(error)) => Err(format!(
            "key {key}: {} (window not synced)",
            flat(&text(error).unwrap_or_default())
        )),
        (tag, body) => Err(format!("key {key}: unexpected reply {tag:?} {body:?}")),
    }
}

/// The six parts of a key's state (see [`SCRIPT`]).
fn parse_state(key: &str, state: Vec<Value>) -> Result<KeyReply, String> {
    let mut it = state.into_iter();
    let mut next = || it.next().map(text).unwrap_or_else(|| Ok(String::new()));
    let (field, owner, mine, total) = (next(), next(), next(), next());
    let repaired = next();
    let mut out = KeyReply {
        repaired: repaired.as_deref() == Ok("1"),
        ..KeyReply::default()
    };
    let total = total.map_err(|t| format!("key {key}: total {t:?} is not text"))?;
    out.total = parse_sum(&total)
        .ok_or_else(|| format!("key {key}: total {total:?} is not a decimal number"))?;
    match field {
        Ok(f) if f.is_empty() => {}
        Ok(f) => match parse_total(&f) {
            Some(v) => out.field = Some(v),
            None => out.problems.push(format!(
                "key {key}: this node's field = {f:?} is not a canonical u64 total (rewritten by its next send)"
            )),
        },
        Err(f) => out.problems.push(format!("key {key}: this node's field {f:?} is not UTF-8")),
    }
    out.owner = owner.ok().filter(|o| !o.is_empty());
    out.mine = match mine {
        Ok(m) if m.is_empty() => 0,
        Ok(m) => parse_total(&m).unwrap_or_else(|| {
            out.problems.push(format!(
                "key {key}: this instance's kept-apart field = {m:?} is not a canonical u64 total"
            ));
            0
        }),
        Err(m) => {
            out.problems.push(format!(
                "key {key}: this instance's kept-apart field {m:?} is not UTF-8"
            ));
            0
        }
    };
    let bad = it.next();
    let mut words = it.map(|v| text(v).unwrap_or_default());
    let (grant, granted, holders, frozen) =
        (words.next(), words.next(), words.next(), words.next());
    if let Some(g) = grant.filter(|g| !g.is_empty()) {
        let grant = parse_total(&g)
            .ok_or_else(|| format!("key {key}: this node's grant {g:?} is not a canonical u64"))?;
        out.grant = Some(GrantReply {
            grant,
            granted: granted.as_deref().and_then(parse_sum).unwrap_or(u64::MAX),
            holders: holders.as_deref().and_then(parse_sum).unwrap_or(0),
            frozen: frozen.as_deref() == Some("1"),
        });
    }
    if let Some(Value::Array(bad)) = bad {
        let mut bad = bad.into_iter().map(|v| text(v).unwrap_or_else(|e| e));
        let count: usize = bad.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut shown = Vec::new();
        while let (Some(f), Some(v)) = (bad.next(), bad.next()) {
            shown.push(format!("{f:?} = {v:?}"));
        }
        if count > 0 {
            let more = count.saturating_sub(shown.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            out.problems.push(format!(
                "key {key}: fields {}{more} are not canonical u64 totals (left out of the total)",
                shown.join(", ")
            ));
        }
    }
    Ok(out)
}

/// Parses a [`Mode::Read`] group's replies: maybe `PEXPIRE lease`, one `HMGET` per item.
fn parse_read(
    group: &Group,
    renew: bool,
    replies: &mut impl Iterator<Item = redis::RedisResult<Value>>,
) -> GroupOutcome {
    let short = || WireError::Reply {
        key: first_key(group),
        detail: "the pipeline returned fewer replies than commands".into(),
    };
    let renewed = if renew {
        Some(replies.next().ok_or_else(short)?)
    } else {
        None
    };
    let states: Vec<redis::RedisResult<Value>> = group
        .items
        .iter()
        .filter(|x| !x.skip)
        .map(|_| replies.next().ok_or_else(short))
        .collect::<Result<_, _>>()?;
    // A redirect (cluster slot moved) or an unreachable shard concerns the whole budget:
    // report it as the group's failure, as a script call's would be.
    let whole = renewed
        .iter()
        .chain(states.iter())
        .filter_map(|r| r.as_ref().err())
        .find(|e| {
            matches!(
                e.kind(),
                ErrorKind::Server(
                    ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::BusyLoading
                )
            )
        });
    if let Some(error) = whole {
        return Err(WireError::Rejected {
            key: group.lease.clone(),
            error: error.clone(),
        });
    }
    // Read mode runs only while the lease was ours at the last look; `PEXPIRE` answers 0
    // when the key is gone (expired or released): the script takes it again next round.
    let lease = match renewed {
        None | Some(Ok(Value::Int(1))) => Lease::Held,
        Some(Ok(Value::Int(0))) => Lease::Free,
        Some(Ok(v)) => Lease::Broken(format!("unexpected PEXPIRE reply {v:?}")),
        Some(Err(e)) => Lease::Broken(one_line(&e)),
    };
    let mut replies = states.into_iter();
    let mut keys = Vec::with_capacity(group.items.len());
    for item in &group.items {
        if item.skip {
            keys.push(Ok(KeyReply::unread()));
            continue;
        }
        let key = &item.key;
        keys.push(match replies.next().ok_or_else(short)? {
            Ok(Value::Array(parts)) if parts.len() == 5 => Ok(read_state(parts)),
            Ok(other) => Err(format!("key {key}: unexpected reply {other:?}")),
            Err(e) => Err(format!("key {key}: {} (window not synced)", one_line(&e))),
        });
    }
    Ok(GroupReply { lease, keys })
}

/// A key's state from `HMGET node ~owner:node ~retired:node:inst ~total ~bad`; anything the
/// script would repair makes it `needs_script`.
fn read_state(parts: Vec<Value>) -> KeyReply {
    let mut it = parts.into_iter().map(|v| match v {
        Value::Nil => None,
        v => Some(text(v).unwrap_or_else(|e| e)),
    });
    let (field, owner, mine, total, bad) = (
        it.next().flatten(),
        it.next().flatten(),
        it.next().flatten(),
        it.next().flatten(),
        it.next().flatten(),
    );
    let mut out = KeyReply {
        owner,
        ..KeyReply::default()
    };
    let field_ok = field.as_deref().map(parse_total);
    let mine_ok = mine.as_deref().map(parse_total);
    out.field = field_ok.flatten();
    out.mine = mine_ok.flatten().unwrap_or(0);
    let malformed = matches!(field_ok, Some(None)) || matches!(mine_ok, Some(None));
    match total.as_deref().map(parse_sum) {
        Some(Some(t)) => out.total = t,
        // An absent total is right only for an absent key (no field of ours either).
        None if field.is_none() && mine.is_none() => out.total = 0,
        _ => out.needs_script = true,
    }
    let ours = out.field.unwrap_or(0).saturating_add(out.mine);
    if malformed || bad.is_some() || ours > out.total {
        out.needs_script = true;
    }
    out
}

/// The RESP size of a reply value (what Redis sent for it, for the traffic figures).
fn resp_len(value: &Value) -> usize {
    fn header(n: usize) -> usize {
        n.to_string().len() + 3
    }
    match value {
        Value::Nil => 5,
        Value::Int(i) => i.to_string().len() + 3,
        Value::BulkString(b) => header(b.len()) + b.len() + 2,
        Value::SimpleString(s) => s.len() + 3,
        Value::Okay => 5,
        Value::Array(items) | Value::Set(items) => {
            header(items.len()) + items.iter().map(resp_len).sum::<usize>()
        }
        Value::Map(pairs) => {
            header(pairs.len())
                + pairs
                    .iter()
                    .map(|(k, v)| resp_len(k) + resp_len(v))
                    .sum::<usize>()
        }
        other => format!("{other:?}").len(),
    }
}

/// Parses a canonical decimal of any length as a total, saturating at `u64::MAX` (the sum of
/// many u64 fields may exceed it).
fn parse_sum(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

/// A bulk or simple string reply as UTF-8 text (the lossy text as the error).
fn text(value: Value) -> Result<String, String> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        }
        Value::SimpleString(s) => Ok(s),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(format!("{other:?}")),
    }
}

/// Parses a canonical decimal u64, the exact form the script compares: digits only, no sign,
/// no leading zeros (which `str::parse` would accept but would break string comparison).
fn parse_total(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
use provider_budgets_test_support::redis_server;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::redis_server::RedisServer;
    use super::*;
    use redis::aio::MultiplexedConnection;
    use std::time::Instant;

    const FAR_FUTURE: i64 = 4_102_444_800; // 2100-01-01

    async fn connect(server: &RedisServer) -> MultiplexedConnection {
        redis::Client::open(format!("{}?protocol=resp3", server.url()))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    fn item(key: &str, own: u64) -> SyncItem {
        SyncItem {
            key: key.to_owned(),
            own,
            expire_at: FAR_FUTURE,
            grant: None,
            skip: false,
        }
    }

    const INSTANCE: &str = "i0";

    fn identity(node: &str) -> Identity<'_> {
        Identity {
            node,
            instance: INSTANCE,
            lease_ms: 60_000,
            read_lease_ms: 60_000,
            release: false,
            verify: false,
            guard_ms: 0,
            grant_lease_ms: 0,
        }
    }

    fn group(node: &str, items: Vec<SyncItem>) -> Group {
        let tag = items.first().map(|i| i.key.clone()).unwrap_or_default();
        Group {
            lease: format!("{tag}:lease:{node}"),
            marker: format!("{tag}:strict"),
            items,
            mode: Mode::Script { renew: true },
        }
    }

    /// Per key: this node's field and the key's total.
    type State = (Option<u64>, u64);

    impl Wire {
        /// The round for plain groups of one node; any refusal or problem is a panic.
        async fn sync_simple<C: redis::aio::ConnectionLike + Send>(
            &self,
            conn: &mut C,
            node: &str,
            groups: &[Vec<SyncItem>],
        ) -> Result<Vec<Vec<State>>, WireError> {
            let groups: Vec<Group> = groups.iter().map(|g| group(node, g.clone())).collect();
            let out = self.sync_round(conn, &identity(node), &groups).await?;
            Ok(out
                .into_iter()
                .map(|g| {
                    let g = g.unwrap();
                    assert_eq!(g.lease, Lease::Held);
                    g.keys
                        .into_iter()
                        .map(|k| {
                            let k = k.unwrap();
                            assert!(k.problems.is_empty(), "{:?}", k.problems);
                            (k.field, k.total)
                        })
                        .collect()
                })
                .collect())
        }
    }

    /// One item, one group: this node's field and the total of that key.
    async fn sync_one(
        wire: &Wire,
        conn: &mut MultiplexedConnection,
        node: &str,
        key: &str,
        own: u64,
    ) -> State {
        let mut out = wire
            .sync_simple(conn, node, &[vec![item(key, own)]])
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 1);
        out.remove(0).remove(0)
    }

    /// The sum of the contribution fields, from the fields themselves, exactly.
    fn field_sum(server: &RedisServer, key: &str) -> u128 {
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let all: Vec<(String, String)> = redis::cmd("HGETALL").arg(key).query(&mut conn).unwrap();
        all.iter()
            .filter(|(f, _)| !f.starts_with('~') || f.starts_with("~retired:"))
            .map(|(_, v)| v.parse::<u128>().unwrap())
            .sum()
    }

    macro_rules! server_or_skip {
        () => {
            match RedisServer::start() {
                Some(server) => server,
                None => {
                    eprintln!("skipping: redis-server not available");
                    return;
                }
            }
        };
    }

    #[test]
    fn key_layout_has_a_hash_tag_per_budget() {
        assert_eq!(
            window_key("pb", "openai", "1d", 1_700_000_000),
            "pb:{openai:1d}:1700000000"
        );
        assert_eq!(
            lease_key("pb", "openai", "1d", "n1"),
            "pb:{openai:1d}:lease:n1"
        );
    }

    #[test]
    fn only_canonical_u64_totals_parse() {
        assert_eq!(parse_total("0"), Some(0));
        assert_eq!(parse_total("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "007",
            "+5",
            "-1",
            "1.5",
            "abc",
            "18446744073709551616",
            " 5",
        ] {
            assert_eq!(parse_total(bad), None, "{bad:?}");
        }
        // A sum saturates instead.
        assert_eq!(parse_sum("18446744073709551616"), Some(u64::MAX));
        assert_eq!(parse_sum("007"), None);
    }

    #[test]
    fn errors_render_on_one_line() {
        let error = RedisError::from((ErrorKind::Io, "broken", "line one\nline two".to_owned()));
        let rendered = WireError::from(error).to_string();
        assert!(!rendered.contains('\n'), "{rendered}");
        assert!(rendered.starts_with("redis: "), "{rendered}");
    }

    #[tokio::test]
    async fn merge_is_a_max_per_node_and_the_total_moves_with_it() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);

        assert_eq!(sync_one(&wire, &mut conn, "a", &key, 5).await, (Some(5), 5));
        // A smaller (late) total never lowers the stored one.
        assert_eq!(sync_one(&wire, &mut conn, "a", &key, 3).await, (Some(5), 5));
        // Reading with 0 writes nothing and does not create absent fields.
        assert_eq!(sync_one(&wire, &mut conn, "a", &key, 0).await, (Some(5), 5));
        assert_eq!(
            sync_one(&wire, &mut conn, "b", &key, 7).await,
            (Some(7), 12)
        );
        // Re-sending is harmless.
        assert_eq!(
            sync_one(&wire, &mut conn, "b", &key, 7).await,
            (Some(7), 12)
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 5).await,
            (Some(5), 12)
        );
        // A raise moves the total by exactly the raise.
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 9).await,
            (Some(9), 16)
        );
        assert_eq!(server.command(&["HGET", &key, "~total"]), "16");
        // A node can see the others without contributing.
        let absent = window_key("t", "anthropic", "1d", 0);
        assert_eq!(sync_one(&wire, &mut conn, "c", &absent, 0).await, (None, 0));
        assert_eq!(server.command(&["EXISTS", &absent]), "0");
        assert_eq!(sync_one(&wire, &mut conn, "c", &key, 0).await, (None, 16));
        assert_eq!(field_sum(&server, &key), 16);
    }

    #[tokio::test]
    async fn totals_beyond_2_pow_53_and_u64_are_exact() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let p53 = 1_u64 << 53;

        // As doubles, 2^53 + 1 == 2^53: only a string comparison sees the raise.
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, p53).await,
            (Some(p53), p53)
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, p53 + 1).await,
            (Some(p53 + 1), p53 + 1)
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, p53).await,
            (Some(p53 + 1), p53 + 1)
        );
        for v in [
            9_007_199_254_740_999,
            10_000_000_000_000_000,
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(sync_one(&wire, &mut conn, "a", &key, v).await, (Some(v), v));
        }
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, u64::MAX - 1).await,
            (Some(u64::MAX), u64::MAX)
        );
        // Two nodes at u64::MAX: the total is kept exactly in Redis, read saturated.
        assert_eq!(
            sync_one(&wire, &mut conn, "b", &key, u64::MAX).await,
            (Some(u64::MAX), u64::MAX)
        );
        assert_eq!(
            server.command(&["HGET", &key, "~total"]),
            (2 * u128::from(u64::MAX)).to_string()
        );
        assert_eq!(server.command(&["HGET", &key, "a"]), u64::MAX.to_string());
    }

    /// The script's decimal arithmetic alone (`add`, `sub`, `greater`, `moved` of `merge.lua`, run by
    /// `EVAL` on a real Redis), against u128: the 15-digit fast path, its boundary (sums
    /// that carry into 16 digits, 2^53 - 1 + 1), carries and borrows between 15-digit limbs,
    /// and pseudo-random operands of every length up to 38 digits.
    #[tokio::test]
    async fn the_script_arithmetic_is_exact_at_the_15_digit_boundary_and_beyond() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let head = &SCRIPT[..SCRIPT.find("-- A field that holds a contribution").unwrap()];
        // `moved(a, 1, b)`: a + 1 - b, or nil below zero.
        let body = format!(
            "{head}\nlocal out = {{}}\nfor i = 1, #ARGV, 2 do\n  local a, b = ARGV[i], ARGV[i + 1]\n  \
             local d = '-'\n  if not greater(b, a) then d = sub(a, b) end\n  \
             out[#out + 1] = add(a, b) .. ',' .. d .. ',' .. tostring(greater(a, b)) .. ',' .. \
             (moved(a, '1', b) or '-')\nend\nreturn out"
        );
        let e15 = 10_u128.pow(15);
        let p53 = 1_u128 << 53;
        let mut values = vec![
            0,
            1,
            2,
            9,
            10,
            e15 - 2,
            e15 - 1,
            e15,
            e15 + 1,
            2 * e15 - 1,
            2 * e15,
            p53 - 1,
            p53,
            p53 + 1,
            e15 * e15 - 1,
            e15 * e15,
            e15 * e15 + 1,
            e15 * e15 + e15 - 1,
            u128::from(u64::MAX),
            u128::from(u64::MAX) + 1,
            2 * u128::from(u64::MAX),
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..200 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let digits = 1 + (state % 38) as u32;
            let wide = u128::from(state) << 64 | u128::from(state.rotate_left(29));
            values.push(wide % 10_u128.pow(digits));
        }
        let mut pairs: Vec<(u128, u128)> = Vec::new();
        for &a in &values[..21] {
            for &b in &values[..21] {
                pairs.push((a, b));
            }
        }
        for w in values.windows(2) {
            pairs.push((w[0], w[1]));
            pairs.push((w[1], w[0]));
            pairs.push((w[0], w[0]));
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&body).arg(0);
        for (a, b) in &pairs {
            cmd.arg(a.to_string()).arg(b.to_string());
        }
        let out: Vec<String> = cmd.query_async(&mut conn).await.unwrap();
        assert_eq!(out.len(), pairs.len());
        for ((a, b), got) in pairs.iter().zip(out) {
            let diff = if a >= b {
                (a - b).to_string()
            } else {
                "-".to_owned()
            };
            let shifted = if a + 1 >= *b {
                (a + 1 - b).to_string()
            } else {
                "-".to_owned()
            };
            assert_eq!(
                got,
                format!("{},{diff},{},{shifted}", a + b, a > b),
                "{a} {b}"
            );
        }
    }

    /// Raises by three nodes across the 15/16-digit boundary of the fast path: the running
    /// `~total` (moved by `add` then `sub`) equals the exact sum at every step, and a
    /// verifying round (recomputed from the fields) agrees.
    #[tokio::test]
    async fn the_running_total_is_exact_across_the_15_digit_boundary() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "boundary", "1d", 0);
        let steps: [(&str, u64); 14] = [
            ("a", 999_999_999_999_999),
            ("b", 1),
            ("b", 2),
            ("a", 1_000_000_000_000_000),
            ("c", 9_007_199_254_740_991),
            ("b", 999_999_999_999_998),
            ("c", 9_007_199_254_740_992),
            ("b", 999_999_999_999_999),
            ("a", 999_999_999_999_999_999),
            ("b", 1_000_000_000_000_000_000),
            ("c", 9_999_999_999_999_999_999),
            ("a", u64::MAX - 1),
            ("b", u64::MAX),
            ("a", u64::MAX),
        ];
        let mut own = std::collections::BTreeMap::new();
        for (node, v) in steps {
            own.insert(node, v);
            let sum: u128 = own.values().map(|&v| u128::from(v)).sum();
            let (field, total) = sync_one(&wire, &mut conn, node, &key, v).await;
            assert_eq!(field, Some(v));
            assert_eq!(u128::from(total), sum.min(u128::from(u64::MAX)));
            assert_eq!(server.command(&["HGET", &key, "~total"]), sum.to_string());
        }
        let sum: u128 = own.values().map(|&v| u128::from(v)).sum();
        let verify = Identity {
            verify: true,
            ..identity("a")
        };
        let out = wire
            .sync_round(&mut conn, &verify, &[group("a", vec![item(&key, 0)])])
            .await
            .unwrap();
        assert!(out[0].as_ref().unwrap().keys[0].as_ref().unwrap().repaired);
        assert_eq!(server.command(&["HGET", &key, "~total"]), sum.to_string());
    }

    /// Deterministic pseudo-random raises by many nodes, with carries and borrows in every
    /// digit: `~total` equals the exact sum of the fields after each round.
    #[tokio::test]
    async fn the_running_total_is_the_exact_sum_of_the_fields() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "sum", "1d", 0);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut own = [0u64; 7];
        for step in 0..200 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let n = (state % 7) as usize;
            // Small steps, steps of 10^k - 1 (carries), huge values.
            let raise = match step % 4 {
                0 => state % 1000,
                1 => 10u64.pow((state % 19) as u32) - 1,
                2 => state >> (state % 64),
                _ => 0,
            };
            own[n] = own[n].saturating_add(raise);
            let (field, total) = sync_one(&wire, &mut conn, &format!("n{n}"), &key, own[n]).await;
            let exact: u128 = own.iter().map(|&v| u128::from(v)).sum();
            assert_eq!(field, Some(own[n]).filter(|&v| v > 0), "step {step}");
            assert_eq!(
                u128::from(total),
                exact.min(u128::from(u64::MAX)),
                "step {step}"
            );
            if exact > 0 {
                assert_eq!(server.command(&["HGET", &key, "~total"]), exact.to_string());
            }
            assert_eq!(field_sum(&server, &key), exact);
        }
    }

    #[tokio::test]
    async fn a_total_that_cannot_be_right_is_recomputed_server_side() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        sync_one(&wire, &mut conn, "a", &key, 5).await;
        sync_one(&wire, &mut conn, "b", &key, 7).await;
        for (damage, value) in [
            ("missing", None),
            ("malformed", Some("x1")),
            ("below our field", Some("3")),
            ("leading zero", Some("012")),
        ] {
            match value {
                None => server.command(&["HDEL", &key, "~total"]),
                Some(v) => server.command(&["HSET", &key, "~total", v]),
            };
            let out = wire
                .sync_round(
                    &mut conn,
                    &identity("a"),
                    &[group("a", vec![item(&key, 0)])],
                )
                .await
                .unwrap();
            let reply = out[0].as_ref().unwrap().keys[0].clone().unwrap();
            assert!(reply.repaired, "{damage}");
            assert_eq!(reply.total, 12, "{damage}");
            assert_eq!(server.command(&["HGET", &key, "~total"]), "12", "{damage}");
        }
        // A total too high for anyone to see is only found by a verifying round.
        server.command(&["HSET", &key, "~total", "100"]);
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 0).await,
            (Some(5), 100)
        );
        let verify = Identity {
            verify: true,
            ..identity("a")
        };
        let out = wire
            .sync_round(&mut conn, &verify, &[group("a", vec![item(&key, 0)])])
            .await
            .unwrap();
        let reply = out[0].as_ref().unwrap().keys[0].clone().unwrap();
        assert!(reply.repaired);
        assert_eq!(reply.total, 12);
        // A key of the previous wire (fields, no total) gets its total at the first touch.
        let old = window_key("t", "old", "1d", 0);
        server.command(&["HSET", &old, "x", "40", "y", "2", "~owner:x", "i9"]);
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &old, 1).await,
            (Some(1), 43)
        );
    }

    #[tokio::test]
    async fn the_reply_size_does_not_grow_with_the_fleet() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let key = window_key("t", "openai", "1d", 0);
        let measure = |wire: &Wire| wire.traffic().1;
        let wire = Wire::new();
        sync_one(&wire, &mut conn, "a", &key, 123_456).await;
        let before = measure(&wire);
        sync_one(&wire, &mut conn, "a", &key, 0).await;
        let alone = measure(&wire) - before;
        for n in 0..500 {
            server.command(&["HSET", &key, &format!("node-{n}"), "987654321"]);
        }
        server.command(&["HDEL", &key, "~total"]);
        sync_one(&wire, &mut conn, "a", &key, 0).await; // repairs the total once
        let before = measure(&wire);
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 0).await,
            (Some(123_456), 123_456 + 500 * 987_654_321)
        );
        let crowded = measure(&wire) - before;
        // Only the total's digits differ (6 more, and one more digit in its length).
        assert!(
            crowded <= alone + 7,
            "{alone} bytes alone, {crowded} beside 500 nodes"
        );
    }

    #[tokio::test]
    async fn one_round_trip_for_many_groups_and_items() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let groups: Vec<Vec<SyncItem>> = (0..50)
            .map(|b| {
                (0..4)
                    .map(|w| {
                        item(
                            &window_key("t", &format!("p{b}"), "1h", w * 3600),
                            b * 10 + w as u64 + 1,
                        )
                    })
                    .collect()
            })
            .collect();

        // The first round may load the script (fresh server, hence NOSCRIPT): 1 or 2 trips.
        wire.sync_simple(&mut conn, "a", &groups).await.unwrap();
        for _ in 0..3 {
            let before = wire.round_trips();
            let out = wire.sync_simple(&mut conn, "a", &groups).await.unwrap();
            assert_eq!(wire.round_trips(), before + 1);
            assert_eq!(out.len(), groups.len());
            for (group, states) in groups.iter().zip(&out) {
                assert_eq!(states.len(), group.len());
                for (it, s) in group.iter().zip(states) {
                    assert_eq!(s, &(Some(it.own), it.own), "{}", it.key);
                }
            }
        }

        // Empty groups keep their place and cost nothing; all-empty sends nothing.
        let before = wire.round_trips();
        let out = wire
            .sync_simple(&mut conn, "a", &[vec![], groups[1].clone(), vec![]])
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[0].is_empty() && out[2].is_empty());
        assert_eq!(out[1].len(), groups[1].len());
        assert_eq!(wire.round_trips(), before + 1);
        let out = wire
            .sync_simple(&mut conn, "a", &[vec![], vec![]])
            .await
            .unwrap();
        assert_eq!(out, vec![Vec::<State>::new(), Vec::new()]);
        assert_eq!(wire.round_trips(), before + 1);
    }

    #[tokio::test]
    async fn script_flush_costs_one_extra_round_trip() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        sync_one(&wire, &mut conn, "a", &key, 5).await;

        assert_eq!(server.command(&["SCRIPT", "FLUSH"]), "OK");
        assert_eq!(
            server.command(&["SCRIPT", "EXISTS", wire.script_sha()]),
            "[0]"
        );
        let before = wire.round_trips();
        let groups = vec![
            vec![item(&key, 6)],
            vec![item(&window_key("t", "x", "1d", 0), 1)],
        ];
        let out = wire.sync_simple(&mut conn, "a", &groups).await.unwrap();
        assert_eq!(out[0][0], (Some(6), 6));
        assert_eq!(out[1][0], (Some(1), 1));
        assert_eq!(
            wire.round_trips(),
            before + 2,
            "NOSCRIPT then SCRIPT LOAD + retry"
        );
        // Loaded for good: the next round is one trip again.
        assert_eq!(
            server.command(&["SCRIPT", "EXISTS", wire.script_sha()]),
            "[1]"
        );
        let before = wire.round_trips();
        wire.sync_simple(&mut conn, "a", &groups).await.unwrap();
        assert_eq!(wire.round_trips(), before + 1);
    }

    #[tokio::test]
    async fn redis_restart_loses_data_and_a_resend_restores_it() {
        let mut server = server_or_skip!();
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let mut conn_a = connect(&server).await;
        sync_one(&wire, &mut conn_a, "a", &key, 5).await;
        sync_one(&wire, &mut conn_a, "b", &key, 9).await;

        server.kill();
        let err = wire
            .sync_simple(&mut conn_a, "a", &[vec![item(&key, 6)]])
            .await
            .unwrap_err();
        assert!(err.is_connection_error(), "{err}");
        assert!(err.to_string().starts_with("redis: "), "{err}");

        server.restart();
        assert_eq!(server.command(&["EXISTS", &key]), "0", "no persistence");
        // A fresh connection (the old one died with the server); the script is gone too.
        let mut conn = connect(&server).await;
        assert_eq!(sync_one(&wire, &mut conn, "a", &key, 6).await, (Some(6), 6));
        // Node b re-sends its absolute total: the fleet total is whole again.
        assert_eq!(
            sync_one(&wire, &mut conn, "b", &key, 9).await,
            (Some(9), 15)
        );
    }

    #[tokio::test]
    async fn connection_manager_is_a_valid_connection() {
        let server = server_or_skip!();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = redis::aio::ConnectionManager::new(client).await.unwrap();
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let out = wire
            .sync_simple(&mut conn, "a", &[vec![item(&key, 2)]])
            .await
            .unwrap();
        assert_eq!(out, vec![vec![(Some(2), 2)]]);
    }

    #[tokio::test]
    async fn keys_expire_at_the_given_time() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let key = window_key("t", "openai", "1h", 0);
        let item = SyncItem {
            key: key.clone(),
            own: 1,
            expire_at: now + 1000,
            grant: None,
            skip: false,
        };
        wire.sync_simple(&mut conn, "a", &[vec![item.clone()]])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((990..=1000).contains(&ttl), "ttl {ttl}");

        // Set when the key or our field in it is created, not by every send: a key that
        // holds our field has its expiry (issue 11: one command less per dirty key).
        let later = SyncItem {
            expire_at: now + 5000,
            own: 2,
            ..item.clone()
        };
        wire.sync_simple(&mut conn, "a", &[vec![later.clone()]])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((990..=1000).contains(&ttl), "ttl {ttl}");
        // Another node creating its field sets it again.
        wire.sync_simple(&mut conn, "b", &[vec![later.clone()]])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((4990..=5000).contains(&ttl), "ttl {ttl}");
        // A key that lost its expiry (an operator's PERSIST) gets it back from a verifying
        // round (every process's first).
        assert_eq!(server.command(&["PERSIST", &key]), "1");
        let verify = Identity {
            verify: true,
            ..identity("a")
        };
        let third = SyncItem {
            own: 3,
            expire_at: now + 7000,
            ..item.clone()
        };
        wire.sync_round(&mut conn, &verify, &[group("a", vec![third])])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((6990..=7000).contains(&ttl), "ttl {ttl}");
        // A flushed key comes back with its expiry: the write finds our field missing.
        server.command(&["FLUSHALL"]);
        let fourth = SyncItem {
            own: 4,
            expire_at: now + 3000,
            ..item.clone()
        };
        wire.sync_simple(&mut conn, "a", &[vec![fourth]])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((2990..=3000).contains(&ttl), "ttl {ttl}");
        // Without the lease, our kept-apart field's creation sets it too.
        server.command(&["FLUSHALL"]);
        server.command(&["SET", &group("a", vec![item.clone()]).lease, "someone-else"]);
        let apart = SyncItem {
            own: 5,
            expire_at: now + 2000,
            ..item.clone()
        };
        let out = wire
            .sync_round(&mut conn, &identity("a"), &[group("a", vec![apart])])
            .await
            .unwrap();
        assert!(matches!(
            out[0].as_ref().unwrap().lease,
            Lease::Refused { .. }
        ));
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((1990..=2000).contains(&ttl), "ttl {ttl}");

        // A read of an absent key creates nothing.
        let absent = window_key("t", "openai", "1h", 3600);
        let read = SyncItem {
            key: absent.clone(),
            own: 0,
            expire_at: now + 1000,
            grant: None,
            skip: false,
        };
        wire.sync_simple(&mut conn, "a", &[vec![read]])
            .await
            .unwrap();
        assert_eq!(server.command(&["TTL", &absent]), "-2");
    }

    #[tokio::test]
    async fn bad_fields_and_keys_fail_only_themselves() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let good = window_key("t", "anthropic", "1d", 0);
        let wrong = window_key("t", "openai", "1d", 86_400);
        server.command(&["HSET", &key, "b", "abc"]);
        server.command(&["HSET", &key, "c", "-5"]);
        server.command(&["HSET", &key, "d", "18446744073709551616"]);
        server.command(&["HSET", &key, "e", "7"]);
        server.command(&["SET", &wrong, "x"]);
        let groups = [
            group("a", vec![item(&good, 1)]),
            group("a", vec![item(&key, 5), item(&wrong, 3)]),
        ];
        let out = wire
            .sync_round(&mut conn, &identity("a"), &groups)
            .await
            .unwrap();
        let good_reply = out[0].as_ref().unwrap();
        assert_eq!(
            good_reply.keys[0].as_ref().unwrap().problems,
            Vec::<String>::new()
        );
        let bad = out[1].as_ref().unwrap();
        let reply = bad.keys[0].as_ref().unwrap();
        // The bad fields are left out of the total (computed at the first touch).
        assert_eq!((reply.field, reply.total), (Some(5), 12));
        // One line for the key, naming each bad field and its value.
        assert_eq!(reply.problems.len(), 1, "{:?}", reply.problems);
        for (field, value) in [("b", "abc"), ("c", "-5"), ("d", "18446744073709551616")] {
            let p = &reply.problems[0];
            assert!(
                p.contains(&key) && p.contains(&format!("{field:?} = \"{value}\"")),
                "{field}: {p}"
            );
        }
        let wrong_err = bad.keys[1].as_ref().unwrap_err();
        assert!(
            wrong_err.contains(&wrong) && wrong_err.contains("WRONGTYPE"),
            "{wrong_err}"
        );
        assert!(!wrong_err.contains('\n'));
        // A garbage value in our *own* field is reported, then repaired by our total (we
        // are its only writer), and the total stays the sum of the good fields.
        server.command(&["HSET", &key, "a", "99999999999999999999999"]);
        server.command(&["DEL", &wrong]);
        let out = wire
            .sync_round(&mut conn, &identity("a"), &groups)
            .await
            .unwrap();
        let bad = out[1].as_ref().unwrap();
        assert!(bad.keys[1].is_ok());
        let reply = bad.keys[0].as_ref().unwrap();
        assert_eq!((reply.field, reply.total), (Some(5), 12));
        assert_eq!(server.command(&["HGET", &key, "a"]), "5");
        assert_eq!(server.command(&["HGET", &key, "~total"]), "12");
        assert_eq!(server.command(&["HGET", &wrong, "a"]), "3");
        // Still reported while the bad fields are there; an operator's fix counts at once.
        assert_eq!(reply.problems.len(), 1, "{:?}", reply.problems);
        server.command(&["HSET", &key, "b", "100"]);
        server.command(&["HDEL", &key, "c", "d"]);
        let out = wire
            .sync_round(&mut conn, &identity("a"), &groups)
            .await
            .unwrap();
        let reply = out[1].as_ref().unwrap().keys[0].as_ref().unwrap();
        assert_eq!((reply.total, reply.problems.len()), (112, 0), "{reply:?}");
        assert_eq!(server.command(&["HEXISTS", &key, "~bad"]), "0");
        // Clean again: no recomputation.
        let out = wire
            .sync_round(&mut conn, &identity("a"), &groups)
            .await
            .unwrap();
        assert!(!out[1].as_ref().unwrap().keys[0].as_ref().unwrap().repaired);
    }

    /// A key's reply for instance `inst` of node `n`.
    async fn sync_as(
        wire: &Wire,
        conn: &mut MultiplexedConnection,
        id: &Identity<'_>,
        key: &str,
        own: u64,
    ) -> (Lease, KeyReply) {
        let mut out = wire
            .sync_round(conn, id, &[group(id.node, vec![item(key, own)])])
            .await
            .unwrap();
        let reply = out.remove(0).unwrap();
        (reply.lease, reply.keys[0].clone().unwrap())
    }

    #[tokio::test]
    async fn a_lease_held_by_another_instance_refuses_writes_and_a_takeover_keeps_both() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let lease = group("n", vec![item(&key, 0)]).lease;
        let one = identity("n");
        let two = Identity {
            instance: "i2",
            ..identity("n")
        };
        let (l, r) = sync_as(&wire, &mut conn, &one, &key, 100).await;
        assert_eq!(l, Lease::Held);
        assert_eq!(
            (r.field, r.owner.as_deref(), r.mine, r.total),
            (Some(100), Some(INSTANCE), 0, 100)
        );
        // Another data dir with the same node id: refused, the field left alone, its total
        // kept apart under its instance, and counted.
        let (l, r) = sync_as(&wire, &mut conn, &two, &key, 30).await;
        assert_eq!(
            l,
            Lease::Refused {
                holder: INSTANCE.into()
            }
        );
        assert_eq!(
            (r.field, r.owner.as_deref(), r.mine, r.total),
            (Some(100), Some(INSTANCE), 30, 130)
        );
        assert_eq!(server.command(&["HGET", &key, "n"]), "100");
        assert_eq!(server.command(&["HGET", &key, "~retired:n:i2"]), "30");
        // The first stops cleanly: its last round releases the lease.
        let release = Identity {
            release: true,
            ..one
        };
        sync_as(&wire, &mut conn, &release, &key, 100).await;
        assert_eq!(server.command(&["EXISTS", &lease]), "0");
        // The second takes over: the first's total is kept beside its own, not max-merged,
        // and its own apart total moves back into the field.
        let (l, r) = sync_as(&wire, &mut conn, &two, &key, 30).await;
        assert_eq!(l, Lease::Held);
        assert_eq!(
            (r.field, r.owner.as_deref(), r.mine, r.total),
            (Some(30), Some("i2"), 0, 130)
        );
        let ttl: i64 = server.command(&["PTTL", &lease]).parse().unwrap();
        assert!((50_000..=60_000).contains(&ttl), "{ttl}");
        assert_eq!(server.command(&["GET", &lease]), "i2");
        assert_eq!(server.command(&["HEXISTS", &key, "~retired:n:i2"]), "0");
        assert_eq!(
            server.command(&["HGET", &key, format!("~retired:n:{INSTANCE}").as_str()]),
            "100"
        );
        // The first reads: the field is not its own any more.
        let (_, r) = sync_as(&wire, &mut conn, &one, &key, 0).await;
        assert_eq!(
            (r.field, r.owner.as_deref(), r.mine, r.total),
            (Some(30), Some("i2"), 100, 130)
        );
        // The first comes back later with more spend and takes its field back: exact again.
        server.command(&["DEL", &lease]);
        let (_, r) = sync_as(&wire, &mut conn, &one, &key, 110).await;
        assert_eq!(r.total, 140, "{r:?}");
        assert_eq!(field_sum(&server, &key), 140);
    }

    #[tokio::test]
    async fn a_broken_lease_key_writes_only_our_own_instance_field() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let g = [group("n", vec![item(&key, 9)])];
        server.command(&["HSET", &g[0].lease, "x", "y"]);
        let out = wire
            .sync_round(&mut conn, &identity("n"), &g)
            .await
            .unwrap();
        let reply = out[0].as_ref().unwrap();
        assert!(
            matches!(&reply.lease, Lease::Broken(e) if e.contains("WRONGTYPE")),
            "{:?}",
            reply.lease
        );
        assert_eq!(server.command(&["HEXISTS", &key, "n"]), "0");
        assert_eq!(
            server.command(&["HGET", &key, &format!("~retired:n:{INSTANCE}")]),
            "9"
        );
        assert_eq!(reply.keys[0].as_ref().unwrap().total, 9);
        // Repaired: the field is taken and our apart total moves into it.
        server.command(&["DEL", &g[0].lease]);
        let out = wire
            .sync_round(&mut conn, &identity("n"), &g)
            .await
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap().keys[0].as_ref().unwrap().total, 9);
        assert_eq!(server.command(&["HGET", &key, "n"]), "9");
        assert_eq!(server.command(&["HGET", &key, "~total"]), "9");
        assert_eq!(
            server.command(&["HEXISTS", &key, &format!("~retired:n:{INSTANCE}")]),
            "0"
        );
    }

    #[tokio::test]
    async fn a_clean_budget_is_read_with_plain_commands_and_damage_sends_it_to_the_script() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        sync_one(&wire, &mut conn, "a", &key, 5).await;
        sync_one(&wire, &mut conn, "b", &key, 7).await;
        let read = |renew| Group {
            mode: Mode::Read { renew },
            ..group("a", vec![item(&key, 0)])
        };
        let before = wire.traffic();
        let out = wire
            .sync_round(&mut conn, &identity("a"), &[read(true)])
            .await
            .unwrap();
        let after = wire.traffic();
        let reply = out[0].as_ref().unwrap();
        assert_eq!(reply.lease, Lease::Held);
        let state = reply.keys[0].as_ref().unwrap();
        assert_eq!(
            (state.field, state.total, state.needs_script),
            (Some(5), 12, false)
        );
        assert_eq!(state.owner.as_deref(), Some(INSTANCE));
        // No script ran: the request carries no SHA, and the lease was renewed.
        assert!(after.0 - before.0 < 250, "{} bytes", after.0 - before.0);
        let lease = read(false).lease;
        let ttl: i64 = server.command(&["PTTL", &lease]).parse().unwrap();
        assert!(ttl > 50_000, "{ttl}");
        // No `GET` of the lease: a plain read takes it as still ours, and renewing tells a
        // lease that is gone (expired, released) apart: free, the script takes it again.
        server.command(&["DEL", &lease]);
        let out = wire
            .sync_round(&mut conn, &identity("a"), &[read(false)])
            .await
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap().lease, Lease::Held);
        let out = wire
            .sync_round(&mut conn, &identity("a"), &[read(true)])
            .await
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap().lease, Lease::Free);
        // Another data dir's write shows in the owner field (the caller then runs the script).
        sync_one(&wire, &mut conn, "a", &key, 0).await; // takes the lease again
        server.command(&["HSET", &key, "~owner:a", "i9"]);
        let out = wire
            .sync_round(&mut conn, &identity("a"), &[read(true)])
            .await
            .unwrap();
        let reply = out[0].as_ref().unwrap();
        assert_eq!(reply.lease, Lease::Held);
        let state = reply.keys[0].as_ref().unwrap();
        assert_eq!(state.owner.as_deref(), Some("i9"));
        server.command(&["HSET", &key, "~owner:a", INSTANCE]);
        // What only the script repairs: a missing or low total, a flagged key.
        for damage in [
            vec!["HDEL", key.as_str(), "~total"],
            vec!["HSET", key.as_str(), "~total", "1"],
            vec!["HSET", key.as_str(), "~bad", "1"],
            vec!["HSET", key.as_str(), "a", "x"],
        ] {
            server.command(&damage);
            let out = wire
                .sync_round(&mut conn, &identity("a"), &[read(false)])
                .await
                .unwrap();
            let state = out[0].as_ref().unwrap().keys[0].clone().unwrap();
            assert!(state.needs_script, "{damage:?}");
            server.command(&["HDEL", &key, "~bad"]);
            server.command(&["HSET", &key, "a", "5"]);
            sync_one(&wire, &mut conn, "a", &key, 0).await; // the script repairs
        }
        // An absent key needs nothing.
        let absent = window_key("t", "x", "1d", 0);
        let g = Group {
            mode: Mode::Read { renew: false },
            ..group("a", vec![item(&absent, 0)])
        };
        let out = wire
            .sync_round(&mut conn, &identity("a"), &[g])
            .await
            .unwrap();
        let state = out[0].as_ref().unwrap().keys[0].clone().unwrap();
        assert_eq!((state.total, state.needs_script), (0, false));
    }

    // ---- client-side tracking (see `super::super::tracking`) ------------------------------

    /// A RESP3 connection whose push messages (invalidations) go to the returned channel.
    async fn connect_tracked(
        server: &RedisServer,
    ) -> (
        MultiplexedConnection,
        tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let url = format!("redis://127.0.0.1:{}/?protocol=resp3", server.port());
        let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
        let conn = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        (conn, rx)
    }

    /// The next invalidation: its keys (`None`: everything, a flush).
    async fn next_invalidation(
        pushes: &mut tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    ) -> Option<Vec<String>> {
        loop {
            let push = tokio::time::timeout(std::time::Duration::from_secs(5), pushes.recv())
                .await
                .expect("no push message within 5 s")
                .unwrap();
            if push.kind != redis::PushKind::Invalidate {
                continue;
            }
            return match push.data.into_iter().next() {
                Some(Value::Array(keys)) => {
                    Some(keys.into_iter().map(|k| text(k).unwrap()).collect())
                }
                Some(Value::Nil) | None => None,
                other => panic!("unexpected invalidation {other:?}"),
            };
        }
    }

    /// What the tracking design rests on, checked against the real server (7.0 here): with
    /// `CLIENT TRACKING ON NOLOOP`, a plain read (`HMGET`) is tracked; a key read inside the
    /// merge script is tracked too, but not once the script also wrote it (our own write
    /// drops the key from Redis's table and NOLOOP suppresses the message): so only plain
    /// reads may make a key fresh. A flush invalidates everything with no key list.
    #[tokio::test]
    async fn tracking_covers_plain_reads_not_keys_the_script_writes() {
        let server = server_or_skip!();
        let (mut conn, mut pushes) = connect_tracked(&server).await;
        let wire = Wire::new();
        let written = window_key("t", "w", "1d", 0);
        let script_read = window_key("t", "s", "1d", 0);
        let plain = window_key("t", "p", "1d", 0);
        let absent = window_key("t", "a", "1d", 0);
        let read = |items| Group {
            mode: Mode::Read { renew: false },
            ..group("n", items)
        };
        // Every key exists with a field of another node first (the reads then need nothing).
        for key in [&written, &script_read, &plain] {
            sync_one(&wire, &mut conn, "other", key, 3).await;
        }
        let groups = [
            group("n", vec![item(&written, 5)]),
            group("n", vec![item(&script_read, 0)]),
            read(vec![item(&plain, 0), item(&absent, 0)]),
        ];
        let (out, tracked) = wire
            .sync_round_tracked(&mut conn, &identity("n"), &groups, true)
            .await
            .unwrap();
        let tracked = tracked.unwrap();
        assert_eq!(tracked.error, None);
        assert!(tracked.client_id.is_some());
        for g in &out {
            assert!(
                g.as_ref().unwrap().keys.iter().all(|k| k.is_ok()),
                "{out:?}"
            );
        }
        // Another client changes every key, in this order: the invalidations come in the
        // same order, and the written key, not tracked, sends none.
        for key in [&written, &script_read, &plain, &absent] {
            server.command(&["HSET", key, "x", "1"]);
        }
        assert_eq!(
            next_invalidation(&mut pushes).await,
            Some(vec![script_read.clone()])
        );
        assert_eq!(
            next_invalidation(&mut pushes).await,
            Some(vec![plain.clone()])
        );
        assert_eq!(
            next_invalidation(&mut pushes).await,
            Some(vec![absent.clone()]),
            "an absent key is tracked too (a window nobody spent in yet)"
        );
        // One message per read: a second change sends nothing until the key is read again.
        server.command(&["HSET", &plain, "x", "2"]);
        let groups = [read(vec![item(&plain, 0)])];
        wire.sync_round_tracked(&mut conn, &identity("n"), &groups, true)
            .await
            .unwrap();
        // Our own writes send us nothing (NOLOOP), another client's do.
        sync_one(&wire, &mut conn, "n", &written, 6).await;
        server.flushall();
        assert_eq!(next_invalidation(&mut pushes).await, None, "a flush");
        // The prelude is idempotent and `CLIENT ID` stays the connection's.
        let (_, again) = wire
            .sync_round_tracked(&mut conn, &identity("n"), &[], true)
            .await
            .unwrap();
        assert_eq!(again.unwrap(), tracked);
    }

    #[tokio::test]
    async fn skipped_items_cost_no_command_and_answer_unread() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "x", "1d", 0);
        sync_one(&wire, &mut conn, "a", &key, 5).await;
        let skipped = Group {
            mode: Mode::Read { renew: false },
            ..group(
                "a",
                vec![SyncItem {
                    skip: true,
                    ..item(&key, 0)
                }],
            )
        };
        let trips = wire.round_trips();
        let out = wire
            .sync_round(&mut conn, &identity("a"), std::slice::from_ref(&skipped))
            .await
            .unwrap();
        assert_eq!(wire.round_trips(), trips, "nothing to send, nothing sent");
        let reply = out[0].as_ref().unwrap();
        assert_eq!(reply.lease, Lease::Held);
        assert!(reply.keys[0].as_ref().unwrap().unread);
        // With a renewal: only the `PEXPIRE`.
        let renewing = Group {
            mode: Mode::Read { renew: true },
            ..skipped
        };
        let (out, tracked) = wire
            .sync_round_tracked(&mut conn, &identity("a"), &[renewing], true)
            .await
            .unwrap();
        assert_eq!(wire.round_trips(), trips + 1);
        assert!(tracked.unwrap().error.is_none());
        let reply = out[0].as_ref().unwrap();
        assert_eq!(reply.lease, Lease::Held);
        assert!(reply.keys[0].as_ref().unwrap().unread);
    }

    // ---- strict budgets: grants ------------------------------------------------------------

    /// One strict key's call for `node`: spend `own`, durable grant `durable`, wanting `want`.
    async fn ask(
        wire: &Wire,
        conn: &mut MultiplexedConnection,
        id: &Identity<'_>,
        key: &str,
        own: u64,
        durable: u64,
        want: u64,
    ) -> GrantReply {
        let item = SyncItem {
            grant: Some(GrantAsk {
                limit: LIMIT,
                durable,
                want,
            }),
            ..item(key, own)
        };
        let g = group(id.node, vec![item]);
        let out = wire.sync_round(conn, id, &[g]).await.unwrap();
        let key = out[0].as_ref().unwrap().keys[0].clone().unwrap();
        key.grant.expect("a strict key answers with its grant")
    }

    const LIMIT: u64 = 1_000_000;

    /// Checks the running grant fields against the fields themselves and returns
    /// `(Σ grants, Σ max(grant, spent))`.
    fn grant_sums(server: &RedisServer, key: &str) -> (u64, u64) {
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let all: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg(key).query(&mut conn).unwrap();
        let num = |f: &str| all.get(f).map_or(0, |v| v.parse::<u64>().unwrap());
        let (mut granted, mut unspent, mut holders) = (0, 0, 0);
        for (f, v) in &all {
            if let Some(n) = f.strip_prefix("~grant:") {
                let g: u64 = v.parse().unwrap();
                granted += g;
                unspent += g.saturating_sub(num(n));
                holders += 1;
            }
        }
        assert_eq!(num("~granted"), granted, "~granted of {all:?}");
        assert_eq!(num("~unspent"), unspent, "~unspent of {all:?}");
        assert_eq!(num("~holders"), holders, "~holders of {all:?}");
        (granted, num("~total") + unspent)
    }

    #[tokio::test]
    async fn grants_never_sum_above_the_limit_and_the_last_dollars_are_given_out() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let nodes = ["a", "b", "c"];
        let mut own = [0u64; 3];
        let mut grant = [0u64; 3];
        for round in 0..40 {
            for (i, node) in nodes.iter().enumerate() {
                // Spend part of the grant (a little more than it on one node: a commit above
                // its estimate), then ask for far more than is left.
                own[i] = (own[i] + grant[i].saturating_sub(own[i]) / 2).max(own[i]);
                if round == 7 && i == 1 {
                    own[i] = grant[i] + 10;
                }
                let r = ask(
                    &wire,
                    &mut conn,
                    &identity(node),
                    &key,
                    own[i],
                    grant[i],
                    u64::MAX / 4,
                )
                .await;
                assert!(r.grant >= grant[i], "a grant never shrinks unasked");
                grant[i] = r.grant;
                let (granted, claimed) = grant_sums(&server, &key);
                assert_eq!(r.granted, granted);
                assert!(
                    claimed <= LIMIT + 10,
                    "Σ max(grant, spent) = {claimed} > limit + excess"
                );
            }
        }
        let (granted, claimed) = grant_sums(&server, &key);
        assert_eq!(
            claimed,
            LIMIT + 10,
            "everything free was granted (only the excess above)"
        );
        assert!(granted <= LIMIT, "{granted}");
        // The first ask of a fresh budget takes half of it, not all.
        let fresh = window_key("t", "openai", "1d", 86_400);
        let r = ask(&wire, &mut conn, &identity("a"), &fresh, 0, 0, u64::MAX / 4).await;
        assert_eq!(r.grant, LIMIT / 2);
        // A small ask gets exactly what it asks.
        let r = ask(&wire, &mut conn, &identity("b"), &fresh, 0, 0, 1234).await;
        assert_eq!((r.grant, r.granted, r.holders), (1234, LIMIT / 2 + 1234, 2));
    }

    #[tokio::test]
    async fn a_give_back_never_goes_below_the_spend_and_frees_the_rest() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let a = ask(&wire, &mut conn, &identity("a"), &key, 0, 0, 600_000).await;
        assert_eq!(a.grant, 500_000, "half of what is free");
        // Half the limit is free: a quarter of it (smaller steps as the budget fills).
        let b = ask(&wire, &mut conn, &identity("b"), &key, 0, 0, u64::MAX / 4).await;
        assert_eq!(b.grant, 125_000);
        // a spent 300k and gives back down to 100k: kept at its spend.
        let a = ask(
            &wire,
            &mut conn,
            &identity("a"),
            &key,
            300_000,
            500_000,
            100_000,
        )
        .await;
        assert_eq!(a.grant, 300_000);
        assert_eq!(grant_sums(&server, &key), (425_000, 425_000));
        // b takes what a gave back and the rest (the last 5 % of the limit in one step).
        let mut g = b.grant;
        for _ in 0..20 {
            g = ask(&wire, &mut conn, &identity("b"), &key, 0, g, u64::MAX / 4)
                .await
                .grant;
        }
        assert_eq!(g, 700_000);
        assert_eq!(grant_sums(&server, &key), (1_000_000, 1_000_000));
        // A durable grant above what Redis holds is kept (max), never lowered by a want.
        let a = ask(&wire, &mut conn, &identity("a"), &key, 300_000, 300_000, 0).await;
        assert_eq!(a.grant, 300_000);
    }

    #[tokio::test]
    async fn a_flushed_redis_rebuilds_grants_and_raises_wait_for_the_holders() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let guarded = |node| Identity {
            guard_ms: 400,
            ..identity(node)
        };
        // A budget's first strict call freezes raises for the guard time too (Redis cannot
        // tell a first use from a loss).
        let r = ask(&wire, &mut conn, &guarded("a"), &key, 0, 0, 600_000).await;
        assert!(r.frozen);
        assert_eq!(r.grant, 0);
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let a = loop {
            let r = ask(&wire, &mut conn, &guarded("a"), &key, 0, 0, 600_000).await;
            if !r.frozen {
                break r.grant;
            }
            assert!(Instant::now() < deadline, "the guard never ended");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(a, 500_000);
        let b = ask(&wire, &mut conn, &guarded("b"), &key, 0, 0, 400_000)
            .await
            .grant;
        assert_eq!(b, 125_000);

        server.flushall();
        // c, who never held a grant, asks first: frozen, nothing granted twice.
        let c = ask(&wire, &mut conn, &guarded("c"), &key, 0, 0, 900_000).await;
        assert_eq!((c.grant, c.frozen), (0, true));
        // The holders re-register their durable grants (max), even while frozen.
        let r = ask(&wire, &mut conn, &guarded("a"), &key, 0, a, a).await;
        assert_eq!(r.grant, a);
        let r = ask(&wire, &mut conn, &guarded("b"), &key, 0, b, b).await;
        assert_eq!((r.grant, r.granted), (b, a + b));
        // After the guard, c gets only what is really free.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut g = 0;
        loop {
            let r = ask(&wire, &mut conn, &guarded("c"), &key, 0, g, 900_000).await;
            g = r.grant;
            if !r.frozen && r.granted == LIMIT {
                break;
            }
            assert!(Instant::now() < deadline, "c never got the rest: {r:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(g, LIMIT - a - b);
        assert_eq!(grant_sums(&server, &key).0, LIMIT);
    }

    #[tokio::test]
    async fn unused_grants_of_silent_nodes_are_reclaimed_after_the_lease() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let leased = |node| Identity {
            grant_lease_ms: 300,
            ..identity(node)
        };
        // a spent 100k: half of the 900k free.
        let a = ask(&wire, &mut conn, &leased("a"), &key, 100_000, 0, 600_000)
            .await
            .grant;
        assert_eq!(a, 450_000);
        let mut b = 0;
        for _ in 0..20 {
            b = ask(&wire, &mut conn, &leased("b"), &key, 0, b, u64::MAX / 4)
                .await
                .grant;
        }
        assert_eq!(b, 550_000, "all of the rest");
        // Within the lease nothing is taken from a.
        let r = ask(&wire, &mut conn, &leased("b"), &key, 0, b, u64::MAX / 4).await;
        assert_eq!(r.grant, b);
        // a stays silent past its lease: its unused 350k is reclaimed (its spend is kept).
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let r = ask(&wire, &mut conn, &leased("b"), &key, 0, b, u64::MAX / 4).await;
            if r.grant > b {
                b = r.grant;
                break;
            }
            assert!(Instant::now() < deadline, "never reclaimed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(b > 550_000 && b <= 900_000, "{b}");
        // a comes back: its durable grant is restored (max): the bound grows by at most its
        // unused grant, as documented, and raises freeze again.
        let r = ask(&wire, &mut conn, &leased("a"), &key, 100_000, a, a).await;
        assert_eq!(r.grant, a);
        let (_, claimed) = grant_sums(&server, &key);
        assert!(claimed <= LIMIT + (a - 100_000), "{claimed}");
    }

    #[tokio::test]
    async fn a_data_dir_taking_a_node_id_over_gets_only_the_unused_grant() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let first = ask(&wire, &mut conn, &identity("a"), &key, 100_000, 0, 600_000).await;
        assert_eq!(first.grant, 450_000);
        // Another data dir under the same node id while the lease is held: no grant moves.
        let other = Identity {
            instance: "i9",
            ..identity("a")
        };
        let refused = SyncItem {
            grant: Some(GrantAsk {
                limit: LIMIT,
                durable: 0,
                want: 900_000,
            }),
            ..item(&key, 0)
        };
        let out = wire
            .sync_round(&mut conn, &other, &[group("a", vec![refused])])
            .await
            .unwrap();
        let reply = out[0].as_ref().unwrap();
        assert!(matches!(reply.lease, Lease::Refused { .. }));
        assert_eq!(reply.keys[0].as_ref().unwrap().grant, None);
        // The first data dir is gone (its lease expired): the new one takes the field over,
        // with what its predecessor had not spent of the grant, nothing more.
        server.command(&["DEL", &format!("{key}:lease:a")]);
        let taken = ask(&wire, &mut conn, &other, &key, 0, 0, 350_000).await;
        assert_eq!(taken.grant, 350_000);
        assert_eq!(grant_sums(&server, &key), (350_000, 450_000));
    }
}
