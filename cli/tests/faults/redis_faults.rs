//! Replication under faults an operator meets in production, each injected for real against a
//! private `redis-server`:
//!
//! * a window hash with thousands of node fields (pods that come back with fresh ids): the
//!   data dir still opens, totals exact, before and after a restart, with Redis up or down;
//! * two live data dirs under one node id: the second is refused loudly (error naming the id,
//!   `status`, CLI `sync` exit 1); its spend is kept apart under its instance id, so no view
//!   of the fleet undercounts, and it takes the node id over exactly once the other stops
//!   cleanly or crashes and its lease expires;
//! * poisoned fields and a key of the wrong type under one budget: the other budgets stay
//!   exact, the bad one is reported (status, `status --json`, one log line per problem) and
//!   heals once the bad data is deleted;
//! * a Redis password never appears in any output (wrong password, server down, debug logs);
//! * an unparsable Redis URL fails at open with one line naming it, redacted.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::child;
use provider_budgets_test_support::cli;
use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use child::{sigkill, spawn_piped};
use cli::{budget, Cli, Run};
use jiff::Timestamp;
use provider_budgets::{Config, Error, FakeClock, Limiter, Money, RedisConfig, ReplicationError};
use provider_budgets::{Spend, StatusQuery};
use redis_server::RedisServer;

/// Real time (whole seconds): Redis expires keys by its own clock.
fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap()
}

fn day_start(now: Timestamp) -> i64 {
    now.as_second() - now.as_second().rem_euclid(86_400)
}

fn config(dir: &Path, url: &str, node: &str, prefix: &str) -> Config {
    let mut c = Config::new()
        .budget(
            "openai",
            Money::from_nanos(u64::MAX / 2),
            "1d".parse().unwrap(),
        )
        .budget(
            "anthropic",
            Money::from_nanos(u64::MAX / 2),
            "1d".parse().unwrap(),
        )
        .data_dir(dir);
    c.node_id = Some(node.to_owned());
    // Late records into yesterday's window are accepted (the poison test sends one).
    c.storage.retention = Duration::from_secs(3 * 86_400);
    let mut r = RedisConfig::new(url);
    r.prefix = prefix.to_owned();
    r.sync_interval = Duration::from_secs(3600);
    r.connect_timeout = Duration::from_millis(500);
    r.command_timeout = Duration::from_millis(500);
    // Yesterday's keys live on (the poison test keeps bad data in yesterday's window).
    r.grace = Duration::from_secs(3 * 86_400);
    c.redis = Some(r);
    c
}

fn open(dir: &Path, url: &str, node: &str, prefix: &str, now: Timestamp) -> Limiter {
    support::open(config(dir, url, node, prefix), &FakeClock::new(now))
}

fn spend(l: &Limiter, provider: &str) -> u64 {
    l.status(StatusQuery::provider(provider))
        .into_iter()
        .next()
        .unwrap()
        .spend
        .as_nanos()
}

fn nanos(n: u64) -> Money {
    Money::from_nanos(n)
}

// ---- item 4: the peers cache -------------------------------------------------------------

#[test]
fn a_window_with_thousands_of_node_fields_keeps_the_data_dir_openable_and_exact() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let now = now();
    let key = format!("wide:{{openai:1d}}:{}", day_start(now));
    // 5 000 pods with fresh ids over the window, 40-character ids: the old cache entry would
    // have been ~250 KiB, beyond the store's 64 KiB decoding bound.
    let mut expected = 0u64;
    let mut args: Vec<String> = vec!["HSET".into(), key.clone()];
    for i in 0..5000u64 {
        args.push(format!("pod-{i:036}"));
        args.push((1_000 + i).to_string());
        expected += 1_000 + i;
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(server.command(&args), "5000");

    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), &server.url(), "me", "wide", now);
    node.charge(Spend::provider("openai", nanos(7))).unwrap();
    node.sync().unwrap();
    assert_eq!(spend(&node, "openai"), expected + 7);
    drop(node);

    // Restart with Redis up, then with Redis down: opens fine, the others' total is kept.
    let node = open(dir.path(), &server.url(), "me", "wide", now);
    assert_eq!(spend(&node, "openai"), expected + 7);
    drop(node);
    server.kill();
    let node = open(dir.path(), &server.url(), "me", "wide", now);
    assert_eq!(spend(&node, "openai"), expected + 7);
    assert_eq!(
        node.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .own_spend,
        nanos(7),
        "own spend"
    );
    assert!(node.sync().is_err());
}

