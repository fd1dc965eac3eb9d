//! Redis wire protocol for one sync round.
//!
//! Spend is a grow-only counter per (budget, window), kept per node (a G-counter). In Redis, one
//! budget window is one hash whose fields are node ids and whose values are that node's
//! *absolute* total in nano-dollars, as a canonical decimal string (no sign, no leading zeros).
//! A node only ever writes its own field and only ever raises it (`max` merge), so sending
//! twice, late, or again after Redis lost its data is harmless; the fleet total is the sum of
//! the fields.
//!
//! A sync round is **one network round trip**: one pipeline carrying one `EVALSHA` of
//! [`SCRIPT`] per budget (every window key of a budget shares the budget's Redis Cluster hash
//! tag, so one script call never spans slots). The script merges our totals and returns every
//! node's totals for each key. When Redis answers `NOSCRIPT` (its script cache was flushed or it
//! restarted), the failed calls are sent again behind a `SCRIPT LOAD` in a second pipeline, so
//! that rare round costs two round trips. `SCRIPT LOAD` rather than `EVAL`: since Redis 7.4,
//! scripts that only arrived through `EVAL` may be evicted from the cache, loaded ones are not.
//!
//! Totals may exceed 2^53 while Lua numbers are doubles, so the script never converts them to
//! numbers: it compares canonical decimal strings (longer is bigger; same length, byte by
//! byte, which unlike `<` on strings does not depend on the server's collation locale).

use std::sync::atomic::{AtomicU64, Ordering};

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

/// The merge script. `KEYS` are the window keys of one budget. `ARGV[1]` is the node id, then
/// for key `i`, `ARGV[2i]` is the node's own total (canonical decimal u64) and `ARGV[2i+1]` the
/// unix second at which the key expires. Per key:
///
/// 1. if the own total is not `0` and the node's field is absent, smaller, or not a canonical
///    u64 (only this node writes its field, so its own total is the best repair), `HSET` it;
/// 2. `EXPIREAT key expire_at` (a no-op when the key does not exist, so an idle budget leaves
///    nothing behind; a time in the past deletes the key, so callers pass window end + grace);
/// 3. append `HGETALL key` to the reply.
///
/// Returns one flat `[field, value, ...]` array per key, in `KEYS` order. Fields of other
/// nodes are returned untouched, valid or not: the client reports bad ones.
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

local node = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  local own = ARGV[2 * i]
  local expire_at = ARGV[2 * i + 1]
  if own ~= '0' then
    local cur = redis.call('HGET', key, node)
    if (not cur) or (not canonical(cur)) or greater(own, cur) then
      redis.call('HSET', key, node, own)
    end
  end
  redis.call('EXPIREAT', key, expire_at)
  out[i] = redis.call('HGETALL', key)
end
return out
"#;

