//! A throwaway `redis-server` for tests.
//!
//! Used as `provider_budgets_test_support::redis_server`, from integration tests and from the
//! library's unit tests (the crate is a dev-dependency of both workspace crates).
//!
//! Each [`RedisServer`] is a real `redis-server` child process on its own free loopback port,
//! in its own temporary directory, with persistence off (`--save "" --appendonly no`), so a
//! kill really loses the data (which is what replication tests need to prove re-sends restore
//! it). The harness talks RESP over a plain [`std::net::TcpStream`] so that it does not depend on
//! the `redis` crate whose behaviour the tests are checking.
//!
//! When `redis-server` cannot be started, [`RedisServer::start`] returns `None` so a developer
//! without Redis can still run the rest of the suite; when the `CI` environment variable is set
//! it panics instead, so a CI runner without Redis fails loudly rather than skipping silently.
//! The binary is `redis-server` from `PATH` unless `REDIS_SERVER_BIN` names another one.

#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start or restart may take before the harness gives up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on any single harness command, so a wedged server fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports tried by `start` when another process grabs the one we picked.
const PORT_ATTEMPTS: usize = 5;

/// A `redis-server` child process owned by one test; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Extra `redis-server` arguments (cluster mode, TLS); `{port}` and `{tls_port}` in them
    /// are replaced by the ports of the attempt.
    extra: Vec<String>,
    /// Ports are chosen below this (a cluster node's bus port is its port + 10 000).
    port_limit: u16,
    /// The TLS port, when TLS is on (0 otherwise).
    tls_port: u16,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// One RESP2 reply, as read by the harness's raw client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and other status replies.
    Status(String),
    /// `-ERR ...`: the whole line after the `-`.
    Error(String),
    /// `:123`.
    Int(i64),
    /// `$n` bulk string (lossily decoded: tests only use text).
    Bulk(String),
    /// `$-1` or `*-1`.
    Nil,
    /// `*n`.
    Array(Vec<Reply>),
}

