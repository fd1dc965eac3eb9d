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
//! * `~owner:{node}`: the instance (data dir, see `Store::instance_id`) that last wrote the
//!   field `{node}`;
//! * `~retired:{node}:{instance}`: the total that another instance wrote under `{node}` before
//!   the current owner took the field over. When a data dir takes over a node id that another
//!   data dir used (a wiped disk, a copied config once the duplicate stopped), the old total
//!   is not merged by `max` into the new one (that would lose the smaller one) but kept beside
//!   it: every contribution is one `(node, instance)` counter that only grows, so readers sum
//!   them and max-merge per `(node, instance)`. An instance that takes its field back removes
//!   its own retired field (its total includes it).
//!
//! **Lease**: per budget, key `{prefix}:{{provider:period}}:lease:{node}` holds the instance id
//! of the data dir that uses the node id, for a few sync intervals (`lease_ms`), renewed by
//! every round. When another instance holds it, the script leaves the node's field alone,
//! keeps our total apart under `~retired:{node}:{our instance}` (a contribution only we
//! write, so nothing is undercounted) and reports `refused`: two live data dirs share the
//! node id. The lease shares the budget's hash tag, so a script call still touches one
//! Cluster slot. A clean stop releases it.
//!
//! A sync round is **one network round trip**: one pipeline carrying one `EVALSHA` of
//! [`SCRIPT`] per budget (every window key of a budget shares the budget's Redis Cluster hash
//! tag, so one script call never spans slots). The script merges our totals and returns every
//! field for each key. When Redis answers `NOSCRIPT` (its script cache was flushed or it
//! restarted), the failed calls are sent again behind a `SCRIPT LOAD` in a second pipeline, so
//! that rare round costs two round trips. `SCRIPT LOAD` rather than `EVAL`: since Redis 7.4,
//! scripts that only arrived through `EVAL` may be evicted from the cache, loaded ones are not.
//!
//! **Failures are isolated per key**: the script runs each window key under `pcall`, so a key
//! of the wrong type fails only that window; a field that is not a canonical u64 is skipped
//! and reported; a budget whose script call fails does not hide the other budgets' replies.
//! Only a failure of the whole exchange (connection, timeout) fails the round.
//!
//! Totals may exceed 2^53 while Lua numbers are doubles, so the script never converts them to
//! numbers: it compares canonical decimal strings (longer is bigger; same length, byte by
//! byte, which unlike `<` on strings does not depend on the server's collation locale).

use std::sync::atomic::{AtomicU64, Ordering};

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

/// The merge script. `KEYS[1]` is the budget's lease key, `KEYS[2..]` its window keys.
/// `ARGV[1]` is the node id, `ARGV[2]` the instance id, `ARGV[3]` the lease time in ms,
/// `ARGV[4]` `1` to release the lease (last round) or `0`; then for window key `KEYS[i]`,
/// `ARGV[2i+1]` is the node's own total (canonical decimal u64) and `ARGV[2i+2]` the unix
/// second at which the key expires.
///
/// 1. Lease: held by another instance -> `refused`; unreadable -> `broken`; else ours,
///    renewed (or released) at the end.
/// 2. Per window key, under `pcall`, when the own total is not `0`: with the lease, retire
///    another instance's total (see the module doc), take back our own retired total, raise
///    our field to the max of what we know (a non-canonical value in our field is replaced:
///    we are its only writer) and mark us its owner; without it, leave the node's field
///    alone and raise our own instance's field `~retired:{node}:{instance}` instead (only we
///    write it, so the fleet never undercounts, even while two data dirs share the node id).
///    Then `EXPIREAT key expire_at` (a no-op when the key does not exist; callers pass window
///    end + grace) and `HGETALL`.
///
/// Returns `{lease, per_key}`: `lease` is `{'held'}`, `{'refused', holder}` or
/// `{'broken', error}`; `per_key[i]` is `{'ok', hgetall}` or `{'err', error}`.
pub(crate) const SCRIPT: &str = r#"
local U64_MAX = '18446744073709551615'