/// Redis key of one budget window: `{prefix}:{{provider:period}}:{window_start_unix_secs}`.
///
/// The braces are a Redis Cluster hash tag per budget: all windows of one budget live in one
/// slot, so the script that merges them in one call is valid on a cluster too.
pub(crate) fn window_key(prefix: &str, provider: &str, period: &str, window_start: i64) -> String {
    format!("{prefix}:{{{provider}:{period}}}:{window_start}")
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

/// Totals of every node for one window key, as stored in Redis (node id -> nano-dollars).
pub(crate) type NodeTotals = Vec<(String, u64)>;

/// Why a sync round failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum WireError {
    /// Redis could not be reached or refused the whole exchange.
    #[error("redis: {}", one_line(.0))]
    Redis(RedisError),
    /// Redis ran the exchange but the script call for one budget failed (for example
    /// `WRONGTYPE`: something else wrote a non-hash under our key).
    #[error("redis rejected the sync of {key}: {}", one_line(.error))]
    Rejected { key: String, error: RedisError },
    /// A stored total is not a canonical u64: someone else wrote into our hash.
    #[error("corrupt spend total in redis hash {key}, field {field:?}: {value:?} is not a u64")]
    Corrupt {
        key: String,
        field: String,
        value: String,
    },
    /// The reply does not have the shape the script returns (a different script under our
    /// SHA, a proxy in the way, a non-UTF-8 node id, ...).
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
            WireError::Corrupt { .. } | WireError::Reply { .. } => return false,
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
    error
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

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

    /// Merges `node`'s totals and reads every node's totals back, in one round trip.
    ///
    /// `groups` holds the items of one budget each (all keys of a group must share a hash tag).
    /// The result mirrors `groups`: one [`NodeTotals`] per item. Empty groups cost nothing; when
    /// every group is empty nothing is sent. On `NOSCRIPT` the failed groups are retried once
    /// behind a `SCRIPT LOAD` (two round trips). Re-sending is always safe: the merge is a max.
    pub(crate) async fn sync_round<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        node: &str,
        groups: &[Vec<SyncItem>],
    ) -> Result<Vec<Vec<NodeTotals>>, WireError> {
        let mut results: Vec<Option<Vec<NodeTotals>>> = groups
            .iter()
            .map(|g| if g.is_empty() { Some(Vec::new()) } else { None })
            .collect();
        let pending: Vec<usize> = (0..groups.len())
            .filter(|&i| !groups[i].is_empty())
            .collect();
        if pending.is_empty() {
            return Ok(filled(results));
        }

        let no_script = self
            .send(conn, node, groups, &pending, false, &mut results)
            .await?;
        if !no_script.is_empty() {
            tracing::debug!(
                groups = no_script.len(),
                "redis lost the sync script (NOSCRIPT); loading it and retrying once"
            );
            let still_missing = self
                .send(conn, node, groups, &no_script, true, &mut results)
                .await?;
            if let Some(&i) = still_missing.first() {
                return Err(WireError::Reply {
                    key: first_key(&groups[i]),
                    detail: "NOSCRIPT right after SCRIPT LOAD".into(),
                });
            }
        }
        Ok(filled(results))
    }

    /// Sends one pipeline with one `EVALSHA` per group in `which` (preceded by `SCRIPT LOAD`
    /// when `load`), stores the parsed replies in `results` and returns the groups that failed
    /// with `NOSCRIPT`.
    async fn send<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        node: &str,
        groups: &[Vec<SyncItem>],
        which: &[usize],
        load: bool,
        results: &mut [Option<Vec<NodeTotals>>],
    ) -> Result<Vec<usize>, WireError> {
        let mut pipe = redis::pipe();
        // Per-command results: one budget's failure must not hide the others' replies, and
        // NOSCRIPT has to be told apart from other errors.
        pipe.ignore_errors();
        if load {
            pipe.cmd("SCRIPT").arg("LOAD").arg(SCRIPT);
        }
        for &i in which {
            let items = &groups[i];
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(items.len());
            for item in items {
                cmd.arg(&item.key);
            }
            cmd.arg(node);
            for item in items {
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
            let items = &groups[i];
            match replies.next() {
                Some(Ok(value)) => results[i] = Some(parse_group(items, value)?),
                Some(Err(error))
                    if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                {
                    no_script.push(i)
                }
                Some(Err(error)) => {
                    return Err(WireError::Rejected {
                        key: first_key(items),
                        error,
                    })
                }
                None => {
                    return Err(WireError::Reply {
                        key: first_key(items),
                        detail: "the pipeline returned fewer replies than commands".into(),
                    })
                }
            }
        }
        Ok(no_script)
    }
}

/// Turns the per-group slots, all filled once a round succeeded, into the result.
fn filled(results: Vec<Option<Vec<NodeTotals>>>) -> Vec<Vec<NodeTotals>> {
    results.into_iter().map(Option::unwrap_or_default).collect()
}

fn first_key(items: &[SyncItem]) -> String {
    items.first().map(|i| i.key.clone()).unwrap_or_default()
}

/// Parses one script reply: an array with one flat `[field, value, ...]` array per item.
fn parse_group(items: &[SyncItem], value: Value) -> Result<Vec<NodeTotals>, WireError> {
    let per_key = match value {
        Value::Array(per_key) if per_key.len() == items.len() => per_key,
        other => {
            return Err(WireError::Reply {
                key: first_key(items),
                detail: format!("expected an array of {} hashes, got {other:?}", items.len()),
            })
        }
    };
    items
        .iter()
        .zip(per_key)
        .map(|(item, hash)| parse_hash(&item.key, hash))
        .collect()
}

/// Parses one `HGETALL` reply (a flat array in RESP2, a map if a script ever switches to RESP3).
fn parse_hash(key: &str, hash: Value) -> Result<NodeTotals, WireError> {
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
        other => {
            return Err(WireError::Reply {
                key: key.to_owned(),
                detail: format!("expected HGETALL field/value pairs, got {other:?}"),
            })
        }
    };
    pairs
        .into_iter()
        .map(|(field, value)| {
            let field = text(key, field)?;
            let value = text(key, value)?;
            match parse_total(&value) {
                Some(total) => Ok((field, total)),
                None => Err(WireError::Corrupt {
                    key: key.to_owned(),
                    field,
                    value,
                }),
            }
        })
        .collect()
}

