//! The HTTP sidecar (`provider-budgets serve`) against a real server process on an ephemeral
//! loopback port, through a real HTTP client (ureq): every route, every error status, the
//! body limit, bounded concurrency, idempotent retries, `/metrics` equal to the status, and
//! SIGTERM under load keeping every acknowledged durable spend.
//!
//! The server runs with `--now` (a fixed clock), so windows and `Retry-After` are exact.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::cli;
use provider_budgets_test_support::redis_server;
use provider_budgets_test_support::tmpfs;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use cli::Cli;
use serde_json::{json, Value};

pub(super) const NOW: &str = "2024-05-01T12:00:00Z";
const NANOS: u64 = 1_000_000_000;
pub(super) const CONFIG: &str = "provider_budget_config:
  openai: {budget_limit: 1, time_period: 1d}
  anthropic: {budget_limit: 10, time_period: 1h}
";
pub(super) const DEADLINE: Duration = Duration::from_secs(20);

/// A running `provider-budgets serve` child; killed on drop.
pub(super) struct Server {
    pub(super) cli: Cli,
    child: Option<Child>,
    pub(super) base: String,
    pub(super) agent: ureq::Agent,
    stderr: Arc<std::sync::Mutex<String>>,
}

/// One answer.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: HashMap<String, String>,
    pub(super) body: String,
}

impl Reply {
    pub(super) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("JSON body: {e}: {self:?}"))
    }

    /// A 4xx/5xx error body: exactly `{"error": "<one line>"}` (plus `counted` for spends).
    pub(super) fn assert_error(&self, status: u16, contains: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.headers.get("content-type").map(String::as_str),
            Some("application/json"),
            "{self:?}"
        );
        let doc = self.json();
        let reason = doc["error"].as_str().unwrap_or_else(|| panic!("{self:?}"));
        assert!(!reason.contains('\n'), "{self:?}");
        assert!(reason.contains(contains), "{contains:?} not in {self:?}");
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    )
}

impl Server {
    pub(super) fn start(yaml: &str, serve_args: &[&str]) -> Server {
        Server::start_in(Cli::new(yaml), serve_args)
    }

