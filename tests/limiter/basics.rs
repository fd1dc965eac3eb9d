//! The `Limiter` API under bad input and its durability promises:
//!
//! * bad input is refused with an error naming the culprit and nothing counted: records for a
//!   provider without budget (a receipt counting 0 budgets), unparsable money, provider names with
//!   `:`, a config without data dir;
//! * the data dir: a second open in this process is `StoreError::Locked` naming the dir (and
//!   leaves the first limiter working), drop + reopen in a row works, a damaged stored value is
//!   `StoreError::Corrupt` naming tree and key (one line) and restoring the bytes restores
//!   the totals;
//! * concurrency and durability: 4 threads of `record` and `record_durable` give an exact
//!   total, in memory, in a copy of the data dir taken right after the acknowledgements (what
//!   a crash would leave) and after reopen; `record_durable_async` likewise from tokio;
//! * `filter_in_place` and `Prepared::filter`/`filter_into` answer exactly like `filter`;
//!   after `shutdown` records are refused and the rest keeps answering.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use provider_budgets::{
    Config, ConfigError, Error, FakeClock, Limiter, Money, MoneyError, RecordError, StoreError,
    Target, UnknownProvider,
};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};

const YAML: &str = "\
provider_budget_config:
  openai: {budget_limit: 1000, time_period: 1d}
  azure: {budget_limit: 2, time_period: 1h}
";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(dir: &Path) -> Config {
    Config::from_yaml_str(YAML).unwrap().data_dir(dir)
}

fn clock() -> FakeClock {
    FakeClock::new(ts("2024-06-01T12:00:00Z"))
}

fn open(dir: &Path, clock: &FakeClock) -> Limiter {
    support::open(config(dir), clock)
}

fn spend(l: &Limiter, provider: &str) -> u64 {
    l.status(StatusQuery::provider(provider))
        .into_iter()
        .next()
        .unwrap()
        .spend
        .as_nanos()
}

/// Opens the data dir with sled directly. sled releases its file lock asynchronously after the
/// last handle is dropped (sled#1289) and offers no way to wait for it, so poll for it.
fn raw_sled(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::yield_now();
            }
            Err(e) => panic!("cannot open {}: {e}", dir.display()),
        }
    }
}

/// What a crash right now would leave on disk: a copy of every file of the data dir.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

// ---- bad input ----------------------------------------------------------------------------------

#[test]
fn recording_for_a_provider_without_budget_is_refused_and_counts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    let before = l.status(StatusQuery::all());
    // No budget applies: a value (the receipt counts 0 budgets), never an error.
    let no_budget = |_provider: &str| 0;
    let cost = usd("1");
    assert_eq!(
        l.charge(Spend::provider("gemini", cost))
            .map(|r| r.budgets()),
        Ok(no_budget("gemini"))
    );
    assert_eq!(
        l.charge(Spend::provider("gemini", cost))
            .and_then(|r| r.wait()),
        Ok(no_budget("gemini"))
    );
    assert_eq!(
        l.charge(Spend::provider("gemini", cost).at(l.now()))
            .map(|r| r.budgets()),
        Ok(no_budget("gemini"))
    );
    assert_eq!(
        l.charge(Spend::provider("Azure", cost).at(l.now()))
            .and_then(|r| r.wait()),
        Ok(no_budget("Azure")),
        "provider names are case-sensitive"
    );
    assert_eq!(
        l.charge(Spend::provider("", Money::ZERO))
            .map(|r| r.budgets()),
        Ok(no_budget(""))
    );
    let receipt = l.charge(Spend::provider("gemini", cost)).unwrap();
    assert_eq!(receipt.budgets(), no_budget("gemini"), "{receipt:?}");
    assert_eq!(l.status(StatusQuery::all()), before);
    assert!(l.windows("gemini").is_empty());
    assert!(l
        .status(StatusQuery::provider("gemini"))
        .into_iter()
        .next()
        .is_none());
    drop(l);
    let l = open(dir.path(), &clock);
    assert_eq!(
        l.status(StatusQuery::all()),
        before,
        "nothing was stored either"
    );
}