/// A bulk or simple string reply as UTF-8 text.
fn text(key: &str, value: Value) -> Result<String, WireError> {
    let bytes = match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(s) => return Ok(s),
        other => {
            return Err(WireError::Reply {
                key: key.to_owned(),
                detail: format!("expected a string in the hash, got {other:?}"),
            })
        }
    };
    String::from_utf8(bytes).map_err(|e| WireError::Reply {
        key: key.to_owned(),
        detail: format!(
            "non-UTF-8 string in the hash: {:?}",
            String::from_utf8_lossy(e.as_bytes())
        ),
    })
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
            .sync_round(conn, node, &[vec![item(key, own)]])
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
        wire.sync_round(&mut conn, "a", &groups).await.unwrap();
        for _ in 0..3 {
            let before = wire.round_trips();
            let out = wire.sync_round(&mut conn, "a", &groups).await.unwrap();
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
            .sync_round(&mut conn, "a", &[vec![], groups[1].clone(), vec![]])
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[0].is_empty() && out[2].is_empty());
        assert_eq!(out[1].len(), groups[1].len());
        assert_eq!(wire.round_trips(), before + 1);
        let out = wire
            .sync_round(&mut conn, "a", &[vec![], vec![]])
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
        let out = wire.sync_round(&mut conn, "a", &groups).await.unwrap();
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
        wire.sync_round(&mut conn, "a", &groups).await.unwrap();
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
            .sync_round(&mut conn_a, "a", &[vec![item(&key, 6)]])
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
            .sync_round(&mut conn, "a", &[vec![item(&key, 2)]])
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
        wire.sync_round(&mut conn, "a", &[vec![item.clone()]])
            .await
            .unwrap();
        let ttl: i64 = server.command(&["TTL", &key]).parse().unwrap();
        assert!((990..=1000).contains(&ttl), "ttl {ttl}");

        // Every sync re-arms it (a later expire_at moves it).
        let later = SyncItem {
            expire_at: now + 5000,
            ..item
        };
        wire.sync_round(&mut conn, "a", &[vec![later]])
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
        wire.sync_round(&mut conn, "a", &[vec![read]])
            .await
            .unwrap();
        assert_eq!(server.command(&["TTL", &absent]), "-2");
    }

    #[tokio::test]
    async fn corrupt_fields_are_errors_naming_key_and_field() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        let good = window_key("t", "anthropic", "1d", 0);
        server.command(&["HSET", &key, "b", "abc"]);

        let err = wire
            .sync_round(&mut conn, "a", &[vec![item(&good, 1)], vec![item(&key, 5)]])
            .await
            .unwrap_err();
        match &err {
            WireError::Corrupt {
                key: k,
                field,
                value,
            } => {
                assert_eq!((k, field.as_str(), value.as_str()), (&key, "b", "abc"));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(!err.is_connection_error());
        let text = err.to_string();
        assert!(
            text.contains(&key) && text.contains("\"b\"") && text.contains("abc"),
            "{text}"
        );
        // Our merge still landed: only the read-back failed.
        assert_eq!(server.command(&["HGET", &key, "a"]), "5");

        // Non-canonical numbers are corrupt too: they would break the string comparison.
        server.command(&["HSET", &key, "b", "007"]);
        let err = wire
            .sync_round(&mut conn, "a", &[vec![item(&key, 5)]])
            .await
            .unwrap_err();
        assert!(
            matches!(err, WireError::Corrupt { ref value, .. } if value == "007"),
            "{err}"
        );

        // A garbage value in our *own* field is repaired by our total (we are its only writer).
        server.command(&["HDEL", &key, "b"]);
        server.command(&["HSET", &key, "a", "99999999999999999999999"]);
        assert_eq!(
            sync_one(&wire, &mut conn, "a", &key, 5).await,
            [("a".into(), 5)]
        );
    }

    #[tokio::test]
    async fn a_non_hash_key_is_rejected_with_its_key() {
        let server = server_or_skip!();
        let mut conn = connect(&server).await;
        let wire = Wire::new();
        let key = window_key("t", "openai", "1d", 0);
        server.command(&["SET", &key, "x"]);
        let err = wire
            .sync_round(&mut conn, "a", &[vec![item(&key, 5)]])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WireError::Rejected { key: k, .. } if k == &key),
            "{err:?}"
        );
        assert!(!err.is_connection_error());
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