impl fmt::Display for Reply {
    /// A compact rendering for assertions: statuses, bulks and integers as their text, nil as
    /// `(nil)`, errors as `(error) ...`, arrays as `[a, b, c]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Status(s) | Reply::Bulk(s) => f.write_str(s),
            Reply::Error(e) => write!(f, "(error) {e}"),
            Reply::Int(i) => write!(f, "{i}"),
            Reply::Nil => f.write_str("(nil)"),
            Reply::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// True when the `CI` environment variable says we run in CI, where a missing Redis must fail.
fn in_ci() -> bool {
    match std::env::var_os("CI") {
        Some(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
        None => false,
    }
}

/// A free loopback port below `limit` (and, for a limit below the ephemeral range, whose
/// `port + 10 000` is free too: a Redis Cluster bus port).
fn free_port_below(limit: u16) -> io::Result<u16> {
    if limit == u16::MAX {
        return free_port();
    }
    let mut state = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    for _ in 0..1000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = 20_000 + (state % u64::from(limit - 20_000)) as u16;
        let free = |p: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok();
        if free(port) && free(port + 10_000) {
            return Ok(port);
        }
    }
    Err(io::Error::other(format!("no free port below {limit}")))
}

/// Asks the OS for a free loopback port. The listener is dropped before redis binds, so another
/// process may take the port in between; `start` detects that and retries with a fresh one.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port with `--save "" --appendonly no`, in its own
    /// temp dir, and waits (polling, bounded by ~10 s, no fixed sleeps) until it answers.
    ///
    /// Returns `None` when the server cannot be started, unless `CI` is set, in which case it
    /// panics with the reason: tests must fail in CI rather than skip.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(&[], u16::MAX, false)
    }

    /// Like [`RedisServer::start`] with extra arguments (`{port}` and `{tls_port}` in them are
    /// replaced), a port below `port_limit`, and (`tls`) a second free port for `--tls-port`.
    /// The plain port stays open on loopback for the harness's own commands.
    pub fn start_with(extra: &[String], port_limit: u16, tls: bool) -> Option<RedisServer> {
        match Self::try_start(extra, port_limit, tls) {
            Ok(server) => Some(server),
            Err(reason) if in_ci() => {
                panic!("redis-server is required in CI (CI is set) but could not start: {reason}")
            }
            Err(reason) => {
                eprintln!("redis-server not available: {reason}");
                None
            }
        }
    }

    fn try_start(extra: &[String], port_limit: u16, tls: bool) -> Result<RedisServer, String> {
        let bin = std::env::var_os("REDIS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let dir = tempfile::Builder::new()
            .prefix("redis-test-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            bin,
            extra: extra.to_vec(),
            port_limit,
            tls_port: 0,
        };
        let mut last_error = String::from("no attempt made");
        for _ in 0..PORT_ATTEMPTS {
            server.port =
                free_port_below(port_limit).map_err(|e| format!("cannot find a free port: {e}"))?;
            if tls {
                server.tls_port = free_port_below(port_limit)
                    .map_err(|e| format!("cannot find a free port: {e}"))?;
            }
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                // A missing binary will not appear on another port.
                Err(StartError::Spawn(e)) => return Err(e),
                // Most likely another process took the port between probe and bind.
                Err(StartError::NotServing(e)) => {
                    server.kill();
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns the server on `self.port` and polls until it answers as *our* process (its
    /// `INFO server` `process_id` is the child's pid, so a stranger that grabbed the port is
    /// never mistaken for it). Fails when the child exits or the deadline passes.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log = File::create(self.log_path()).map_err(|e| {
            StartError::Spawn(format!("cannot create {}: {e}", self.log_path().display()))
        })?;
        let log_err = log
            .try_clone()
            .map_err(|e| StartError::Spawn(format!("cannot duplicate the log file handle: {e}")))?;
        let spawned = Command::new(&self.bin)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path())
            .args(self.extra.iter().map(|a| {
                a.replace("{port}", &self.port.to_string())
                    .replace("{tls_port}", &self.tls_port.to_string())
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                return Err(StartError::Spawn(format!(
                    "cannot run {}: {e}",
                    self.bin.display()
                )))
            }
        };
        let pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        let mut last;
        loop {
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        self.child = None;
                        return Err(StartError::NotServing(format!(
                            "redis-server on port {} exited with {status}; log:\n{}",
                            self.port,
                            self.log_tail()
                        )));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return Err(StartError::Spawn(format!("cannot poll redis-server: {e}")))
                    }
                }
            }
            match self.server_pid() {
                Ok(Some(answered)) if answered == pid => return Ok(()),
                Ok(Some(other)) => {
                    last = format!(
                        "port {} is answered by another redis (pid {other})",
                        self.port
                    )
                }
                Ok(None) => last = String::from("INFO server has no process_id"),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(StartError::NotServing(format!(
                    "redis-server on port {} did not answer within {START_TIMEOUT:?} ({last}); log:\n{}",
                    self.port,
                    self.log_tail()
                )));
            }
            // Polling, not a fixed wait: the loop ends as soon as the server answers.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The `process_id` reported by whatever answers on our port.
    fn server_pid(&self) -> io::Result<Option<u32>> {
        let stream = self.connect(Duration::from_millis(200))?;
        let reply = roundtrip(stream, &["INFO", "server"])?;
        let text = match reply {
            Reply::Bulk(text) => text,
            other => return Err(io::Error::other(format!("unexpected INFO reply: {other}"))),
        };
        Ok(text
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok()))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn connect(&self, timeout: Duration) -> io::Result<TcpStream> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rediss://127.0.0.1:TLS_PORT/` (a server started with `tls`).
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }

    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The server's working directory (its log is `redis.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// False once [`RedisServer::kill`] ran (without a restart).
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// True while the child process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILLs the server and waits for it to exit. With persistence off, its data is gone.
    /// Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // kill() fails only when the child already exited; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    /// Kills the running one first if needed. Panics when it cannot (the port was taken by
    /// another process meanwhile, or the binary vanished): the test cannot go on.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::Spawn(e)) => {
                    panic!("cannot restart redis-server on port {}: {e}", self.port)
                }
                Err(StartError::NotServing(e)) if Instant::now() >= deadline => {
                    panic!("cannot restart redis-server on port {}: {e}", self.port)
                }
                Err(StartError::NotServing(_)) => {
                    // Most likely the old socket is not released yet; try again shortly.
                    self.kill();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// `FLUSHALL`; panics when the server does not answer `OK`.
    pub fn flushall(&self) {
        let reply = self.command_reply(&["FLUSHALL"]);
        assert_eq!(
            reply,
            Reply::Status("OK".into()),
            "FLUSHALL on port {}",
            self.port
        );
    }

    /// Sends one command and returns the reply rendered as text (see [`Reply`]'s `Display`):
    /// e.g. `HGETALL k` -> `[node-a, 5, node-b, 3]`, `TTL k` -> `42`, `GET missing` -> `(nil)`.
    /// Panics on I/O errors; server errors come back as `(error) ...`.
    pub fn command(&self, args: &[&str]) -> String {
        self.command_reply(args).to_string()
    }

    /// Sends one command and returns the parsed reply. Panics on I/O errors.
    pub fn command_reply(&self, args: &[&str]) -> Reply {
        self.connect(IO_TIMEOUT)
            .and_then(|stream| roundtrip(stream, args))
            .unwrap_or_else(|e| panic!("redis command {args:?} on port {}: {e}", self.port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why a start attempt failed, to decide whether another attempt can help.
enum StartError {
    /// The process could not be run at all (missing binary, no temp dir): retrying is useless.
    Spawn(String),
    /// It ran but did not serve on our port (exited, e.g. the port was taken, or timed out).
    NotServing(String),
}

/// Writes one command as a RESP array of bulk strings and reads one reply.
fn roundtrip(mut stream: TcpStream, args: &[&str]) -> io::Result<Reply> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    stream.write_all(&out)?;
    stream.flush()?;
    read_reply(&mut BufReader::new(stream))
}

fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn parse_int(text: &str) -> io::Result<i64> {
    text.parse()
        .map_err(|_| io::Error::other(format!("bad RESP integer {text:?}")))
}

fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
    let line = read_line(reader)?;
    let (kind, rest) = line.split_at_checked(1).unwrap_or(("", ""));
    match kind {
        "+" => Ok(Reply::Status(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Int(parse_int(rest)?)),
        "$" => {
            let len = parse_int(rest)?;
            if len < 0 {
                return Ok(Reply::Nil);
            }
            let len = usize::try_from(len).map_err(io::Error::other)?;
            let mut buf = vec![0; len + 2];
            reader.read_exact(&mut buf)?;
            buf.truncate(len);
            Ok(Reply::Bulk(String::from_utf8_lossy(&buf).into_owned()))
        }
        "*" => {
            let len = parse_int(rest)?;
            if len < 0 {
                return Ok(Reply::Nil);
            }
            (0..len)
                .map(|_| read_reply(reader))
                .collect::<io::Result<Vec<_>>>()
                .map(Reply::Array)
        }
        _ => Err(io::Error::other(format!("unexpected RESP line {line:?}"))),
    }
}

/// A Redis Cluster of real `redis-server` processes on loopback, created with
/// `redis-cli --cluster create` (node ports below 55 000: the bus port is port + 10 000).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each; waits until every node reports
    /// `cluster_state:ok` and every master has its replicas. `None` (or a panic in CI) when
    /// it cannot.
    pub fn start(masters: usize, replicas: usize) -> Option<RedisCluster> {
        match Self::try_start(masters, replicas) {
            Ok(c) => Some(c),
            Err(reason) if in_ci() => panic!("a redis cluster is required in CI: {reason}"),
            Err(reason) => {
                eprintln!("redis cluster not available: {reason}");
                None
            }
        }
    }

    fn try_start(masters: usize, replicas: usize) -> Result<RedisCluster, String> {
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes-{port}.conf",
            "--cluster-node-timeout",
            "1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            nodes.push(Self::node(&args).ok_or_else(|| "cannot start a cluster node".to_string())?);
        }
        let cli = std::env::var_os("REDIS_CLI_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-cli"));
        let out = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_until("the cluster is ok", Duration::from_secs(20), |c| {
            c.nodes
                .iter()
                .all(|n| n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                && c.masters().len() == masters
                && c.nodes.iter().all(|n| {
                    // Masters see their replicas; replicas finished their first sync (a
                    // replica that never synced does not fail over).
                    let info = n.command(&["INFO", "replication"]);
                    if info.contains("role:master") {
                        info.contains(&format!("connected_slaves:{replicas}"))
                    } else {
                        info.contains("master_link_status:up")
                            && !info.contains("master_sync_in_progress:1")
                    }
                })
        })?;
        Ok(cluster)
    }

    fn node(args: &[String]) -> Option<RedisServer> {
        RedisServer::start_with(args, 55_000, false)
    }

    /// Polls `done` until it holds or `within` passes.
    pub fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&RedisCluster) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while !done(self) {
            if Instant::now() >= deadline {
                return Err(format!("timed out waiting until {what}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Indexes of the running nodes that are masters owning slots.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive())
            .filter(|&i| {
                let info = self.nodes[i].command(&["INFO", "replication"]);
                info.contains("role:master")
                    && !self.nodes[i].command(&["CLUSTER", "SLOTS"]).is_empty()
            })
            .collect()
    }

    /// `redis://127.0.0.1:PORT/` of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// The node index serving `key` (`CLUSTER KEYSLOT` then `CLUSTER SLOTS`).
    pub fn master_of(&self, key: &str) -> usize {
        let any = self.nodes.iter().find(|n| n.alive()).expect("a live node");
        let slot: i64 = any
            .command(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap_or(-1);
        let i = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive())
            .find(
                |&i| match self.nodes[i].command_reply(&["CLUSTER", "SLOTS"]) {
                    Reply::Array(ranges) => ranges.iter().any(|r| match r {
                        Reply::Array(parts) => match (&parts[0], &parts[1], &parts[2]) {
                            (Reply::Int(a), Reply::Int(b), Reply::Array(master)) => {
                                (*a..=*b).contains(&slot)
                                    && master.get(1)
                                        == Some(&Reply::Int(i64::from(self.nodes[i].port())))
                            }
                            _ => false,
                        },
                        _ => false,
                    }),
                    _ => false,
                },
            );
        i.unwrap_or_else(|| panic!("no master serves {key} (slot {slot})"))
    }
}
