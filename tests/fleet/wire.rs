//! The sync round's wire protocol against a live `redis-server` (the merge script, the plain
//! reads of clean budgets, client-side tracking, leases and grants). Moved out of the library's
//! `replicate::wire` (whose unit tests need no Redis); the items used here are re-exported by
//! the hidden module `provider_budgets::__wire`.

#![cfg(feature = "redis")]

use provider_budgets_test_support::redis_server;

use provider_budgets::__wire::*;
use redis::aio::MultiplexedConnection;
use redis::Value;
use redis_server::RedisServer;
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

/// Test-only rounds on [`Wire`] (an extension: the type lives in the library).
trait WireExt {
    async fn sync_simple<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        node: &str,
        groups: &[Vec<SyncItem>],
    ) -> Result<Vec<Vec<State>>, WireError>;
}

impl WireExt for Wire {
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

/// A budget window's Redis key, as the library derives it from the budget's identity.
fn window_key(prefix: &str, provider: &str, period: &str, start: i64) -> String {
    provider_budgets::__wire::window_key(
        prefix,
        &BudgetKey::new(provider_budgets::Scope::Provider, provider, period),
        start,
    )
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
    // holds our field has its expiry (one command less per dirty key).
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
            Some(Value::Array(keys)) => Some(keys.into_iter().map(|k| text(k).unwrap()).collect()),
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
            known: String::new(),
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

/// One strict key's call with the caller's known holders `known`.
#[allow(clippy::too_many_arguments)]
async fn ask_known(
    wire: &Wire,
    conn: &mut MultiplexedConnection,
    id: &Identity<'_>,
    key: &str,
    durable: u64,
    want: u64,
    known: &str,
) -> GrantReply {
    let item = SyncItem {
        grant: Some(GrantAsk {
            limit: LIMIT,
            durable,
            want,
            known: known.to_owned(),
        }),
        ..item(key, 0)
    };
    let g = group(id.node, vec![item]);
    let out = wire.sync_round(conn, id, &[g]).await.unwrap();
    let key = out[0].as_ref().unwrap().keys[0].clone().unwrap();
    key.grant.expect("a strict key answers with its grant")
}

#[tokio::test]
async fn after_a_loss_nothing_is_granted_until_every_known_holder_re_registered() {
    let server = server_or_skip!();
    let mut conn = connect(&server).await;
    let wire = Wire::new();
    let key = window_key("t", "openai", "1d", 0);
    // No guard timer: only the registry holds the window.
    let a = ask_known(&wire, &mut conn, &identity("a"), &key, 0, 600_000, "").await;
    assert_eq!(a.grant, 500_000);
    // The reply names the holders while the caller's list is not the same size.
    assert_eq!(a.holder_ids, Some(vec!["a".to_owned()]));
    let b = ask_known(&wire, &mut conn, &identity("b"), &key, 0, 100_000, "a").await;
    assert_eq!(b.grant, 100_000);
    assert_eq!(b.holder_ids, Some(vec!["a".to_owned(), "b".to_owned()]));
    let same = ask_known(
        &wire,
        &mut conn,
        &identity("b"),
        &key,
        100_000,
        100_000,
        "a,b",
    )
    .await;
    assert_eq!(same.holder_ids, None);

    server.flushall();
    // b comes back first and knows a: its rebuild is kept, nothing is raised (no timer).
    let r = ask_known(
        &wire,
        &mut conn,
        &identity("b"),
        &key,
        100_000,
        900_000,
        "a,b",
    )
    .await;
    assert_eq!((r.grant, r.frozen), (100_000, true));
    // c, who knows nobody, is held too: `~await` names a for every caller.
    let c = ask_known(&wire, &mut conn, &identity("c"), &key, 0, 900_000, "").await;
    assert_eq!((c.grant, c.frozen), (0, true));
    // a re-registers: the window is granted from again, only what is really free.
    let r = ask_known(
        &wire,
        &mut conn,
        &identity("a"),
        &key,
        500_000,
        500_000,
        "a,b",
    )
    .await;
    assert_eq!(r.grant, 500_000);
    let c = ask_known(&wire, &mut conn, &identity("c"), &key, 0, 900_000, "a,b").await;
    assert!(!c.frozen);
    assert_eq!(c.grant, 100_000, "a quarter of the 400k free");
    assert_eq!(grant_sums(&server, &key).0, 700_000);

    // A holder whose grant was given back to 0 still re-registers (at 0) after a loss.
    server.flushall();
    let r = ask_known(
        &wire,
        &mut conn,
        &identity("a"),
        &key,
        500_000,
        500_000,
        "a,b,c",
    )
    .await;
    assert!(r.frozen);
    let r = ask_known(
        &wire,
        &mut conn,
        &identity("c"),
        &key,
        100_000,
        100_000,
        "a,b,c",
    )
    .await;
    assert!(r.frozen);
    let r = ask_known(&wire, &mut conn, &identity("b"), &key, 0, 0, "a,b,c").await;
    assert_eq!((r.grant, r.frozen), (0, false));
    assert_eq!(r.holders, 3);
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
            known: String::new(),
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
