//! Runs the `provider-budgets` binary for integration tests.
//!
//! Use it as `provider_budgets_test_support::cli`. A [`Cli`] owns a temporary dir with a
//! config file and a data dir, and builds commands with `--config` and `--data-dir` set.
//! Children run with `RUST_LOG` removed (the default `warn` level must keep normal runs quiet)
//! and `RUST_BACKTRACE=1`, so that a panic would show a backtrace the assertions catch.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test: `PROVIDER_BUDGETS_BIN` when set, else `provider-budgets` beside the
/// test executable's `deps/` dir (where `cargo test` at the workspace root builds it; the CLI
/// crate's own tests are guaranteed a fresh one).
pub fn bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PROVIDER_BUDGETS_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("provider-budgets");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test` at the workspace root (it builds the CLI crate), or set PROVIDER_BUDGETS_BIN",
        bin.display()
    );
    bin
}

/// A config file and a data dir in one temporary directory.
pub struct Cli {
    pub tmp: tempfile::TempDir,
    pub config: PathBuf,
    pub data: PathBuf,
}

impl Cli {
    /// A fresh data dir and `config.yaml` holding `yaml`.
    pub fn new(yaml: &str) -> Cli {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = tmp.path().join("config.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let data = tmp.path().join("data");
        Cli { tmp, config, data }
    }

    /// Writes another config file next to the default one and returns its path.
    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// `provider-budgets --config <config> --data-dir <data> ARGS...`
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_with(&self.config, args)
    }

    /// Like [`Cli::cmd`] with another config file.
    pub fn cmd_with(&self, config: &Path, args: &[&str]) -> Command {
        let mut c = bare_cmd();
        c.arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(&self.data);
        c.args(args);
        c
    }

    /// `provider-budgets ... --redis URL --node-id NODE --now NOW ingest --durable`: a node
    /// that acknowledges each durable record on stdout (the crash tests SIGKILL it).
    pub fn durable_ingest(&self, url: &str, node: &str, now: &str) -> Command {
        self.cmd(&[
            "--redis",
            url,
            "--node-id",
            node,
            "--now",
            now,
            "ingest",
            "--durable",
        ])
    }

    /// Runs to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::of(self.cmd(args).output().expect("spawn provider-budgets"))
    }

    /// Runs to completion against another data dir (same config file).
    pub fn run_in(&self, data: &Path, args: &[&str]) -> Run {
        let mut c = bare_cmd();
        c.arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(data);
        c.args(args);
        Run::of(c.output().expect("spawn provider-budgets"))
    }

    /// Runs to completion with `input` on stdin (stdout and stderr captured).
    pub fn pipe(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn provider-budgets");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("wait for provider-budgets")
    }

    /// Runs with another config file.
    pub fn run_with(&self, config: &Path, args: &[&str]) -> Run {
        Run::of(
            self.cmd_with(config, args)
                .output()
                .expect("spawn provider-budgets"),
        )
    }

    /// `--now NOW status --json`, asserting success; the parsed document.
    pub fn status_json(&self, now: &str) -> serde_json::Value {
        let run = self.run(&["--now", now, "status", "--json"]);
        run.assert_ok();
        serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("status JSON: {e}: {run:?}"))
    }

    /// Exact spend (nano-dollars) of `provider` in the window of `now`.
    pub fn spend_nanos(&self, now: &str, provider: &str) -> u64 {
        let doc = self.status_json(now);
        budget(&doc, provider)["spend_nanos"]
            .as_u64()
            .unwrap_or_else(|| panic!("no spend_nanos for {provider}: {doc}"))
    }
}

/// The binary with a controlled environment and no arguments: none of the
/// `PROVIDER_BUDGETS_*` variables the binary reads for its global flags is inherited.
pub fn bare_cmd() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("RUST_LOG").env("RUST_BACKTRACE", "1");
    for var in [
        "PROVIDER_BUDGETS_CONFIG",
        "PROVIDER_BUDGETS_DATA_DIR",
        "PROVIDER_BUDGETS_REDIS",
        "PROVIDER_BUDGETS_NODE_ID",
        "PROVIDER_BUDGETS_AUTH_TOKEN",
    ] {
        c.env_remove(var);
    }
    c
}

/// The budget entry of `provider` in a `status --json` document.
pub fn budget<'a>(doc: &'a serde_json::Value, provider: &str) -> &'a serde_json::Value {
    doc["budgets"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["provider"] == provider))
        .unwrap_or_else(|| panic!("no budget for {provider} in {doc}"))
}

/// What a finished invocation did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Exit 0 and nothing on stderr.
    pub fn assert_ok(&self) {
        assert_eq!(self.code, Some(0), "expected success: {self:?}");
        assert_eq!(self.stderr, "", "stderr of a successful run: {self:?}");
    }

    /// Failed with `code`, and stderr is exactly one `error: ` line that contains every one
    /// of `culprits`, without any sign of a panic.
    pub fn assert_error(&self, code: i32, culprits: &[&str]) {
        assert_eq!(self.code, Some(code), "exit code: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected exactly one stderr line: {self:?}");
        assert!(lines[0].starts_with("error: "), "{self:?}");
        for c in culprits {
            assert!(lines[0].contains(c), "stderr does not name {c:?}: {self:?}");
        }
        for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "internal error"] {
            assert!(!self.stderr.contains(bad), "{bad:?} in stderr: {self:?}");
        }
    }
}
