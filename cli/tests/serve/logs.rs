//! What `serve` logs by default (no `RUST_LOG`): warnings, plus one info line per lifecycle
//! event: listening, a reload (what it added, changed and removed), Redis lost and back, and
//! shutdown (what was flushed). Nothing else at info level.

use provider_budgets_test_support::cli::Cli;
use provider_budgets_test_support::redis_server::RedisServer;

use std::time::{Duration, Instant};

use super::edge::Sidecar;

const DEADLINE: Duration = Duration::from_secs(20);

fn config(url: &str, extra: &str) -> String {
    format!(
        "provider_budget_config:\n  openai: {{budget_limit: 1, time_period: 1d}}\n{extra}provider_budgets:\n  redis: {{url: \"{url}\", sync_interval: 50ms, connect_timeout: 200ms, command_timeout: 200ms}}\n"
    )
}

/// Waits until the sidecar's stderr holds a line with every one of `parts`; returns it.
fn line_with(s: &Sidecar, parts: &[&str]) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = s.stderr();
        if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_logs_each_lifecycle_event_once_and_no_other_info() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let cli = Cli::new(&config(&redis.url(), ""));
    let config_path = cli.config.clone();
    let s = Sidecar::start_env(cli, &[], &[("RUST_LOG", "")]);
    line_with(&s, &["INFO", "listening"]);

    std::fs::write(
        &config_path,
        config(
            &redis.url(),
            "  anthropic: {budget_limit: 2, time_period: 1h}\n",
        ),
    )
    .unwrap();
    s.signal("HUP");
    let reload = line_with(&s, &["INFO", "config reloaded"]);
    assert!(reload.contains("added=[\"anthropic\"]"), "{reload}");

    redis.kill();
    line_with(&s, &["WARN", "redis sync failed"]);
    redis.restart();
    line_with(&s, &["INFO", "redis reachable again"]);

    s.signal("TERM");
    line_with(&s, &["INFO", "shutting down"]);
    line_with(&s, &["INFO", "stopped: every counted spend is on disk"]);
    let log = s.stderr();
    for l in log.lines().filter(|l| l.contains(" INFO ")) {
        assert!(
            l.contains("provider_budgets::lifecycle"),
            "an info line off the lifecycle: {l}\n{log}"
        );
    }
    assert_eq!(log.matches("listening").count(), 1, "{log}");
}

#[test]
fn serve_warns_at_start_and_at_reload_about_configs_that_enforce_less_than_they_seem() {
    let cli = Cli::new(
        "provider_budget_config:\n  OpenAI: {budget_limit: 1, time_period: 1d}\ngeneral_settings:\n  max_budget: 10\n",
    );
    let config_path = cli.config.clone();
    let s = Sidecar::start_env(cli, &[], &[("RUST_LOG", "")]);
    line_with(&s, &["warning: ", "did you mean \"openai\""]);
    line_with(&s, &["warning: ", "general_settings.max_budget"]);
    std::fs::write(&config_path, "model_list: []\n").unwrap();
    s.signal("HUP");
    line_with(&s, &["warning: ", "no budget is configured"]);
    // Each once: not also through the library's log.
    let log = s.stderr();
    assert_eq!(
        log.matches("general_settings.max_budget").count(),
        1,
        "{log}"
    );
}
