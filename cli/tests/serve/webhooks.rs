//! Alerts delivered (`provider_budgets.alerts.webhooks`) to a real receiver on loopback:
//! JSON and Slack bodies, the idempotency header, exactly one delivery per alert, a receiver
//! down for a while (delivered when it is back, also across a sidecar restart), one delivery
//! for a fleet of two sidecars sharing Redis, and the exhaustion forecast.

use provider_budgets_test_support::cli::Cli;
use provider_budgets_test_support::redis_server::RedisServer;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::api::{Server, DEADLINE};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: HashMap<String, String>,
    body: Value,
}

/// An HTTP receiver on 127.0.0.1 answering 200 to every request and keeping them.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// On a port found free earlier (retried while the kernel still holds it).
    fn at(port: u16) -> Receiver {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => return Receiver::on(l),
                Err(e) => assert!(Instant::now() < deadline, "bind {port}: {e}"),
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn on(listener: TcpListener) -> Receiver {
        Receiver::serving(listener, None)
    }

    /// Over TLS with `tls` (the server's certificate and key).
    fn tls(tls: Arc<rustls::ServerConfig>) -> Receiver {
        Receiver::serving(TcpListener::bind("127.0.0.1:0").unwrap(), Some(tls))
    }

    fn serving(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, halt) = (Arc::clone(&got), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let got = match &tls {
                    None => serve_one(c),
                    Some(cfg) => rustls::ServerConnection::new(Arc::clone(cfg))
                        .ok()
                        .and_then(|s| serve_one(rustls::StreamOwned::new(s, c))),
                };
                if let Some(g) = got {
                    sink.lock().unwrap().push(g);
                }
            }
        });
        Receiver { port, got, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}/hook", self.port)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests came; returns them all.
    fn wait_for(&self, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} deliveries: {got:?}",
                got.len()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request (head and `Content-Length` body) and answers 200.
fn serve_one<S: Read + Write>(mut c: S) -> Option<Got> {
    let mut reader = BufReader::new(&mut c);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split(' ').nth(1)?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    drop(reader);
    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .ok()?;
    c.flush().ok()?;
    Some(Got {
        path,
        headers,
        body: serde_json::from_slice(&body).ok()?,
    })
}

fn config(url: &str, extra: &str) -> String {
    format!(
        "provider_budgets:
  budgets:
    - {{provider: openai, limit: 1, period: 1d, soft_limits: [0.5, 1]}}
  alerts:
    webhooks:
      - {{url: \"{url}\", headers: {{Authorization: \"Bearer hook-secret\"}}{extra}}}
"
    )
}

/// One sample of `/metrics` (`0` when the series is absent).
fn metric(s: &Server, name: &str, labels: &str) -> f64 {
    let text = s.get("/metrics").body;
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

fn wait_metric(s: &Server, name: &str, labels: &str, at_least: f64) {
    let deadline = Instant::now() + DEADLINE;
    while metric(s, name, labels) < at_least {
        assert!(
            Instant::now() < deadline,
            "{name}{{{labels}}} < {at_least}: {}",
            s.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every alert was delivered (outbox empty after `delivered` deliveries).
fn wait_delivered(s: &Server, delivered: f64) {
    wait_metric(
        s,
        "provider_budgets_webhook_deliveries_total",
        "outcome=\"delivered\"",
        delivered,
    );
    assert_eq!(metric(s, "provider_budgets_webhook_outbox", ""), 0.0);
}

fn key_ok(g: &Got) -> &str {
    let key = g.headers.get("idempotency-key").map_or("", String::as_str);
    assert!(key.starts_with("pb-") && key.len() == 35, "{g:?}");
    assert_eq!(g.body["id"], key, "{g:?}");
    key
}

#[test]
fn soft_limit_and_exhaustion_are_each_delivered_once_as_json_with_an_idempotency_key() {
    let r = Receiver::start();
    let s = Server::start(&config(&r.url(), ""), &[]);
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "0.6"})).status,
        200
    );
    let got = r.wait_for(1);
    let g = &got[0];
    key_ok(g);
    assert_eq!(g.path, "/hook");
    assert_eq!(g.headers["authorization"], "Bearer hook-secret");
    assert_eq!(g.headers["content-type"], "application/json");
    let b = &g.body;
    assert_eq!(
        (
            b["kind"].as_str(),
            b["scope"].as_str(),
            b["name"].as_str(),
            b["period"].as_str()
        ),
        (
            Some("soft_limit"),
            Some("provider"),
            Some("openai"),
            Some("1d")
        ),
        "{b}"
    );
    assert_eq!(b["threshold"], 0.5);
    assert_eq!(
        (b["spend"].as_str(), b["limit"].as_str()),
        (Some("0.6"), Some("1"))
    );
    assert_eq!(b["window_start"], "2024-05-01T00:00:00Z");
    assert_eq!(b["window_end"], "2024-05-02T00:00:00Z");
    assert!(b["eta_seconds"].is_null(), "{b}");

    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "0.5"})).status,
        200
    );
    let got = r.wait_for(2);
    assert_eq!(
        (
            got[1].body["kind"].as_str(),
            got[1].body["threshold"].as_f64()
        ),
        (Some("exhausted"), Some(1.0))
    );
    assert_ne!(key_ok(&got[0]), key_ok(&got[1]));
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "0.5"})).status,
        200
    );
    wait_delivered(&s, 2.0);
    assert_eq!(r.got().len(), 2, "{:?}", r.got());
    let log = stopped_log(s, "soft limit crossed");
    assert!(!log.contains("hook-secret"), "{log}");
}

