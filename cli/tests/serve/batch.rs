//! `POST /v1/spend/batch`: each spend answered as `/v1/spend` answers it, in order, counted
//! once (idempotency keys hold across a batch and single posts), one bad spend failing alone,
//! and the batch itself refused only when malformed or too long.

use serde_json::{json, Value};

use super::api::{Server, CONFIG};

const NANOS: u64 = 1_000_000_000;

fn batch(s: &Server, spends: Value) -> (u16, Value) {
    let r = s.post("/v1/spend/batch", &json!({ "spends": spends }).to_string());
    let doc = if r.status == 200 {
        r.json()
    } else {
        json!(r.body)
    };
    (r.status, doc)
}

#[test]
fn each_spend_of_a_batch_is_answered_and_counted_as_if_posted_alone() {
    let s = Server::start(CONFIG, &[]);
    let (status, doc) = batch(
        &s,
        json!([
            {"provider": "anthropic", "cost": 1, "idempotency_key": "a"},
            {"provider": "anthropic", "cost": "0.5"},
            {"provider": "anthropic", "cost": -1},
            {"provider": "nobody", "cost": 1},
            {"provider": "anthropic", "cost": 1, "idempotency_key": "a"},
            {"provider": "anthropic", "cost": 2, "idempotency_key": "a"},
            7,
        ]),
    );
    assert_eq!(status, 200, "{doc}");
    let r = doc["results"].as_array().unwrap();
    assert_eq!(r.len(), 7, "{doc}");
    assert_eq!(r[0], json!({"status": 200, "counted": true}));
    assert_eq!(r[1], json!({"status": 200, "counted": true}));
    assert_eq!(r[2]["status"], 400, "{doc}");
    assert!(r[2]["error"].as_str().unwrap().contains("cost"), "{doc}");
    assert_eq!(r[3]["status"], 200, "{doc}");
    assert_eq!(r[3]["counted"], false, "{doc}");
    // The same key within the batch: counted once (the repeat may run concurrently with the
    // first: it waits for it), and a different request under that key is a conflict.
    assert_eq!(r[4]["counted"], true, "{doc}");
    assert_eq!(r[4]["duplicate"], true, "{doc}");
    assert_eq!(r[5]["status"], 409, "{doc}");
    assert_eq!(r[6]["status"], 400, "{doc}");
    assert_eq!(s.spend_nanos("anthropic"), NANOS + NANOS / 2);
    // A key first used in a batch is a duplicate when posted alone.
    let again = s.spend(json!({"provider": "anthropic", "cost": 1, "idempotency_key": "a"}));
    assert_eq!(again.json(), json!({"counted": true, "duplicate": true}));
    assert_eq!(s.spend_nanos("anthropic"), NANOS + NANOS / 2);
}

#[test]
fn a_malformed_or_oversized_batch_is_refused_whole_and_counts_nothing() {
    let s = Server::start(CONFIG, &[]);
    for body in [
        "[]".to_string(),
        r#"{"spends": {}}"#.to_string(),
        r#"{"spends": [], "extra": 1}"#.to_string(),
        "{\"spends\": [".to_string(),
    ] {
        s.post("/v1/spend/batch", &body).assert_error(400, "");
    }
    let many: Vec<Value> = (0..1001).map(|_| json!(1)).collect();
    let r = s.post("/v1/spend/batch", &json!({ "spends": many }).to_string());
    r.assert_error(400, "at most 1000");
    let big: Vec<Value> = (0..400)
        .map(|i| json!({"provider": "anthropic", "cost": 1, "idempotency_key": format!("k-{i:0>150}")}))
        .collect();
    let r = s.post("/v1/spend/batch", &json!({ "spends": big }).to_string());
    r.assert_error(413, "body");
    assert_eq!(s.spend_nanos("anthropic"), 0);
    let (status, doc) = batch(&s, json!([]));
    assert_eq!((status, doc), (200, json!({"results": []})));
    // The largest batch the limits allow: 1 000 spends, each answered and counted once.
    let most: Vec<Value> = (0..1000)
        .map(|_| json!({"provider": "anthropic", "cost": "0.001"}))
        .collect();
    let (status, doc) = batch(&s, json!(most));
    assert_eq!(status, 200, "{doc}");
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 1000);
    assert!(results
        .iter()
        .all(|r| r == &json!({"status": 200, "counted": true})));
    assert_eq!(s.spend_nanos("anthropic"), NANOS);
}

#[test]
fn admission_says_whether_a_filter_still_admits_every_spent_deployment() {
    let config = "provider_budgets:
  budgets:
    - {provider: openai, limit: 1, period: 1d}
    - {tag: team-a, limit: 10, period: 1d}
    - {team: research, limit: 2, period: 1d}
";
    let s = Server::start(config, &[]);
    let post = |spends: Value| {
        let body = json!({ "spends": spends, "admission": true });
        let r = s.post("/v1/spend/batch", &body.to_string());
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    };
    let gpt = |cost: &str| json!({"deployment": {"model": "openai/gpt-4o"}, "tags": ["team-a"], "cost": cost});
    // Room left in every budget the spends counted in.
    let doc = post(json!([gpt("0.25"), gpt("0.25")]));
    assert_eq!(doc["admitted"], true, "{doc}");
    // Without "admission" the answer has no such field.
    let r = s.post(
        "/v1/spend/batch",
        &json!({"spends": [gpt("0")]}).to_string(),
    );
    assert!(r.json().get("admitted").is_none(), "{r:?}");
    // The provider's budget is spent: a filter of that deployment now refuses.
    let doc = post(json!([gpt("0.5")]));
    assert_eq!(doc["admitted"], false, "{doc}");
    // An identity's budget counts too: the team is spent on another provider's model.
    let claude = json!({"deployment": {"model": "anthropic/claude-haiku-4-5"}, "identity": {"team": "research"}, "cost": 2});
    let doc = post(json!([claude]));
    assert_eq!(doc["admitted"], false, "{doc}");
    // A spend counted nowhere (refused) changes nothing; a provider spend cannot be checked.
    let doc = post(json!([{"deployment": {"model": "mistral/large"}, "cost": -1}]));
    assert_eq!(doc["admitted"], true, "{doc}");
    let doc = post(json!([{"provider": "openai", "cost": 0}]));
    assert_eq!(doc["admitted"], false, "{doc}");
}
