//! Storage faults injected for real: a full disk (a small tmpfs), clock steps, flipped bytes in
//! sled's files, a data dir reopened under another node id, a journal thread that dies.
//!
//! Each test opens with the bug it pins. Disk-full tests mount a tmpfs (root is needed; CI runs
//! as root): without it they print a note and pass, except under `CI`, where they fail.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::cli;
use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;
use provider_budgets_test_support::tmpfs;

use tmpfs::Tmpfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{Clock, Config, Error, FakeClock, Limiter, Money, RecordError, StoreError};
use provider_budgets::{Spend, StatusQuery};

const YAML: &str = "\
provider_budget_config:
  openai: {budget_limit: 1000000, time_period: 1d}
  azure: {budget_limit: 1000000, time_period: 1h}
";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn config(dir: &Path) -> Config {
    Config::from_yaml_str(YAML).unwrap().data_dir(dir)
}

fn open(dir: &Path, clock: &FakeClock) -> Limiter {
    support::open(config(dir), clock)
}

fn spend_at(l: &Limiter, provider: &str, at: Timestamp) -> u64 {
    l.status(StatusQuery::all().at(at))
        .into_iter()
        .find(|s| s.provider == provider)
        .unwrap()
        .spend
        .as_nanos()
}

/// Polls `cond` until it holds or `secs` pass (then panics with `what`).
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reopens a data dir right after a drop: sled releases its lock a few ms late (sled#1289).
fn reopen(dir: &Path, clock: &FakeClock) -> Limiter {
    reopen_with(config(dir), clock)
}

// ---- disk full ----------------------------------------------------------------------------

/// The bug: sled's first I/O error is sticky. After the disk was full once, every later flush
/// failed even with space back; records that returned `Ok` never reached disk and a restart
/// lost them (3 000 of 3 900 in the report). Now: `record_durable` fails while the disk is
/// full, `record` keeps counting, health shows the fault, and once space returns everything
/// counted becomes durable without a restart.
#[test]
fn a_full_disk_then_freed_space_loses_nothing_and_needs_no_restart() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let data = fs.path().join("data");
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let limiter = open(&data, &clock);
    let cent = Money::from_nanos(10_000_000);
    let mut counted = 0u64;
    for _ in 0..50 {
        limiter
            .charge(Spend::provider("openai", cent))
            .unwrap()
            .wait()
            .unwrap();
        counted += cent.as_nanos();
    }
    assert!(limiter.health().storage_ok());

    let filler = fs.fill();
    // The disk is full: once sled has used up the room it had allocated, a durable record is
    // refused (but counted in memory).
    let mut refused = 0;
    for _ in 0..200_000 {
        match limiter
            .charge(Spend::provider("openai", cent))
            .and_then(|r| r.wait())
        {
            Ok(_) => {}
            Err(RecordError::Storage(e)) => {
                refused += 1;
                let text = e.to_string();
                assert!(!text.contains('\n'), "{text}");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        counted += cent.as_nanos();
        if refused >= 3 {
            break;
        }
    }
    assert!(refused >= 3, "no durable record was refused on a full disk");
    // Buffered records keep counting.
    for _ in 0..1000 {
        limiter.charge(Spend::provider("openai", cent)).unwrap();
        limiter.charge(Spend::provider("azure", cent)).unwrap();
        counted += 2 * cent.as_nanos();
    }
    let health = limiter.health();
    let fault = health
        .storage_fault
        .expect("health shows the storage fault");
    assert!(fault.contains(&data.display().to_string()), "{fault}");
    assert!(limiter
        .status(StatusQuery::all())
        .iter()
        .all(|b| b.storage_fault.is_some()));
    assert!(
        limiter.flush().is_err(),
        "flush cannot succeed on a full disk"
    );
    assert_eq!(
        spend_at(&limiter, "openai", clock.now()),
        counted - 1000 * cent.as_nanos()
    );

    // Space returns: without a restart, everything counted becomes durable.
    std::fs::remove_file(filler).unwrap();
    wait_for(30, "storage to recover", || limiter.health().storage_ok());
    assert!(limiter
        .status(StatusQuery::all())
        .iter()
        .all(|b| b.storage_fault.is_none()));
    limiter.flush().unwrap();
    limiter
        .charge(Spend::provider("openai", cent))
        .unwrap()
        .wait()
        .unwrap();
    counted += cent.as_nanos();
    let openai = spend_at(&limiter, "openai", clock.now());
    let azure = spend_at(&limiter, "azure", clock.now());
    assert_eq!(openai + azure, counted);

    // What a crash would leave: a copy of the data dir taken now.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&data, copy.path());
    let crashed = open(copy.path(), &clock);
    assert_eq!(spend_at(&crashed, "openai", clock.now()), openai);
    assert_eq!(spend_at(&crashed, "azure", clock.now()), azure);
    drop(crashed);
    drop(limiter);
    let limiter = reopen(&data, &clock);
    assert_eq!(spend_at(&limiter, "openai", clock.now()), openai);
    assert_eq!(spend_at(&limiter, "azure", clock.now()), azure);
}

/// The CLI on a full disk: one `error:` line naming the data dir and the cause, exit 1 (no
/// sled log lines, no Debug text); the records made before are intact once space is back.
#[test]
fn cli_on_a_full_disk_says_so_in_one_line() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let cli = cli::Cli::new(YAML);
    let data = fs.path().join("data");
    let now = "2024-06-01T12:00:00Z";
    let run = |args: &[&str]| cli.run_in(&data, args);
    run(&["--now", now, "record", "openai", "1.5", "--durable"]).assert_ok();
    let filler = fs.fill();
    let r = run(&["--now", now, "record", "openai", "2", "--durable"]);
    r.assert_error(1, &[&data.display().to_string(), "no space left"]);
    std::fs::remove_file(filler).unwrap();
    let r = run(&["--now", now, "status", "--json"]);
    r.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let openai = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["provider"] == "openai")
        .unwrap()
        .clone();
    // The refused durable record was not acknowledged; the first one is there.
    assert!(openai["spend_nanos"].as_u64().unwrap() >= 1_500_000_000);
}

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

