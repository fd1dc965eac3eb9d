//! Units over HTTP: `/v1/spend` and `/v1/commit` with usage count token and request budgets,
//! a spend without usage names the token budgets it could not count (`"uncounted"`), a 429 of
//! a token or concurrent budget carries `RateLimit-Policy`/`RateLimit` and integer amounts,
//! `/v1/reserve` takes an estimate per unit, `PUT /v1/budgets` takes `"unit"`, status rows
//! and `/metrics` say the unit.

use serde_json::{json, Value};

use super::api::Server;

const CONFIG: &str = "provider_budgets:
  reservation_timeout: 60s
  budgets:
    - {model: gpt-4o, limit: 100, period: 1d}
    - {model: gpt-4o, unit: tokens, limit: 1000, period: 1m}
    - {model: gpt-4o, unit: requests, limit: 5, period: 1m}
    - {model: gpt-4o-mini, unit: concurrent, limit: 1}
";

fn gpt4o() -> Value {
    json!({"model": "gpt-4o"})
}

/// (unit, period, spend, limit, spend_nanos) of each model row.
fn rows(s: &Server) -> Vec<(String, Value, Value, Value, Value)> {
    let doc = s.get("/v1/budgets?scope=model").json();
    let mut out: Vec<_> = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                format!(
                    "{}:{}",
                    r["name"].as_str().unwrap(),
                    r["unit"].as_str().unwrap()
                ),
                r["period"].clone(),
                r["spend"].clone(),
                r["limit"].clone(),
                r["spend_nanos"].clone(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn spend_with_usage_counts_each_unit_and_without_it_says_what_it_could_not_count() {
    let s = Server::start(CONFIG, &[]);
    let r = s.spend(json!({"deployment": gpt4o(), "cost": "0.5",
        "usage": {"prompt_tokens": 300, "completion_tokens": 200}}));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json().get("uncounted").is_none(), "{r:?}");
    let r = s.spend(json!({"deployment": gpt4o(), "cost": "0.5"}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["uncounted"],
        json!([{"scope": "model", "name": "gpt-4o", "period": "1m", "unit": "tokens"}])
    );
    assert_eq!(
        rows(&s),
        vec![
            (
                "gpt-4o-mini:concurrent".into(),
                Value::Null,
                json!(0),
                json!(1),
                Value::Null
            ),
            (
                "gpt-4o:requests".into(),
                json!("1m"),
                json!(2),
                json!(5),
                Value::Null
            ),
            (
                "gpt-4o:tokens".into(),
                json!("1m"),
                json!(500),
                json!(1000),
                Value::Null
            ),
            (
                "gpt-4o:usd".into(),
                json!("1d"),
                json!(1.0),
                json!(100.0),
                json!(1_000_000_000u64)
            ),
        ]
    );
    let metrics = s.get("/metrics").body;
    assert!(
        metrics.contains(
            "provider_budgets_spend{provider=\"model:gpt-4o\",period=\"1m~tokens\",unit=\"tokens\"} 500"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("provider_budgets_uncounted_total{unit=\"tokens\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics
            .contains("provider_budgets_spend_usd{provider=\"model:gpt-4o\",period=\"1m~tokens\""),
        "no dollars for tokens"
    );
}

#[test]
fn a_spent_token_budget_refuses_with_ratelimit_headers_and_whole_counts() {
    let s = Server::start(CONFIG, &[]);
    let r = s.spend(json!({"deployment": gpt4o(), "cost": "0",
        "usage": {"input_tokens": 900, "output_tokens": 150}}));
    assert_eq!(r.status, 200, "{r:?}");
    let r = s.filter(json!([gpt4o()]));
    assert_eq!(r.status, 429, "{r:?}");
    let e = &r.json()["exceeded"][0];
    assert_eq!(e["unit"], "tokens");
    assert_eq!(
        (e["spend"].clone(), e["limit"].clone()),
        (json!(1050), json!(1000))
    );
    assert_eq!(e["spend_nanos"], Value::Null);
    let policy = &r.headers["ratelimit-policy"];
    assert_eq!(
        policy,
        "\"model:gpt-4o:1m:tokens\";q=1000;qu=\"tokens\";w=60"
    );
    let state = &r.headers["ratelimit"];
    assert!(
        state.starts_with("\"model:gpt-4o:1m:tokens\";r=0;t="),
        "{state}"
    );
    let t: u64 = state.rsplit("t=").next().unwrap().parse().unwrap();
    let retry: u64 = r.headers["retry-after"].parse().unwrap();
    assert!(t <= 60 && t == retry, "t={t} retry-after={retry}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("1050 >= 1000 tokens"),
        "{r:?}"
    );
}

#[test]
fn reserve_holds_an_estimate_per_unit_and_commit_counts_usage() {
    let s = Server::start(CONFIG, &[]);
    let reserve =
        |estimate: Value| s.reserve(json!({"deployments": [gpt4o()], "estimate": estimate}));
    let r = reserve(json!({"usd": 0.1, "tokens": 700}));
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.json()["reservation"].as_str().unwrap().to_owned();
    let r = reserve(json!({"tokens": 400}));
    assert_eq!(r.status, 429, "700 held + 400 > 1000: {r:?}");
    assert_eq!(r.json()["exceeded"][0]["unit"], "tokens");
    let bad = reserve(json!({"usd": 0.1, "watts": 3}));
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.body.contains("watts"), "{bad:?}");
    let r = s.post(
        "/v1/commit",
        &json!({"reservation": id, "cost": "0.05", "usage": {"input_tokens": 100, "output_tokens": 20}})
            .to_string(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let tokens = rows(&s)
        .into_iter()
        .find(|r| r.0 == "gpt-4o:tokens")
        .unwrap();
    assert_eq!(tokens.2, json!(120), "the usage, not the estimate");
    // The concurrent budget: one slot, a 429 with Retry-After 1 and no window.
    let mini = json!([{"model": "gpt-4o-mini"}]);
    let held = s.reserve(json!({"deployments": mini, "estimate": 0}));
    assert_eq!(held.status, 200, "{held:?}");
    let r = s.reserve(json!({"deployments": mini, "estimate": 0}));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json()["exceeded"][0]["period"], Value::Null);
    assert_eq!(
        r.headers["ratelimit-policy"],
        "\"model:gpt-4o-mini:concurrent\";q=1;qu=\"concurrent-requests\""
    );
    let id = held.json()["reservation"].as_str().unwrap().to_owned();
    let r = s.post("/v1/release", &json!({"reservation": id}).to_string());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.filter(mini).status, 200, "the slot is free");
}

#[test]
fn a_runtime_budget_takes_a_unit_and_refuses_a_fractional_count() {
    let s = Server::start(CONFIG, &[]);
    let r = s.put_budget(
        "/v1/budgets/tag/batch",
        json!({"limit": 60, "period": "1m", "unit": "requests"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let row = &r.json()["budgets"][0];
    assert_eq!(
        (row["unit"].clone(), row["limit"].clone()),
        (json!("requests"), json!(60))
    );
    let r = s.put_budget(
        "/v1/budgets/tag/batch",
        json!({"limit": 1.5, "period": "1m", "unit": "tokens"}),
    );
    assert_eq!(r.status, 422, "{r:?}");
    assert!(r.body.contains("whole number"), "{r:?}");
    let r = s.put_budget(
        "/v1/budgets/tag/slots",
        json!({"limit": 3, "unit": "concurrent"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn reserve_estimates_from_messages_and_max_tokens_per_candidate() {
    let config = "provider_budgets:
  budgets:
    - {provider: openai, limit: 100, period: 1d, max_estimate: 50}
";
    let s = Server::start(config, &[]);
    let body = json!({
        "deployments": [{"model": "openai/gpt-4o"}],
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]},
        ],
        "max_tokens": 500,
    });
    let r = s.reserve(body.clone());
    assert_eq!(r.status, 200, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["estimate_input_tokens"], 19, "{doc}");
    assert_eq!(doc["estimate_output_tokens"], 500);
    assert!(doc["estimate_nanos"].as_u64().unwrap() > 0, "{doc}");
    let mut both = body.clone();
    both["estimate"] = json!(1);
    let r = s.reserve(both);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("not both"), "{r:?}");
    let r = s.reserve(json!({"deployments": [{"model": "gpt-4o"}], "messages": [7]}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("messages[0]"), "{r:?}");
    let r = s.reserve(json!({"deployments": [{"model": "gpt-4o"}]}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("missing \\\"estimate\\\""), "{r:?}");
    let r = s.reserve(json!({"deployments": [{"model": "gpt-4o"}], "prompt_tokens": 10, "max_completion_tokens": 5}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["estimate_input_tokens"], 10);
}

#[test]
fn a_runtime_max_estimate_caps_what_a_reservation_holds() {
    let s = Server::start(CONFIG, &[]);
    let r = s.put_budget(
        "/v1/budgets/tag/capped",
        json!({"limit": 10, "period": "1d", "max_estimate": "2"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = s.reserve(json!({"deployments": [gpt4o()], "tags": ["capped"], "estimate": 5}));
    assert_eq!(r.status, 200, "{r:?}");
    let doc = s.get("/v1/budgets?scope=tag&name=capped").json();
    assert_eq!(
        doc["budgets"][0]["reserved_nanos"], 2_000_000_000u64,
        "{doc}"
    );
    let r = s.put_budget(
        "/v1/budgets/tag/capped",
        json!({"limit": 10, "period": "1d", "max_estimate": true}),
    );
    assert_eq!(r.status, 400, "{r:?}");
}