/// A value and a check of the error kind it must give.
type MoneyCase = (&'static str, fn(&MoneyError) -> bool);

#[test]
fn money_parse_errors_name_the_value() {
    let cases: [MoneyCase; 8] = [
        ("-1", |e| matches!(e, MoneyError::Negative(_))),
        ("-0.5", |e| matches!(e, MoneyError::Negative(_))),
        ("NaN", |e| matches!(e, MoneyError::NotFinite(_))),
        ("inf", |e| matches!(e, MoneyError::NotFinite(_))),
        ("1e30", |e| matches!(e, MoneyError::TooLarge(_))),
        ("1e400", |e| matches!(e, MoneyError::TooLarge(_))),
        ("18446744073.709551616", |e| {
            matches!(e, MoneyError::TooLarge(_))
        }),
        ("abc", |e| matches!(e, MoneyError::Malformed(_))),
    ];
    for (text, kind) in cases {
        let err = text.parse::<Money>().unwrap_err();
        assert!(kind(&err), "{text}: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(text),
            "{text:?}: message {msg:?} does not name the value"
        );
        assert!(!msg.contains('\n'));
    }
    // The same values as a budget limit: the error names the provider and the value.
    for text in ["-1", "1e30", "abc", "NaN"] {
        let yaml = format!(
            "provider_budget_config:\n  openai: {{budget_limit: \"{text}\", time_period: 1d}}\n"
        );
        let err = Config::from_yaml_str(&yaml).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Limit { provider, .. } if provider == "openai"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("openai") && msg.contains(text), "{msg}");
    }
}

#[test]
fn provider_names_with_a_colon_are_rejected() {
    let err = Config::from_yaml_str(
        "provider_budget_config:\n  \"openai:eu\": {budget_limit: 1, time_period: 1d}\n",
    )
    .unwrap_err();
    assert_eq!(err, ConfigError::ProviderName("openai:eu".into()));
    assert!(err.to_string().contains("openai:eu"));
    let err = Config::from_toml_str(
        "[provider_budget_config.\"openai:eu\"]\nbudget_limit = 1\ntime_period = \"1d\"\n",
    )
    .unwrap_err();
    assert_eq!(err, ConfigError::ProviderName("openai:eu".into()));
    // Built in code: refused at open, before the data dir is touched.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = Config::new()
        .budget("openai:eu", usd("1"), "1d".parse().unwrap())
        .data_dir(&data);
    let err = Limiter::open(config).unwrap_err();
    assert!(
        matches!(&err, Error::Config(ConfigError::ProviderName(p)) if p == "openai:eu"),
        "{err:?}"
    );
    assert!(!data.exists());
}

#[test]
fn opening_without_a_data_dir_is_refused() {
    let config = Config::from_yaml_str(YAML).unwrap();
    let err = Limiter::open(config).unwrap_err();
    assert!(
        matches!(err, Error::Config(ConfigError::NoDataDir)),
        "{err:?}"
    );
    assert!(err.to_string().contains("data dir"), "{err}");
}

// ---- the data dir -------------------------------------------------------------------------------