-- a > b for canonical decimal strings (no sign, no leading zeros).
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return false
end

-- true when s is a u64 written canonically, the only form this protocol stores.
local function canonical(s)
  if s == '0' then return true end
  if not string.find(s, '^[1-9][0-9]*$') then return false end
  return not greater(s, U64_MAX)
end

local function message(e)
  if type(e) == 'table' and e.err then return e.err end
  return tostring(e)
end

local node, inst, lease_ms, release = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner_field = '~owner:' .. node
local retired_mine = '~retired:' .. node .. ':' .. inst

local lease
local read, holder = pcall(redis.call, 'GET', KEYS[1])
if not read then
  lease = {'broken', message(holder)}
elseif holder and holder ~= inst then
  lease = {'refused', holder}
else
  lease = {'held'}
end
local writable = lease[1] == 'held'

local function merge(key, own, expire_at)
  if writable and own ~= '0' then
    local got = redis.call('HMGET', key, node, owner_field, retired_mine)
    local cur, owner, mine = got[1], got[2], got[3]
    if cur and owner and owner ~= inst then
      if canonical(cur) then
        local rf = '~retired:' .. node .. ':' .. owner
        local prev = redis.call('HGET', key, rf)
        if (not prev) or (not canonical(prev)) or greater(cur, prev) then
          redis.call('HSET', key, rf, cur)
        end
      end
      cur = false
    end
    local best = own
    if cur and canonical(cur) and greater(cur, best) then best = cur end
    if mine then
      if canonical(mine) and greater(mine, best) then best = mine end
      redis.call('HDEL', key, retired_mine)
    end
    if best ~= cur then redis.call('HSET', key, node, best) end
    if owner ~= inst then redis.call('HSET', key, owner_field, inst) end
  elseif own ~= '0' then
    -- Not ours to write: keep our total apart, under our instance (nobody else writes it).
    local prev = redis.call('HGET', key, retired_mine)
    if (not prev) or (not canonical(prev)) or greater(own, prev) then
      redis.call('HSET', key, retired_mine, own)
    end
  end
  redis.call('EXPIREAT', key, expire_at)
  return redis.call('HGETALL', key)
end

local out = {}
for i = 2, #KEYS do
  local ok, r = pcall(merge, KEYS[i], ARGV[2 * i + 1], ARGV[2 * i + 2])
  if ok then out[i - 1] = {'ok', r} else out[i - 1] = {'err', message(r)} end
end
if writable then
  if release == '1' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], inst, 'PX', lease_ms)
  end
end
return {lease, out}
"#;

/// Redis key of one budget window: `{prefix}:{{provider:period}}:{window_start_unix_secs}`.
///
/// The braces are a Redis Cluster hash tag per budget: all windows of one budget live in one
/// slot, so the script that merges them in one call is valid on a cluster too.
pub(crate) fn window_key(prefix: &str, provider: &str, period: &str, window_start: i64) -> String {
    format!("{prefix}:{{{provider}:{period}}}:{window_start}")
}

/// Redis key of a node id's lease for one budget: `{prefix}:{{provider:period}}:lease:{node}`
/// (same hash tag as the budget's windows).
pub(crate) fn lease_key(prefix: &str, provider: &str, period: &str, node: &str) -> String {
    format!("{prefix}:{{{provider}:{period}}}:lease:{node}")
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
}

/// One budget's part of a round: its lease key and its windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    /// See [`lease_key`].
    pub lease: String,
    pub items: Vec<SyncItem>,
}

/// Who is syncing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity<'a> {
    pub node: &'a str,
    /// This data dir's instance id.
    pub instance: &'a str,
    /// How long the lease lives without renewal.
    pub lease_ms: u64,
    /// Release the lease in this round (the last one).
    pub release: bool,
}

/// One `(node, instance)` contribution to a window: a counter that only grows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Contribution {
    pub node: String,
    /// The instance that wrote it; `None` for a field written before owners were recorded.
    pub instance: Option<String>,
    pub total: u64,
}