// ---- item 5: duplicate node ids ----------------------------------------------------------

#[test]
fn a_second_live_data_dir_with_the_same_node_id_is_refused_and_never_undercounts() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (url, now) = (server.url(), now());
    let (d1, d2, db) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let first = open(d1.path(), &url, "dup", "dup", now);
    let b = open(db.path(), &url, "b", "dup", now);
    first.charge(Spend::provider("openai", nanos(100))).unwrap();
    b.charge(Spend::provider("openai", nanos(1))).unwrap();
    first.sync().unwrap();
    b.sync().unwrap();

    // A copied config: same node id, its own data dir. Refused at once, loudly.
    let second = open(d2.path(), &url, "dup", "dup", now);
    second.charge(Spend::provider("openai", nanos(30))).unwrap();
    let err = second.sync().unwrap_err();
    match &err {
        Error::Replication(ReplicationError::DuplicateNodeId { node_id, .. }) => {
            assert_eq!(node_id, "dup")
        }
        other => panic!("expected DuplicateNodeId, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("\"dup\"") && !text.contains('\n'), "{text}");
    let status = second
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap();
    assert!(
        status
            .replication
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("duplicate node id \"dup\"")),
        "{status:?}"
    );
    // The node id's field was not written: it still holds the first one's total...
    let key = format!("dup:{{openai:1d}}:{}", day_start(now));
    assert_eq!(server.command(&["HGET", &key, "dup"]), "100");
    // ...the second's spend is kept apart under its instance, so nobody undercounts, even
    // while both live: the second counts the first's field as someone else's, B sees both.
    assert_eq!(spend(&second, "openai"), 131);
    assert_eq!(status.own_spend, nanos(30));
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), 131);
    second.charge(Spend::provider("openai", nanos(2))).unwrap();
    assert!(second.sync().is_err());
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), 133);
    // The first keeps working, and a restart of the first (same data dir) is not refused.
    first.sync().unwrap();
    drop(first);
    let first = open(d1.path(), &url, "dup", "dup", now);
    first.sync().unwrap();
    assert!(
        second.sync().is_err(),
        "still refused while the first lives"
    );

    // The first stops cleanly (its lease is released): the second takes the node id's field
    // over; the first's total stays beside it (retired), not max-merged away.
    drop(first);
    second.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), 133);
    assert_eq!(spend(&second, "openai"), 133);
    assert!(second
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap()
        .replication
        .last_error
        .is_none());

    // The first comes back (with more spend) while the second lives: now it is refused, and
    // nobody's spend is lost; once the second stops, the first takes its field back.
    let first = open(d1.path(), &url, "dup", "dup", now);
    first.charge(Spend::provider("openai", nanos(5))).unwrap();
    assert!(first.sync().is_err());
    assert_eq!(spend(&first, "openai"), 138);
    drop(second);
    first.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), 138);
    assert_eq!(spend(&first, "openai"), 138);
    // The CLI's `sync` on yet another data dir with the same id: exit 1, one line naming it.
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1000000, time_period: 1d}\n  anthropic: {budget_limit: 1000000, time_period: 1d}\nprovider_budgets:\n  redis: {url: \"redis://127.0.0.1:1/\", prefix: dup}\n";
    let cli = Cli::new(yaml);
    let now_text = now.to_string();
    let run = cli.run(&[
        "--redis",
        &url,
        "--node-id",
        "dup",
        "--now",
        &now_text,
        "sync",
    ]);
    run.assert_error(1, &["duplicate node id", "\"dup\""]);
    let run = cli.run(&[
        "--redis",
        &url,
        "--node-id",
        "dup",
        "--now",
        &now_text,
        "status",
        "--json",
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let last_error = budget(&doc, "openai")["replication"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(last_error.contains("duplicate node id"), "{doc}");
}

#[test]
fn a_holder_reading_clean_budgets_notices_another_data_dir_writing_its_field() {
    // Clean budgets are read without a `GET` of the lease: the `~owner` field of each window
    // is what tells that another data dir wrote the node's field (it took the lease while
    // this one stalled), and the script's lease check then reports the duplicate.
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (url, now) = (server.url(), now());
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), &url, "own", "own", now);
    first.charge(Spend::provider("openai", nanos(100))).unwrap();
    for _ in 0..3 {
        first.sync().unwrap(); // written, then clean rounds (plain reads)
    }
    let key = format!("own:{{openai:1d}}:{}", day_start(now));
    assert_eq!(server.command(&["HGET", &key, "own"]), "100");
    for provider in ["openai", "anthropic"] {
        server.command(&["SET", &format!("own:{{{provider}:1d}}:lease:own"), "i9"]);
    }
    // In a budget this data dir has not spent in (with spend of its own there, the missing
    // acknowledgement alone would send it through the script).
    let other = format!("own:{{anthropic:1d}}:{}", day_start(now));
    let write = [
        "HSET",
        &other,
        "own",
        "250",
        "~owner:own",
        "i9",
        "~total",
        "250",
    ];
    server.command(&write);
    let mut refused = false;
    for _ in 0..2 {
        if let Err(e) = first.sync() {
            assert!(
                matches!(
                    e,
                    Error::Replication(ReplicationError::DuplicateNodeId { .. })
                ),
                "{e}"
            );
            refused = true;
            break;
        }
    }
    assert!(refused, "the other data dir's write went unnoticed");
    // Nothing undercounted: the other's 250 counts as another's spend.
    assert_eq!(spend(&first, "anthropic"), 250);
    assert_eq!(spend(&first, "openai"), 100);
}

#[test]
fn a_crashed_holder_blocks_its_node_id_only_until_its_lease_expires() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (url, now) = (server.url(), now());
    let now_text = now.to_string();
    // The CLI node ships every 50 ms; its lease lives 3 intervals + both timeouts (~2.2 s).
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1000000, time_period: 1d}\n  anthropic: {budget_limit: 1000000, time_period: 1d}\nprovider_budgets:\n  redis: {url: \"redis://127.0.0.1:1/\", prefix: crash, sync_interval: 50ms, connect_timeout: 1s, command_timeout: 1s}\n";
    let a = Cli::new(yaml);
    let (mut child, mut stdin, acks) = spawn_piped(a.durable_ingest(&url, "dup", &now_text));
    let mut acks = acks.lines();
    let mut acked = 0u64;
    for k in 1..=20u64 {
        writeln!(stdin, "openai 0.{k:09}").unwrap();
        assert!(acks.next().unwrap().unwrap().starts_with("ok "));
        acked += k;
    }
    let key = format!("crash:{{openai:1d}}:{}", day_start(now));
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.command(&["HGET", &key, "dup"]) != acked.to_string() {
        assert!(Instant::now() < deadline, "the CLI node never shipped");
        std::thread::sleep(Duration::from_millis(5));
    }
    sigkill(&mut child); // SIGKILL: the lease stays until it expires
    let killed_at = Instant::now();

    let (d2, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let second = open(d2.path(), &url, "dup", "crash", now);
    let b = open(db.path(), &url, "b", "crash", now);
    second
        .charge(Spend::provider("openai", nanos(1_000)))
        .unwrap();
    let refused = second.sync();
    assert!(
        matches!(
            refused,
            Err(Error::Replication(ReplicationError::DuplicateNodeId { .. }))
        ) || killed_at.elapsed() > Duration::from_secs(2),
        "{refused:?}"
    );
    // Refused or not, its spend already counts for the rest of the fleet.
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), acked + 1_000);
    let deadline = Instant::now() + Duration::from_secs(15);
    while second.sync().is_err() {
        assert!(
            Instant::now() < deadline,
            "the dead holder's lease never expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), acked + 1_000);
    assert_eq!(spend(&second, "openai"), acked + 1_000);

    // The crashed node restarts on its own data dir later: refused while the second lives,
    // then it ships nothing twice.
    drop(second);
    let restarted = open(&a.data, &url, "dup", "crash", now);
    restarted.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), acked + 1_000);
    assert_eq!(spend(&restarted, "openai"), acked + 1_000);
}

