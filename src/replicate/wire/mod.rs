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
//! by every write (a command less per dirty key). Invariant: a key that holds our
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
//! **Rolling upgrade of the script**: every binary loads and calls its own script
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

pub(crate) mod definitions;
mod keys;
mod replies;
mod script;

use std::sync::atomic::{AtomicU64, Ordering};

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use crate::model::text::flat;

pub use keys::{lease_key, strict_key, window_key};
pub use replies::{text, GroupReply, KeyReply, Lease, TrackReply};
pub use script::SCRIPT;

/// One window of one budget to merge: our absolute own total and when the key may expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncItem {
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
    /// `super::tracking`); its reply is [`KeyReply::unread`].
    pub skip: bool,
}

/// What a node sends about its grant of one strict window (all nano-dollars, absolute).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantAsk {
    /// The budget's limit (as this node is configured).
    pub limit: u64,
    /// This node's durable grant: Redis keeps at least this (rebuild after a loss).
    pub durable: u64,
    /// The grant the node wants: more is raised within what is free, less is given back
    /// (never below the node's spend in Redis).
    pub want: u64,
    /// The node ids this node knows held a grant field in the window (durable, comma
    /// separated; node ids have no comma). After a data loss the script grants nothing from
    /// the window until each of them has re-registered (see `docs/strict-budgets.md`).
    pub known: String,
}

/// The grant part of a strict key's reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantReply {
    /// This node's grant now.
    pub grant: u64,
    /// `~granted`: the sum of every node's grant in the window.
    pub granted: u64,
    /// `~holders`: how many nodes hold a grant field in the window.
    pub holders: u64,
    /// Raises are frozen (the guard after a loss, or holders not re-registered yet).
    pub frozen: bool,
    /// Every node holding a grant field, when the ask's `known` list was not the same size
    /// as `holders` (else `None`).
    pub holder_ids: Option<Vec<String>>,
}

/// One budget's part of a round: its lease key and its windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
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
pub enum Mode {
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
pub struct Identity<'a> {
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

/// Why a sync round, or one budget's part of it, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
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
    pub fn is_connection_error(&self) -> bool {
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
    pub fn is_redirect(&self) -> bool {
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
pub(super) fn one_line(error: &RedisError) -> String {
    flat(&error.to_string())
}

/// Per budget: its reply, or why its script call failed.
pub type GroupOutcome = Result<GroupReply, WireError>;

/// The sync protocol: the merge script's SHA and a round-trip counter.
#[derive(Debug)]
pub struct Wire {
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
    pub fn new() -> Self {
        Wire {
            script: redis::Script::new(SCRIPT),
            round_trips: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
        }
    }

    /// Pipelines sent so far (each is one network round trip), failed ones included. Lets
    /// tests and benches prove that a sync costs one round trip.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Bytes sent to and received from Redis so far: `(out, in)`.
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.bytes_out.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
        )
    }

    /// The SHA1 under which Redis caches [`SCRIPT`].
    #[doc(hidden)]
    pub fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    /// Merges our totals and reads back, per key, our field and the total, in one round trip.
    ///
    /// `groups` holds one budget each (all keys of a group share a hash tag). The result
    /// mirrors `groups`. Empty groups cost nothing; when every group is empty nothing is sent.
    /// On `NOSCRIPT` the failed groups are retried once behind a `SCRIPT LOAD` (two round
    /// trips). Re-sending is always safe: the merge is a max. `Err` only when the exchange as
    /// a whole failed; a budget whose call failed gets its own `Err` in the result.
    ///
    /// # Errors
    ///
    /// [`WireError`] when the exchange as a whole failed (connection, timeout, a bad reply).
    pub async fn sync_round<C: redis::aio::ConnectionLike + Send>(
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
    ///
    /// # Errors
    ///
    /// As [`Wire::sync_round`].
    pub async fn sync_round_tracked<C: redis::aio::ConnectionLike + Send>(
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
            script::push_group(&mut pipe, self.script.get_hash(), id, &groups[i]);
        }
        let mut replies = self.exchange(conn, &pipe).await?.into_iter();
        let tracked = track.then(|| track_reply(&mut replies));
        if load {
            self.check_load(replies.next(), &groups[which[0]])?;
        }
        let mut no_script = Vec::new();
        for &i in which {
            let group = &groups[i];
            if let Mode::Read { renew } = group.mode {
                results[i] = Some(replies::parse_read(group, renew, &mut replies));
                continue;
            }
            results[i] = match replies.next() {
                Some(Ok(value)) => Some(replies::parse_group(&group.items, value)),
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

    /// One network round trip: sends `pipe`, counts it and its traffic.
    async fn exchange<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<redis::RedisResult<Value>>, WireError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.bytes_out
            .fetch_add(pipe.get_packed_pipeline().len() as u64, Ordering::Relaxed);
        let replies = pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(conn)
            .await?;
        let received: usize = replies
            .iter()
            .map(|r| match r {
                Ok(v) => replies::resp_len(v),
                Err(e) => e.to_string().len() + 3,
            })
            .sum();
        self.bytes_in.fetch_add(received as u64, Ordering::Relaxed);
        Ok(replies)
    }

    /// Checks the `SCRIPT LOAD` reply: the SHA of our script.
    fn check_load(
        &self,
        reply: Option<redis::RedisResult<Value>>,
        group: &Group,
    ) -> Result<(), WireError> {
        match reply {
            Some(Ok(Value::BulkString(sha))) if sha == self.script.get_hash().as_bytes() => Ok(()),
            Some(Err(error)) => Err(WireError::Redis(error)),
            other => Err(WireError::Reply {
                key: first_key(group),
                detail: format!(
                    "SCRIPT LOAD answered {other:?}, expected {}",
                    self.script.get_hash()
                ),
            }),
        }
    }
}

/// The replies of the tracking prelude (`CLIENT TRACKING ON NOLOOP`, `CLIENT ID`).
fn track_reply(replies: &mut impl Iterator<Item = redis::RedisResult<Value>>) -> TrackReply {
    let on = replies.next();
    let client = replies.next();
    TrackReply {
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
    }
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

pub(super) fn first_key(group: &Group) -> String {
    group
        .items
        .first()
        .map(|i| i.key.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_has_a_hash_tag_per_budget() {
        use crate::model::budget::Scope;
        use crate::model::key::BudgetKey;
        let openai = BudgetKey::new(Scope::Provider, "openai", "1d");
        assert_eq!(
            window_key("pb", &openai, 1_700_000_000),
            "pb:{openai:1d}:1700000000"
        );
        assert_eq!(lease_key("pb", &openai, "n1"), "pb:{openai:1d}:lease:n1");
    }

    #[test]
    fn errors_render_on_one_line() {
        let error = RedisError::from((ErrorKind::Io, "broken", "line one\nline two".to_owned()));
        let rendered = WireError::from(error).to_string();
        assert!(!rendered.contains('\n'), "{rendered}");
        assert!(rendered.starts_with("redis: "), "{rendered}");
    }
}