#[test]
fn a_second_open_of_a_dir_in_use_is_locked_and_names_the_dir() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let first = open(dir.path(), &clock);
    first.charge(Spend::provider("openai", usd("1"))).unwrap();
    let err = Limiter::builder(config(dir.path()))
        .clock(Arc::new(clock.clone()))
        .open()
        .unwrap_err();
    match &err {
        Error::Storage(StoreError::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(!msg.contains('\n'));
    // The refused open disturbed nothing.
    first
        .charge(Spend::provider("openai", usd("2")))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(spend(&first, "openai"), 3_000_000_000);
    drop(first);
    let again = open(dir.path(), &clock);
    assert_eq!(spend(&again, "openai"), 3_000_000_000);
}

#[test]
fn drop_and_reopen_in_a_row_keeps_every_record() {
    // Regression: sled releases its lock a little after the drop; an immediate reopen used to
    // fail with StoreError::Locked.
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    for i in 0..30u64 {
        let l = open(dir.path(), &clock);
        assert_eq!(spend(&l, "openai"), i, "after {i} restarts");
        l.charge(Spend::provider("openai", Money::from_nanos(1)))
            .unwrap();
    }
}

#[test]
fn a_corrupt_stored_value_is_reported_with_tree_and_key_and_restoring_it_restores_the_totals() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    l.charge(Spend::provider("openai", usd("0.5"))).unwrap();
    drop(l);

    // The documented key layout: provider 0x00 period 0x00 start (big-endian, sign flipped).
    let start = ts("2024-06-01T00:00:00Z").as_second();
    let mut key = b"openai\x001d\x00".to_vec();
    key.extend_from_slice(&((start as u64) ^ (1 << 63)).to_be_bytes());
    let original = {
        let db = raw_sled(dir.path());
        let own = db.open_tree("own").unwrap();
        // Keys starting with 0xff are reserved (the journal's batch sequence).
        let entries: Vec<_> = own
            .iter()
            .map(Result::unwrap)
            .filter(|(k, _)| k.first() != Some(&0xff))
            .collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(&*entries[0].0, &key[..]);
        entries[0].1.to_vec()
    };

    let mut truncated = original.clone();
    truncated.pop();
    let mut trailing = original.clone();
    trailing.push(0);
    let mut other_version = original.clone();
    other_version[0] = other_version[0].wrapping_add(1);
    let garbage: [(&str, Vec<u8>); 5] = [
        ("empty", Vec::new()),
        ("truncated", truncated),
        ("trailing byte", trailing),
        ("unknown version", other_version),
        (
            "huge length",
            vec![
                original[0],
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
            ],
        ),
    ];
    for (what, bytes) in garbage {
        {
            let db = raw_sled(dir.path());
            db.open_tree("own").unwrap().insert(&key, bytes).unwrap();
            db.flush().unwrap();
        }
        let err = Limiter::builder(config(dir.path()))
            .clock(Arc::new(clock.clone()))
            .open()
            .unwrap_err();
        match &err {
            Error::Storage(StoreError::Corrupt { tree, key, .. }) => {
                assert_eq!(*tree, "own", "{what}");
                assert_eq!(key, &format!("openai/1d/{start}"), "{what}");
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("own") && msg.contains(&format!("openai/1d/{start}")),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    {
        let db = raw_sled(dir.path());
        db.open_tree("own").unwrap().insert(&key, original).unwrap();
        db.flush().unwrap();
    }
    let l = open(dir.path(), &clock);
    assert_eq!(spend(&l, "openai"), 500_000_000);
    l.charge(Spend::provider("openai", usd("0.25"))).unwrap();
    assert_eq!(spend(&l, "openai"), 750_000_000);
}

// ---- concurrency and durability -----------------------------------------------------------------

#[test]
fn concurrent_records_give_an_exact_total_in_memory_on_disk_and_after_reopen() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    let cost = |t: u64, i: u64| t * 1_000_000 + i + 1;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let c = Money::from_nanos(cost(t, i));
                    let provider = if i % 2 == 0 { "openai" } else { "azure" };
                    if i % 4 < 2 {
                        l.charge(Spend::provider(provider, c))
                            .unwrap()
                            .wait()
                            .unwrap();
                    } else {
                        l.charge(Spend::provider(provider, c)).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let expected = |even: bool| -> u64 {
        (0..THREADS)
            .flat_map(|t| (0..PER_THREAD).map(move |i| (t, i)))
            .filter(|(_, i)| (i % 2 == 0) == even)
            .map(|(t, i)| cost(t, i))
            .sum()
    };
    assert_eq!(spend(&l, "openai"), expected(true));
    assert_eq!(spend(&l, "azure"), expected(false));
    assert_eq!(
        l.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .own_spend
            .as_nanos(),
        expected(true)
    );

    // flush() returns once everything recorded before is on disk: a crash now loses nothing.
    l.flush().unwrap();
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let from_copy = open(copy.path(), &clock);
    assert_eq!(spend(&from_copy, "openai"), expected(true));
    assert_eq!(spend(&from_copy, "azure"), expected(false));
    drop(from_copy);

    drop(l);
    let l = open(dir.path(), &clock);
    assert_eq!(spend(&l, "openai"), expected(true));
    assert_eq!(spend(&l, "azure"), expected(false));
}

#[test]
fn record_durable_is_on_disk_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    l.charge(Spend::provider(
                        "openai",
                        Money::from_nanos(t * 100 + i + 1),
                    ))
                    .unwrap()
                    .wait()
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let expected: u64 = (0..4u64)
        .flat_map(|t| (0..50u64).map(move |i| t * 100 + i + 1))
        .sum();
    // No flush, no drop: the data dir as a crash would leave it now.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let from_copy = open(copy.path(), &clock);
    assert_eq!(spend(&from_copy, "openai"), expected);
    assert_eq!(spend(&l, "openai"), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_durable_async_from_tokio_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let l = l.clone();
            tokio::spawn(async move {
                for i in 0..25u64 {
                    l.charge(Spend::provider(
                        "azure",
                        Money::from_nanos(t * 1_000 + i + 1),
                    ))
                    .unwrap()
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let expected: u64 = (0..8u64)
        .flat_map(|t| (0..25u64).map(move |i| t * 1_000 + i + 1))
        .sum();
    assert_eq!(spend(&l, "azure"), expected);
    assert_eq!(
        l.charge(Spend::provider("gemini", usd("1"))).unwrap().await,
        Ok(0)
    );
    // The data dir as a crash would leave it right after the acknowledgements.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let from_copy = open(copy.path(), &clock);
    assert_eq!(spend(&from_copy, "azure"), expected);
    drop(from_copy);
    drop(l);
    let l = open(dir.path(), &clock);
    assert_eq!(spend(&l, "azure"), expected);
}

#[test]
fn after_shutdown_records_are_refused_and_the_rest_answers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    l.charge(Spend::provider("azure", usd("2"))).unwrap();
    let clone = l.clone();
    l.shutdown().unwrap();
    assert_eq!(
        clone
            .charge(Spend::provider("azure", usd("1")))
            .map(|r| r.budgets()),
        Err(RecordError::Closed)
    );
    assert_eq!(
        clone
            .charge(Spend::provider("openai", usd("1")))
            .and_then(|r| r.wait()),
        Err(RecordError::Closed)
    );
    assert_eq!(spend(&l, "azure"), 2_000_000_000);
    assert!(l.filter(&["azure/gpt-4o"], NO_TAGS).is_err());
    assert_eq!(l.filter(&["gpt-4o"], NO_TAGS).unwrap().len(), 1);
    l.flush().unwrap();
    drop((l, clone));
    let l = open(dir.path(), &clock);
    assert_eq!(spend(&l, "azure"), 2_000_000_000);
    assert_eq!(spend(&l, "openai"), 0);
}

// ---- the three forms of filter ------------------------------------------------------------------

#[test]
fn filter_in_place_and_prepared_answer_like_filter() {
    for policy in [UnknownProvider::Allow, UnknownProvider::Deny] {
        let dir = tempfile::tempdir().unwrap();
        let clock = clock();
        let mut config = config(dir.path());
        config.unknown_provider = policy;
        let l = Limiter::builder(config)
            .clock(Arc::new(clock.clone()))
            .open()
            .unwrap();
        let bare = |m: &str| Target::parse(m);
        let lists: Vec<Vec<Target>> = vec![
            vec![],
            vec![bare("gpt-4o")],
            vec![bare("azure/gpt-4o"), bare("gpt-4o"), bare("azure/gpt-4o")],
            vec![bare("gpt-4o"), bare("claude-3-opus"), bare("my-model")],
            vec![bare("my-model")],
            vec![
                Target::new("gpt-4o", "azure"),
                bare("o1"),
                bare("gpt-4o-mini"),
            ],
            vec![
                bare("azure/a"),
                bare("my-model"),
                bare("o3-mini"),
                bare("gemini-pro"),
            ],
        ];
        let prepared: Vec<_> = lists.iter().map(|d| l.prepare(d)).collect();
        let mut out = vec![99, 98, 97];
        // Fresh, azure exhausted, both exhausted, next hour (azure fresh again).
        let steps: [&dyn Fn(); 4] = [
            &|| {},
            &|| drop(l.charge(Spend::provider("azure", usd("2"))).unwrap()),
            &|| drop(l.charge(Spend::provider("openai", usd("1000"))).unwrap()),
            &|| clock.set(ts("2024-06-01T13:00:00Z")),
        ];
        for (step, act) in steps.iter().enumerate() {
            act();
            for (list, prep) in lists.iter().zip(&prepared) {
                let expected = l.filter(list, NO_TAGS);
                assert_eq!(prep.len(), list.len());
                assert_eq!(prep.is_empty(), list.is_empty());
                let mut in_place = list.clone();
                let r = l.filter_in_place(&mut in_place, NO_TAGS);
                let from_prepared = prep.filter(NO_TAGS);
                let into = prep.filter_into(NO_TAGS, &mut out);
                let ctx = format!("{policy:?} step {step} {list:?}");
                match expected {
                    Ok(kept) => {
                        let indices: Vec<usize> = kept
                            .iter()
                            .map(|k| list.iter().position(|d| std::ptr::eq(d, *k)).unwrap())
                            .collect();
                        let kept: Vec<Target> = kept.into_iter().cloned().collect();
                        assert_eq!(r, Ok(()), "{ctx}");
                        assert_eq!(in_place, kept, "{ctx}");
                        assert_eq!(from_prepared.unwrap(), indices, "{ctx}");
                        assert_eq!(into, Ok(()), "{ctx}");
                        assert_eq!(out, indices, "{ctx}");
                    }
                    Err(e) => {
                        assert_eq!(r.unwrap_err(), e, "{ctx}");
                        assert_eq!(&in_place, list, "{ctx}: left unchanged");
                        assert_eq!(from_prepared.unwrap_err(), e, "{ctx}");
                        assert_eq!(into.unwrap_err(), e, "{ctx}");
                    }
                }
            }
        }
        // Spot checks that the scenario exercised both outcomes.
        assert!(
            l.filter(&lists[2], NO_TAGS).is_ok(),
            "next hour: azure fresh"
        );
        assert!(
            l.filter(&lists[1], NO_TAGS).is_err(),
            "the day's openai budget is spent"
        );
        assert_eq!(
            l.filter(&lists[4], NO_TAGS).is_err(),
            policy == UnknownProvider::Deny
        );
    }
}

/// A record whose window ended more than `storage.retention` ago would be deleted by the next
/// expiry pass: it is refused with `RecordError::Expired` (naming provider and time) instead of
/// being counted for a moment and then silently dropped.
#[test]
fn records_older_than_the_retention_are_refused_not_silently_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock(); // 2024-06-01T12:00:00Z, default retention 1 h
    let l = open(dir.path(), &clock);
    // azure has 1h windows: 10:00-11:00 ended exactly one hour ago, 09:00-10:00 two.
    let err = l
        .charge(Spend::provider("azure", usd("1")).at(ts("2024-06-01T09:30:00Z")))
        .unwrap_err();
    assert!(matches!(err, RecordError::Expired { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("azure") && msg.contains("2024-06-01T09:30:00Z"),
        "{msg}"
    );
    let err = l
        .charge(Spend::provider("azure", usd("1")).at(ts("2024-06-01T10:59:59Z")))
        .and_then(|r| r.wait())
        .unwrap_err();
    assert!(matches!(err, RecordError::Expired { .. }), "{err:?}");
    assert_eq!(
        l.status(StatusQuery::all().at(ts("2024-06-01T09:30:00Z")))
            .iter()
            .find(|s| s.provider == "azure")
            .unwrap()
            .spend,
        Money::ZERO
    );
    // Within the retention: the previous window still takes late records.
    l.charge(Spend::provider("azure", usd("0.5")).at(ts("2024-06-01T11:15:00Z")))
        .unwrap();
    // The 1d window of openai is current: any time of the day is fine.
    l.charge(Spend::provider("openai", usd("2")).at(ts("2024-06-01T00:00:01Z")))
        .unwrap();
    assert_eq!(spend(&l, "openai"), 2_000_000_000);
    let previous = l
        .status(StatusQuery::all().at(ts("2024-06-01T11:15:00Z")))
        .into_iter()
        .find(|s| s.provider == "azure")
        .unwrap();
    assert_eq!(previous.spend, usd("0.5"));
}

/// A spend's `at` may be at most `MAX_FUTURE_SKEW` past the clock. Later
/// is refused with `RecordError::Future` (naming the time and the limit) and nothing is
/// counted, for a provider and a deployment spend alike; within the skew it counts.
#[test]
fn records_later_than_now_plus_the_skew_are_refused_and_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock(); // 2024-06-01T12:00:00Z
    let l = open(dir.path(), &clock);
    let skew = provider_budgets::MAX_FUTURE_SKEW.as_secs();
    assert_eq!(skew, 300);
    let far = ts("9999-12-30T00:00:00Z");
    for at in [far, ts("2024-06-01T12:05:01Z")] {
        let err = l
            .charge(Spend::provider("openai", usd("1")).at(at))
            .unwrap_err();
        assert!(matches!(err, RecordError::Future { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("openai")
                && msg.contains(&at.to_string())
                && msg.contains("2024-06-01T12:05:00Z"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        let err = l
            .charge(Spend::deployment("gpt-4o", usd("1")).at(at))
            .unwrap_err();
        assert!(matches!(err, RecordError::Future { .. }), "{err:?}");
    }
    l.flush().unwrap();
    assert_eq!(spend(&l, "openai"), 0);
    assert_eq!(
        l.status(StatusQuery::all().at(far))
            .iter()
            .map(|s| s.spend.as_nanos())
            .sum::<u64>(),
        0
    );
    // Exactly at the limit: counted (in the current 1d window).
    l.charge(Spend::provider("openai", usd("2")).at(ts("2024-06-01T12:05:00Z")))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(spend(&l, "openai"), 2_000_000_000);
}