#[test]
fn slack_format_posts_one_line_of_text() {
    let r = Receiver::start();
    let s = Server::start(&config(&r.url(), ", format: slack"), &[]);
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "0.6"})).status,
        200
    );
    let g = &r.wait_for(1)[0];
    let text = g.body["text"].as_str().unwrap_or_else(|| panic!("{g:?}"));
    assert_eq!(g.body.as_object().map(|o| o.len()), Some(1), "{g:?}");
    assert!(
        text.contains("openai") && text.contains("50%") && text.contains("0.6"),
        "{text}"
    );
    assert!(g.headers.contains_key("idempotency-key"), "{g:?}");
}

/// A port nothing listens on (for now).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_receiver_down_for_a_while_gets_the_alert_when_it_is_back() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let s = Server::start(&config(&url, ""), &[]);
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "0.6"})).status,
        200
    );
    wait_metric(
        &s,
        "provider_budgets_webhook_deliveries_total",
        "outcome=\"failed\"",
        2.0,
    );
    assert_eq!(metric(&s, "provider_budgets_webhook_outbox", ""), 1.0);
    let r = Receiver::at(port);
    let g = &r.wait_for(1)[0];
    key_ok(g);
    wait_delivered(&s, 1.0);
    assert_eq!(r.got().len(), 1);
    // One warning for the outage (not one per retry), one line when it is over.
    let log = stopped_log(s, "webhook reachable again");
    assert_eq!(log.matches("webhook delivery failed").count(), 1, "{log}");
}

#[test]
fn an_alert_pending_when_the_sidecar_is_killed_is_delivered_after_its_restart() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let s = Server::start(&config(&url, ""), &[]);
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "0.6"})).status,
        200
    );
    wait_metric(
        &s,
        "provider_budgets_webhook_deliveries_total",
        "outcome=\"failed\"",
        1.0,
    );
    let cli: Cli = s.take_cli();
    let outbox: Vec<_> = std::fs::read_dir(cli.data.join("outbox"))
        .unwrap()
        .collect();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    let r = Receiver::at(port);
    let s = Server::start_in(cli, &[]);
    let g = &r.wait_for(1)[0];
    key_ok(g);
    assert_eq!(g.body["kind"], "soft_limit");
    wait_delivered(&s, 1.0);
    assert_eq!(r.got().len(), 1);
}

#[test]
fn two_sidecars_sharing_redis_deliver_a_crossing_once_for_the_fleet() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let r = Receiver::start();
    let yaml = format!(
        "provider_budgets:
  redis: {{url: \"{}\", sync_interval: 50ms}}
  budgets:
    - {{provider: openai, limit: 1, period: 1d, soft_limits: [0.5]}}
  alerts:
    webhooks: [{{url: \"{}\"}}]
",
        redis.url(),
        r.url()
    );
    let a = Server::start(&yaml, &[]);
    let b = Server::start(&yaml, &[]);
    assert_eq!(
        a.spend(json!({"provider": "openai", "cost": "0.6"})).status,
        200
    );
    r.wait_for(1);
    assert_eq!(
        b.spend(json!({"provider": "openai", "cost": "0.6"})).status,
        200
    );
    // B crossed 0.5 on its own spend too, and lost the claim to A.
    wait_metric(
        &b,
        "provider_budgets_soft_limit_claimed_elsewhere_total",
        "",
        1.0,
    );
    wait_delivered(&a, 1.0);
    assert_eq!(metric(&b, "provider_budgets_webhook_outbox", ""), 0.0);
    assert_eq!(r.got().len(), 1, "{:?}", r.got());
}

#[test]
fn a_budget_burning_fast_gets_an_eta_and_one_forecast_alert() {
    let r = Receiver::start();
    let yaml = format!(
        "provider_budgets:
  budgets:
    - {{provider: openai, limit: 100, period: 1d}}
  alerts:
    lead_time: 10h
    webhooks: [{{url: \"{}\"}}]
",
        r.url()
    );
    let s = Server::start(&yaml, &[]);
    let eta = "provider_budgets_exhaustion_eta_seconds";
    let labels = "provider=\"openai\",period=\"1d\",unit=\"usd\"";
    // 12 h into the day (the sidecar's clock is fixed): 10 USD spent, 90 left at 10 per 12 h.
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "10"})).status,
        200
    );
    wait_metric(&s, eta, labels, 1.0);
    let deadline = Instant::now() + DEADLINE;
    while (metric(&s, eta, labels) - 388_800.0).abs() > 1.0 {
        assert!(Instant::now() < deadline, "{}", s.get("/metrics").body);
        thread::sleep(Duration::from_millis(50));
    }
    // 60 spent: 40 left at 60 per 12 h runs out in 8 h, before the day ends, within 10 h.
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "50"})).status,
        200
    );
    let g = &r.wait_for(1)[0];
    key_ok(g);
    assert_eq!(g.body["kind"], "forecast");
    assert_eq!(g.body["eta_seconds"], 28_800.0);
    assert!(g.body["threshold"].is_null());
    assert!((metric(&s, eta, labels) - 28_800.0).abs() < 1.0);
    // Later forecasts of the same window send nothing more.
    thread::sleep(Duration::from_millis(2500));
    wait_delivered(&s, 1.0);
    assert_eq!(r.got().len(), 1, "{:?}", r.got());
}

