//! The sidecar's edges against a real `provider-budgets serve` child, through raw sockets:
//! slow bodies, slowloris heads, idle connections, the connection cap, bearer auth, content
//! type, `Host`/`Origin`, reload safety, idempotency mismatches, SIGHUP while starting.

use provider_budgets_test_support::cli::{self, Cli};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const NOW: &str = "2024-05-01T12:00:00Z";
const CONFIG: &str = "provider_budget_config:
  openai: {budget_limit: 1, time_period: 1d}
  anthropic: {budget_limit: 10, time_period: 1h}
";
const DEADLINE: Duration = Duration::from_secs(20);

/// A running sidecar; killed on drop.
pub(super) struct Sidecar {
    cli: Cli,
    child: Option<Child>,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

/// Spawns `provider-budgets ARGS`; `ready` receives the first stdout line.
pub(super) fn spawn(
    cli: &Cli,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, mpsc::Receiver<String>, Arc<Mutex<String>>) {
    let mut cmd = cli.cmd(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn provider-budgets serve");
    let stdout = child.stdout.take().unwrap();
    let stderr_pipe = child.stderr.take().unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&stderr);
    thread::spawn(move || {
        for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    (child, rx, stderr)
}

impl Sidecar {
    fn start(yaml: &str, serve_args: &[&str]) -> Sidecar {
        Sidecar::start_env(Cli::new(yaml), serve_args, &[])
    }

    pub(super) fn start_env(cli: Cli, serve_args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let mut args = vec!["--now", NOW, "serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(serve_args);
        let (mut child, rx, stderr) = spawn(&cli, &args, env);
        let Ok(line) = rx.recv_timeout(DEADLINE) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no ready line; stderr: {}", stderr.lock().unwrap());
        };
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("ready line {line:?}"))
            .to_owned();
        Sidecar {
            cli,
            child: Some(child),
            addr,
            stderr,
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    /// One request on a fresh connection (`Connection: close`), `extra` header lines as given.
    fn raw(&self, method: &str, path: &str, extra: &[&str], body: &str) -> Reply {
        self.try_raw(method, path, extra, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn try_raw(
        &self,
        method: &str,
        path: &str,
        extra: &[&str],
        body: &str,
    ) -> std::io::Result<Reply> {
        let mut s = self.connect();
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !extra
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("host:"))
        {
            head.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for h in extra {
            head.push_str(h);
            head.push_str("\r\n");
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        head.push_str(body);
        s.write_all(head.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        if text.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Reply::parse(&text))
    }

    pub(super) fn get(&self, path: &str, extra: &[&str]) -> Reply {
        self.raw("GET", path, extra, "")
    }

    /// A GET on the one spare connection over the cap: retried while the previous request's
    /// connection still holds it (then this one is closed without an answer).
    fn spare_get(&self, path: &str) -> Reply {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.try_raw("GET", path, &[], "") {
                Ok(r) => return r,
                Err(e) => assert!(Instant::now() < deadline, "GET {path}: {e}"),
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn post(&self, path: &str, extra: &[&str], body: &str) -> Reply {
        let mut headers = vec!["Content-Type: application/json"];
        headers.extend_from_slice(extra);
        self.raw("POST", path, &headers, body)
    }

    fn spend_nanos(&self, provider: &str, extra: &[&str]) -> u64 {
        let doc = self.get("/v1/budgets", extra).json();
        doc["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["provider"] == provider)
            .and_then(|b| b["spend_nanos"].as_u64())
            .unwrap_or_else(|| panic!("no budget {provider}: {doc}"))
    }

    pub(super) fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// The address it listens on.
    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    pub(super) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: u16,
    headers: Vec<(String, String)>,
    pub(super) body: String,
}

impl Reply {
    fn parse(text: &str) -> Reply {
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete answer: {text:?}"));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("status line: {text:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("JSON body: {e}: {self:?}"))
    }

    fn assert_error(&self, status: u16, contains: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let doc = self.json();
        let reason = doc["error"].as_str().unwrap_or_else(|| panic!("{self:?}"));
        assert!(reason.contains(contains), "{contains:?} not in {self:?}");
    }
}

/// Reads until the peer closes (EOF or reset): what it sent, and when.
fn read_until_closed(s: &mut TcpStream) -> (String, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&got).into_owned(), Instant::now()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes one keep-alive request and reads exactly its answer (by Content-Length).
fn keep_alive_request(s: &mut TcpStream, addr: &str, path: &str) -> Reply {
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "closed mid-answer: {head:?}"
        );
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let reply = Reply::parse(&format!("{head}\r\n"));
    let len: usize = reply.header("content-length").unwrap().parse().unwrap();
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    Reply {
        body: String::from_utf8(body).unwrap(),
        ..reply
    }
}

// ---- slow clients -------------------------------------------------------------------------------

/// Eight clients that send a head and one byte of their body do not hold the four admission
/// permits: other requests are answered at once; the slow ones get 408 after --body-timeout.
#[test]
fn slow_bodies_do_not_starve_other_requests_and_get_408() {
    let s = Sidecar::start(CONFIG, &["--max-in-flight", "4", "--body-timeout", "2s"]);
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = s.connect();
            write!(
                c,
                "POST /v1/spend HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: 40\r\n\r\n{{",
                s.addr
            )
            .unwrap();
            c
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let r = s.post("/v1/spend", &[], r#"{"provider":"anthropic","cost":"0.5"}"#);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(s.get("/v1/budgets", &[]).status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "normal requests waited for the slow bodies"
    );
    for c in &mut slow {
        let (text, at) = read_until_closed(c);
        let r = Reply::parse(&text);
        r.assert_error(408, "--body-timeout");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        assert!(at - started >= Duration::from_millis(1900), "408 too early");
    }
    assert_eq!(s.spend_nanos("anthropic", &[]), 5 * 500_000_000);
    assert_eq!(s.spend_nanos("openai", &[]), 0);

    // A Content-Length over 64 KiB is refused before any of the body is sent.
    let mut c = s.connect();
    write!(
        c,
        "POST /v1/spend HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 70000\r\n\r\n",
        s.addr
    )
    .unwrap();
    let (text, _) = read_until_closed(&mut c);
    Reply::parse(&text).assert_error(413, "over the limit of 65536 bytes");
}

/// A client that trickles its request head is closed --header-timeout after its first byte;
/// a connection that sends nothing, or nothing after its answer, after --idle-timeout.
#[test]
fn slowloris_heads_and_idle_connections_are_closed_after_their_timeouts() {
    let s = Sidecar::start(CONFIG, &["--header-timeout", "1s", "--idle-timeout", "2s"]);
    // Trickle: one header byte every 100 ms, forever.
    let mut c = s.connect();
    let start = Instant::now();
    c.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").unwrap();
    let writer = {
        let mut w = c.try_clone().unwrap();
        thread::spawn(move || {
            while w.write_all(b"a").is_ok() && start.elapsed() < DEADLINE {
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (text, at) = read_until_closed(&mut c);
    let took = at - start;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "slowloris closed after {took:?} ({text:?})"
    );
    assert!(!text.contains("200 OK"), "{text:?}");
    writer.join().unwrap();

    // Silent from the start: closed after the idle timeout.
    let mut c = s.connect();
    let start = Instant::now();
    let (_, at) = read_until_closed(&mut c);
    let took = at - start;
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "idle connection closed after {took:?}"
    );

    // Keep-alive: a connection after its answer is idle; within the timeout it serves more.
    let mut c = s.connect();
    assert_eq!(keep_alive_request(&mut c, &s.addr, "/healthz").status, 200);
    thread::sleep(Duration::from_millis(1200)); // more than the header timeout, less than idle
    assert_eq!(
        keep_alive_request(&mut c, &s.addr, "/v1/budgets").status,
        200
    );
    let start = Instant::now();
    let (_, at) = read_until_closed(&mut c);
    assert!(
        at - start >= Duration::from_millis(1900),
        "{:?}",
        at - start
    );
}

/// Over --max-connections, one spare connection is served the probes only (503 elsewhere),
/// and a connection beyond it is closed at once; once the crowd leaves, the API answers.
#[test]
fn connections_over_the_cap_are_closed_while_healthz_answers() {
    let s = Sidecar::start(
        CONFIG,
        &[
            "--max-connections",
            "8",
            "--idle-timeout",
            "30s",
            "--header-timeout",
            "30s",
        ],
    );
    // Eight keep-alive connections, each served once: they hold every slot.
    let mut crowd: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = s.connect();
            assert_eq!(keep_alive_request(&mut c, &s.addr, "/healthz").status, 200);
            c
        })
        .collect();
    // The spare connection: probes answer, the API does not. Each request is a new
    // connection that closes after its answer; the server frees the spare slot just after the
    // client read the answer, so the next one may find it still taken (closed at once): retry.
    let h = s.spare_get("/healthz");
    assert_eq!(
        (h.status, h.json()["status"].clone()),
        (200, json!("ok")),
        "{h:?}"
    );
    assert_eq!(s.spare_get("/metrics").status, 200);
    let r = s.spare_get("/v1/budgets");
    r.assert_error(503, "too many connections");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Hold the spare too: the next connection is closed without an answer.
    let _spare = s.connect();
    thread::sleep(Duration::from_millis(200));
    let mut refused = s.connect();
    let _ =
        refused.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr).as_bytes());
    let start = Instant::now();
    let (text, at) = read_until_closed(&mut refused);
    assert_eq!(
        text, "",
        "a connection over the cap and the spare got an answer"
    );
    assert!(at - start < Duration::from_secs(1), "not closed at once");
    // The crowd still works, and once it leaves the API answers new connections.
    assert_eq!(
        keep_alive_request(&mut crowd[0], &s.addr, "/v1/budgets").status,
        200
    );
    drop(crowd);
    let deadline = Instant::now() + DEADLINE;
    while s
        .try_raw("GET", "/v1/budgets", &[], "")
        .map_or(true, |r| r.status != 200)
    {
        assert!(Instant::now() < deadline, "slots not released");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---- auth, content type, host, origin -----------------------------------------------------------

const TOKEN: &str = "t0ken-0f-the-sidecar";

#[test]
fn a_token_guards_every_v1_route_and_the_probes_stay_open() {
    let cli = Cli::new(CONFIG);
    let file = cli.write_config("token", &format!("{TOKEN}\n"));
    let s = Sidecar::start_env(cli, &["--auth-token-file", file.to_str().unwrap()], &[]);
    let auth = format!("Authorization: Bearer {TOKEN}");
    let spend = r#"{"provider":"openai","cost":"0.25"}"#;
    for (method, path) in [
        ("GET", "/v1/budgets"),
        ("POST", "/v1/spend"),
        ("POST", "/v1/filter"),
        ("POST", "/v1/reload"),
        ("POST", "/v1/reserve"),
        ("POST", "/v1/commit"),
        ("POST", "/v1/release"),
        ("POST", "/v1/adjust"),
    ] {
        for wrong in [
            vec![],
            vec!["Authorization: Bearer nope"],
            vec!["Authorization: Basic dDBrZW4="],
            vec!["Authorization: Bearer t0ken-0f-the-sidecar-and-more"],
        ] {
            let mut headers = wrong.clone();
            headers.push("Content-Type: application/json");
            let r = s.raw(
                method,
                path,
                &headers,
                if method == "POST" { spend } else { "" },
            );
            r.assert_error(401, if wrong.is_empty() { "missing" } else { "wrong" });
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{r:?}");
            assert!(!r.body.contains(TOKEN), "{r:?}");
        }
    }
    // A keep-alive POST refused before its body was read: the connection closes (the body
    // may still be on its way; a client reusing the connection would lose its next request).
    let mut c = s.connect();
    write!(
        c,
        "POST /v1/spend HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{spend}",
        s.addr,
        spend.len()
    )
    .unwrap();
    let (head, _) = read_until_closed(&mut c);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(s.spend_nanos("openai", &[&auth]), 0, "nothing counted");
    assert_eq!(s.post("/v1/spend", &[&auth], spend).status, 200);
    assert_eq!(
        s.post(
            "/v1/spend",
            &["authorization: bearer  t0ken-0f-the-sidecar "],
            spend
        )
        .status,
        200
    );
    assert_eq!(s.spend_nanos("openai", &[&auth]), 500_000_000);
    assert_eq!(s.get("/healthz", &[]).status, 200);
    assert_eq!(s.get("/metrics", &[]).status, 200);
    assert!(!s.stderr().contains(TOKEN), "{}", s.stderr());

    // The variable works the same (the file wins over it when both are given).
    let s = Sidecar::start_env(
        Cli::new(CONFIG),
        &[],
        &[("PROVIDER_BUDGETS_AUTH_TOKEN", TOKEN)],
    );
    s.get("/v1/budgets", &[]).assert_error(401, "missing");
    assert_eq!(s.get("/v1/budgets", &[&auth]).status, 200);
}

#[test]
fn an_unusable_token_or_a_public_address_without_one_refuses_to_start() {
    let cli = Cli::new(CONFIG);
    let empty = cli.write_config("empty-token", " \n");
    let missing = cli.tmp.path().join("no-such-token");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a [&'a str]);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--auth-token-file", empty.to_str().unwrap()],
            vec![],
            &["empty-token", "is empty"],
        ),
        (
            vec!["--auth-token-file", missing.to_str().unwrap()],
            vec![],
            &["no-such-token", "cannot read"],
        ),
        (
            vec!["--auth-token-file", cli.tmp.path().to_str().unwrap()],
            vec![],
            &["cannot read the auth token file"],
        ),
        (
            vec![],
            vec![("PROVIDER_BUDGETS_AUTH_TOKEN", "two words")],
            &["PROVIDER_BUDGETS_AUTH_TOKEN", "one word"],
        ),
        // Refused before anything is bound: nothing listens on a public address.
        (
            vec!["--listen", "0.0.0.0:0"],
            vec![],
            &["0.0.0.0:0", "--auth-token-file", "--insecure-no-auth"],
        ),
    ];
    for (args, env, culprits) in cases {
        let mut all = vec!["serve"];
        all.extend(args);
        let mut cmd = cli.cmd(&all);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let run = cli::Run::of(cmd.stdin(Stdio::null()).output().unwrap());
        run.assert_error(1, culprits);
        assert!(!run.stderr.contains("two words"), "{run:?}");
        assert!(run.stdout.is_empty(), "{run:?}");
    }
}

#[test]
fn posts_need_json_and_foreign_hosts_and_origins_are_403() {
    let s = Sidecar::start(CONFIG, &[]);
    let spend = r#"{"provider":"openai","cost":"0.25"}"#;
    // Content type.
    s.raw("POST", "/v1/spend", &["Content-Type: text/plain"], spend)
        .assert_error(415, "application/json");
    s.raw("POST", "/v1/spend", &[], spend)
        .assert_error(415, "got none");
    s.raw(
        "POST",
        "/v1/spend",
        &["Content-Type: application/x-www-form-urlencoded"],
        spend,
    )
    .assert_error(415, "application/json");
    let r = s.raw(
        "POST",
        "/v1/spend",
        &["Content-Type: Application/JSON; charset=utf-8"],
        spend,
    );
    assert_eq!(r.status, 200, "{r:?}");
    // A body-less POST may omit it.
    let r = s.raw("POST", "/v1/reload", &[], "");
    assert_eq!(r.status, 200, "{r:?}");
    // Origin: a browser page of another site may not post; a loopback page may.
    for origin in [
        "http://evil.example",
        "null",
        "https://127.0.0.1.evil.example",
    ] {
        s.post("/v1/spend", &[&format!("Origin: {origin}")], spend)
            .assert_error(403, "Origin");
    }
    let r = s.post("/v1/spend", &["Origin: http://localhost:3000"], spend);
    assert_eq!(r.status, 200, "{r:?}");
    // Host (bound to loopback): DNS rebinding names another host.
    for host in ["evil.example", "evil.example:8787", "10.1.2.3"] {
        s.post("/v1/spend", &[&format!("Host: {host}")], spend)
            .assert_error(403, "Host");
        s.get("/v1/budgets", &[&format!("Host: {host}")])
            .assert_error(403, "Host");
    }
    for host in ["localhost:1234", "127.0.0.1", "[::1]:8787"] {
        assert_eq!(
            s.get("/v1/budgets", &[&format!("Host: {host}")]).status,
            200
        );
    }
    // The probes answer whatever the Host.
    assert_eq!(s.get("/healthz", &["Host: evil.example"]).status, 200);
    assert_eq!(s.spend_nanos("openai", &[]), 500_000_000, "two counted");
}

// ---- reload -------------------------------------------------------------------------------------

#[test]
fn a_reload_without_budgets_is_refused_unless_forced_and_the_old_budgets_keep_enforcing() {
    let s = Sidecar::start(CONFIG, &[]);
    assert_eq!(
        s.post("/v1/spend", &[], r#"{"provider":"openai","cost":1}"#)
            .status,
        200
    );
    let denied = r#"{"deployments":[{"model":"gpt-4o"}]}"#;
    assert_eq!(s.post("/v1/filter", &[], denied).status, 429);
    for text in [
        "",
        "  \n\n",
        "model_list: []\n",
        "litellm_settings: {drop_params: true}\n",
    ] {
        std::fs::write(&s.cli.config, text).unwrap();
        s.raw("POST", "/v1/reload", &[], "")
            .assert_error(422, "no budget");
        s.post("/v1/reload", &[], "{}")
            .assert_error(422, "--allow-empty");
        assert_eq!(s.post("/v1/filter", &[], denied).status, 429, "{text:?}");
    }
    // SIGHUP with an empty file: refused, logged, budgets kept.
    std::fs::write(&s.cli.config, "").unwrap();
    s.signal("HUP");
    let deadline = Instant::now() + DEADLINE;
    while !s.stderr().contains("no budget") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            s.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.post("/v1/filter", &[], denied).status, 429);
    s.post("/v1/reload", &[], r#"{"allow_empty": "yes"}"#)
        .assert_error(400, "invalid");
    s.post("/v1/reload", &[], r#"{"allow_emtpy": true}"#)
        .assert_error(400, "unknown field");
    // Forced: applied, every budget removed (and named).
    let r = s.post("/v1/reload", &[], r#"{"allow_empty": true}"#);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["budgets"], 0);
    assert_eq!(r.json()["removed"].as_array().unwrap().len(), 2, "{r:?}");
    assert_eq!(s.post("/v1/filter", &[], denied).status, 200);

    // `serve --allow-empty` applies it without the body flag.
    let s = Sidecar::start(CONFIG, &["--allow-empty"]);
    std::fs::write(&s.cli.config, "").unwrap();
    let r = s.raw("POST", "/v1/reload", &[], "");
    assert_eq!(
        (r.status, r.json()["budgets"].clone()),
        (200, json!(0)),
        "{r:?}"
    );
}

/// A refused reload's answer never carries a value from the environment.
#[test]
fn a_refused_reload_does_not_echo_environment_values() {
    const SECRET: &str = "sk-live-very-secret-value";
    let s = Sidecar::start_env(Cli::new(CONFIG), &[], &[("PB_TEST_LIMIT", SECRET)]);
    std::fs::write(
        &s.cli.config,
        "provider_budget_config:\n  openai: {budget_limit: os.environ/PB_TEST_LIMIT, time_period: 1d}\n",
    )
    .unwrap();
    let r = s.raw("POST", "/v1/reload", &[], "");
    r.assert_error(422, "config reload refused");
    assert!(!r.body.contains(SECRET), "{r:?}");
    // The config path may come from the environment too (PROVIDER_BUDGETS_CONFIG).
    std::fs::remove_file(&s.cli.config).unwrap();
    let r = s.raw("POST", "/v1/reload", &[], "");
    r.assert_error(422, "config reload refused");
}

// ---- idempotency ---------------------------------------------------------------------------------

#[test]
fn a_key_reused_with_another_request_is_409_and_counts_nothing() {
    let s = Sidecar::start(CONFIG, &[]);
    let first = r#"{"provider":"anthropic","cost":"1","idempotency_key":"k1"}"#;
    assert_eq!(s.post("/v1/spend", &[], first).status, 200);
    let r = s.post("/v1/spend", &[], first);
    assert_eq!(r.json(), json!({"counted": true, "duplicate": true}));
    for other in [
        r#"{"provider":"anthropic","cost":"2","idempotency_key":"k1"}"#,
        r#"{"provider":"openai","cost":"1","idempotency_key":"k1"}"#,
        r#"{"provider":"anthropic","cost":"1","at":"2024-05-01T12:30:00Z","idempotency_key":"k1"}"#,
    ] {
        s.post("/v1/spend", &[], other)
            .assert_error(409, "idempotency_key \"k1\"");
    }
    // The same request written differently is the same request.
    let again =
        r#"{ "idempotency_key":"k1", "cost": 1.0, "provider":"anthropic", "durable": true }"#;
    assert_eq!(
        s.post("/v1/spend", &[], again).json(),
        json!({"counted": true, "duplicate": true})
    );
    assert_eq!(s.spend_nanos("anthropic", &[]), 1_000_000_000);
    assert_eq!(s.spend_nanos("openai", &[]), 0);
}

// ---- signals ---------------------------------------------------------------------------------

/// SIGHUP while the limiter opens (a Redis that accepts and never answers makes that take
/// seconds) is queued: the process survives, serves, and applies it as a reload.
#[test]
fn sighup_while_starting_does_not_kill_the_sidecar() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    thread::spawn(move || {
        for c in silent.incoming().map_while(Result::ok) {
            keep.lock().unwrap().push(c); // accept, never answer
        }
    });
    let cli = Cli::new(CONFIG);
    let url = format!("redis://127.0.0.1:{port}");
    let (mut child, ready, stderr) = spawn(
        &cli,
        &[
            "--redis",
            &url,
            "--now",
            NOW,
            "serve",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        ready.try_recv().is_err(),
        "ready before the signal: the start is not slow enough to test"
    );
    let ok = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let line = match ready.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => {
            let status = child.try_wait().unwrap();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no ready line (exit {status:?}); stderr: {}",
                stderr.lock().unwrap()
            );
        }
    };
    let s = Sidecar {
        cli,
        child: Some(child),
        addr: line.strip_prefix("listening on ").unwrap().to_owned(),
        stderr,
    };
    assert_eq!(s.get("/healthz", &[]).status, 200);
    assert_eq!(s.get("/v1/budgets", &[]).status, 200);
    assert!(
        !held.lock().unwrap().is_empty(),
        "the sidecar never reached the fake Redis"
    );
}