/// One window key's reply: its contributions, and the fields that were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Hash {
    pub contributions: Vec<Contribution>,
    /// One line per skipped field, naming the key and the field.
    pub problems: Vec<String>,
}

/// The state of a budget's lease after the script ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lease {
    /// Ours (taken, renewed or released).
    Held,
    /// Another live instance holds it: nothing was written.
    Refused { holder: String },
    /// The lease key is unusable (e.g. of the wrong type): nothing was written.
    Broken(String),
}

/// One budget's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupReply {
    pub lease: Lease,
    /// Per item: its hash, or why that key failed (one line naming the key).
    pub keys: Vec<Result<Hash, String>>,
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
        }
    }

    /// Pipelines sent so far (each is one network round trip), failed ones included. Lets
    /// tests and benches prove that a sync costs one round trip.
    pub(crate) fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The SHA1 under which Redis caches [`SCRIPT`].
    #[cfg(test)]
    pub(crate) fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    /// Merges our totals and reads every contribution back, in one round trip.
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
        let mut results: Vec<Option<GroupOutcome>> = groups
            .iter()
            .map(|g| {
                g.items.is_empty().then(|| {
                    Ok(GroupReply {
                        lease: Lease::Held,
                        keys: Vec::new(),
                    })
                })
            })
            .collect();
        let pending: Vec<usize> = (0..groups.len())
            .filter(|&i| !groups[i].items.is_empty())
            .collect();
        if pending.is_empty() {
            return Ok(filled(results));
        }

        let no_script = self
            .send(conn, id, groups, &pending, false, &mut results)
            .await?;
        if !no_script.is_empty() {
            tracing::debug!(
                groups = no_script.len(),
                "redis lost the sync script (NOSCRIPT); loading it and retrying once"
            );
            let still_missing = self
                .send(conn, id, groups, &no_script, true, &mut results)
                .await?;
            for i in still_missing {
                results[i] = Some(Err(WireError::Reply {
                    key: first_key(&groups[i]),
                    detail: "NOSCRIPT right after SCRIPT LOAD".into(),
                }));
            }
        }
        Ok(filled(results))
    }

    /// Sends one pipeline with one `EVALSHA` per group in `which` (preceded by `SCRIPT LOAD`
    /// when `load`), stores the outcomes in `results` and returns the groups that failed
    /// with `NOSCRIPT`.
    async fn send<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        id: &Identity<'_>,
        groups: &[Group],
        which: &[usize],
        load: bool,
        results: &mut [Option<GroupOutcome>],
    ) -> Result<Vec<usize>, WireError> {
        let mut pipe = redis::pipe();
        // Per-command results: one budget's failure must not hide the others' replies, and
        // NOSCRIPT has to be told apart from other errors.
        pipe.ignore_errors();
        if load {
            pipe.cmd("SCRIPT").arg("LOAD").arg(SCRIPT);
        }
        for &i in which {
            let group = &groups[i];
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(group.items.len() + 1)
                .arg(&group.lease);
            for item in &group.items {
                cmd.arg(&item.key);
            }
            cmd.arg(id.node)
                .arg(id.instance)
                .arg(id.lease_ms.max(1).to_string())
                .arg(if id.release { "1" } else { "0" });
            for item in &group.items {
                // Decimal strings, not integers: the script compares them as strings.
                cmd.arg(item.own.to_string())
                    .arg(item.expire_at.to_string());
            }
        }

        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut replies = pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(conn)
            .await?
            .into_iter();

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
        Ok(no_script)
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
                (Some(Value::Array(lease)), Some(Value::Array(per_key)))
                    if per_key.len() == items.len() =>
                {
                    (lease, per_key)
                }
                other => return Err(bad(format!("expected {{lease, per-key}}, got {other:?}"))),
            }
        }
        other => return Err(bad(format!("expected {{lease, per-key}}, got {other:?}"))),
    };
    let lease = {
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

/// One key's `{'ok', hgetall}` or `{'err', error}`.
fn parse_key(key: &str, reply: Value) -> Result<Hash, String> {
    let Value::Array(mut parts) = reply else {
        return Err(format!("key {key}: unexpected reply {reply:?}"));
    };
    let body = if parts.len() == 2 { parts.pop() } else { None };
    let tag = parts.pop().and_then(|v| text(v).ok());
    match (tag.as_deref(), body) {
        (Some("ok"), Some(hash)) => parse_hash(key, hash),
        (Some("err"), Some(error)) => Err(format!(
            "key {key}: {} (window not synced)",
            flat(&text(error).unwrap_or_default())
        )),
        (tag, body) => Err(format!("key {key}: unexpected reply {tag:?} {body:?}")),
    }
}

/// Parses one `HGETALL` reply (a flat array in RESP2, a map in RESP3) into contributions;
/// fields that are not canonical totals are skipped and reported.
fn parse_hash(key: &str, hash: Value) -> Result<Hash, String> {
    let pairs: Vec<(Value, Value)> = match hash {
        Value::Array(flat) if flat.len() % 2 == 0 => {
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(field), Some(value)) = (it.next(), it.next()) {
                pairs.push((field, value));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        other => return Err(format!("key {key}: expected HGETALL pairs, got {other:?}")),
    };
    let mut out = Hash::default();
    let mut owners: Vec<(String, String)> = Vec::new();
    let mut totals: Vec<(String, Option<String>, u64)> = Vec::new();
    for (field, value) in pairs {
        let (field, value) = match (text(field), text(value)) {
            (Ok(f), Ok(v)) => (f, v),
            (f, v) => {
                out.problems.push(format!(
                    "key {key}: field {:?} = {:?} is not UTF-8 (skipped)",
                    f.unwrap_or_else(|e| e),
                    v.unwrap_or_else(|e| e)
                ));
                continue;
            }
        };
        if let Some(of) = field.strip_prefix("~owner:") {
            owners.push((of.to_owned(), value));
            continue;
        }
        let (name, instance) = match field.strip_prefix("~retired:") {
            Some(rest) => match rest.rsplit_once(':') {
                Some((n, i)) => (n.to_owned(), Some(i.to_owned())),
                None => (rest.to_owned(), None),
            },
            // Other reserved fields belong to later protocol versions: not totals.
            None if field.starts_with('~') => continue,
            None => (field, None),
        };
        match parse_total(&value) {
            Some(total) => totals.push((name, instance, total)),
            None => out.problems.push(format!(
                "key {key}: field {name:?} = {value:?} is not a canonical u64 total (skipped)"
            )),
        }
    }
    out.contributions = totals
        .into_iter()
        .map(|(node, instance, total)| {
            let instance = instance.or_else(|| {
                owners
                    .iter()
                    .find(|(n, _)| *n == node)
                    .map(|(_, i)| i.clone())
            });
            Contribution {
                node,
                instance,
                total,
            }
        })
        .collect();
    Ok(out)
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

// Declared here rather than inside `mod tests`: there the path would be resolved from
// `src/replicate/tests/`, a directory that does not exist, and the OS cannot `..` out of it.
#[cfg(test)]
#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::redis_server::RedisServer;
    use super::*;
    use redis::aio::MultiplexedConnection;

    const FAR_FUTURE: i64 = 4_102_444_800; // 2100-01-01

    async fn connect(server: &RedisServer) -> MultiplexedConnection {
        redis::Client::open(server.url())
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
        }
    }

    type NodeTotals = Vec<(String, u64)>;

    const INSTANCE: &str = "i0";

    fn identity(node: &str) -> Identity<'_> {
        Identity {
            node,
            instance: INSTANCE,
            lease_ms: 60_000,
            release: false,
        }
    }

    fn group(node: &str, items: Vec<SyncItem>) -> Group {
        let tag = items.first().map(|i| i.key.clone()).unwrap_or_default();
        Group {
            lease: format!("{tag}:lease:{node}"),
            items,
        }
    }

    impl Wire {
        /// The round in the shape of the first protocol version: per group, per key, the
        /// `(field, total)` pairs; any refusal or problem is a panic.
        async fn sync_round_legacy<C: redis::aio::ConnectionLike + Send>(
            &self,
            conn: &mut C,
            node: &str,
            groups: &[Vec<SyncItem>],
        ) -> Result<Vec<Vec<NodeTotals>>, WireError> {
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
                            k.contributions
                                .into_iter()
                                .map(|c| (c.node, c.total))
                                .collect()
                        })
                        .collect()
                })
                .collect())
        }
    }

    fn sorted(mut totals: NodeTotals) -> NodeTotals {
        totals.sort();
        totals
    }

    /// One item, one group: the totals of that key.
    async fn sync_one(
        wire: &Wire,
        conn: &mut MultiplexedConnection,
        node: &str,
        key: &str,
        own: u64,
    ) -> NodeTotals {
        let mut out = wire
            .sync_round_legacy(conn, node, &[vec![item(key, own)]])
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 1);
        sorted(out.remove(0).remove(0))
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
    }

    #[test]
    fn errors_render_on_one_line() {
        let error = RedisError::from((ErrorKind::Io, "broken", "line one\nline two".to_owned()));
        let rendered = WireError::from(error).to_string();
        assert!(!rendered.contains('\n'), "{rendered}");
        assert!(rendered.starts_with("redis: "), "{rendered}");
    }

    #[tokio::test]
    async fn merge_is_a_max_per_node_and_idempotent() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);

        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 5).await,
            [("a".into(), 5)]
        );
        // A smaller (late) total never lowers the stored one.
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 3).await,
            [("a".into(), 5)]
        );
        // Reading with 0 writes nothing and does not create absent fields.
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 0).await,
            [("a".into(), 5)]
        );
        let both = vec![("a".to_owned(), 5), ("b".to_owned(), 7)];
        assert_eq!(sync_one(&wire, &mut conn, "b", &key, 7).await, both);
        // Re-sending is harmless.
        assert_eq!(sync_one(&wire, &mut conn, "b", &key, 7).await, both);
        assert_eq!(sync_one(&wire, &mut conn, "a", &key, 5).await, both);
        // A node can see the others without contributing.
        let absent = window_key("t", "anthropic", "1d", 0);
        assert_eq!(sync_one(&wire, &mut conn, "c", &absent, 0).await, []);
        assert_eq!(server.command(&["EXISTS", &absent]), "0");
        assert_eq!(sync_one(&wire, &mut conn, "c", &key, 0).await, both);
    }

    #[tokio::test]
    async fn totals_beyond_2_pow_53_are_exact() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let p53 = 1_u64 << 53;

        // As doubles, 2^53 + 1 == 2^53: only a string comparison sees the raise.
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, p53).await,
            [("a".into(), p53)]
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, p53 + 1).await,
            [("a".into(), p53 + 1)]
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, p53).await,
            [("a".into(), p53 + 1)]
        );
        // Same length, differing only in the last digit; then more digits.
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 9_007_199_254_740_999).await,
            [("a".into(), 9_007_199_254_740_999)]
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 10_000_000_000_000_000).await,
            [("a".into(), 10_000_000_000_000_000)]
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, u64::MAX - 1).await,
            [("a".into(), u64::MAX - 1)]
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, u64::MAX).await,
            [("a".into(), u64::MAX)]
        );
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, u64::MAX - 1).await,
            [("a".into(), u64::MAX)]
        );
        assert_eq!(server.command(&["HGET", &key, "a"]), u64::MAX.to_string());
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
        wire.sync_round_legacy(&mut conn, "a", &groups)
            .await
            .unwrap();
        for _ in 0..3 {
            let before = wire.round_trips();
            let out = wire
                .sync_round_legacy(&mut conn, "a", &groups)
                .await
                .unwrap();
            assert_eq!(wire.round_trips(), before + 1);
            assert_eq!(out.len(), groups.len());
            for (group, totals) in groups.iter().zip(&out) {
                assert_eq!(totals.len(), group.len());
                for (it, t) in group.iter().zip(totals) {
                    assert_eq!(t, &vec![("a".to_owned(), it.own)], "{}", it.key);
                }
            }
        }

        // Empty groups keep their place and cost nothing; all-empty sends nothing.
        let before = wire.round_trips();
        let out = wire
            .sync_round_legacy(&mut conn, "a", &[vec![], groups[1].clone(), vec![]])
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[0].is_empty() && out[2].is_empty());
        assert_eq!(out[1].len(), groups[1].len());
        assert_eq!(wire.round_trips(), before + 1);
        let out = wire
            .sync_round_legacy(&mut conn, "a", &[vec![], vec![]])
            .await
            .unwrap();
        assert_eq!(out, vec![Vec::<NodeTotals>::new(), Vec::new()]);
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
        let out = wire
            .sync_round_legacy(&mut conn, "a", &groups)
            .await
            .unwrap();
        assert_eq!(out[0][0], vec![("a".to_owned(), 6)]);
        assert_eq!(out[1][0], vec![("a".to_owned(), 1)]);
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
        wire.sync_round_legacy(&mut conn, "a", &groups)
            .await
            .unwrap();
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
            .sync_round_legacy(&mut conn_a, "a", &[vec![item(&key, 6)]])
            .await
            .unwrap_err();
        assert!(err.is_connection_error(), "{err}");
        assert!(err.to_string().starts_with("redis: "), "{err}");

        server.restart();
        assert_eq!(server.command(&["EXISTS", &key]), "0", "no persistence");
        // A fresh connection (the old one died with the server); the script is gone too.
        let mut conn = connect(&server).await;
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 6).await,
            [("a".into(), 6)]
        );
        // Node b re-sends its absolute total: the fleet total is whole again.
        assert_eq!(
            sync_one(&wire, &mut conn, "b", &key, 9).await,
            [("a".into(), 6), ("b".into(), 9)]
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
            .sync_round_legacy(&mut conn, "a", &[vec![item(&key, 2)]])
            .await
            .unwrap();
        assert_eq!(out, vec![vec![vec![("a".to_owned(), 2)]]]);
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
        };
        wire.sync_round_legacy(&mut conn, "a", &[vec![item.clone()]])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((990..=1000).contains(&ttl), "ttl {ttl}");

        // Every sync re-arms it (a later expire_at moves it).
        let later = SyncItem {
            expire_at: now + 5000,
            ..item
        };
        wire.sync_round_legacy(&mut conn, "a", &[vec![later]])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((4990..=5000).contains(&ttl), "ttl {ttl}");

        // A read of an absent key creates nothing.
        let absent = window_key("t", "openai", "1h", 3600);
        let read = SyncItem {
            key: absent.clone(),
            own: 0,
            expire_at: now + 1000,
        };
        wire.sync_round_legacy(&mut conn, "a", &[vec![read]])
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
        let hash = bad.keys[0].as_ref().unwrap();
        let mut totals: Vec<(&str, u64)> = hash
            .contributions
            .iter()
            .map(|c| (c.node.as_str(), c.total))
            .collect();
        totals.sort();
        assert_eq!(totals, [("a", 5), ("e", 7)]);
        assert_eq!(hash.problems.len(), 3, "{:?}", hash.problems);
        for (field, value) in [("b", "abc"), ("c", "-5"), ("d", "18446744073709551616")] {
            assert!(
                hash.problems.iter().any(|p| p.contains(&key)
                    && p.contains(&format!("{field:?}"))
                    && p.contains(value)),
                "{field}: {:?}",
                hash.problems
            );
        }
        let wrong_err = bad.keys[1].as_ref().unwrap_err();
        assert!(
            wrong_err.contains(&wrong) && wrong_err.contains("WRONGTYPE"),
            "{wrong_err}"
        );
        assert!(!wrong_err.contains('\n'));
        // A garbage value in our *own* field is repaired by our total (we are its only writer).
        server.command(&["HSET", &key, "a", "99999999999999999999999"]);
        server.command(&["DEL", &wrong]);
        let out = wire
            .sync_round(&mut conn, &identity("a"), &groups)
            .await
            .unwrap();
        let bad = out[1].as_ref().unwrap();
        assert!(bad.keys[1].is_ok());
        assert_eq!(server.command(&["HGET", &key, "a"]), "5");
        assert_eq!(server.command(&["HGET", &wrong, "a"]), "3");
    }

    #[tokio::test]
    async fn a_lease_held_by_another_instance_refuses_writes_and_a_takeover_keeps_both() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let g = [group("n", vec![item(&key, 100)])];
        let one = identity("n");
        let two = Identity {
            instance: "i2",
            ..identity("n")
        };
        let out = wire.sync_round(&mut conn, &one, &g).await.unwrap();
        assert_eq!(out[0].as_ref().unwrap().lease, Lease::Held);
        // Another data dir with the same node id: refused, nothing written, still reads.
        let g2 = [group("n", vec![item(&key, 30)])];
        let out = wire.sync_round(&mut conn, &two, &g2).await.unwrap();
        let reply = out[0].as_ref().unwrap();
        assert_eq!(
            reply.lease,
            Lease::Refused {
                holder: INSTANCE.into()
            }
        );
        // The node's field is left alone; its total is kept apart under its instance.
        let mut c = reply.keys[0].as_ref().unwrap().contributions.clone();
        c.sort();
        assert_eq!(
            c,
            [
                Contribution {
                    node: "n".into(),
                    instance: Some(INSTANCE.into()),
                    total: 100
                },
                Contribution {
                    node: "n".into(),
                    instance: Some("i2".into()),
                    total: 30
                },
            ]
        );
        assert_eq!(server.command(&["HGET", &key, "n"]), "100");
        assert_eq!(server.command(&["HGET", &key, "~retired:n:i2"]), "30");
        // The first stops cleanly: its last round releases the lease.
        let release = Identity {
            release: true,
            ..one
        };
        wire.sync_round(&mut conn, &release, &g).await.unwrap();
        assert_eq!(server.command(&["EXISTS", &g[0].lease]), "0");
        // The second takes over: the first's total is kept beside its own, not max-merged,
        // and its own apart total moves back into the field.
        let out = wire.sync_round(&mut conn, &two, &g2).await.unwrap();
        let mut c = out[0].as_ref().unwrap().keys[0]
            .as_ref()
            .unwrap()
            .contributions
            .clone();
        c.sort();
        assert_eq!(
            c,
            [
                Contribution {
                    node: "n".into(),
                    instance: Some(INSTANCE.into()),
                    total: 100
                },
                Contribution {
                    node: "n".into(),
                    instance: Some("i2".into()),
                    total: 30
                },
            ]
        );
        let ttl: i64 = server.command(&["PTTL", &g[0].lease]).parse().unwrap();
        assert!((50_000..=60_000).contains(&ttl), "{ttl}");
        assert_eq!(server.command(&["GET", &g[0].lease]), "i2");
        assert_eq!(server.command(&["HEXISTS", &key, "~retired:n:i2"]), "0");
        assert_eq!(server.command(&["HGET", &key, "n"]), "30");
        // The first comes back later with more spend and takes its field back: exact again.
        server.command(&["DEL", &g[0].lease]);
        let g3 = [group("n", vec![item(&key, 110)])];
        let out = wire.sync_round(&mut conn, &one, &g3).await.unwrap();
        let mut c = out[0].as_ref().unwrap().keys[0]
            .as_ref()
            .unwrap()
            .contributions
            .clone();
        c.sort();
        let sum: u64 = c.iter().map(|c| c.total).sum();
        assert_eq!(sum, 140, "{c:?}");
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
        // Repaired: the field is taken and our apart total moves into it.
        server.command(&["DEL", &g[0].lease]);
        wire.sync_round(&mut conn, &identity("n"), &g)
            .await
            .unwrap();
        assert_eq!(server.command(&["HGET", &key, "n"]), "9");
        assert_eq!(
            server.command(&["HEXISTS", &key, &format!("~retired:n:{INSTANCE}")]),
            "0"
        );
    }
}
