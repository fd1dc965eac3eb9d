//! Templates over HTTP: a `key: "*"` budget gives each key its own series on `/v1/filter`,
//! `/v1/spend` and `/v1/reserve`; a template past `max_series` refuses a new name with a 429
//! that says so (`template_refused`); `GET /v1/budgets?scope=&name=` finds a series;
//! `/metrics` has the template's aggregates and no gauge per series; a template can be put
//! at runtime (`PUT /v1/budgets/team/*`, with `max_series`).

use serde_json::{json, Value};

use super::api::{Reply, Server};

const CONFIG: &str = "provider_budget_config:
  openai: {budget_limit: 100, time_period: 1d}
provider_budgets:
  budgets:
    - {key: \"*\", limit: 1, period: 1d, max_series: 2}
";

fn filter(s: &Server, identity: Value) -> Reply {
    s.post(
        "/v1/filter",
        &json!({"deployments": [{"model": "gpt-4o"}], "identity": identity}).to_string(),
    )
}

fn spend(s: &Server, key: &str, cost: &str) {
    let r =
        s.spend(json!({"deployment": {"model": "gpt-4o"}, "identity": {"key": key}, "cost": cost}));
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn each_key_gets_a_series_bounded_by_max_series_and_aggregated_in_metrics() {
    let s = Server::start(CONFIG, &[]);
    assert_eq!(filter(&s, json!({"key": "a"})).status, 200);
    spend(&s, "a", "1");
    let r = filter(&s, json!({"key": "a"}));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["exceeded"][0]["name"], "a");
    assert_eq!(filter(&s, json!({"key": "b"})).status, 200, "b has its own");
    spend(&s, "b", "0.25");
    // Two keys have series: a third is refused, saying why.
    let r = filter(&s, json!({"key": "c"}));
    assert_eq!(r.status, 429, "{r:?}");
    let why = r.json()["template_refused"].as_str().unwrap().to_owned();
    assert!(
        why.contains("key \"c\"") && why.contains("max_series"),
        "{why}"
    );
    let r = s.reserve(
        json!({"deployments": [{"model": "gpt-4o"}], "estimate": "0.1", "identity": {"key": "c"}}),
    );
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.json()["template_refused"].is_string(), "{r:?}");

    // A series is found by scope and name, as any budget.
    let doc = s.get("/v1/budgets?scope=key&name=b").json();
    let rows = doc["budgets"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{doc}");
    assert_eq!(rows[0]["spend_nanos"], 250_000_000);
    assert_eq!(rows[0]["templated"], true);

    let metrics = s.get("/metrics").body;
    assert!(
        metrics.contains("provider_budgets_template_live_series{scope=\"key\",period=\"1d\"} 2")
            || metrics
                .contains("provider_budgets_template_live_series{period=\"1d\",scope=\"key\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("provider_budgets_template_exhausted_series"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("provider=\"key:a\""),
        "no per-series gauge for a templated series"
    );
    assert!(
        metrics.contains("provider_budgets_template_refused_total"),
        "{metrics}"
    );
}

#[test]
fn a_template_put_at_runtime_applies_to_new_names() {
    let s = Server::start(CONFIG, &[]);
    let r = s.put_budget(
        "/v1/budgets/team/*",
        json!({"limit": 0, "period": "1d", "max_series": 10}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = filter(&s, json!({"team": "research"}));
    assert_eq!(r.status, 429, "{r:?}");
    assert!(
        r.json()["template_refused"]
            .as_str()
            .is_some_and(|w| w.contains("zero limit")),
        "{r:?}"
    );
    let r = s.put_budget(
        "/v1/budgets/team/research",
        json!({"limit": 5, "period": "1d", "max_series": 3}),
    );
    assert_eq!(r.status, 422, "max_series on a named budget: {r:?}");
    assert!(r.body.contains("max_series: only a template"), "{r:?}");
}
