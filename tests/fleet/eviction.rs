//! Loud data loss: an evicting Redis shows in status (`evicting`, the policy) and
//! a default one does not; a deleted window key (our acknowledged field gone) counts one
//! data loss and heals.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig};
use provider_budgets::{ReplicationStatus, Spend, StatusQuery};
use redis_server::RedisServer;

fn open(dir: &Path, url: &str) -> Limiter {
    let mut c = Config::new()
        .budget("openai", Money::from_nanos(1 << 50), "1h".parse().unwrap())
        .data_dir(dir);
    c.node_id = Some("a".to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "evi".to_owned();
    r.sync_interval = Duration::from_secs(3600);
    r.connect_timeout = Duration::from_millis(500);
    r.command_timeout = Duration::from_millis(500);
    c.redis = Some(r);
    let now = Timestamp::now().as_second();
    let clock = FakeClock::new(Timestamp::from_second(now - now.rem_euclid(3600) + 1800).unwrap());
    Limiter::builder(c).clock(Arc::new(clock)).open().unwrap()
}

fn replication(l: &Limiter) -> ReplicationStatus {
    l.status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap()
        .replication
}

#[test]
fn an_allkeys_lru_redis_is_reported_evicting_and_a_default_one_is_not() {
    let args = ["--maxmemory-policy".to_owned(), "allkeys-lru".to_owned()];
    let Some(lru) = RedisServer::start_with(&args, u16::MAX, false) else {
        return;
    };
    let Some(plain) = RedisServer::start() else {
        return;
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = open(dirs[0].path(), &lru.url());
    let b = open(dirs[1].path(), &plain.url());
    for l in [&a, &b] {
        l.charge(Spend::provider("openai", Money::from_nanos(5)))
            .unwrap();
        l.sync().unwrap();
    }
    let (ra, rb) = (replication(&a), replication(&b));
    assert_eq!(ra.evicting, Some(true));
    assert_eq!(ra.maxmemory_policy.as_deref(), Some("allkeys-lru"));
    assert_eq!(rb.evicting, Some(false));
    assert_eq!(rb.maxmemory_policy.as_deref(), Some("noeviction"));
    assert_eq!((ra.data_loss, rb.data_loss), (0, 0));
}

#[test]
fn a_deleted_window_key_counts_one_data_loss_and_is_sent_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), &server.url());
    a.charge(Spend::provider("openai", Money::from_nanos(40)))
        .unwrap();
    for _ in 0..3 {
        a.sync().unwrap();
    }
    assert_eq!(replication(&a).data_loss, 0);
    let start = a
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap()
        .window
        .start()
        .as_second();
    let key = format!("evi:{{openai:1h}}:{start}");
    assert_eq!(server.command(&["HGET", &key, "a"]), "40");
    server.command(&["DEL", &key]);
    for _ in 0..2 {
        a.sync().unwrap();
    }
    assert_eq!(replication(&a).data_loss, 1);
    // Sent again: Redis holds it once more.
    assert_eq!(server.command(&["HGET", &key, "a"]), "40");
}
