//! Child processes driven over pipes by the crash tests: spawned with stdin and stdout piped
//! (stderr discarded), fed line by line, then SIGKILLed.
//!
//! Used as `provider_budgets_test_support::child`.

#![allow(dead_code)]

use std::io::BufReader;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Spawns `cmd` with stdin and stdout piped and stderr discarded; returns the child with its
/// stdin and its buffered stdout taken.
pub fn spawn_piped(mut cmd: Command) -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdin = child.stdin.take().expect("child stdin");
    let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
    (child, stdin, stdout)
}

/// Kills `child` without warning (SIGKILL on unix) and reaps it.
pub fn sigkill(child: &mut Child) {
    child.kill().expect("kill child");
    child.wait().expect("reap child");
}