    pub(super) fn start_in(cli: Cli, serve_args: &[&str]) -> Server {
        let mut args = vec!["--now", NOW, "serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(serve_args);
        Server::start_with(cli, &args)
    }

    /// Starts `provider-budgets ARGS` (which must run `serve`).
    pub(super) fn start_with(cli: Cli, args: &[&str]) -> Server {
        Server::start_env(cli, args, &[])
    }

    /// [`Server::start_with`] with environment variables set.
    pub(super) fn start_env(cli: Cli, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = cli.cmd(args);
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn provider-budgets serve");
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(std::sync::Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr_pipe).read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {} // keep the pipe drained
        });
        let line = match rx.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no ready line; stderr: {}", stderr.lock().unwrap());
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("ready line {line:?}"));
        Server {
            cli,
            child: Some(child),
            base: format!("http://{addr}"),
            agent: agent(),
            stderr,
        }
    }

    fn addr(&self) -> &str {
        self.base.strip_prefix("http://").unwrap()
    }

    pub(super) fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut r = r.unwrap_or_else(|e| panic!("HTTP request failed: {e}"));
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        Reply {
            status: r.status().as_u16(),
            headers,
            body: r.body_mut().read_to_string().unwrap(),
        }
    }

    pub(super) fn post(&self, path: &str, body: &str) -> Reply {
        Server::reply(
            self.agent
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .send(body),
        )
    }

    pub(super) fn get(&self, path: &str) -> Reply {
        Server::reply(self.agent.get(format!("{}{path}", self.base)).call())
    }

    pub(super) fn spend(&self, body: Value) -> Reply {
        self.post("/v1/spend", &body.to_string())
    }

    pub(super) fn filter(&self, deployments: Value) -> Reply {
        self.post(
            "/v1/filter",
            &json!({ "deployments": deployments }).to_string(),
        )
    }

    /// Exact spend of `provider` from `GET /v1/budgets`.
    pub(super) fn spend_nanos(&self, provider: &str) -> u64 {
        let doc = self.get("/v1/budgets").json();
        doc["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["provider"] == provider)
            .and_then(|b| b["spend_nanos"].as_u64())
            .unwrap_or_else(|| panic!("no budget {provider}: {doc}"))
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` (`TERM`, `INT`, `HUP`) with kill(1): the crate forbids `unsafe`.
    pub(super) fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig}");
    }

    /// Waits for the child to exit (bounded).
    pub(super) fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < within,
                "server still running {within:?} after the signal; stderr: {}",
                self.stderr.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- filter -----------------------------------------------------------------------------------

#[test]
fn filter_keeps_order_and_fields_and_429_names_each_exhausted_budget_with_retry_after() {
    let s = Server::start(CONFIG, &[]);
    let candidates = json!([
        {"model": "gpt-4o", "id": "a"},
        {"model": "claude-3-5-sonnet"},
        {"model": "gpt-4o", "provider": "groq", "id": "b"},
        {"model": "llama-3"},
    ]);
    let r = s.filter(candidates.clone());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({ "deployments": candidates }));

    // Exhaust openai exactly: ten tenths.
    for _ in 0..10 {
        assert_eq!(
            s.spend(json!({"provider": "openai", "cost": 0.1})).status,
            200
        );
    }
    let r = s.filter(candidates);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["deployments"],
        json!([
            {"model": "claude-3-5-sonnet"},
            {"model": "gpt-4o", "provider": "groq", "id": "b"},
            {"model": "llama-3"},
        ]),
        "openai's gpt-4o dropped; the same model on a provider without budget kept"
    );

    // Nothing left: 429, the budget, its reset and Retry-After (12:00 -> midnight = 12 h).
    let r = s.filter(json!([{"model": "gpt-4o"}, {"model": "openai/gpt-4o-mini"}]));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.headers.get("retry-after").map(String::as_str),
        Some("43200")
    );
    let doc = r.json();
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .starts_with("No deployments available"),
        "{doc}"
    );
    assert_eq!(
        doc["exceeded"],
        json!([{
            "provider": "openai", "scope": "provider", "name": "openai", "period": "1d",
            "refused_by": "limit",
            "spend": 1.0, "limit": 1.0, "grant": null,
            "spend_nanos": NANOS, "limit_nanos": NANOS, "grant_nanos": null, "unit": "usd",
            "resets_at": "2024-05-02T00:00:00Z",
        }])
    );

    // The earliest reset wins: anthropic's hourly window ends at 13:00.
    assert_eq!(
        s.spend(json!({"provider": "anthropic", "cost": "10"}))
            .status,
        200
    );
    let r = s.filter(json!([{"model": "gpt-4o"}, {"model": "claude-3-5-sonnet"}]));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.headers.get("retry-after").map(String::as_str),
        Some("3600")
    );
    assert_eq!(r.json()["exceeded"].as_array().unwrap().len(), 2);

    // An empty list is not an error.
    let r = s.filter(json!([]));
    assert_eq!((r.status, r.json()), (200, json!({"deployments": []})));
}

/// Budget model v2 over HTTP: `/v1/filter` takes `"tags"` and deployment ids, `/v1/spend`
/// takes a `"deployment"` and `"tags"` and charges every budget that applies.
#[test]
fn filter_and_spend_with_deployment_ids_and_tags_charge_every_applicable_budget() {
    let s = Server::start(
        "provider_budget_config:
  openai: {budget_limit: 10, time_period: 1d}
tag_budget_config:
  team-a: {max_budget: 1, budget_duration: 1h}
model_list:
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o, max_budget: 2, budget_duration: 1d}
    model_info: {id: east}
",
        &[],
    );
    let east = json!({"model": "openai/gpt-4o", "id": "east"});
    let west = json!({"model": "openai/gpt-4o", "id": "west"});
    let r = s.spend(json!({"deployment": east, "tags": ["team-a"], "cost": "0.5"}));
    assert_eq!(
        (r.status, r.json()["counted"].clone()),
        (200, json!(true)),
        "{r:?}"
    );
    let r = s.spend(json!({"deployment": east, "cost": "1.5"}));
    assert_eq!(r.status, 200, "{r:?}");
    // east's own budget is spent (2 of 2); west passes.
    let r = s.post(
        "/v1/filter",
        &json!({"deployments": [east, west], "tags": ["other"]}).to_string(),
    );
    assert_eq!(r.json(), json!({"deployments": [west]}), "{r:?}");
    let r = s.spend(json!({"deployment": west, "tags": ["team-a", "x"], "cost": "0.5"}));
    assert_eq!(r.status, 200, "{r:?}");
    // team-a is spent (1 of 1): nothing for its requests; the earliest reset is the tag's hour.
    let r = s.post(
        "/v1/filter",
        &json!({"deployments": [east, west], "tags": ["team-a"]}).to_string(),
    );
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.headers.get("retry-after").map(String::as_str),
        Some("3600")
    );
    let doc = r.json();
    let names: Vec<(String, String)> = doc["exceeded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["scope"].as_str().unwrap().into(),
                e["name"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("tag".to_string(), "team-a".to_string()),
            ("deployment".into(), "east".into())
        ]
    );
    assert!(doc["exceeded"][0]["provider"].is_null(), "{doc}");
    // Spend per budget: openai got all three, east two, the tag two.
    let doc = s.get("/v1/budgets").json();
    let spend: Vec<(String, u64)> = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().into(),
                b["spend_nanos"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        spend,
        [
            ("openai".to_string(), 2_500_000_000),
            ("east".into(), 2_000_000_000),
            ("team-a".into(), 1_000_000_000),
        ]
    );
    // A charge that matches no budget is not an error, and says so.
    let r = s.spend(json!({"deployment": {"model": "claude-3-5-sonnet"}, "cost": 1}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["counted"], false);
    // Bad shapes: one line each, nothing counted.
    s.spend(json!({"deployment": east, "provider": "openai", "cost": 1}))
        .assert_error(400, "either \"provider\" or \"deployment\"");
    s.spend(json!({"provider": "openai", "tags": ["a"], "cost": 1}))
        .assert_error(400, "tags: only with \"deployment\"");
    s.spend(json!({"cost": 1}))
        .assert_error(400, "missing \"deployment\"");
    s.spend(json!({"deployment": {"model": ""}, "cost": 1}))
        .assert_error(400, "deployment.model: empty");
    assert_eq!(s.spend_nanos("openai"), 2_500_000_000);
}

// ---- spend ------------------------------------------------------------------------------------

#[test]
fn spend_is_exact_to_the_nano_dollar_in_every_json_form() {
    let s = Server::start(CONFIG, &[]);
    let costs = [
        json!(0.1),
        json!("0.1"),
        json!(1.5e-5),                               // Python writes 1.5e-05
        Value::from(serde_json::Number::from(3u64)), // an integer
        json!("2.5E-3"),
        json!("0.000000001"),
    ];
    let mut expected = 0;
    for (i, cost) in costs.iter().enumerate() {
        let durable = i % 2 == 0;
        let r = s.spend(json!({"provider": "anthropic", "cost": cost, "durable": durable}));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json(), json!({"counted": true}));
        expected += [100_000_000, 100_000_000, 15_000, 3 * NANOS, 2_500_000, 1][i];
    }
    // A float printer's digits are taken as written (no f64 on the way): 17 significant
    // digits round at the ninth decimal, so 0.30000000000000004 is 0.3 exactly.
    let raw = r#"{"provider":"anthropic","cost":0.30000000000000004}"#;
    assert_eq!(s.post("/v1/spend", raw).status, 200);
    expected += 300_000_000;
    assert_eq!(s.spend_nanos("anthropic"), expected);

    // `at` places the spend in another window: the previous hour's, not this one.
    let r = s.spend(json!({"provider": "anthropic", "cost": 1, "at": "2024-05-01T11:30:00Z"}));
    assert_eq!(r.status, 200, "{r:?}");
    let r = s.spend(json!({"provider": "anthropic", "cost": 1, "at": 1714562000, "durable": true}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.spend_nanos("anthropic"), expected);

    // A provider without a budget: 200, not counted.
    let r = s.spend(json!({"provider": "groq", "cost": 1}));
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["counted"], false, "{doc}");
    assert!(doc["reason"].as_str().unwrap().contains("groq"), "{doc}");
}

#[test]
fn bad_requests_are_4xx_with_one_line_json_and_record_nothing() {
    let s = Server::start(CONFIG, &[]);
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/spend", "{", 400, "invalid JSON body"),
        ("/v1/spend", "", 400, "invalid JSON body"),
        ("/v1/spend", "[1]", 400, "invalid JSON body"),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1,"costs":2}"#,
            400,
            "unknown field `costs`",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai"}"#,
            400,
            "missing field `cost`",
        ),
        (
            "/v1/spend",
            r#"{"cost":1}"#,
            400,
            "missing \"deployment\" (or \"provider\")",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":-0.5}"#,
            400,
            "negative",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":"-1e-3"}"#,
            400,
            "negative",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":"NaN"}"#,
            400,
            "not a finite",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":"abc"}"#,
            400,
            "not a number",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1e300}"#,
            400,
            "too large",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1e9223372036854775807}"#,
            400,
            "too large",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":-1e9223372036854775807}"#,
            400,
            "negative",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":"-."}"#,
            400,
            "not a number",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":true}"#,
            400,
            "cost",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":null}"#,
            400,
            "cost",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1,"at":"yesterday"}"#,
            400,
            "at:",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1,"durable":"yes"}"#,
            400,
            "invalid type",
        ),
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1,"idempotency_key":""}"#,
            400,
            "idempotency_key",
        ),
        ("/v1/spend", r#"{"provider":"","cost":1}"#, 400, "provider"),
        // A window past retention (1 year before now): refused, nothing counted.
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1,"at":"2023-01-01T00:00:00Z"}"#,
            422,
            "retention",
        ),
        // Later than now plus five minutes: refused, nothing counted.
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1,"at":"9999-12-30T00:00:00Z"}"#,
            422,
            "at: record for \"openai\" at 9999-12-30T00:00:00Z is later than",
        ),
        // RFC 3339, only beyond what a timestamp holds: out of range.
        (
            "/v1/spend",
            r#"{"provider":"openai","cost":1,"at":"9999-12-31T00:00:00Z"}"#,
            400,
            "at: \"9999-12-31T00:00:00Z\" is out of range",
        ),
        ("/v1/filter", "{}", 400, "missing field `deployments`"),
        (
            "/v1/filter",
            r#"{"deployments":[{"modle":"x"}]}"#,
            400,
            "unknown field `modle`",
        ),
        (
            "/v1/filter",
            r#"{"deployments":"gpt-4o"}"#,
            400,
            "invalid type",
        ),
        ("/v1/nothing", "{}", 404, "no route POST /v1/nothing"),
        ("/v1/budgets", "{}", 405, "method POST not allowed"),
    ];
    for (path, body, status, reason) in cases {
        let r = s.post(path, body);
        r.assert_error(*status, reason);
    }
    // Over 64 KiB, even valid JSON: 413 before parsing.
    let pad = " ".repeat(64 * 1024);
    let big = format!(r#"{{"provider":"openai","cost":1{pad}}}"#);
    s.post("/v1/spend", &big)
        .assert_error(413, "over the limit of 65536 bytes");
    let r = s.get("/v1/spend");
    r.assert_error(405, "method GET not allowed");
    // Exactly at the limit is fine.
    let body = r#"{"provider":"openai","cost":0.25}"#;
    let padded = format!("{body}{}", " ".repeat(64 * 1024 - body.len()));
    assert_eq!(s.post("/v1/spend", &padded).status, 200);

    assert_eq!(
        s.spend_nanos("openai"),
        NANOS / 4,
        "only the last one counted"
    );
    assert_eq!(s.spend_nanos("anthropic"), 0);
}

#[test]
fn an_idempotency_key_is_counted_once_even_for_concurrent_retries() {
    let s = Server::start(CONFIG, &[]);
    let first = s.spend(json!({"provider": "anthropic", "cost": 1, "idempotency_key": "call-1"}));
    assert_eq!(
        (first.status, first.json()),
        (200, json!({"counted": true}))
    );
    for durable in [false, true] {
        let again = s.spend(json!({
            "provider": "anthropic", "cost": 1, "idempotency_key": "call-1", "durable": durable
        }));
        assert_eq!(
            (again.status, again.json()),
            (200, json!({"counted": true, "duplicate": true}))
        );
    }
    assert_eq!(s.spend_nanos("anthropic"), NANOS);

    // Eight clients racing with the same key (durable: the first waits for its fsync while
    // the others arrive), for 20 different keys.
    let base = s.base.clone();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let base = base.clone();
            thread::spawn(move || {
                let a = agent();
                let mut counted = 0;
                for k in 0..20 {
                    let body = json!({
                        "provider": "anthropic", "cost": "0.01", "durable": true,
                        "idempotency_key": format!("race-{k}"),
                    });
                    let mut r = a
                        .post(format!("{base}/v1/spend"))
                        .header("content-type", "application/json")
                        .send(body.to_string())
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                    let doc: Value =
                        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                    assert_eq!(doc["counted"], true);
                    if doc.get("duplicate").is_none() {
                        counted += 1;
                    }
                }
                counted
            })
        })
        .collect();
    let fresh: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(fresh, 20, "exactly one request per key was the counted one");
    assert_eq!(s.spend_nanos("anthropic"), NANOS + 20 * NANOS / 100);

    // A key whose first attempt counted nothing (expired window) runs again on retry.
    let old = json!({"provider": "anthropic", "cost": 1, "at": "2023-01-01T00:00:00Z",
                     "idempotency_key": "late"});
    assert_eq!(s.spend(old).status, 422);
    let retry = s.spend(json!({"provider": "anthropic", "cost": 1, "idempotency_key": "late"}));
    assert_eq!(
        (retry.status, retry.json()),
        (200, json!({"counted": true}))
    );
}

#[test]
fn concurrent_clients_are_all_counted() {
    let s = Server::start(CONFIG, &[]);
    let base = s.base.clone();
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let base = base.clone();
            thread::spawn(move || {
                let a = agent();
                for i in 0..60 {
                    let body = json!({"provider": "anthropic", "cost": "0.001",
                                      "durable": (i + t) % 3 == 0});
                    let r = a
                        .post(format!("{base}/v1/spend"))
                        .header("content-type", "application/json")
                        .send(body.to_string());
                    assert_eq!(r.unwrap().status().as_u16(), 200);
                    let f = json!({"deployments": [{"model": "claude-3-5-sonnet"}]});
                    let r = a
                        .post(format!("{base}/v1/filter"))
                        .header("content-type", "application/json")
                        .send(f.to_string());
                    assert_eq!(r.unwrap().status().as_u16(), 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(s.spend_nanos("anthropic"), 8 * 60 * NANOS / 1000);
}

#[test]
fn requests_beyond_max_in_flight_get_503_at_once() {
    let s = Server::start(CONFIG, &["--max-in-flight", "1"]);
    // A request that holds the only permit inside its handler: a reload whose config file is
    // now a FIFO with no writer (opening it blocks until the test writes the config).
    std::fs::remove_file(&s.cli.config).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&s.cli.config)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let base = s.base.clone();
    let holder = thread::spawn(move || {
        let mut r = agent().post(format!("{base}/v1/reload")).send("").unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    });
    // Wait (through /metrics, which is not bounded) until it is admitted and holds it.
    let deadline = Instant::now() + DEADLINE;
    while Prometheus::parse(&s.get("/metrics").body).value("provider_budgets_http_in_flight", "")
        < 1.0
    {
        assert!(Instant::now() < deadline, "the reload was not admitted");
        thread::sleep(Duration::from_millis(2));
    }
    let r = s.get("/v1/budgets");
    r.assert_error(503, "too many requests in flight");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    let f = s.filter(json!([{"model": "gpt-4o"}]));
    f.assert_error(503, "too many requests in flight");
    // Probes are not queued behind the API: health and metrics still answer.
    assert_eq!(s.get("/healthz").status, 200);
    let m = Prometheus::parse(&s.get("/metrics").body);
    assert!(m.value("provider_budgets_http_overloaded_total", "") >= 2.0);
    // Release it: the reload reads the same config and answers 200.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.cli.config)
        .unwrap()
        .write_all(CONFIG.as_bytes())
        .unwrap();
    let (status, body) = holder.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + DEADLINE;
    while s.get("/v1/budgets").status != 200 {
        assert!(Instant::now() < deadline, "permit not released");
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.spend_nanos("openai"), 0);
}

// ---- budgets, metrics, health -----------------------------------------------------------------

#[test]
fn budgets_is_the_cli_status_json_and_metrics_equal_it() {
    let mut s = Server::start(CONFIG, &[]);
    for (p, c) in [
        ("openai", "0.25"),
        ("anthropic", "1.125"),
        ("openai", "0.5"),
    ] {
        assert_eq!(
            s.spend(json!({"provider": p, "cost": c, "durable": true}))
                .status,
            200
        );
    }
    assert_eq!(s.filter(json!([{"model": "gpt-4o"}])).status, 200);
    let budgets = s.get("/v1/budgets");
    assert_eq!(budgets.status, 200);
    let doc = budgets.json();

    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/plain"), "{r:?}");
    let m = Prometheus::parse(&r.body);
    for b in doc["budgets"].as_array().unwrap() {
        let p = b["provider"].as_str().unwrap();
        let labels = format!(
            "provider=\"{p}\",period=\"{}\"",
            b["period"].as_str().unwrap()
        );
        for (metric, field) in [
            ("provider_budgets_spend_usd", "spend"),
            ("provider_budgets_limit_usd", "limit"),
            ("provider_budgets_remaining_usd", "remaining"),
        ] {
            assert_eq!(
                m.value(metric, &labels),
                b[field].as_f64().unwrap(),
                "{metric}{{{labels}}} vs {b}"
            );
            m.assert_described(metric, "gauge");
        }
    }
    assert_eq!(m.value("provider_budgets_records_total", ""), 3.0);
    m.assert_described("provider_budgets_records_total", "counter");
    assert_eq!(m.value("provider_budgets_filter_calls_total", ""), 1.0);
    m.assert_described("provider_budgets_journal_flush_seconds", "histogram");
    assert!(m.value("provider_budgets_journal_flush_seconds_count", "") >= 1.0);
    assert_eq!(m.value("provider_budgets_storage_fault", ""), 0.0);

    let h = s.get("/healthz");
    assert_eq!(h.status, 200);
    let hd = h.json();
    assert_eq!(hd["status"], "ok");
    assert_eq!(hd["node_id"], doc["node_id"]);
    assert_eq!(hd["replication"]["enabled"], false);

    // The same document as the CLI's `status --json` on the same data dir (after a clean stop).
    s.signal("INT");
    assert!(s.wait_exit(DEADLINE).success(), "{}", s.stderr());
    assert_eq!(s.cli.status_json(NOW), doc);
}

/// The samples of a Prometheus text exposition, with its HELP and TYPE lines.
struct Prometheus {
    samples: HashMap<(String, String), f64>,
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
}

impl Prometheus {
    fn parse(text: &str) -> Prometheus {
        let mut p = Prometheus {
            samples: HashMap::new(),
            types: HashMap::new(),
            helps: HashMap::new(),
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                p.helps.insert(name.into(), help.into());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                p.types.insert(name.into(), kind.into());
            } else {
                assert!(!line.starts_with('#'), "stray comment {line:?}");
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => (n, l.strip_suffix('}').unwrap()),
                    None => (series, ""),
                };
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|_| panic!("sample value in {line:?}"));
                p.samples.insert((name.into(), labels.into()), value);
            }
        }
        p
    }

    fn value(&self, name: &str, labels: &str) -> f64 {
        *self
            .samples
            .get(&(name.to_owned(), labels.to_owned()))
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}}"))
    }

    fn assert_described(&self, name: &str, kind: &str) {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some(kind),
            "{name}"
        );
        assert!(
            self.helps.get(name).is_some_and(|h| !h.is_empty()),
            "{name}"
        );
    }
}

// ---- shutdown ---------------------------------------------------------------------------------

#[test]
fn sigterm_under_load_exits_0_and_every_acknowledged_spend_is_on_disk() {
    let mut s = Server::start(CONFIG, &[]);
    let base = s.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    // Half the clients post durable spends (200 after their fsync), half buffered ones (200
    // at once, flushed at shutdown): every acknowledged one must be on disk after exit.
    let clients: Vec<_> = (0..6)
        .map(|t| {
            let (base, stop, acked, sent) = (
                base.clone(),
                Arc::clone(&stop),
                Arc::clone(&acked),
                Arc::clone(&sent),
            );
            thread::spawn(move || {
                let a = agent();
                let body = json!({"provider": "anthropic", "cost": "0.001", "durable": t % 2 == 0})
                    .to_string();
                while !stop.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::SeqCst);
                    match a
                        .post(format!("{base}/v1/spend"))
                        .header("content-type", "application/json")
                        .send(body.as_str())
                    {
                        Ok(r) if r.status().as_u16() == 200 => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        // After the signal: refused connections or 503s; keep trying until
                        // the test stops us, so requests race with the shutdown.
                        _ => thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        })
        .collect();
    // Let the load run until a good number of spends were acknowledged.
    let deadline = Instant::now() + DEADLINE;
    while acked.load(Ordering::SeqCst) < 200 {
        assert!(Instant::now() < deadline, "no load");
        thread::sleep(Duration::from_millis(5));
    }
    s.signal("TERM");
    let started = Instant::now();
    let status = s.wait_exit(Duration::from_secs(15));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(status.success(), "exit {status:?}; stderr: {}", s.stderr());
    assert!(took < Duration::from_secs(12), "shutdown took {took:?}");
    let acked = acked.load(Ordering::SeqCst);
    let sent = sent.load(Ordering::SeqCst);
    let on_disk = s.cli.spend_nanos(NOW, "anthropic");
    assert!(
        on_disk >= acked * 1_000_000,
        "acknowledged {acked} spends, only {} on disk",
        on_disk / 1_000_000
    );
    assert!(on_disk <= sent * 1_000_000, "{on_disk} > {sent} sent");
    assert_eq!(on_disk % 1_000_000, 0);
}

// ---- reload -----------------------------------------------------------------------------------

#[test]
fn reload_under_load_switches_limits_and_loses_no_spend() {
    let s = Server::start(
        "provider_budget_config:\n  openai: {budget_limit: 1000, time_period: 1d}\n",
        &[],
    );
    let base = s.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (base, stop, acked) = (base.clone(), Arc::clone(&stop), Arc::clone(&acked));
            thread::spawn(move || {
                let a = agent();
                let body =
                    json!({"provider": "openai", "cost": "0.001", "durable": t == 0}).to_string();
                while !stop.load(Ordering::Relaxed) {
                    let r = a
                        .post(format!("{base}/v1/spend"))
                        .header("content-type", "application/json")
                        .send(body.as_str());
                    assert_eq!(r.unwrap().status().as_u16(), 200);
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + DEADLINE;
    while acked.load(Ordering::SeqCst) < 100 {
        assert!(Instant::now() < deadline, "no load");
        thread::sleep(Duration::from_millis(2));
    }
    // Lower openai's limit below its spend and add anthropic, through the endpoint.
    std::fs::write(
        &s.cli.config,
        "provider_budget_config:\n  openai: {budget_limit: 0.05, time_period: 1d}\n  \
         anthropic: {budget_limit: 2, time_period: 1d}\n",
    )
    .unwrap();
    let r = s.post("/v1/reload", "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"reloaded": true, "budgets": 2, "added": ["anthropic"],
               "changed": ["openai"], "removed": []})
    );
    // The new limit applies at once, under load.
    let f = s.filter(json!([{"model": "gpt-4o"}]));
    assert_eq!(f.status, 429, "{f:?}");
    assert_eq!(
        s.spend(json!({"provider": "anthropic", "cost": 2})).status,
        200
    );
    let f = s.filter(json!([{"model": "claude-3-5-sonnet"}, {"model": "groq/llama"}]));
    assert_eq!(f.json()["deployments"], json!([{"model": "groq/llama"}]));

    // A broken file is refused (422) and the old config keeps running.
    std::fs::write(
        &s.cli.config,
        "provider_budget_config:\n  openai: {budget_limit: -1}\n",
    )
    .unwrap();
    s.post("/v1/reload", "")
        .assert_error(422, "config reload refused");
    assert_eq!(s.filter(json!([{"model": "gpt-4o"}])).status, 429);

    // SIGHUP reloads too: openai back to a high limit.
    std::fs::write(
        &s.cli.config,
        "provider_budget_config:\n  openai: {budget_limit: 1000, time_period: 1d}\n  \
         anthropic: {budget_limit: 2, time_period: 1d}\n",
    )
    .unwrap();
    s.signal("HUP");
    let deadline = Instant::now() + DEADLINE;
    while s.filter(json!([{"model": "gpt-4o"}])).status != 200 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload: {}",
            s.stderr()
        );
        thread::sleep(Duration::from_millis(5));
    }

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.load(Ordering::SeqCst);
    assert_eq!(s.spend_nanos("openai"), acked * 1_000_000, "no spend lost");
    assert_eq!(s.spend_nanos("anthropic"), 2 * NANOS);
}

#[test]
fn an_address_in_use_is_one_error_line_and_exit_1() {
    let s = Server::start(CONFIG, &[]);
    let other = Cli::new(CONFIG);
    let run = cli::Run::of(
        other
            .cmd(&["serve", "--listen", s.addr()])
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with(&format!("error: cannot listen on {}", s.addr())),
        "{run:?}"
    );
    assert!(run.stdout.is_empty(), "{run:?}");
}

// ---- storage faults -----------------------------------------------------------------------

/// A full disk under the sidecar: `/healthz` answers 503 naming the fault, a durable spend is
/// refused with 503 (but counted in memory, `"counted": true`), buffered spends keep counting;
/// once space is back, `/healthz` is 200 again without a restart and every counted spend is
/// there.
#[test]
fn healthz_is_503_while_the_disk_is_full_and_200_once_it_is_freed() {
    let Some(fs) = tmpfs::Tmpfs::mount("8m") else {
        return;
    };
    let mut cli =
        Cli::new("provider_budget_config:\n  openai: {budget_limit: 1000, time_period: 1d}\n");
    cli.data = fs.path().join("data");
    let server = Server::start_in(cli, &[]);
    assert_eq!(server.get("/healthz").status, 200);
    let filler = fs.fill();
    // Durable spends until sled runs out of the room it had: then 503, counted in memory.
    let mut refused = None;
    let mut counted = 0u64;
    for i in 0..100_000 {
        let r = server.spend(json!({"provider": "openai", "cost": "0.01", "durable": true, "idempotency_key": format!("k{i}")}));
        counted += 10_000_000;
        if r.status != 200 {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("a durable spend was refused on a full disk");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.json()["counted"], true, "{refused:?}");
    let health = server.get("/healthz");
    assert_eq!(health.status, 503, "{health:?}");
    assert!(health.body.contains("no space left"), "{health:?}");
    for _ in 0..10 {
        assert_eq!(
            server
                .spend(json!({"provider": "openai", "cost": "0.01"}))
                .status,
            200
        );
        counted += 10_000_000;
    }
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while server.get("/healthz").status != 200 {
        assert!(Instant::now() < deadline, "healthz did not recover");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.spend_nanos("openai"), counted);
    let r = server.spend(json!({"provider": "openai", "cost": "0.01", "durable": true}));
    assert_eq!(r.status, 200, "{r:?}");
}

// ---- reservations -----------------------------------------------------------------------------

impl Server {
    /// Stops the child (SIGKILL if still running) and hands back its data dir.
    pub(super) fn take_cli(mut self) -> Cli {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::mem::replace(&mut self.cli, Cli::new(CONFIG))
    }

    pub(super) fn reserve(&self, body: Value) -> Reply {
        self.post("/v1/reserve", &body.to_string())
    }

    /// `(spend_nanos, reserved_nanos)` of a provider budget from `GET /v1/budgets`.
    fn held(&self, provider: &str) -> (u64, u64) {
        let doc = self.get("/v1/budgets").json();
        let b = doc["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["provider"] == provider)
            .cloned()
            .unwrap_or_else(|| panic!("no budget {provider}: {doc}"));
        (
            b["spend_nanos"].as_u64().unwrap(),
            b["reserved_nanos"].as_u64().unwrap(),
        )
    }
}

#[test]
fn reserve_commit_release_are_idempotent_and_a_denial_is_the_filters_429() {
    let s = Server::start(CONFIG, &[]);
    // openai 1/d, anthropic 10/h. The first candidate with room is reserved, echoed as given.
    let r = s.reserve(json!({
        "deployments": [{"model": "gpt-4o", "ref": "east"}, {"model": "claude-3-5-sonnet"}],
        "estimate": "0.6",
    }));
    assert_eq!(r.status, 200, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["deployment"], json!({"model": "gpt-4o", "ref": "east"}));
    assert_eq!(doc["index"], 0);
    assert_eq!(doc["expires_at"], "2024-05-01T12:10:01Z", "10 min default");
    let first = doc["reservation"].as_str().unwrap().to_owned();
    assert_eq!(
        s.held("openai"),
        (0, 600_000_000),
        "status shows it as reserved"
    );

    // 0.6 + 0.5 > 1: the next candidate.
    let r = s.reserve(json!({
        "deployments": [{"model": "gpt-4o"}, {"model": "claude-3-5-sonnet"}],
        "estimate": 0.5,
    }));
    assert_eq!(
        (r.status, r.json()["index"].clone()),
        (200, json!(1)),
        "{r:?}"
    );
    let second = r.json()["reservation"].as_str().unwrap().to_owned();
    assert_ne!(first, second);

    // No candidate with room: 429 exactly as /v1/filter (what admission would reach).
    let r = s.reserve(json!({"deployments": [{"model": "gpt-4o"}], "estimate": "0.5"}));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.headers.get("retry-after").map(String::as_str),
        Some("43200")
    );
    assert_eq!(
        r.json()["exceeded"],
        json!([{
            "provider": "openai", "scope": "provider", "name": "openai", "period": "1d",
            "refused_by": "limit",
            "spend": 1.1, "limit": 1.0, "grant": null,
            "spend_nanos": 1_100_000_000u64, "limit_nanos": NANOS, "grant_nanos": null, "unit": "usd",
            "resets_at": "2024-05-02T00:00:00Z",
        }])
    );
    // Held money blocks /v1/filter too once at the limit.
    let last = s.reserve(json!({"provider": "openai", "estimate": "0.4"}));
    assert_eq!(
        (last.status, last.json()["deployment"].clone()),
        (200, json!("openai"))
    );
    assert_eq!(s.filter(json!([{"model": "gpt-4o"}])).status, 429);
    let last = last.json()["reservation"].as_str().unwrap().to_owned();
    let release = |id: &str| s.post("/v1/release", &json!({ "reservation": id }).to_string());
    assert_eq!(release(&last).status, 200);

    // Commit: exactly the cost; concurrent repeats get the same answer, counted once.
    let commit = json!({"reservation": first, "cost": "0.25"}).to_string();
    let answers: Vec<Reply> = thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|_| sc.spawn(|| s.post("/v1/commit", &commit)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut fresh = 0;
    for a in &answers {
        assert_eq!(a.status, 200, "{a:?}");
        let doc = a.json();
        assert_eq!(doc["committed"], true);
        assert_eq!(doc["cost_nanos"], 250_000_000u64);
        if doc.get("duplicate").is_none() {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "{answers:?}");
    assert_eq!(s.held("openai"), (250_000_000, 0));
    release(&first).assert_error(409, "already committed");

    let r = release(&second);
    assert_eq!((r.status, r.json()["released"].clone()), (200, json!(true)));
    assert_eq!(release(&second).json()["duplicate"], true);
    assert_eq!(s.held("anthropic"), (0, 0), "a release counts nothing");

    s.post(
        "/v1/commit",
        &json!({"reservation": "nope-1", "cost": 1}).to_string(),
    )
    .assert_error(404, "unknown reservation \"nope-1\"");

    // Bad requests: 400 naming the field, nothing held.
    s.reserve(json!({"deployments": [{"model": "gpt-4o"}]}))
        .assert_error(400, "estimate");
    s.reserve(json!({"deployments": [{"model": "gpt-4o"}], "estimate": "-1"}))
        .assert_error(400, "estimate");
    s.reserve(json!({"deployments": [], "estimate": 1}))
        .assert_error(400, "deployments: empty");
    s.reserve(json!({"provider": "openai", "deployments": [{"model": "x"}], "estimate": 1}))
        .assert_error(400, "not both");
    s.post(
        "/v1/commit",
        &json!({"reservation": "", "cost": 1}).to_string(),
    )
    .assert_error(400, "reservation");
    s.post(
        "/v1/commit",
        &json!({"reservation": second, "cost": "abc"}).to_string(),
    )
    .assert_error(400, "cost");
    assert_eq!(s.held("openai"), (250_000_000, 0));
}

#[test]
fn open_reservations_count_their_estimate_after_sigterm_or_sigkill() {
    let mut cli = Cli::new(CONFIG);
    for (round, signal) in [(1u64, "TERM"), (2, "KILL")] {
        let mut s = Server::start_in(cli, &[]);
        let r = s.reserve(json!({"provider": "openai", "estimate": "0.125"}));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(s.held("openai"), ((round - 1) * 125_000_000, 125_000_000));
        s.signal(signal);
        let status = s.wait_exit(Duration::from_secs(15));
        if signal == "TERM" {
            assert!(status.success(), "{status:?}: {}", s.stderr());
        }
        cli = s.take_cli();
        assert_eq!(
            cli.spend_nanos(NOW, "openai"),
            round * 125_000_000,
            "round {round} (SIG{signal}): the open reservation counts its estimate, once"
        );
        // The next run does not know the old id.
        let s = Server::start_in(cli, &[]);
        s.post(
            "/v1/commit",
            &json!({"reservation": r.json()["reservation"], "cost": 1}).to_string(),
        )
        .assert_error(404, "unknown reservation");
        assert_eq!(s.held("openai"), (round * 125_000_000, 0));
        cli = s.take_cli();
    }
}

#[test]
fn a_commit_after_expiry_is_409_and_the_estimate_is_counted() {
    // A real clock (no --now) and a 1 s timeout: the reaper counts the estimate within ~2 s.
    let cli = Cli::new(&format!(
        "{CONFIG}provider_budgets:\n  reservation_timeout: 1s\n"
    ));
    let s = Server::start_with(cli, &["serve", "--listen", "127.0.0.1:0"]);
    let r = s.reserve(json!({"provider": "openai", "estimate": "0.3"}));
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.json()["reservation"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + DEADLINE;
    while s.held("openai") != (300_000_000, 0) {
        assert!(
            Instant::now() < deadline,
            "never expired: {:?}",
            s.held("openai")
        );
        thread::sleep(Duration::from_millis(20));
    }
    let commit = json!({"reservation": id, "cost": "0.01"}).to_string();
    let r = s.post("/v1/commit", &commit);
    r.assert_error(409, "expired");
    assert_eq!(r.json()["expired"], true);
    s.post("/v1/release", &json!({"reservation": id}).to_string())
        .assert_error(409, "expired");
    assert_eq!(
        s.held("openai"),
        (300_000_000, 0),
        "the cost was not counted"
    );
}

#[test]
fn adjust_credits_a_budget_net_of_spend_and_refuses_clearly() {
    let server = Server::start(CONFIG, &[]);
    assert_eq!(
        server
            .spend(json!({"provider": "openai", "cost": "1.25", "durable": true}))
            .status,
        200
    );
    assert_eq!(server.filter(json!([{"model": "gpt-4o"}])).status, 429);

    let r = server.post(
        "/v1/adjust",
        &json!({"budget": "openai", "amount": "0.75", "reason": "refunded call", "by": "ops"})
            .to_string(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["credited"], true);
    assert_eq!(doc["amount_nanos"], 750_000_000);
    assert_eq!(doc["spend_nanos"], 500_000_000);
    assert_eq!(doc["period"], "1d");
    assert_eq!(doc["window_start"], "2024-05-01T00:00:00Z");
    assert_eq!(server.filter(json!([{"model": "gpt-4o"}])).status, 200);

    let budgets = server.get("/v1/budgets").json();
    let openai = budgets["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["provider"] == "openai")
        .unwrap()
        .clone();
    assert_eq!(openai["credited_nanos"], 750_000_000);
    assert_eq!(openai["credited"], 0.75);
    assert_eq!(openai["spend_nanos"], 500_000_000);

    for (body, status, contains) in [
        (
            json!({"budget": "nope", "amount": 1, "reason": "x"}),
            404,
            "no configured budget \"nope\"",
        ),
        (
            json!({"budget": "openai", "amount": "0.6", "reason": "x"}),
            422,
            "more than the window's spend",
        ),
        (
            json!({"budget": "openai", "amount": "-1", "reason": "x"}),
            400,
            "amount",
        ),
        (
            json!({"budget": "openai", "amount": "1e9223372036854775807", "reason": "x"}),
            400,
            "amount",
        ),
        (
            json!({"budget": "openai", "amount": 0.1, "reason": ""}),
            422,
            "a reason is required",
        ),
        (json!({"budget": "openai", "amount": 0.1}), 400, "reason"),
        (
            json!({"budget": "openai", "amount": 0.1, "reason": "x", "period": "1h"}),
            404,
            "with period 1h",
        ),
        (
            json!({"budget": "openai", "amount": 0.1, "reason": "x", "at": "2024-05-02T12:00:00Z"}),
            422,
            "later than the latest accepted time",
        ),
        (
            json!({"budget": "openai", "amount": 0.1, "reason": "x", "extra": 1}),
            400,
            "extra",
        ),
    ] {
        server
            .post("/v1/adjust", &body.to_string())
            .assert_error(status, contains);
    }
    // Nothing more was credited by the refusals.
    assert_eq!(server.spend_nanos("openai"), 500_000_000);
}

/// A credit on a full disk is either refused with nothing counted, or counted and not yet
/// durable (503 `"credited": true`, "do not retry"); either way, once space returns, exactly
/// the one credit is there.
#[test]
fn adjust_on_a_full_disk_is_counted_once_and_says_do_not_retry() {
    let Some(fs) = tmpfs::Tmpfs::mount("8m") else {
        return;
    };
    let mut cli =
        Cli::new("provider_budget_config:\n  openai: {budget_limit: 1000, time_period: 1d}\n");
    cli.data = fs.path().join("data");
    let server = Server::start_in(cli, &[]);
    let r = server.spend(json!({"provider": "openai", "cost": "5", "durable": true}));
    assert_eq!(r.status, 200, "{r:?}");
    let filler = fs.fill();
    // Fill what sled still had room for.
    for i in 0..100_000 {
        let r = server.spend(json!({"provider": "openai", "cost": "0.000000001", "durable": true, "idempotency_key": format!("k{i}")}));
        if r.status != 200 {
            break;
        }
    }
    let r = server.post(
        "/v1/adjust",
        &json!({"budget": "openai", "amount": "2", "reason": "refund"}).to_string(),
    );
    assert_eq!(r.status, 503, "{r:?}");
    // Either refused before anything counted (the audit entry could not be written: no
    // `credited`), or counted and not yet durable (`"credited": true`, do not retry).
    let counted = r.json()["credited"] == true;
    if counted {
        assert!(
            r.json()["error"].as_str().unwrap().contains("do not retry"),
            "{r:?}"
        );
    } else {
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("no space left"),
            "{r:?}"
        );
    }
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while server.get("/healthz").status != 200 {
        assert!(Instant::now() < deadline, "healthz did not recover");
        thread::sleep(Duration::from_millis(20));
    }
    if !counted {
        let r = server.post(
            "/v1/adjust",
            &json!({"budget": "openai", "amount": "2", "reason": "refund"}).to_string(),
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    let budgets = server.get("/v1/budgets").json();
    let openai = &budgets["budgets"][0];
    assert_eq!(openai["credited_nanos"], 2 * NANOS, "{openai}");
}

// ---- strict budgets ---------------------------------------------------------------------------

/// `"{usd}.{nanos:09}"`: an exact amount for a request body.
fn usd_text(nanos: u64) -> String {
    format!("{}.{:09}", nanos / NANOS, nanos % NANOS)
}

#[test]
fn a_strict_429_under_a_silent_redis_names_the_configured_limit_and_the_nodes_grant() {
    let Some(mut redis) = redis_server::RedisServer::start() else {
        return;
    };
    let config = format!(
        "provider_budgets:\n  budgets:\n    - {{provider: openai, limit: 100, period: 1d, enforcement: strict}}\n  redis: {{url: \"{}\", sync_interval: 50ms, connect_timeout: 300ms, command_timeout: 300ms}}\n",
        redis.url()
    );
    // A real clock (no --now): Redis expires the grant's key by its own clock.
    let s = Server::start_with(
        Cli::new(&config),
        &["--node-id", "a", "serve", "--listen", "127.0.0.1:0"],
    );
    // Past the first use's guard: $1 admitted by a grant, and spent.
    let deadline = Instant::now() + DEADLINE;
    let first = loop {
        let r = s.reserve(json!({"provider": "openai", "estimate": "1"}));
        if r.status == 200 {
            break r.json()["reservation"].as_str().unwrap().to_owned();
        }
        assert_eq!(r.status, 429, "{r:?}");
        assert!(Instant::now() < deadline, "no first grant: {r:?}");
        thread::sleep(Duration::from_millis(20));
    };
    let commit = json!({"reservation": first, "cost": "1"}).to_string();
    assert_eq!(s.post("/v1/commit", &commit).status, 200);

    // Redis dies; once the sidecar knows, its grant stays as it is (offline: grant_only).
    redis.kill();
    let row = || s.get("/v1/budgets").json()["budgets"][0].clone();
    while row()["replication"]["last_error"].is_null() {
        assert!(
            Instant::now() < deadline,
            "Redis's death unnoticed: {}",
            row()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let before = row();
    let grant = before["grant_nanos"].as_u64().unwrap();
    let own = before["own_spend_nanos"].as_u64().unwrap();
    assert!(grant > own && grant < 100 * NANOS, "{before}");

    // One nano past the grant: 429 by the grant, the limit as configured.
    let asked = grant - own + 1;
    let r = s.reserve(json!({"provider": "openai", "estimate": usd_text(asked)}));
    assert_eq!(r.status, 429, "{r:?}");
    let doc = r.json();
    let e = &doc["exceeded"][0];
    assert_eq!(doc["exceeded"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(e["refused_by"], "grant", "{doc}");
    assert_eq!(e["limit_nanos"], 100 * NANOS, "{doc}");
    assert_eq!(e["limit"], 100.0, "{doc}");
    assert_eq!(e["grant_nanos"], grant, "{doc}");
    assert_eq!(e["spend_nanos"], own + asked, "{doc}");
    let error = doc["error"].as_str().unwrap();
    assert!(
        error.contains("Exceeded this node's grant for provider openai")
            && error.contains("limit 100, not spent")
            && error.contains("Redis is unreachable"),
        "{doc}"
    );
    // Retry after a grant round (1 s, rounded up), not at the window's reset.
    assert_eq!(
        r.headers.get("retry-after").map(String::as_str),
        Some("1"),
        "{r:?}"
    );
    assert_eq!(row()["grant_nanos"], grant, "the grant did not move");
    // Not spent: the filter still passes it, and the grant's rest is admitted.
    assert_eq!(s.filter(json!([{"model": "openai/gpt-4o"}])).status, 200);
    let r = s.reserve(json!({"provider": "openai", "estimate": usd_text(asked - 1)}));
    assert_eq!(r.status, 200, "{r:?}");
}