// ---- clock steps ----------------------------------------------------------------------------

fn one_hour_retention(dir: &Path) -> Config {
    let mut c = config(dir);
    c.storage.retention = Duration::from_secs(3600);
    c
}

/// The bug: a wall clock that stepped forward (NTP, a resumed VM) for one journal tick made
/// retention delete the current spend from memory *and disk*; with the clock right again the
/// spend was 0. Now a step deletes nothing, forward or back, and retention still works when
/// time really passes.
#[test]
fn clock_steps_delete_nothing_and_real_time_still_expires() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = ts("2024-06-01T12:00:00Z");
    let clock = FakeClock::new(t0);
    let limiter = Limiter::builder(one_hour_retention(dir.path()))
        .clock(Arc::new(clock.clone()))
        .open()
        .unwrap();
    let five = Money::from_nanos(5_000_000_000);
    limiter
        .charge(Spend::provider("openai", five))
        .unwrap()
        .wait()
        .unwrap();
    limiter
        .charge(Spend::provider("azure", five))
        .unwrap()
        .wait()
        .unwrap();

    // Forward step of 30 days, several maintenance passes (what the 250 ms tick does). Both
    // ways of stepping a FakeClock are steps to the limiter.
    clock.advance(SignedDuration::from_hours(24 * 10));
    clock.step(SignedDuration::from_hours(24 * 20));
    for _ in 0..3 {
        provider_budgets::testing::maintain(&limiter).unwrap();
    }
    // Spend recorded on the jumped clock lands in its (wrong) window; nothing else moves.
    limiter
        .charge(Spend::provider("openai", five))
        .unwrap()
        .wait()
        .unwrap();
    provider_budgets::testing::maintain(&limiter).unwrap();
    clock.set(t0); // the clock is right again
    provider_budgets::testing::maintain(&limiter).unwrap();
    assert_eq!(spend_at(&limiter, "openai", t0), 5_000_000_000);
    assert_eq!(spend_at(&limiter, "azure", t0), 5_000_000_000);

    // Backward step: nothing lost either, and records land where the clock says.
    clock.step(SignedDuration::from_hours(-24 * 30));
    limiter
        .charge(Spend::provider("azure", five))
        .unwrap()
        .wait()
        .unwrap();
    provider_budgets::testing::maintain(&limiter).unwrap();
    clock.set(t0);
    provider_budgets::testing::maintain(&limiter).unwrap();
    drop(limiter);
    let limiter = reopen_with(one_hour_retention(dir.path()), &clock);
    assert_eq!(spend_at(&limiter, "openai", t0), 5_000_000_000);
    assert_eq!(spend_at(&limiter, "azure", t0), 5_000_000_000);
    assert_eq!(
        spend_at(&limiter, "azure", t0 - SignedDuration::from_hours(24 * 30)),
        5_000_000_000
    );

    // Time that really passes (wall and monotonic) still expires ended windows: the azure
    // window of t0 (1h) ends at 13:00, plus 1 h retention, and no record touched it since.
    clock.pass(Duration::from_secs(3 * 3600));
    provider_budgets::testing::maintain(&limiter).unwrap();
    let azure_windows: Vec<i64> = limiter
        .windows("azure")
        .iter()
        .map(|(w, _)| w.start().as_second())
        .collect();
    assert!(
        !azure_windows.contains(&t0.as_second()),
        "the ended window was not expired: {azure_windows:?}"
    );
    // The current 1d openai window is kept, and its spend with it.
    assert_eq!(spend_at(&limiter, "openai", t0), 5_000_000_000);
    drop(limiter);
    let limiter = reopen_with(one_hour_retention(dir.path()), &clock);
    assert_eq!(spend_at(&limiter, "azure", t0), 0, "expired on disk too");
    assert_eq!(spend_at(&limiter, "openai", t0), 5_000_000_000);
}

