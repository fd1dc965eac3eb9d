//! Exactly once across a sidecar crash: a keyed spend, or a reservation's end, that is
//! durable but whose answer never left the sidecar (SIGKILL in between) is a duplicate when
//! the client retries it against the restarted sidecar, counted once; the same key with
//! another request is still a 409 after the restart.
//!
//! The window between the fsync and the answer is hit deterministically with the sidecar's
//! hidden test flag `--testing-pause-after-fsync`: after the fsync of a keyed spend or of a
//! reservation's end it prints `fsynced KEY` and never answers; the test reads that line and
//! SIGKILLs it. Trials differ by a deterministic PRNG seeded with the trial number (how many
//! buffered keyed spends go first, a provider or a deployment with tags, the cost): a failure
//! names its trial and reproduces.

use provider_budgets_test_support::child::sigkill;
use provider_budgets_test_support::cli::Cli;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

const TRIALS: u64 = 24;
const NOW: &str = "2024-05-01T12:00:00Z";
const CONFIG: &str = "provider_budget_config:
  openai: {budget_limit: 1000000, time_period: 1d}
tag_budget_config:
  team-a: {max_budget: 1000000, budget_duration: 1d}
";
const DEADLINE: Duration = Duration::from_secs(20);

/// xorshift64*: tiny and deterministic (as in `crash.rs`).
struct Rng(u64);