// ---- item 7: one bad key -----------------------------------------------------------------

#[test]
fn poisoned_fields_and_a_wrong_type_key_fail_only_their_budget_and_heal() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (url, now) = (server.url(), now());
    let day = day_start(now);
    // A live window holds poisoned fields; a closed window that both nodes still have to
    // send (late records into yesterday) is a key of the wrong type. Closed windows are only
    // touched while a node has something to send, so the bad key is met by a dirty window.
    let current = format!("poison:{{openai:1d}}:{day}");
    let previous = format!("poison:{{openai:1d}}:{}", day - 86_400);
    let yesterday = Timestamp::from_second(day - 1).unwrap();
    server.command(&["SET", &previous, "not a hash"]);
    for (field, value) in [("x", "-5"), ("y", "abc"), ("z", "18446744073709551616")] {
        server.command(&["HSET", &current, field, value]);
    }
    server.command(&["HSET", &current, "old", "11"]);

    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), &url, "a", "poison", now);
    let b = open(db.path(), &url, "b", "poison", now);
    a.charge(Spend::provider("openai", nanos(7)).at(yesterday))
        .unwrap();
    b.charge(Spend::provider("openai", nanos(8)).at(yesterday))
        .unwrap();
    for round in 1..=3u64 {
        a.charge(Spend::provider("anthropic", nanos(round)))
            .unwrap();
        b.charge(Spend::provider("anthropic", nanos(10 * round)))
            .unwrap();
        a.charge(Spend::provider("openai", nanos(100))).unwrap();
        // Rounds succeed: a bad key is not a failure of the fleet.
        a.sync().unwrap();
        b.sync().unwrap();
    }
    a.sync().unwrap();
    for node in [&a, &b] {
        assert_eq!(spend(node, "anthropic"), 66);
        let anthropic = node
            .status(StatusQuery::provider("anthropic"))
            .into_iter()
            .next()
            .unwrap();
        assert_eq!(anthropic.replication_problem, None);
        assert!(anthropic.replication.last_error.is_none());
        let openai = node
            .status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap();
        let problem = openai.replication_problem.unwrap_or_default();
        assert!(
            problem.contains(&previous) && problem.contains("WRONGTYPE"),
            "{problem}"
        );
        assert!(
            problem.contains(&current) && problem.contains("\"-5\""),
            "{problem}"
        );
        assert!(!problem.contains('\n'));
    }
    // The bad budget still counts what it can: a's own spend and the good field.
    assert_eq!(spend(&a, "openai"), 311);
    assert_eq!(spend(&b, "openai"), 311);
    let old = |l: &Limiter| {
        l.status(StatusQuery::all().at(yesterday))
            .into_iter()
            .find(|s| s.provider == "openai")
            .unwrap()
            .spend
    };
    assert_eq!(old(&b), nanos(8));

    // The CLI shows it per budget, and logs each distinct problem once, not once per round.
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1000000, time_period: 1d}\n  anthropic: {budget_limit: 1000000, time_period: 1d}\nprovider_budgets:\n  redis: {url: \"redis://127.0.0.1:1/\", prefix: poison, grace: 3d}\n";
    let cli = Cli::new(yaml);
    let now_text = now.to_string();
    let run = Run::of(
        cli.cmd(&[
            "--redis",
            &url,
            "--node-id",
            "c",
            "--now",
            &now_text,
            "status",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap(),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert!(
        budget(&doc, "anthropic")["replication"]["problem"].is_null(),
        "{doc}"
    );
    assert!(
        budget(&doc, "openai")["replication"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("\"abc\"")),
        "{doc}"
    );
    assert_eq!(budget(&doc, "anthropic")["spend_nanos"], 66, "{doc}");
    // Two rounds ran (open, then status): each problem is logged once.
    for needle in ["\"-5\"", "\"abc\""] {
        let count = run.stderr.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(count, 1, "{needle}: {}", run.stderr);
    }

    // Heal: the operator deletes the bad key and fields; the next rounds are exact again.
    server.command(&["DEL", &previous]);
    server.command(&["HDEL", &current, "x", "y", "z"]);
    for _ in 0..2 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    for node in [&a, &b] {
        assert_eq!(spend(node, "openai"), 311);
        assert_eq!(
            node.status(StatusQuery::provider("openai"))
                .into_iter()
                .next()
                .unwrap()
                .replication_problem,
            None
        );
    }
    assert_eq!(server.command(&["HGET", &current, "a"]), "300");
    assert_eq!(server.command(&["HGET", &previous, "b"]), "8");
    assert_eq!(server.command(&["HGET", &current, "~total"]), "311");
}

// ---- item 8: passwords -------------------------------------------------------------------

const PASSWORD: &str = "Pb7-sekrit-pw";

/// Every output of a CLI run, for the leak checks.
fn all_output(run: &Run) -> String {
    format!("{}\n{}", run.stdout, run.stderr)
}

fn run_debug(cli: &Cli, args: &[&str]) -> Run {
    Run::of(cli.cmd(args).env("RUST_LOG", "debug").output().unwrap())
}

#[test]
fn redis_passwords_never_appear_in_errors_status_or_logs() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let port = server.port();
    // From here on the server wants a password (the harness's own commands would need it).
    assert_eq!(
        server.command(&["CONFIG", "SET", "requirepass", PASSWORD]),
        "OK"
    );
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1000000, time_period: 1d}\n";
    let cli = Cli::new(yaml);
    let right = format!("redis://:{PASSWORD}@127.0.0.1:{port}/");
    let with_user = format!("redis://default:{PASSWORD}@127.0.0.1:{port}/");
    let wrong = format!("redis://:{PASSWORD}-wrong@127.0.0.1:{port}/");
    let wrong_user = format!("redis://default:{PASSWORD}-wrong@127.0.0.1:{port}/");

    // The right password works (so the other cases fail for the reason they claim).
    let run = cli.run(&["--redis", &right, "--node-id", "n", "sync"]);
    run.assert_ok();
    let run = cli.run(&["--redis", &with_user, "--node-id", "n", "sync"]);
    run.assert_ok();

    let check = |run: &Run, what: &str| {
        let out = all_output(run);
        assert!(!out.contains(PASSWORD), "{what}: password leaked: {run:?}");
        assert!(!out.contains("sekrit"), "{what}: password leaked: {run:?}");
    };
    for url in [&wrong, &wrong_user] {
        let run = run_debug(&cli, &["--redis", url, "--node-id", "n", "sync"]);
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains(":***@127.0.0.1"), "{run:?}");
        check(&run, "sync, wrong password");
        let run = run_debug(
            &cli,
            &["--redis", url, "--node-id", "n", "status", "--json"],
        );
        assert_eq!(run.code, Some(0), "{run:?}");
        check(&run, "status, wrong password");
        let run = run_debug(
            &cli,
            &["--redis", url, "--node-id", "n", "record", "openai", "1"],
        );
        // Recorded durably, the sync failed: its own exit code, and no retry.
        assert_eq!(run.code, Some(4), "{run:?}");
        assert!(
            run.stderr.contains("error: recorded locally; do not retry"),
            "{run:?}"
        );
        assert!(
            run.stdout.starts_with("recorded 1 USD for openai"),
            "{run:?}"
        );
        check(&run, "record, wrong password");
        let run = run_debug(
            &cli,
            &["--redis", url, "--node-id", "n", "charge", "gpt-4o", "1"],
        );
        assert_eq!(run.code, Some(4), "{run:?}");
        assert!(
            run.stderr.contains("error: recorded locally; do not retry"),
            "{run:?}"
        );
        check(&run, "charge, wrong password");
    }
    // No password at all: every command is refused, so the round fails as a whole
    // instead of reporting a "problem" per budget and pretending to be in sync.
    let no_password = format!("redis://127.0.0.1:{port}/");
    let run = cli.run(&["--redis", &no_password, "--node-id", "n", "sync"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.starts_with("error: redis") && run.stderr.lines().count() == 1,
        "{run:?}"
    );
    // In the library's status too.
    let dir = tempfile::tempdir().unwrap();
    let node = Limiter::open(config(dir.path(), &wrong, "lib", "pw")).unwrap();
    let err = node.sync().unwrap_err().to_string();
    assert!(!err.contains(PASSWORD), "{err}");
    let status = node
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap();
    let last = status.replication.last_error.unwrap();
    assert!(!last.contains(PASSWORD) && last.contains(":***@"), "{last}");
    drop(node);

    // Right password, server down: connect errors, timeouts, "reachable again" logs.
    server.kill();
    for url in [&right, &with_user] {
        let run = run_debug(&cli, &["--redis", url, "--node-id", "n", "sync"]);
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains(":***@127.0.0.1"), "{run:?}");
        check(&run, "sync, server down");
        let run = run_debug(
            &cli,
            &["--redis", url, "--node-id", "n", "status", "--json"],
        );
        assert_eq!(run.code, Some(0), "{run:?}");
        check(&run, "status, server down");
        let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        let last = budget(&doc, "openai")["replication"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(last.contains(":***@127.0.0.1"), "{doc}");
    }
    // Back up (still password-protected): the info line on recovery is redacted too.
    server.restart();
    assert_eq!(
        server.command(&["CONFIG", "SET", "requirepass", PASSWORD]),
        "OK"
    );
    let run = run_debug(&cli, &["--redis", &right, "--node-id", "n", "sync"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    check(&run, "sync, server back");
}

// ---- item 9: invalid URLs ----------------------------------------------------------------

#[test]
fn an_invalid_redis_url_fails_at_open_with_one_redacted_line() {
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n";
    let cli = Cli::new(yaml);
    for (url, shown) in [
        ("not a url", "not a url"),
        ("http://127.0.0.1:6379/", "http://127.0.0.1:6379/"),
        (
            "redis://:Pb7-sekrit-pw@127.0.0.1:notaport/",
            "redis://:***@127.0.0.1:notaport/",
        ),
    ] {
        for cmd in [&["status"][..], &["record", "openai", "0.1"], &["sync"]] {
            let mut args = vec!["--redis", url];
            args.extend_from_slice(cmd);
            let run = cli.run(&args);
            run.assert_error(1, &["invalid Redis URL", shown]);
            assert!(!all_output(&run).contains("sekrit"), "{run:?}");
        }
    }
    // Nothing was recorded by the refused invocations.
    let doc = cli.status_json("2024-05-01T12:00:00Z");
    assert_eq!(budget(&doc, "openai")["spend_nanos"], 0, "{doc}");
}

/// When no key at all could be synced (here every key is of the wrong type), the round is a
/// failure (`sync` errs, `last_error`, stale), not a list of per-budget problems.
#[test]
fn a_round_where_no_key_syncs_is_a_failed_round() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (url, now) = (server.url(), now());
    let day = day_start(now);
    // Every key: each budget's and its credit series' (`…}#credit:…`).
    for provider in ["openai", "anthropic"] {
        for start in [day, day - 86_400] {
            for series in ["", "#credit"] {
                server.command(&[
                    "SET",
                    &format!("allbad:{{{provider}:1d}}{series}:{start}"),
                    "x",
                ]);
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), &url, "a", "allbad", now);
    node.charge(Spend::provider("openai", nanos(1))).unwrap();
    let err = node.sync().unwrap_err().to_string();
    assert!(
        err.contains("WRONGTYPE") && err.contains("allbad:{"),
        "{err}"
    );
    let status = node
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap();
    assert!(status.replication.last_error.is_some());
    assert!(status.replication.last_sync.is_none());
    // One key repaired: the round succeeds again, the rest stays reported per budget.
    server.command(&["DEL", &format!("allbad:{{openai:1d}}:{day}")]);
    node.sync().unwrap();
    let status = node
        .status(StatusQuery::provider("anthropic"))
        .into_iter()
        .next()
        .unwrap();
    assert!(status.replication.last_error.is_none());
    assert!(status
        .replication_problem
        .is_some_and(|p| p.contains("WRONGTYPE")));
}

/// Thousands of poisoned fields: the budget's problem says how many, the log stays short.
#[test]
fn thousands_of_poisoned_fields_are_summarized_not_logged_one_by_one() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (url, now) = (server.url(), now());
    let key = format!("many:{{openai:1d}}:{}", day_start(now));
    let mut args: Vec<String> = vec!["HSET".into(), key.clone(), "good".into(), "5".into()];
    for i in 0..2000 {
        args.push(format!("bad-{i}"));
        args.push(format!("-{i}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(server.command(&args), "2001");
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1000000, time_period: 1d}\nprovider_budgets:\n  redis: {url: \"redis://127.0.0.1:1/\", prefix: many}\n";
    let cli = Cli::new(yaml);
    let now_text = now.to_string();
    let run = Run::of(
        cli.cmd(&[
            "--redis",
            &url,
            "--node-id",
            "c",
            "--now",
            &now_text,
            "status",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap(),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.lines().count() <= 8, "{}", run.stderr);
    let doc: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let openai = budget(&doc, "openai");
    assert_eq!(openai["spend_nanos"], 5, "{doc}");
    let problem = openai["replication"]["problem"]
        .as_str()
        .unwrap_or_default();
    assert!(problem.contains("and 1997 more"), "{problem}");
}