/// A window that received a record within the retention (monotonic time) is never deleted,
/// even when the wall clock says it ended long ago (a backward step then a record into the
/// then-current window, then the clock right again).
#[test]
fn a_window_touched_within_retention_is_kept_whatever_the_wall_clock() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = ts("2024-06-01T12:00:00Z");
    let clock = FakeClock::new(t0);
    let limiter = Limiter::builder(one_hour_retention(dir.path()))
        .clock(Arc::new(clock.clone()))
        .open()
        .unwrap();
    clock.step(SignedDuration::from_hours(-48));
    let two = Money::from_nanos(2_000_000_000);
    limiter
        .charge(Spend::provider("azure", two))
        .unwrap()
        .wait()
        .unwrap();
    clock.set(t0);
    // Only 30 real minutes pass: the window (ended ~47 h ago by the wall) stays.
    clock.pass(Duration::from_secs(30 * 60));
    provider_budgets::testing::maintain(&limiter).unwrap();
    let past = t0 - SignedDuration::from_hours(48);
    assert_eq!(spend_at(&limiter, "azure", past), 2_000_000_000);
    // Once the retention has passed in real time too, it goes.
    clock.pass(Duration::from_secs(31 * 60));
    provider_budgets::testing::maintain(&limiter).unwrap();
    assert_eq!(spend_at(&limiter, "azure", past), 0);
}

/// The CLI with a wrong `--now` (a one-shot process on a jumped clock) deletes nothing: the
/// spend is there when the clock is right again.
#[test]
fn cli_now_far_ahead_deletes_nothing() {
    let cli = cli::Cli::new(YAML);
    let now = "2024-06-01T12:00:00Z";
    cli.run(&["--now", now, "record", "openai", "3.25", "--durable"])
        .assert_ok();
    for ahead in ["2024-07-15T00:00:00Z", "2031-01-01T00:00:00Z"] {
        cli.run(&["--now", ahead, "status", "--json"]).assert_ok();
        cli.run(&["--now", ahead, "record", "azure", "1"])
            .assert_ok();
    }
    cli.run(&["--now", "2020-01-01T00:00:00Z", "record", "azure", "1"])
        .assert_ok();
    assert_eq!(cli.spend_nanos(now, "openai"), 3_250_000_000);
}