impl Rng {
    fn new(trial: u64) -> Rng {
        Rng(trial.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// A running `provider-budgets serve` child with its stdout lines on a channel.
struct Sidecar {
    child: Child,
    base: String,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    agent: ureq::Agent,
}

impl Sidecar {
    /// Starts a sidecar on `cli`'s data dir; `pause`: with the hidden test hook.
    fn start(cli: &Cli, pause: bool) -> Sidecar {
        let mut args = vec!["--now", NOW, "serve", "--listen", "127.0.0.1:0"];
        if pause {
            args.push("--testing-pause-after-fsync");
        }
        let mut child = cli
            .cmd(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn provider-budgets serve");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        let mut s = Sidecar {
            child,
            base: String::new(),
            lines,
            stderr,
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build(),
            ),
        };
        let ready = s.line();
        let addr = ready
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("ready line {ready:?}"));
        s.base = format!("http://{addr}");
        s
    }

    /// The next stdout line (bounded wait, no polling).
    fn line(&self) -> String {
        self.lines.recv_timeout(DEADLINE).unwrap_or_else(|e| {
            panic!(
                "no line from the sidecar ({e}); stderr: {}",
                self.stderr.lock().unwrap()
            )
        })
    }

    /// Waits until the hook says `key` is durable and the answer is being held.
    fn wait_fsynced(&self, key: &str) {
        let line = self.line();
        assert_eq!(line, format!("fsynced {key}"));
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post(&self.agent, &format!("{}{path}", self.base), body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Posts from another thread: the hooked request never gets an answer.
    fn post_in_background(
        &self,
        path: &str,
        body: Value,
    ) -> thread::JoinHandle<Result<(u16, Value), ureq::Error>> {
        let (agent, url) = (self.agent.clone(), format!("{}{path}", self.base));
        thread::spawn(move || post(&agent, &url, &body))
    }

    /// Exact spend of `name`'s budget (`provider` or `tag` scope) in the window of [`NOW`].
    fn spend_nanos(&self, scope: &str, name: &str) -> u64 {
        let r = self
            .agent
            .get(format!("{}/v1/budgets", self.base))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let doc: Value = serde_json::from_str(&r).unwrap();
        doc["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["scope"] == scope && b["name"] == name)
            .and_then(|b| b["spend_nanos"].as_u64())
            .unwrap_or_else(|| panic!("no {scope} budget {name}: {doc}"))
    }

    fn kill(mut self) {
        sigkill(&mut self.child);
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> Result<(u16, Value), ureq::Error> {
    let mut r = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())?;
    let text = r.body_mut().read_to_string()?;
    Ok((r.status().as_u16(), serde_json::from_str(&text).unwrap()))
}

/// One keyed spend of a trial: its body and what it adds to openai and to team-a.
fn spend_body(rng: &mut Rng, key: &str, durable: bool) -> (Value, u64, u64) {
    let nanos = 1 + rng.below(5_000_000_000);
    let cost = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    if rng.below(2) == 0 {
        let body =
            json!({"provider": "openai", "cost": cost, "idempotency_key": key, "durable": durable});
        (body, nanos, 0)
    } else {
        let body = json!({
            "deployment": {"model": "gpt-4o", "id": "east"}, "tags": ["team-a"],
            "cost": cost, "idempotency_key": key, "durable": durable,
        });
        (body, nanos, nanos)
    }
}

#[test]
fn a_spend_killed_between_its_fsync_and_its_answer_counts_once_on_retry() {
    let cli = Cli::new(CONFIG);
    let (mut openai, mut team) = (0u64, 0u64);
    for trial in 0..TRIALS {
        let mut rng = Rng::new(trial + 1);
        let s = Sidecar::start(&cli, true);
        // Buffered keyed spends first: answered at once, made durable by the fsync below.
        let mut sent = Vec::new();
        for i in 0..rng.below(4) {
            let (body, o, t) = spend_body(&mut rng, &format!("t{trial}-{i}"), false);
            let (status, doc) = s.post("/v1/spend", &body);
            assert_eq!(
                (status, &doc),
                (200, &json!({"counted": true})),
                "trial {trial}"
            );
            sent.push((body, o, t));
        }
        let key = format!("t{trial}-last");
        let (body, o, t) = spend_body(&mut rng, &key, true);
        let pending = s.post_in_background("/v1/spend", body.clone());
        s.wait_fsynced(&key);
        s.kill();
        assert!(
            pending.join().unwrap().is_err(),
            "trial {trial}: the answer never left the sidecar"
        );
        sent.push((body, o, t));
        for (_, o, t) in &sent {
            (openai, team) = (openai + o, team + t);
        }

        let s = Sidecar::start(&cli, false);
        assert_eq!(s.spend_nanos("provider", "openai"), openai, "trial {trial}");
        for (body, _, _) in &sent {
            let (status, doc) = s.post("/v1/spend", body);
            assert_eq!(
                (status, &doc),
                (200, &json!({"counted": true, "duplicate": true})),
                "trial {trial}: {body}"
            );
        }
        assert_eq!(
            (
                s.spend_nanos("provider", "openai"),
                s.spend_nanos("tag", "team-a")
            ),
            (openai, team),
            "trial {trial}: every spend counted exactly once"
        );
        s.kill();
    }
    assert!(team > 0 && openai > team, "both kinds of spend ran");
}

#[test]
fn a_reservation_end_killed_between_its_fsync_and_its_answer_is_the_same_answer_on_retry() {
    let cli = Cli::new(CONFIG);
    let mut spent = 0;
    for (trial, commit) in [(0, true), (1, false), (2, true), (3, false)] {
        let s = Sidecar::start(&cli, true);
        let (status, doc) = s.post(
            "/v1/reserve",
            &json!({"provider": "openai", "estimate": "0.5"}),
        );
        assert_eq!(status, 200, "{doc}");
        let id = doc["reservation"].as_str().unwrap().to_owned();
        let (path, body) = if commit {
            ("/v1/commit", json!({"reservation": id, "cost": "0.25"}))
        } else {
            ("/v1/release", json!({"reservation": id}))
        };
        let pending = s.post_in_background(path, body.clone());
        s.wait_fsynced(&id);
        s.kill();
        assert!(pending.join().unwrap().is_err(), "trial {trial}");
        if commit {
            spent += 250_000_000;
        }

        let s = Sidecar::start(&cli, false);
        let (status, doc) = s.post(path, &body);
        let expected = if commit {
            json!({"committed": true, "reservation": id, "cost": 0.25,
                   "cost_nanos": 250_000_000u64, "duplicate": true})
        } else {
            json!({"released": true, "reservation": id, "duplicate": true})
        };
        assert_eq!((status, doc), (200, expected), "trial {trial}");
        // Counted once: the cost, not the estimate (nor both).
        assert_eq!(s.spend_nanos("provider", "openai"), spent, "trial {trial}");
        let (other, body, done) = if commit {
            (
                "/v1/release",
                json!({"reservation": id}),
                "already committed",
            )
        } else {
            (
                "/v1/commit",
                json!({"reservation": id, "cost": "0.25"}),
                "already released",
            )
        };
        let (status, doc) = s.post(other, &body);
        assert_eq!(status, 409, "{doc}");
        assert!(doc["error"].as_str().unwrap().contains(done), "{doc}");
        s.kill();
    }
}

#[test]
fn a_key_reused_with_another_request_after_a_restart_is_409() {
    let cli = Cli::new(CONFIG);
    let s = Sidecar::start(&cli, false);
    let first = json!({
        "deployment": {"model": "gpt-4o", "id": "east"}, "tags": ["team-a"],
        "cost": "0.1", "idempotency_key": "k-1", "durable": true,
    });
    assert_eq!(s.post("/v1/spend", &first), (200, json!({"counted": true})));
    s.kill();

    let s = Sidecar::start(&cli, false);
    for other in [
        json!({"deployment": {"model": "gpt-4o", "id": "east"}, "tags": ["team-a"],
               "cost": "0.2", "idempotency_key": "k-1"}),
        json!({"deployment": {"model": "gpt-4o", "id": "east"}, "tags": [],
               "cost": "0.1", "idempotency_key": "k-1"}),
        json!({"provider": "openai", "cost": "0.1", "idempotency_key": "k-1"}),
    ] {
        let (status, doc) = s.post("/v1/spend", &other);
        assert_eq!(status, 409, "{other}: {doc}");
        let error = doc["error"].as_str().unwrap();
        assert!(
            error.contains("\"k-1\"") && error.contains("another request"),
            "{doc}"
        );
    }
    // The same request, spelled otherwise and without `durable`, is the duplicate.
    let same = json!({"idempotency_key": "k-1", "cost": 0.10, "tags": ["team-a"],
                      "deployment": {"id": "east", "model": "gpt-4o"}});
    assert_eq!(
        s.post("/v1/spend", &same),
        (200, json!({"counted": true, "duplicate": true}))
    );
    assert_eq!(s.spend_nanos("provider", "openai"), 100_000_000);
    s.kill();
}