/// Replication needs the real clock (with `--now` the window's keys in Redis would expire at
/// once): any time of day works, as 99.99 of 100 spent runs out long before the day ends.
#[test]
fn two_sidecars_sharing_redis_send_a_forecast_once_for_the_fleet() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let r = Receiver::start();
    let yaml = format!(
        "provider_budgets:
  redis: {{url: \"{}\", sync_interval: 50ms}}
  budgets:
    - {{provider: openai, limit: 100, period: 1d}}
  alerts:
    lead_time: 1d
    webhooks: [{{url: \"{}\"}}]
",
        redis.url(),
        r.url()
    );
    let serve = ["serve", "--listen", "127.0.0.1:0"];
    let a = Server::start_with(Cli::new(&yaml), &serve);
    let b = Server::start_with(Cli::new(&yaml), &serve);
    assert_eq!(
        a.spend(json!({"provider": "openai", "cost": "99.99"}))
            .status,
        200
    );
    let g = &r.wait_for(1)[0];
    assert_eq!(g.body["kind"], "forecast");
    // Both nodes forecast the fleet's spend: one wins the claim, the other loses it.
    let lost = "provider_budgets_once_claimed_elsewhere_total";
    let deadline = Instant::now() + DEADLINE;
    while metric(&a, lost, "") + metric(&b, lost, "") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "{}\n{}",
            a.get("/metrics").body,
            b.get("/metrics").body
        );
        thread::sleep(Duration::from_millis(20));
    }
    wait_delivered(&a, 0.0);
    wait_delivered(&b, 0.0);
    assert_eq!(r.got().len(), 1, "{:?}", r.got());
}

/// A CA (its PEM) and a server configuration with a certificate it signed for 127.0.0.1.
fn pki() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "webhook test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (ca_pem, Arc::new(config))
}

#[test]
fn an_https_webhook_is_delivered_over_tls_trusting_the_system_roots() {
    let (ca, tls) = pki();
    let r = Receiver::tls(tls);
    let cli = Cli::new(&config(&r.https_url(), ""));
    let ca_file = cli.write_config("ca.pem", &ca);
    let args = ["--now", super::api::NOW, "serve", "--listen", "127.0.0.1:0"];
    let env = [("SSL_CERT_FILE", ca_file.to_str().unwrap())];
    let s = Server::start_env(cli, &args, &env);
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "0.6"})).status,
        200
    );
    let g = &r.wait_for(1)[0];
    key_ok(g);
    assert_eq!(g.body["kind"], "soft_limit");
    wait_delivered(&s, 1.0);
}

#[test]
fn a_full_outbox_drops_new_alerts_with_a_count_and_a_warning() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let yaml = config(&url, "").replace("  alerts:\n", "  alerts:\n    outbox_cap: 1\n");
    let s = Server::start(&yaml, &[]);
    // Two crossings (0.5 and 1) while the receiver is down: the second finds the outbox full.
    assert_eq!(
        s.spend(json!({"provider": "openai", "cost": "1"})).status,
        200
    );
    let dropped = "outcome=\"dropped\"";
    wait_metric(
        &s,
        "provider_budgets_webhook_deliveries_total",
        dropped,
        1.0,
    );
    assert_eq!(metric(&s, "provider_budgets_webhook_outbox", ""), 1.0);
    let r = Receiver::at(port);
    assert_eq!(r.wait_for(1)[0].body["kind"], "soft_limit");
    wait_delivered(&s, 1.0);
    assert_eq!(r.got().len(), 1);
    let log = stopped_log(s, "alert dropped");
    assert!(log.contains("outbox is full"), "{log}");
}

/// Stops the sidecar (SIGTERM) and waits for its stderr (read to its end) to hold `line`.
fn stopped_log(mut s: Server, line: &str) -> String {
    s.signal("TERM");
    s.wait_exit(DEADLINE);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = s.stderr();
        if log.contains(line) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {line:?} in: {log}");
        thread::sleep(Duration::from_millis(20));
    }
}
