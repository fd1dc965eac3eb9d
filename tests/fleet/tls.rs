//! `rediss://` through a real TLS `redis-server` (`--tls-port`), with certificates generated
//! by the test (`rcgen`: a CA and a server certificate for 127.0.0.1): two nodes exact over
//! TLS with `tls.ca_file`, a wrong CA is one clear error line, an unreadable CA file fails at
//! open, the explicit test-only opt-out of verification works, and a URL whose scheme does not
//! match the server (`redis://` at the TLS port, `rediss://` at a plain server) says so.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::redis_server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use provider_budgets::{Config, Error, FakeClock, Limiter, Money, RedisConfig};
use provider_budgets::{Spend, StatusQuery};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use redis_server::RedisServer;

/// A CA (its PEM) and, when asked, a server certificate and key it signed for 127.0.0.1.
struct Pki {
    ca: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&key).unwrap().pem();
        Pki {
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// `(cert, key)` PEMs for a server at 127.0.0.1.
    fn server(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "redis test server");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A TLS redis-server (plus its plain loopback port for the harness) and the CA's file.
fn tls_server(files: &Path) -> Option<(RedisServer, PathBuf)> {
    let pki = Pki::new("provider-budgets test CA");
    let (cert, key) = pki.server();
    let ca = write(files, "ca.pem", &pki.ca);
    let cert = write(files, "server.pem", &cert);
    let key = write(files, "server.key", &key);
    let args: Vec<String> = vec![
        "--tls-port".into(),
        "{tls_port}".into(),
        "--tls-cert-file".into(),
        cert.display().to_string(),
        "--tls-key-file".into(),
        key.display().to_string(),
        "--tls-ca-cert-file".into(),
        ca.display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    let server = RedisServer::start_with(&args, u16::MAX, true)?;
    Some((server, ca))
}

fn config(dir: &Path, url: &str, node: &str, ca: Option<&Path>, insecure: bool) -> Config {
    let mut c = Config::new()
        .budget(
            "openai",
            Money::from_nanos(u64::MAX / 4),
            "1h".parse().unwrap(),
        )
        .data_dir(dir);
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "tls".into();
    r.sync_interval = Duration::from_secs(3600);
    r.connect_timeout = Duration::from_millis(1000);
    r.command_timeout = Duration::from_millis(1000);
    r.tls.ca_file = ca.map(Path::to_path_buf);
    r.tls.insecure_skip_verify = insecure;
    c.redis = Some(r);
    c
}

fn open(config: Config) -> Result<Limiter, Error> {
    Limiter::builder(config)
        .clock(Arc::new(FakeClock::new(Timestamp::now())))
        .open()
}

fn spend(l: &Limiter) -> u64 {
    l.status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap()
        .spend
        .as_nanos()
}

#[test]
fn two_nodes_are_exact_over_tls_with_a_private_ca() {
    let files = tempfile::tempdir().unwrap();
    let Some((server, ca)) = tls_server(files.path()) else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = server.tls_url();
    let a = open(config(da.path(), &url, "a", Some(&ca), false)).unwrap();
    let b = open(config(db.path(), &url, "b", Some(&ca), false)).unwrap();
    let mut total = 0;
    for k in 1..=50u64 {
        let node = if k % 2 == 0 { &a } else { &b };
        node.charge(Spend::provider("openai", Money::from_nanos(k * 1_001)))
            .unwrap();
        total += k * 1_001;
    }
    for _ in 0..2 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    assert_eq!(spend(&a), total);
    assert_eq!(spend(&b), total);
    // Client-side tracking works over TLS too: a clean round reads nothing, and b sees a's
    // new spend at its next round.
    b.sync().unwrap();
    let r = b
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap()
        .replication;
    assert!(r.tracking);
    assert_eq!(r.last_round.keys_unchanged, r.last_round.keys_read);
    a.charge(Spend::provider("openai", Money::from_nanos(7)))
        .unwrap();
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(spend(&b), total + 7);
    // It really went through the TLS port: plain RESP is not spoken there.
    let dc = tempfile::tempdir().unwrap();
    let plain = format!("redis://127.0.0.1:{}/", server.tls_port());
    let c = open(config(dc.path(), &plain, "c", None, false)).unwrap();
    assert!(c.sync().is_err());
}

#[test]
fn a_wrong_ca_is_one_clear_error_line() {
    let files = tempfile::tempdir().unwrap();
    let Some((server, _ca)) = tls_server(files.path()) else {
        return;
    };
    let other = write(files.path(), "other.pem", &Pki::new("another CA").ca);
    let url = server.tls_url();
    for ca in [Some(other.as_path()), None] {
        let dir = tempfile::tempdir().unwrap();
        let node = open(config(dir.path(), &url, "a", ca, false)).unwrap();
        node.charge(Spend::provider("openai", Money::from_nanos(3)))
            .unwrap();
        let err = node.sync().unwrap_err().to_string();
        eprintln!("{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains(&url), "{err}");
        assert!(
            err.contains("not signed by a trusted CA") && err.contains("tls.ca_file"),
            "{err}"
        );
        // Counting goes on locally.
        assert_eq!(spend(&node), 3);
    }
}

#[test]
fn an_unreadable_ca_file_fails_at_open_naming_it() {
    let files = tempfile::tempdir().unwrap();
    let missing = files.path().join("missing.pem");
    let not_pem = write(files.path(), "not.pem", "hello\n");
    let dir = tempfile::tempdir().unwrap();
    for path in [&missing, &not_pem] {
        let err = open(config(
            dir.path(),
            "rediss://127.0.0.1:1/",
            "a",
            Some(path),
            false,
        ))
        .map(drop)
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("provider_budgets.redis.tls.ca_file")
                && err.contains(&path.display().to_string())
                && !err.contains('\n'),
            "{err}"
        );
    }
}

#[test]
fn skipping_verification_is_an_explicit_opt_in_for_tests() {
    let files = tempfile::tempdir().unwrap();
    let Some((server, _ca)) = tls_server(files.path()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = open(config(dir.path(), &server.tls_url(), "a", None, true)).unwrap();
    node.charge(Spend::provider("openai", Money::from_nanos(9)))
        .unwrap();
    node.sync().unwrap();
    node.sync().unwrap();
    assert_eq!(spend(&node), 9);
}

/// The replication error a node reports for `url` after one failed round: from `sync`, and
/// the same text in `health()` and in every status row.
fn replication_error(url: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let node = open(config(dir.path(), url, "a", None, false)).unwrap();
    let err = node.sync().unwrap_err().to_string();
    assert_eq!(
        node.health().replication.last_error.as_deref(),
        Some(err.as_str())
    );
    for row in node.status(StatusQuery::all()) {
        assert_eq!(row.replication.last_error.as_deref(), Some(err.as_str()));
    }
    err
}

#[test]
fn a_scheme_that_does_not_match_the_server_says_so_without_the_password() {
    let files = tempfile::tempdir().unwrap();
    let Some((tls, _ca)) = tls_server(files.path()) else {
        return;
    };
    let Some(plain) = RedisServer::start() else {
        return;
    };
    let secret = "s3cret-pw";
    // redis:// at the TLS port: the server resets the connection (and answers a handshake).
    let url = format!("redis://:{secret}@127.0.0.1:{}/", tls.tls_port());
    let err = replication_error(&url);
    assert!(
        err.contains("is the server TLS? it answers a TLS handshake, but the URL says redis://"),
        "{err}"
    );
    // rediss:// at a plain server: the handshake times out (the server waits for a line).
    let url = format!("rediss://:{secret}@127.0.0.1:{}/", plain.port());
    let err = replication_error(&url);
    assert!(
        err.contains("the URL says rediss:// but the server does not speak TLS"),
        "{err}"
    );
    // A matching scheme that fails for another reason gets no hint: nobody listens, or a
    // plain server refuses the password.
    let closed = format!("rediss://:{secret}@127.0.0.1:{}/", free_port());
    plain.command(&["CONFIG", "SET", "requirepass", "another"]);
    let wrong_password = format!("redis://:{secret}@127.0.0.1:{}/", plain.port());
    for url in [closed, wrong_password] {
        let err = replication_error(&url);
        assert!(!err.contains("the URL says"), "{err}");
    }
    for err in [
        replication_error(&format!("redis://:{secret}@127.0.0.1:{}/", tls.tls_port())),
        replication_error(&format!("rediss://:{secret}@127.0.0.1:{}/", plain.port())),
    ] {
        assert!(!err.contains(secret) && err.contains(":***@"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

/// A loopback port nobody listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