fn reopen_with(config: Config, clock: &FakeClock) -> Limiter {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Limiter::builder(config.clone())
            .clock(Arc::new(clock.clone()))
            .open()
        {
            Ok(l) => return l,
            Err(Error::Storage(StoreError::Locked { .. })) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

// ---- node id, journal death -----------------------------------------------------------------

/// The bug: reopening a data dir under another node id double-counted its spend in the fleet
/// (the old field stayed in Redis, the new one repeated it). Now it is an error naming both.
#[test]
fn a_data_dir_keeps_its_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let mut c = config(dir.path());
    c.node_id = Some("edge-1".into());
    let l = Limiter::builder(c.clone())
        .clock(Arc::new(clock.clone()))
        .open()
        .unwrap();
    l.charge(Spend::provider("openai", Money::from_nanos(7)))
        .unwrap()
        .wait()
        .unwrap();
    drop(l);
    let mut renamed = c.clone();
    renamed.node_id = Some("edge-2".into());
    let err = loop {
        match Limiter::builder(renamed.clone())
            .clock(Arc::new(clock.clone()))
            .open()
        {
            Err(Error::Storage(StoreError::Locked { .. })) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => break other.unwrap_err(),
        }
    };
    assert!(
        matches!(err, Error::Storage(StoreError::NodeIdChanged { .. })),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("edge-1") && text.contains("edge-2"), "{text}");
    // Without an id, or with the same one, it opens with its id.
    let l = reopen_with(config(dir.path()), &clock);
    assert_eq!(l.node_id(), "edge-1");
}

/// The bug: `flush()` and `shutdown()` answered `Ok` when the journal thread had died, so a
/// caller believed unflushed spend was durable. Now both fail, records are refused with the
/// reason, and health shows it.
#[test]
fn a_dead_journal_is_reported_not_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let limiter = open(dir.path(), &clock);
    limiter
        .charge(Spend::provider("openai", Money::from_nanos(1)))
        .unwrap()
        .wait()
        .unwrap();
    provider_budgets::testing::inject_journal_panic(&limiter);
    wait_for(10, "the journal to die", || {
        !limiter.health().journal_running
    });
    let err = limiter.flush().unwrap_err();
    assert!(matches!(err, StoreError::JournalStopped { .. }), "{err}");
    assert!(err.to_string().contains("panicked"), "{err}");
    let err = limiter
        .charge(Spend::provider("openai", Money::from_nanos(1)))
        .unwrap_err();
    assert!(
        matches!(err, RecordError::Storage(StoreError::JournalStopped { .. })),
        "{err}"
    );
    assert!(limiter
        .charge(Spend::provider("openai", Money::from_nanos(1)))
        .and_then(|r| r.wait())
        .is_err());
    assert!(!limiter.health().storage_ok());
    assert!(
        limiter.shutdown().is_err(),
        "shutdown must report the dead journal"
    );
}

// ---- media corruption ------------------------------------------------------------------------

/// How an open of a damaged copy ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Opened with every acknowledged total.
    Exact,
    /// Refused: acknowledged spend is missing (the high-water check).
    Lost,
    /// Refused by sled or a decoding check, with a one-line error.
    Refused,
}

/// Makes a data dir whose sled log holds many acknowledged batches (one process, `ingest
/// --durable`: one batch and fsync per line); returns the config file and the totals.
fn many_batches(cli: &cli::Cli) -> (u64, u64) {
    let mut lines = String::new();
    let (mut openai, mut azure) = (0, 0);
    for i in 0..300u64 {
        let nanos = 1_000_000 + i;
        let cost = Money::from_nanos(nanos);
        if i % 3 == 0 {
            lines.push_str(&format!("azure {cost}\n"));
            azure += nanos;
        } else {
            lines.push_str(&format!("openai {cost}\n"));
            openai += nanos;
        }
    }
    let out = cli.pipe(&["--now", NOW, "ingest", "--durable"], &lines);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok 300"));
    (openai, azure)
}

const NOW: &str = "2024-06-01T12:00:00Z";

fn sled_log(dir: &Path) -> PathBuf {
    // sled 0.34 keeps its log segments in the file `db`.
    let path = dir.join("db");
    assert!(path.exists(), "no sled log at {}", path.display());
    path
}

