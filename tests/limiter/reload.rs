//! `Limiter::reload`: a new config for a running limiter. Changed limits apply at once, new
//! budgets start at zero, a changed period starts a new series, removed budgets stop
//! filtering, recorded spend is never lost (in memory, on disk after reopen, under concurrent
//! records), an invalid config or a restart-only change is refused and the old config keeps
//! running, `Prepared` lists follow.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use provider_budgets::{Config, Error, FakeClock, Limiter, Money, RedisConfig, Target};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};
use redis_server::RedisServer;

const NOW: &str = "2024-06-01T12:00:00Z";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(dir: &Path, budgets: &str) -> Config {
    Config::from_yaml_str(&format!("provider_budget_config:\n{budgets}"))
        .unwrap()
        .data_dir(dir)
}

fn open(dir: &Path, budgets: &str) -> Limiter {
    support::open(config(dir, budgets), &FakeClock::new(NOW.parse().unwrap()))
}

fn spend(l: &Limiter, provider: &str) -> Option<u64> {
    l.status(StatusQuery::provider(provider))
        .into_iter()
        .next()
        .map(|s| s.spend.as_nanos())
}

const OPENAI_1: &str = "  openai: {budget_limit: 1, time_period: 1d}\n";
const GPT: [&str; 2] = ["gpt-4o", "claude-3-5-sonnet"];

#[test]
fn a_changed_limit_applies_at_once_and_keeps_the_spend() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), OPENAI_1);
    l.charge(Spend::provider("openai", usd("0.6"))).unwrap();
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap().len(), 2);

    let r = l
        .reload(config(
            dir.path(),
            "  openai: {budget_limit: 0.5, time_period: 1d}\n",
        ))
        .unwrap();
    assert_eq!(r.changed, ["openai"]);
    assert!(r.added.is_empty() && r.removed.is_empty(), "{r:?}");
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap(), [&"claude-3-5-sonnet"]);
    let s = l
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(
        (s.spend, s.limit, s.exhausted),
        (usd("0.6"), usd("0.5"), true)
    );
    assert_eq!(l.config().budgets[0].limit, usd("0.5"));

    l.reload(config(
        dir.path(),
        "  openai: {budget_limit: 2, time_period: 1d}\n",
    ))
    .unwrap();
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap().len(), 2);
    assert_eq!(spend(&l, "openai"), Some(600_000_000));
}

#[test]
fn a_new_budget_starts_at_zero_and_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), OPENAI_1);
    assert!(matches!(
        l.charge(Spend::provider("anthropic", usd("1")))
            .map(|r| r.budgets()),
        Ok(0)
    ));
    let r = l
        .reload(config(
            dir.path(),
            "  openai: {budget_limit: 1, time_period: 1d}\n  anthropic: {budget_limit: 1, time_period: 1h}\n",
        ))
        .unwrap();
    assert_eq!(
        (r.added.as_slice(), r.budgets),
        (["anthropic".to_owned()].as_slice(), 2)
    );
    assert_eq!(spend(&l, "anthropic"), Some(0));
    assert_eq!(l.status(StatusQuery::all()).len(), 2);
    l.charge(Spend::provider("anthropic", usd("1"))).unwrap();
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap(), [&"gpt-4o"]);

    // It is stored like any budget: reopen with the new config.
    drop(l);
    let l = open(
        dir.path(),
        "  openai: {budget_limit: 1, time_period: 1d}\n  anthropic: {budget_limit: 1, time_period: 1h}\n",
    );
    assert_eq!(spend(&l, "anthropic"), Some(1_000_000_000));
}

#[test]
fn a_changed_period_is_a_new_series_and_the_old_one_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), OPENAI_1);
    l.charge(Spend::provider("openai", usd("0.75")))
        .unwrap()
        .wait()
        .unwrap();
    let hourly = config(dir.path(), "  openai: {budget_limit: 1, time_period: 1h}\n");
    let r = l.reload(hourly).unwrap();
    assert_eq!(
        (r.added.as_slice(), r.removed.as_slice()),
        (
            ["openai".to_owned()].as_slice(),
            ["openai".to_owned()].as_slice()
        )
    );
    assert_eq!(spend(&l, "openai"), Some(0), "a new series");
    assert_eq!(
        l.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .period
            .to_string(),
        "1h"
    );
    l.charge(Spend::provider("openai", usd("0.25"))).unwrap();

    // Back to daily: the daily series still holds its spend.
    l.reload(config(dir.path(), OPENAI_1)).unwrap();
    assert_eq!(spend(&l, "openai"), Some(750_000_000));
    drop(l);
    // Both series are on disk.
    let daily = open(dir.path(), OPENAI_1);
    assert_eq!(spend(&daily, "openai"), Some(750_000_000));
    drop(daily);
    let hourly = open(dir.path(), "  openai: {budget_limit: 1, time_period: 1h}\n");
    assert_eq!(spend(&hourly, "openai"), Some(250_000_000));
}

