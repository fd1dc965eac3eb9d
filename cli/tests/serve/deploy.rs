//! The deployment files in `deploy/`: the image runs the sidecar as a non-root user with the
//! data dir as a volume and a `/healthz` check; the systemd unit keeps the data dir in a
//! `StateDirectory` and reloads with SIGHUP; the Kubernetes example runs the litellm proxy and
//! the sidecar in one pod with a persistent data dir; the Grafana dashboard queries only
//! metrics that a running sidecar exports. Plus what they rely on: `--listen` from
//! `PROVIDER_BUDGETS_LISTEN`.

use provider_budgets_test_support::cli::Cli;
use provider_budgets_test_support::redis_server::RedisServer;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::edge::{spawn, Sidecar};

fn deploy(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_image_runs_as_non_root_with_a_data_volume_and_a_health_check() {
    let d = deploy("Dockerfile");
    assert_eq!(
        d.matches("\nFROM ").count() + usize::from(d.starts_with("FROM ")),
        2,
        "two stages"
    );
    assert!(d.contains("cargo build --release --locked"), "locked build");
    assert!(d.contains("\nUSER 10001\n"), "non-root user");
    assert!(d.contains("VOLUME [\"/var/lib/provider-budgets\"]"));
    assert!(d.contains("PROVIDER_BUDGETS_DATA_DIR=/var/lib/provider-budgets"));
    assert!(
        d.contains("PROVIDER_BUDGETS_LISTEN="),
        "--listen from the environment"
    );
    let health = d
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<String>();
    assert!(health.contains("/healthz"), "{health}");
    assert!(d.contains("CMD [\"serve\"]"));
}

#[test]
fn the_systemd_unit_keeps_state_and_reloads_with_sighup() {
    let u = deploy("provider-budgets.service");
    for line in [
        "StateDirectory=provider-budgets",
        "Environment=PROVIDER_BUDGETS_DATA_DIR=/var/lib/provider-budgets",
        "ExecStart=/usr/local/bin/provider-budgets serve",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "DynamicUser=yes",
    ] {
        assert!(u.lines().any(|l| l == line), "missing {line:?}");
    }
}

#[test]
fn the_k8s_pod_runs_litellm_and_the_sidecar_with_a_persistent_data_dir() {
    let docs: Vec<serde_yaml_ng::Value> = ["statefulset.yaml", "configmap.yaml"]
        .iter()
        .map(|f| serde_yaml_ng::from_str(&deploy(&format!("k8s/{f}"))).unwrap())
        .collect();
    let spec = &docs[0]["spec"];
    let containers = spec["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    let names: Vec<&str> = containers
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["litellm", "provider-budgets"]);
    let sidecar = &containers[1];
    let env: Vec<&str> = sidecar["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for var in [
        "PROVIDER_BUDGETS_DATA_DIR",
        "PROVIDER_BUDGETS_NODE_ID",
        "PROVIDER_BUDGETS_AUTH_TOKEN",
    ] {
        assert!(env.contains(&var), "{var} in {env:?}");
    }
    let mounts = sidecar["volumeMounts"].as_sequence().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "data"));
    assert_eq!(spec["volumeClaimTemplates"][0]["metadata"]["name"], "data");
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/healthz");
    // The one config file both read: the proxy's master key and the plugin's callback.
    let config = docs[1]["data"]["config.yaml"].as_str().unwrap();
    assert!(config.contains("master_key: os.environ/LITELLM_MASTER_KEY"));
    assert!(config.contains("provider_budgets_litellm.proxy_handler_instance"));
    // The sidecar reads that very file (without the proxy's environment).
    let cli = Cli::new(config);
    let run = cli.run(&["status", "--json"]);
    run.assert_ok();
}

#[test]
fn listen_comes_from_the_environment() {
    let cli = Cli::new("provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n");
    let (mut child, rx, stderr) = spawn(
        &cli,
        &["serve"],
        &[("PROVIDER_BUDGETS_LISTEN", "127.0.0.1:0")],
    );
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.unwrap_or_else(|_| panic!("no ready line: {}", stderr.lock().unwrap()));
    let addr = line
        .strip_prefix("listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("{line}"));
    assert_ne!(addr, "8787", "the default was used: {line}");
}

/// Every `provider_budgets_*` name in the dashboard's queries.
fn dashboard_metrics() -> BTreeSet<String> {
    let doc: Value = serde_json::from_str(&deploy("grafana/provider-budgets.json")).unwrap();
    let mut names = BTreeSet::new();
    for panel in doc["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("provider_budgets_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 12, "{wanted:?}");
    let yaml = format!(
        "provider_budget_config:\n  openai: {{budget_limit: 1, time_period: 1d}}\nprovider_budgets:\n  redis: {{url: \"{}\", sync_interval: 50ms}}\n",
        redis.url()
    );
    let s = Sidecar::start_env(Cli::new(&yaml), &[], &[]);
    let post = |path: &str, body: Value| s.post(path, &[], &body.to_string());
    let models = json!({"deployments": [{"model": "openai/gpt-4o"}]});
    assert_eq!(post("/v1/filter", models.clone()).status, 200);
    let spend = json!({"provider": "openai", "cost": "1", "durable": true});
    assert_eq!(post("/v1/spend", spend).status, 200);
    assert_eq!(post("/v1/filter", models).status, 429);
    // A few sync rounds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = s.get("/metrics", &[]).body;
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|m| !metrics.lines().any(|l| l.starts_with(m.as_str())))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not in /metrics: {missing:?}\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // /healthz says how stale replication is (seconds since the last round that reached Redis).
    let health: Value = serde_json::from_str(&s.get("/healthz", &[]).body).unwrap();
    let staleness = health["replication"]["staleness_seconds"].as_f64();
    assert!(
        staleness.is_some_and(|x| (0.0..5.0).contains(&x)),
        "{health}"
    );
}