fn open_damaged(dir: &Path, clock: &FakeClock, want: (u64, u64)) -> Outcome {
    match Limiter::builder(config(dir))
        .clock(Arc::new(clock.clone()))
        .open()
    {
        Ok(l) => {
            let got = (
                spend_at(&l, "openai", clock.now()),
                spend_at(&l, "azure", clock.now()),
            );
            assert_eq!(
                got, want,
                "BUG: a damaged data dir opened with acknowledged spend missing"
            );
            Outcome::Exact
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(!text.contains("backtrace"), "{text}");
            match e {
                Error::Storage(StoreError::Corrupt {
                    tree: "high-water", ..
                }) => {
                    assert!(text.contains(&dir.display().to_string()), "{text}");
                    assert!(text.contains("repair"), "{text}");
                    Outcome::Lost
                }
                Error::Storage(_) => Outcome::Refused,
                other => panic!("unexpected error {other}"),
            }
        }
    }
}

/// The bug: one flipped byte in the middle of sled's log opened with exit 0 and part of the
/// acknowledged spend gone (sled truncates its log at the first bad message). Now every
/// damaged copy either opens with every acknowledged total or is refused, loudly; `repair`
/// is the way out.
#[test]
fn a_flipped_byte_in_sleds_log_never_loses_spend_silently() {
    let cli = cli::Cli::new(YAML);
    let clock = FakeClock::new(ts(NOW));
    let want = many_batches(&cli);
    let len = std::fs::metadata(sled_log(&cli.data)).unwrap().len();
    let mut outcomes = Vec::new();
    let mut damaged = None;
    for tenth in 1..10u64 {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(&cli.data, copy.path());
        let log = sled_log(copy.path());
        let mut bytes = std::fs::read(&log).unwrap();
        let at = (len * tenth / 10) as usize;
        bytes[at] ^= 0x5a;
        std::fs::write(&log, &bytes).unwrap();
        let outcome = open_damaged(copy.path(), &clock, want);
        if outcome == Outcome::Lost && damaged.is_none() {
            damaged = Some(copy);
        }
        outcomes.push((tenth, outcome));
    }
    let damaged =
        damaged.unwrap_or_else(|| panic!("no trial exercised the high-water check: {outcomes:?}"));

    // The CLI says the same in one line, and `repair` is the way out.
    let run = |args: &[&str]| cli.run_in(damaged.path(), args);
    run(&["--now", NOW, "status"]).assert_error(1, &["lost acknowledged spend", "repair"]);
    // Without Redis nothing can bring the spend back: repair says what is missing, exit 1,
    // and the data dir still refuses to open.
    run(&["--now", NOW, "repair"]).assert_error(1, &["still missing", "--accept-loss"]);
    run(&["--now", NOW, "status"]).assert_error(1, &["lost acknowledged spend"]);
    let accepted = run(&["--now", NOW, "repair", "--accept-loss"]);
    accepted.assert_ok();
    assert!(
        accepted.stdout.contains("accepted the loss"),
        "{accepted:?}"
    );
    let after = run(&["--now", NOW, "status", "--json"]);
    after.assert_ok();
    // It records again, and a reopen after that is clean.
    run(&["--now", NOW, "record", "openai", "1", "--durable"]).assert_ok();
    run(&["--now", NOW, "status"]).assert_ok();
}

/// An unreadable high-water record (both slots damaged) is refused at open, and `repair`
/// rewrites it from what is stored when nothing is missing.
#[test]
fn a_damaged_high_water_record_is_refused_then_repaired() {
    let cli = cli::Cli::new(YAML);
    cli.run(&["--now", NOW, "record", "openai", "2.5", "--durable"])
        .assert_ok();
    let hw = cli.data.join("provider-budgets.hw");
    let mut bytes = std::fs::read(&hw).unwrap();
    for b in bytes.iter_mut() {
        *b ^= 0xff;
    }
    std::fs::write(&hw, &bytes).unwrap();
    cli.run(&["--now", NOW, "status"])
        .assert_error(1, &["high-water record", "unreadable"]);
    let r = cli.run(&["--now", NOW, "repair"]);
    r.assert_ok();
    assert!(r.stdout.contains("unreadable"), "{r:?}");
    assert_eq!(cli.spend_nanos(NOW, "openai"), 2_500_000_000);
}