#[test]
fn a_removed_budget_stops_filtering_and_its_spend_survives() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), OPENAI_1);
    l.charge(Spend::provider("openai", usd("1"))).unwrap();
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap(), [&"claude-3-5-sonnet"]);

    let r = l
        .reload(config(
            dir.path(),
            "  azure: {budget_limit: 1, time_period: 1d}\n",
        ))
        .unwrap();
    assert_eq!(r.removed, ["openai"]);
    assert_eq!(
        l.filter(&GPT, NO_TAGS).unwrap().len(),
        2,
        "openai has no budget now"
    );
    assert!(l
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .is_none());
    assert!(matches!(
        l.charge(Spend::provider("openai", usd("1")))
            .map(|r| r.budgets()),
        Ok(0)
    ));
    let p = l
        .status(StatusQuery::all())
        .into_iter()
        .map(|s| s.provider)
        .collect::<Vec<_>>();
    assert_eq!(p, ["azure"]);

    // Back again: the spend recorded before is still there and enforced.
    l.reload(config(dir.path(), OPENAI_1)).unwrap();
    assert_eq!(spend(&l, "openai"), Some(1_000_000_000));
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap(), [&"claude-3-5-sonnet"]);
}

#[test]
fn an_invalid_or_restart_only_config_is_refused_and_the_old_one_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let l = open(dir.path(), OPENAI_1);
    l.charge(Spend::provider("openai", usd("1"))).unwrap();

    let mut bad = config(dir.path(), OPENAI_1);
    bad.budgets[0].name = "open:ai".into();
    let e = l.reload(bad).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(e.to_string().contains("open:ai"), "{e}");

    let e = l
        .reload(config(
            other.path(),
            "  openai: {budget_limit: 5, time_period: 1d}\n",
        ))
        .unwrap_err();
    assert!(matches!(e, Error::Reload(_)), "{e}");
    assert!(e.to_string().contains("storage"), "{e}");
    assert!(!e.to_string().contains('\n'));

    let mut anchored = config(dir.path(), OPENAI_1);
    anchored.window_anchor = "2024-01-01T00:00:00Z".parse().unwrap();
    let e = l.reload(anchored).unwrap_err();
    assert!(e.to_string().contains("window_anchor"), "{e}");

    // Nothing changed: the old limit is enforced, records still go to the old budget.
    assert_eq!(
        l.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .limit,
        usd("1")
    );
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap(), [&"claude-3-5-sonnet"]);
    l.charge(Spend::provider("openai", usd("1"))).unwrap();
    assert_eq!(spend(&l, "openai"), Some(2_000_000_000));

    // A config without storage dir keeps the running one.
    let no_dir = Config::from_yaml_str(&format!("provider_budget_config:\n{OPENAI_1}")).unwrap();
    l.reload(no_dir).unwrap();
}

#[test]
fn prepared_lists_follow_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), OPENAI_1);
    let list = [
        Target::new("gpt-4o", "openai"),
        Target::new("claude-3-5-sonnet", "anthropic"),
    ];
    let p = l.prepare(&list);
    l.charge(Spend::provider("openai", usd("1"))).unwrap();
    assert_eq!(p.filter(NO_TAGS).unwrap(), [1]);
    l.reload(config(
        dir.path(),
        "  anthropic: {budget_limit: 0, time_period: 1d}\n",
    ))
    .unwrap();
    assert_eq!(
        p.filter(NO_TAGS).unwrap(),
        [0],
        "openai removed, anthropic blocked"
    );
}

