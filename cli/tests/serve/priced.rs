//! Spend and commits given as token usage (`"usage"` without `"cost"`): priced by the
//! sidecar's catalog, a given cost wins, unpriced models under `deny` are a 422 naming the
//! model (counted in `provider_budgets_unpriced_total`), idempotency keys cover the usage.

use serde_json::{json, Value};

use super::api::Server;

/// openai 100/d; `my-model` at $1 in / $2 out / $0.5 cache read per million tokens.
const PRICED: &str = "provider_budget_config:
  openai: {budget_limit: 100, time_period: 1d}
provider_budgets:
  pricing:
    overrides:
      my-model: {input_per_mtok: 1, output_per_mtok: 2, cache_read_per_mtok: \"0.5\"}
";

fn openai_spend(s: &Server) -> u64 {
    let doc: Value = s.get("/v1/budgets").json();
    doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["provider"] == "openai")
        .and_then(|b| b["spend_nanos"].as_u64())
        .unwrap_or_else(|| panic!("no openai budget: {doc}"))
}

const MY: &str = "openai/my-model";

#[test]
fn priced_spend_prices_usage_and_a_given_cost_wins() {
    let s = Server::start(PRICED, &[]);
    // Our names: 1M in (400k of them cached), 1M out = 0.6 + 0.2 + 2.
    let r = s.spend(json!({"deployment": {"model": MY},
        "usage": {"input_tokens": 1_000_000, "output_tokens": 1_000_000, "cache_read_tokens": 400_000}}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"counted": true, "cost": "2.8", "cost_nanos": 2_800_000_000u64, "priced": true, "price_source": "override"})
    );
    // OpenAI's names, as litellm's usage has them.
    let r = s.spend(json!({"deployment": {"model": MY}, "usage": {
        "prompt_tokens": 1_000_000, "completion_tokens": 500_000, "total_tokens": 1_500_000,
        "prompt_tokens_details": {"cached_tokens": 1_000_000, "audio_tokens": null},
        "completion_tokens_details": {"reasoning_tokens": 100}}}));
    assert_eq!(
        (r.json()["cost"].clone(), r.json()["priced"].clone()),
        (json!("1.5"), json!(true)),
        "{r:?}"
    );
    // A given cost wins; the usage is still accepted (and checked).
    let r = s.spend(json!({"deployment": {"model": MY}, "cost": "0.25",
        "usage": {"input_tokens": 1_000_000, "output_tokens": 0}}));
    assert_eq!(
        r.json(),
        json!({"counted": true, "cost": "0.25", "cost_nanos": 250_000_000u64, "priced": false, "price_source": "given"})
    );
    // The builtin catalog prices what the overrides do not.
    let r = s.spend(json!({"deployment": {"model": "gpt-4o"}, "usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}));
    let doc = r.json();
    assert_eq!(
        (doc["priced"].clone(), doc["price_source"].clone()),
        (json!(true), json!("catalog")),
        "{r:?}"
    );
    let gpt = doc["cost_nanos"].as_u64().unwrap();
    assert!(gpt > 0);
    // A plain cost answers as it always did.
    let r = s.spend(json!({"provider": "openai", "cost": 1}));
    assert_eq!(r.json(), json!({"counted": true}));
    assert_eq!(
        openai_spend(&s),
        2_800_000_000 + 1_500_000_000 + 250_000_000 + gpt + 1_000_000_000
    );
    // Bad shapes: 400, one line, nothing counted.
    s.spend(json!({"deployment": {"model": MY}}))
        .assert_error(400, "missing field `cost` (or `usage`");
    s.spend(json!({"provider": "openai", "usage": {"input_tokens": 1}}))
        .assert_error(400, "usage: priced only with \"deployment\"");
    s.spend(json!({"deployment": {"model": MY}, "usage": {"input_tokenz": 1}}))
        .assert_error(400, "input_tokenz");
    s.spend(json!({"deployment": {"model": MY}, "usage": {"input_tokens": -1}}))
        .assert_error(400, "invalid JSON body");
    s.spend(json!({"deployment": {"model": MY}, "usage": {"input_tokens": 1, "prompt_tokens": 2}}))
        .assert_error(
            400,
            "usage: input_tokens (1) and prompt_tokens (2) disagree",
        );
    s.spend(json!({"deployment": {"model": MY}, "usage": {"total_tokens": 2}}))
        .assert_error(400, "usage: give input_tokens and output_tokens");
    assert_eq!(
        openai_spend(&s),
        2_800_000_000 + 1_500_000_000 + 250_000_000 + gpt + 1_000_000_000
    );
}

#[test]
fn priced_unpriced_models_are_a_422_under_deny_and_counted_in_a_metric() {
    let mut s = Server::start(PRICED, &[]);
    let body = json!({"deployment": {"model": "openai/no-such-model"},
        "usage": {"input_tokens": 10, "output_tokens": 10}, "idempotency_key": "k1"});
    s.spend(body.clone())
        .assert_error(422, "\"openai/no-such-model\" is unpriced");
    // Not remembered: a retry runs again (a reload may have priced it).
    s.spend(body).assert_error(422, "is unpriced");
    assert_eq!(openai_spend(&s), 0);
    let metrics = s.get("/metrics").body;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("provider_budgets_unpriced_total{"))
        .unwrap_or_else(|| panic!("no unpriced metric: {metrics}"));
    assert!(line.contains("model=\"openai/no-such-model\""), "{line}");
    assert!(line.contains("policy=\"deny\""), "{line}");
    assert!(line.ends_with(" 2"), "{line}");
    // Logged once per model (stderr is read to its end: stop the server first).
    s.signal("TERM");
    assert!(s.wait_exit(std::time::Duration::from_secs(20)).success());
    let stderr = s.stderr();
    let lines = stderr
        .lines()
        .filter(|l| l.contains("no-such-model") && l.contains("is unpriced"))
        .count();
    assert_eq!(lines, 1, "{stderr}");
}

#[test]
fn priced_allow_zero_counts_nothing_and_says_unpriced() {
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\nprovider_budgets:\n  pricing: {unpriced: allow_zero}\n";
    let s = Server::start(yaml, &[]);
    let r = s.spend(json!({"deployment": {"model": "openai/no-such-model"},
        "usage": {"input_tokens": 10, "output_tokens": 10}}));
    assert_eq!(
        r.json(),
        json!({"counted": true, "cost": "0", "cost_nanos": 0, "priced": false, "price_source": "unpriced_zero"}),
        "{r:?}"
    );
}

#[test]
fn priced_idempotency_keys_cover_the_usage() {
    let s = Server::start(PRICED, &[]);
    let spend = |input: u64| {
        s.spend(
            json!({"deployment": {"model": MY}, "idempotency_key": "call-1",
            "usage": {"input_tokens": input, "output_tokens": 0}}),
        )
    };
    let first = spend(1_000_000);
    assert_eq!(first.json()["cost"], "1", "{first:?}");
    let again = spend(1_000_000);
    assert_eq!(again.json()["duplicate"], true, "{again:?}");
    assert_eq!(again.json()["cost"], "1", "{again:?}");
    spend(2_000_000).assert_error(409, "usage");
    // The same cost with and without usage are other requests too.
    let with_cost = |usage: Value| {
        let mut b = json!({"deployment": {"model": MY}, "idempotency_key": "call-2", "cost": "1"});
        if !usage.is_null() {
            b["usage"] = usage;
        }
        s.spend(b)
    };
    assert_eq!(with_cost(Value::Null).status, 200);
    with_cost(json!({"input_tokens": 1, "output_tokens": 1})).assert_error(409, "another request");
    assert_eq!(openai_spend(&s), 2_000_000_000);
}

#[test]
fn priced_commit_prices_usage_on_the_reserved_model() {
    let s = Server::start(PRICED, &[]);
    let reserve = |model: &str| {
        let r = s.post(
            "/v1/reserve",
            &json!({"deployments": [{"model": model}], "estimate": "5"}).to_string(),
        );
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["reservation"].as_str().unwrap().to_owned()
    };
    let id = reserve(MY);
    let commit =
        json!({"reservation": id, "usage": {"prompt_tokens": 2_000_000, "completion_tokens": 0}})
            .to_string();
    let r = s.post("/v1/commit", &commit);
    assert_eq!(r.status, 200, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["committed"], true);
    assert_eq!(
        (doc["cost"].clone(), doc["cost_nanos"].clone()),
        (json!("2"), json!(2_000_000_000u64))
    );
    assert_eq!(
        (doc["priced"].clone(), doc["price_source"].clone()),
        (json!(true), json!("override"))
    );
    assert_eq!(s.post("/v1/commit", &commit).json()["duplicate"], true);
    assert_eq!(openai_spend(&s), 2_000_000_000);

    // Unpriced under deny: 422, the reservation stays open; a cost commits it.
    let id = reserve("openai/no-such-model");
    let r = s.post(
        "/v1/commit",
        &json!({"reservation": id, "usage": {"input_tokens": 1, "output_tokens": 1}}).to_string(),
    );
    r.assert_error(422, "stays open");
    let r = s.post(
        "/v1/commit",
        &json!({"reservation": id, "cost": "0.5"}).to_string(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(openai_spend(&s), 2_500_000_000);
    // Neither cost nor usage.
    s.post("/v1/commit", &json!({"reservation": id}).to_string())
        .assert_error(400, "missing field `cost`");
}

/// A catalog of `n` models `m0`… priced at `$input` in and $0 out per million tokens.
fn catalog(n: usize, input: &str) -> String {
    let entries: Vec<String> = (0..n)
        .map(|i| {
            format!(r#""m{i}": {{"litellm_provider": "openai", "input_cost_per_token": {input}e-6, "output_cost_per_token": 0}}"#)
        })
        .collect();
    format!("{{{}}}", entries.join(",\n"))
}

#[test]
fn priced_catalog_reloads_with_the_config_and_a_bad_one_is_refused() {
    let cli = provider_budgets_test_support::cli::Cli::new("");
    let config = |file: &std::path::Path| {
        format!(
            "provider_budget_config:\n  openai: {{budget_limit: 100, time_period: 1d}}\nprovider_budgets:\n  pricing: {{catalog: {}}}\n",
            file.display()
        )
    };
    let file = cli.write_config("prices.json", &catalog(4, "1"));
    std::fs::write(&cli.config, config(&file)).unwrap();
    let s = Server::start_in(cli, &[]);
    let price_m0 = || {
        let r = s.spend(json!({"deployment": {"model": "openai/m0"},
            "usage": {"input_tokens": 1_000_000, "output_tokens": 0}}));
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["cost"].as_str().unwrap().to_owned()
    };
    assert_eq!(price_m0(), "1");
    // The file shrank by more than half: refused, the running catalog keeps pricing.
    std::fs::write(&file, catalog(1, "9")).unwrap();
    s.post("/v1/reload", "")
        .assert_error(422, "fewer than half");
    assert_eq!(price_m0(), "1");
    // Malformed: refused, naming the file.
    std::fs::write(&file, r#"{"m0": {"input_cost_per_token": "cheap"}}"#).unwrap();
    s.post("/v1/reload", "").assert_error(422, "prices.json");
    assert_eq!(price_m0(), "1");
    // A good one: taken.
    std::fs::write(&file, catalog(3, "2")).unwrap();
    let r = s.post("/v1/reload", "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(price_m0(), "2");
}