/// With Redis, `repair` takes this node's own totals back from its fields and the data dir is
/// whole again: nothing acknowledged and replicated is lost to a damaged disk.
#[test]
fn repair_takes_back_from_redis_what_the_disk_lost() {
    let Some(server) = redis_server::RedisServer::start() else {
        return;
    };
    // Near-real time: Redis expires keys by its own clock.
    let now = Timestamp::now().as_second().to_string();
    let cli = cli::Cli::new(YAML);
    let url = server.url();
    let lines: String = (0..200u64)
        .map(|i| format!("openai {}\n", Money::from_nanos((i % 10 + 1) * 10_000_000)))
        .collect();
    let want: u64 = (0..200u64).map(|i| (i % 10 + 1) * 10_000_000).sum();
    let out = cli.pipe(
        &["--redis", &url, "--now", &now, "ingest", "--durable"],
        &lines,
    );
    assert!(out.status.success(), "{out:?}");
    // Copies as the crash left them (an open rewrites sled's snapshot, after which most of
    // the log is superseded pages).
    let copies: Vec<tempfile::TempDir> = (0..9)
        .map(|_| {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(&cli.data, copy.path());
            copy
        })
        .collect();
    // The last round at exit shipped the whole total.
    assert_eq!(cli.spend_nanos(&now, "openai"), want);

    // Flip one byte at tenths of the log until a copy loses acknowledged spend (a flip in a
    // page that a later write superseded is harmless, and opens exact).
    let damaged = copies
        .into_iter()
        .zip(1..10u64)
        .find_map(|(copy, tenth)| {
            let log = sled_log(copy.path());
            let mut bytes = std::fs::read(&log).unwrap();
            let at = bytes.len() * tenth as usize / 10;
            bytes[at] ^= 0x5a;
            std::fs::write(&log, &bytes).unwrap();
            let r = cli.run_in(copy.path(), &["--now", &now, "status"]);
            if r.code == Some(0) {
                assert!(r.stdout.contains("openai"), "{r:?}");
                return None;
            }
            r.assert_error(1, &["lost acknowledged spend"]);
            Some(copy)
        })
        .expect("no flipped byte made the data dir lose spend");
    let cli = cli::Cli {
        tmp: tempfile::tempdir().unwrap(),
        config: cli.config.clone(),
        data: damaged.path().to_path_buf(),
    };
    let r = cli.run(&["--redis", &url, "--now", &now, "repair"]);
    r.assert_ok();
    assert!(
        r.stdout.contains("nothing acknowledged is missing"),
        "{r:?}"
    );
    assert_eq!(cli.spend_nanos(&now, "openai"), want);
}

/// A budget removed from the config keeps its stored windows (counted in the high-water
/// record); one added back by a live reload takes them over, counted once: the next open
/// finds exactly what was acknowledged (no false "lost spend", no double count).
#[test]
fn a_budget_removed_then_added_back_by_reload_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts(NOW));
    let l = open(dir.path(), &clock);
    l.charge(Spend::provider("azure", Money::from_nanos(700)))
        .unwrap()
        .wait()
        .unwrap();
    drop(l);
    let only_openai = Config::from_yaml_str(
        "provider_budget_config:\n  openai: {budget_limit: 1000000, time_period: 1d}\n",
    )
    .unwrap()
    .data_dir(dir.path());
    let l = reopen_with(only_openai, &clock);
    l.charge(Spend::provider("openai", Money::from_nanos(5)))
        .unwrap()
        .wait()
        .unwrap();
    l.reload(config(dir.path())).unwrap();
    assert_eq!(spend_at(&l, "azure", clock.now()), 700);
    l.charge(Spend::provider("azure", Money::from_nanos(300)))
        .unwrap()
        .wait()
        .unwrap();
    drop(l);
    let l = reopen(dir.path(), &clock);
    assert_eq!(spend_at(&l, "azure", clock.now()), 1000);
    assert_eq!(spend_at(&l, "openai", clock.now()), 5);
}
