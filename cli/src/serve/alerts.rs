//! Alerts delivered to webhooks (`provider_budgets.alerts.webhooks`), at least once, from a
//! durable outbox.
//!
//! * Sources: the library's soft-limit callback (once per fleet per budget, window and
//!   threshold where Redis is configured: the library claims each crossing in Redis; a
//!   threshold of 1 is reported as `exhausted`), and the forecast (module `forecast`).
//! * Outbox: `{data_dir}/outbox/`, one file per (alert, webhook), written to a temporary name,
//!   fsynced and renamed (then the dir fsynced), so a file is whole or absent. A file is
//!   removed once its receiver answered 2xx (or refused it for good with a 4xx other than
//!   408/429). Files left by an earlier run are delivered after a restart.
//! * Bounded: at most `alerts.outbox_cap` files; an alert beyond is dropped, counted
//!   (`provider_budgets_webhook_deliveries_total{outcome="dropped"}`) and logged.
//! * Delivery: one thread, one request at a time, each bounded by [`REQUEST_TIMEOUT`]; a
//!   failed one is retried with exponential backoff from [`FIRST_RETRY`] up to [`MAX_RETRY`].
//!   Every request carries `Idempotency-Key`: the same for an alert on every node and across
//!   restarts, so a receiver can drop repeats.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use provider_budgets::{AlertsConfig, Webhook, WebhookFormat};

/// Bound of one delivery request (connect, send, answer).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before the first retry of a failed delivery; doubled at each failure.
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Longest wait between two attempts.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(60);
/// Alerts waiting for the outbox thread; one more is dropped (counted) rather than blocking
/// the thread that charged a spend.
const QUEUE: usize = 1024;

/// One alert: the JSON body of a `format: json` webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Alert {
    /// The `Idempotency-Key`: stable per (kind, budget, window, threshold).
    pub id: String,
    /// `soft_limit`, `exhausted` or `forecast`.
    pub kind: String,
    pub scope: String,
    pub name: String,
    /// The budget's period part (`1d`, `1h@Europe/Paris`).
    pub period: String,
    /// The fraction of the limit crossed (1 for `exhausted`); `null` for `forecast`.
    pub threshold: Option<f64>,
    /// Spend and limit in the budget's unit, as decimal text.
    pub spend: String,
    pub limit: String,
    pub window_start: String,
    pub window_end: String,
    /// `forecast` only: seconds until the budget runs out at the current burn rate.
    pub eta_seconds: Option<f64>,
}

impl Alert {
    /// The key of an alert: every node derives the same one.
    pub(crate) fn key_of(
        kind: &str,
        scope: &str,
        name: &str,
        period: &str,
        start: i64,
        ppm: u64,
    ) -> String {
        let text = format!("{kind}\0{scope}\0{name}\0{period}\0{start}\0{ppm}");
        format!("pb-{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
    }

    /// From a crossed soft limit (a threshold of 1: `exhausted`).
    pub(crate) fn soft_limit(e: &provider_budgets::SoftLimitCrossed) -> Alert {
        let ppm = (e.soft_limit.fraction() * 1e6).round() as u64;
        let kind = if ppm == 1_000_000 {
            "exhausted"
        } else {
            "soft_limit"
        };
        let scope = e.scope.to_string();
        Alert {
            id: Alert::key_of(kind, &scope, &e.name, &e.period, e.window.start_secs(), ppm),
            kind: kind.to_owned(),
            scope,
            name: e.name.clone(),
            period: e.period.clone(),
            threshold: Some(e.soft_limit.fraction()),
            spend: e.spend.to_string(),
            limit: e.limit.to_string(),
            window_start: e.window.start().to_string(),
            window_end: e.window.end().to_string(),
            eta_seconds: None,
        }
    }

    /// The one line of a `format: slack` body.
    fn text(&self) -> String {
        let what = match (self.kind.as_str(), self.threshold) {
            ("forecast", _) => format!(
                "projected to run out in {} (before its window ends at {})",
                humantime::format_duration(Duration::from_secs(
                    self.eta_seconds.unwrap_or(0.0).max(0.0) as u64
                )),
                self.window_end
            ),
            ("exhausted", _) => "exhausted".to_owned(),
            (_, Some(t)) => format!("crossed its soft limit of {}%", t * 100.0),
            _ => self.kind.clone(),
        };
        format!(
            "Budget {} {} ({}) {what}: spend {} of {}.",
            self.scope, self.name, self.period, self.spend, self.limit
        )
    }
}

/// What the sidecar holds: a sender to the outbox thread.
#[derive(Debug, Clone)]
pub(crate) struct Alerts {
    tx: Option<SyncSender<Alert>>,
}

impl Alerts {
    /// Starts the outbox thread when webhooks are configured (and a data dir is set).
    pub(crate) fn start(config: &AlertsConfig, data_dir: Option<&Path>) -> Alerts {
        metrics::gauge!("provider_budgets_webhook_outbox").set(0.0);
        if config.webhooks.is_empty() {
            return Alerts { tx: None };
        }
        let Some(dir) = data_dir else {
            tracing::warn!(
                "alerts.webhooks need a data dir for their outbox; no alert is delivered"
            );
            return Alerts { tx: None };
        };
        let outbox = match Outbox::open(dir.join("outbox"), config) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the alert outbox; no alert is delivered");
                return Alerts { tx: None };
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("provider-budgets-webhooks".into())
            .spawn(move || outbox.run(&rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the webhook thread; no alert is delivered");
            return Alerts { tx: None };
        }
        Alerts { tx: Some(tx) }
    }

    /// Whether alerts go anywhere.
    pub(crate) fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands an alert to the outbox thread (never blocks).
    pub(crate) fn send(&self, alert: Alert) {
        let Some(tx) = &self.tx else { return };
        if let Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) = tx.try_send(alert) {
            dropped(&a, "the outbox thread is behind");
        }
    }
}

fn dropped(a: &Alert, why: &str) {
    metrics::counter!("provider_budgets_webhook_deliveries_total", "outcome" => "dropped")
        .increment(1);
    tracing::warn!(kind = %a.kind, scope = %a.scope, name = %a.name, period = %a.period, "alert dropped: {why}");
}

/// A pending delivery as stored: the alert and which webhook (by a hash of its URL, so a
/// config that dropped the webhook drops its deliveries).
#[derive(Serialize, Deserialize)]
struct Stored {
    webhook: String,
    alert: Alert,
}

/// When a pending file is tried next.
struct Pending {
    attempts: u32,
    due: Instant,
}

struct Outbox {
    dir: PathBuf,
    webhooks: Vec<Webhook>,
    cap: usize,
    agent: ureq::Agent,
    /// File name → retry state; the files on disk are the truth.
    pending: HashMap<String, Pending>,
    /// Webhooks (by id) whose last delivery failed: a failure is logged once per outage.
    down: std::collections::HashSet<String>,
}

fn webhook_id(w: &Webhook) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(w.url.as_bytes()))
}

