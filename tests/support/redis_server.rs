//! A throwaway `redis-server` for tests.
//!
//! Include it from an integration test with
//! `#[path = "support/redis_server.rs"] mod redis_server;` or from a unit test with
//! `#[path = "../../tests/support/redis_server.rs"] mod redis_server;`.
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
        match Self::try_start() {
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

    fn try_start() -> Result<RedisServer, String> {
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
        };
        let mut last_error = String::from("no attempt made");
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port().map_err(|e| format!("cannot find a free port: {e}"))?;
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

    /// The server's working directory (its log is `redis.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
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