#[test]
fn reloads_racing_with_records_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(
        dir.path(),
        "  openai: {budget_limit: 1000, time_period: 1d}\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (l, stop, counted) = (l.clone(), Arc::clone(&stop), Arc::clone(&counted));
            thread::spawn(move || {
                let cost = usd("0.001");
                while !stop.load(Ordering::Relaxed) {
                    l.charge(Spend::provider("openai", cost)).unwrap();
                    counted.fetch_add(1, Ordering::Relaxed);
                    let _ = l.filter(&GPT, NO_TAGS);
                }
            })
        })
        .collect();
    for i in 0..200 {
        let extra = if i % 2 == 0 {
            format!("  p{i}: {{budget_limit: 1, time_period: 1d}}\n")
        } else {
            String::new()
        };
        let limit = 1000 + i;
        l.reload(config(
            dir.path(),
            &format!("  openai: {{budget_limit: {limit}, time_period: 1d}}\n{extra}"),
        ))
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let n = counted.load(Ordering::Relaxed);
    assert!(n > 0);
    assert_eq!(spend(&l, "openai"), Some(n * 1_000_000));
    assert_eq!(
        l.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .limit,
        usd("1199")
    );
    // 100 distinct p{i} budgets were added and removed: their 100 series keep their slots.
    drop(l);
    let l = open(
        dir.path(),
        "  openai: {budget_limit: 1000, time_period: 1d}\n",
    );
    assert_eq!(spend(&l, "openai"), Some(n * 1_000_000));
}

#[test]
fn more_new_series_than_spare_slots_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), OPENAI_1);
    let many: String = (0..=provider_budgets::RELOAD_SLOTS)
        .map(|i| format!("  p{i}: {{budget_limit: 1, time_period: 1d}}\n"))
        .collect();
    let e = l.reload(config(dir.path(), &many)).unwrap_err();
    assert!(e.to_string().contains("restart"), "{e}");
    assert_eq!(l.status(StatusQuery::all()).len(), 1, "nothing changed");
    assert_eq!(l.config().budgets.len(), 1);
}

/// A budget added by a reload is replicated like the others: node A gets it by reload, node B
/// has it from the start, and each sees the other's spend after two rounds.
#[test]
fn a_budget_added_by_reload_is_replicated() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let now = jiff::Timestamp::now();
    let with_redis = |dir: &Path, node: &str, budgets: &str| {
        let mut c = config(dir, budgets);
        c.node_id = Some(node.to_owned());
        let mut r = RedisConfig::new(server.url());
        r.prefix = "reload".into();
        r.sync_interval = std::time::Duration::from_secs(3600);
        c.redis = Some(r);
        c
    };
    let both = "  openai: {budget_limit: 10, time_period: 1d}\n  anthropic: {budget_limit: 10, time_period: 1d}\n";
    let clock = || Arc::new(FakeClock::new(now));
    let a = Limiter::builder(with_redis(da.path(), "a", OPENAI_1))
        .clock(clock())
        .open()
        .unwrap();
    let b = Limiter::builder(with_redis(db.path(), "b", both))
        .clock(clock())
        .open()
        .unwrap();
    a.reload(with_redis(da.path(), "a", both)).unwrap();
    a.charge(Spend::provider("anthropic", usd("1.5"))).unwrap();
    b.charge(Spend::provider("anthropic", usd("0.25"))).unwrap();
    for _ in 0..2 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    assert_eq!(spend(&a, "anthropic"), Some(1_750_000_000));
    assert_eq!(spend(&b, "anthropic"), Some(1_750_000_000));
}

/// A budget that the running process never had, but whose series is on disk from an earlier
/// run (removed from the config, then the process restarted): a reload that adds it back
/// resumes the stored spend instead of starting at zero and overwriting it.
#[test]
fn a_budget_added_by_reload_resumes_what_an_earlier_run_stored() {
    let dir = tempfile::tempdir().unwrap();
    let both =
        "  openai: {budget_limit: 10, time_period: 1d}\n  anthropic: {budget_limit: 2, time_period: 1d}\n";
    let l = open(dir.path(), both);
    l.charge(Spend::provider("anthropic", usd("1.5")))
        .unwrap()
        .wait()
        .unwrap();
    drop(l);

    let l = open(dir.path(), OPENAI_1);
    assert!(l
        .status(StatusQuery::provider("anthropic"))
        .into_iter()
        .next()
        .is_none());
    let r = l.reload(config(dir.path(), both)).unwrap();
    assert_eq!(r.added, ["anthropic"]);
    assert_eq!(
        spend(&l, "anthropic"),
        Some(1_500_000_000),
        "resumed, not zero"
    );
    l.charge(Spend::provider("anthropic", usd("0.5"))).unwrap();
    assert_eq!(
        l.filter(&GPT, NO_TAGS).unwrap(),
        [&"gpt-4o"],
        "2 of 2 spent"
    );
    drop(l);
    let l = open(dir.path(), both);
    assert_eq!(
        spend(&l, "anthropic"),
        Some(2_000_000_000),
        "nothing overwritten on disk"
    );
}