impl Outbox {
    fn open(dir: PathBuf, config: &AlertsConfig) -> std::io::Result<Outbox> {
        std::fs::create_dir_all(&dir)?;
        let mut agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false);
        if config.webhooks.iter().any(|w| is_https(&w.url)) {
            agent = agent.tls_config(tls());
        }
        let agent = agent.build().new_agent();
        let mut pending = HashMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                // A write cut by a crash: never renamed, so never promised.
                let _ = std::fs::remove_file(dir.join(&name));
            } else if name.ends_with(".json") {
                pending.insert(
                    name,
                    Pending {
                        attempts: 0,
                        due: Instant::now(),
                    },
                );
            }
        }
        if !pending.is_empty() {
            tracing::info!(target: "provider_budgets::lifecycle", pending = pending.len(), "alerts left in the outbox by an earlier run: delivering them");
        }
        Ok(Outbox {
            dir,
            webhooks: config.webhooks.clone(),
            cap: config.outbox_cap,
            agent,
            pending,
            down: std::collections::HashSet::new(),
        })
    }

    fn gauge(&self) {
        metrics::gauge!("provider_budgets_webhook_outbox").set(self.pending.len() as f64);
    }

    fn run(mut self, rx: &Receiver<Alert>) {
        self.gauge();
        loop {
            let now = Instant::now();
            let wait = self
                .pending
                .values()
                .map(|p| p.due.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(3600));
            match rx.recv_timeout(wait) {
                Ok(a) => self.add(&a),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(a) = rx.try_recv() {
                self.add(&a);
            }
            self.deliver_due();
        }
    }

    /// Writes one file per webhook for `a` (durably) unless already pending.
    fn add(&mut self, a: &Alert) {
        for w in &self.webhooks {
            let id = webhook_id(w);
            let name = format!("{}.{id}.json", a.id);
            if self.pending.contains_key(&name) {
                continue;
            }
            if self.pending.len() >= self.cap {
                dropped(
                    a,
                    "the outbox is full (alerts.outbox_cap); a receiver is down?",
                );
                continue;
            }
            let stored = Stored {
                webhook: id,
                alert: a.clone(),
            };
            match write_atomic(&self.dir, &name, &stored) {
                Ok(()) => {
                    self.pending.insert(
                        name,
                        Pending {
                            attempts: 0,
                            due: Instant::now(),
                        },
                    );
                }
                Err(e) => dropped(a, &format!("cannot write the outbox: {e}")),
            }
        }
        self.gauge();
    }

    fn deliver_due(&mut self) {
        let now = Instant::now();
        let mut due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        due.sort_unstable();
        for name in due {
            let outcome = self.attempt(&name);
            metrics::counter!("provider_budgets_webhook_deliveries_total", "outcome" => outcome)
                .increment(1);
            if outcome == "failed" {
                if let Some(p) = self.pending.get_mut(&name) {
                    p.attempts = p.attempts.saturating_add(1);
                    p.due = Instant::now() + backoff(p.attempts);
                }
            } else {
                self.pending.remove(&name);
                let _ = std::fs::remove_file(self.dir.join(&name));
            }
        }
        self.gauge();
    }

    /// One attempt: `delivered`, `rejected` (a 4xx but 408/429: not retried) or `failed`.
    fn attempt(&mut self, name: &str) -> &'static str {
        let stored: Stored = match std::fs::read(self.dir.join(name))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = name, error = %e, "unreadable outbox file; removed");
                return "rejected";
            }
        };
        let Some(w) = self
            .webhooks
            .iter()
            .find(|w| webhook_id(w) == stored.webhook)
        else {
            tracing::warn!(
                file = name,
                "outbox file for a webhook no longer configured; removed"
            );
            return "rejected";
        };
        let body = match w.format {
            WebhookFormat::Slack => serde_json::json!({ "text": stored.alert.text() }).to_string(),
            _ => serde_json::to_string(&stored.alert).unwrap_or_default(),
        };
        let mut req = self
            .agent
            .post(&w.url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", &stored.alert.id);
        for (k, v) in &w.headers {
            req = req.header(k, v);
        }
        let url = provider_budgets::redact_urls(&w.url);
        let id = stored.webhook;
        match req.send(body.as_bytes()) {
            Ok(r) if r.status().is_success() => {
                if self.down.remove(&id) {
                    tracing::info!(target: "provider_budgets::lifecycle", %url, "webhook reachable again");
                }
                "delivered"
            }
            Ok(r) if r.status().is_client_error() && ![408, 429].contains(&r.status().as_u16()) => {
                tracing::error!(%url, status = r.status().as_u16(), key = %stored.alert.id, "webhook refused the alert; not retried");
                "rejected"
            }
            Ok(r) => {
                self.failed(id, &url, &format!("status {}", r.status().as_u16()));
                "failed"
            }
            Err(e) => {
                self.failed(id, &url, &provider_budgets::redact_urls(&e.to_string()));
                "failed"
            }
        }
    }

    /// Logs a failed delivery once per outage of its webhook (retries are counted, not logged).
    fn failed(&mut self, webhook: String, url: &str, error: &str) {
        if self.down.insert(webhook) {
            tracing::warn!(%url, %error, "webhook delivery failed; retrying with backoff (logged once until it answers)");
        }
    }
}

fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// TLS for `https://` webhooks: rustls with ring (as the library's `rediss://`), trusting the
/// system's root certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set).
fn tls() -> ureq::tls::TlsConfig {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let found = rustls_native_certs::load_native_certs();
    if let Some(e) = found.errors.first() {
        tracing::warn!(error = %e, "some system root certificates could not be read (https webhooks)");
    }
    let roots: Vec<Certificate<'static>> = found
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    if roots.is_empty() {
        tracing::warn!(
            "no system root certificate found: https webhooks will fail (set SSL_CERT_FILE)"
        );
    }
    TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&roots))
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .build()
}

/// The wait after the `attempts`-th failure: doubling from [`FIRST_RETRY`], at most
/// [`MAX_RETRY`].
fn backoff(attempts: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

/// Writes `value` as `dir/name`: a temporary file, fsynced, renamed, the dir fsynced.
fn write_atomic(dir: &Path, name: &str, value: &Stored) -> std::io::Result<()> {
    let tmp = dir.join(format!(".tmp-{name}"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), FIRST_RETRY);
        assert_eq!(backoff(2), FIRST_RETRY * 2);
        assert_eq!(backoff(5), FIRST_RETRY * 16);
        assert_eq!(backoff(40), MAX_RETRY);
    }

    #[test]
    fn keys_are_stable_and_differ_per_alert() {
        // Pinned: a key must not change between versions (a pending alert keeps its key).
        let k = Alert::key_of(
            "soft_limit",
            "provider",
            "openai",
            "1d",
            1_714_521_600,
            500_000,
        );
        assert_eq!(
            k,
            Alert::key_of(
                "soft_limit",
                "provider",
                "openai",
                "1d",
                1_714_521_600,
                500_000
            )
        );
        assert_eq!(k, "pb-fc82551d4c531ce970862f573e551c3d");
        assert_ne!(
            k,
            Alert::key_of(
                "soft_limit",
                "provider",
                "openai",
                "1d",
                1_714_521_600,
                900_000
            )
        );
        assert_ne!(
            k,
            Alert::key_of(
                "soft_limit",
                "provider",
                "openai",
                "1d",
                1_714_608_000,
                500_000
            )
        );
        assert_ne!(
            k,
            Alert::key_of(
                "exhausted",
                "provider",
                "openai",
                "1d",
                1_714_521_600,
                500_000
            )
        );
    }

    #[test]
    fn slack_text_says_what_happened() {
        let a = Alert {
            id: "pb-x".into(),
            kind: "forecast".into(),
            scope: "team".into(),
            name: "research".into(),
            period: "1mo".into(),
            threshold: None,
            spend: "60".into(),
            limit: "100".into(),
            window_start: "2024-05-01T00:00:00Z".into(),
            window_end: "2024-06-01T00:00:00Z".into(),
            eta_seconds: Some(7200.0),
        };
        let t = a.text();
        assert!(
            t.contains("team research (1mo)") && t.contains("2h") && t.contains("60 of 100"),
            "{t}"
        );
    }
}
