//! Identities over HTTP: `"identity": {"key", "user", "team", "org", "customer"}` on
//! `/v1/filter`, `/v1/spend` and `/v1/reserve`; a commit counts in the identities its
//! reservation was admitted with; the idempotency fingerprint covers the identity; a bad
//! identity is a 400 naming its field, counting nothing.

use serde_json::{json, Value};

use super::api::Server;

const CONFIG: &str = "provider_budget_config:
  openai: {budget_limit: 100, time_period: 1d}
provider_budgets:
  budgets:
    - {key: k1, limit: 1, period: 1d}
    - {team: research, limit: 2, period: 1d}
    - {customer: c1, limit: 5, period: 1h}
";

/// `(spend_nanos, reserved_nanos)` of the budget `scope` `name` from `GET /v1/budgets`.
fn held(s: &Server, scope: &str, name: &str) -> (u64, u64) {
    let doc = s.get("/v1/budgets").json();
    let b = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["scope"] == scope && b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no budget {scope} {name}: {doc}"));
    (
        b["spend_nanos"].as_u64().unwrap(),
        b["reserved_nanos"].as_u64().unwrap(),
    )
}

fn filter(s: &Server, identity: Value) -> super::api::Reply {
    s.post(
        "/v1/filter",
        &json!({"deployments": [{"model": "gpt-4o"}, {"model": "claude-3-5-sonnet"}], "identity": identity})
            .to_string(),
    )
}

#[test]
fn identities_filter_charge_reserve_and_commit_over_http() {
    let s = Server::start(CONFIG, &[]);
    let k1 = json!({"key": "k1", "team": "research", "org": "acme"});
    let r = s.spend(json!({"deployment": {"model": "gpt-4o"}, "identity": k1, "cost": "1"}));
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"counted": true})),
        "{r:?}"
    );
    assert_eq!(held(&s, "key", "k1"), (1_000_000_000, 0));
    assert_eq!(held(&s, "team", "research"), (1_000_000_000, 0));
    // k1's key budget is spent: 429 naming it, as a tag budget is named.
    let r = filter(&s, k1.clone());
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.headers.get("retry-after").map(String::as_str),
        Some("43200")
    );
    let doc = r.json();
    assert_eq!(
        doc["exceeded"],
        json!([{
            "provider": null, "scope": "key", "name": "k1", "period": "1d",
            "spend": 1.0, "limit": 1.0, "spend_nanos": 1_000_000_000u64,
            "limit_nanos": 1_000_000_000u64, "resets_at": "2024-05-02T00:00:00Z",
            "refused_by": "limit", "grant": null, "grant_nanos": null, "unit": "usd",
        }])
    );
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("Exceeded budget for key k1: 1 >= 1"),
        "{doc}"
    );
    // Another key of the same team passes, and so does a request without identity.
    let k2 = json!({"key": "k2", "team": "research"});
    assert_eq!(
        filter(&s, k2.clone()).json()["deployments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(filter(&s, Value::Null).status, 200);

    // A reservation holds the estimate in the team; a second one does not fit (1 + 0.75 + 0.5 > 2).
    let r = s
        .reserve(json!({"deployments": [{"model": "gpt-4o"}], "estimate": "0.75", "identity": k2}));
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.json()["reservation"].as_str().unwrap().to_owned();
    assert_eq!(held(&s, "team", "research"), (1_000_000_000, 750_000_000));
    let r = s.reserve(json!({
        "deployments": [{"model": "gpt-4o"}],
        "estimate": "0.5",
        "identity": {"key": "k3", "team": "research"},
    }));
    assert_eq!(r.status, 429, "{r:?}");
    let e = &r.json()["exceeded"][0];
    assert_eq!(
        (
            e["scope"].clone(),
            e["name"].clone(),
            e["spend_nanos"].clone()
        ),
        (json!("team"), json!("research"), json!(2_250_000_000u64))
    );
    // The commit counts in the team it was admitted with (the body names no identity).
    let r = s.post(
        "/v1/commit",
        &json!({"reservation": id, "cost": "0.6"}).to_string(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(held(&s, "team", "research"), (1_600_000_000, 0));
    assert_eq!(held(&s, "key", "k1"), (1_000_000_000, 0), "k2 is not k1");
}

#[test]
fn the_idempotency_key_covers_the_identity() {
    let s = Server::start(CONFIG, &[]);
    let body = |identity: Value| json!({"deployment": {"model": "gpt-4o"}, "cost": "0.25", "idempotency_key": "call-1", "identity": identity});
    let r = s.spend(body(json!({"customer": "c1"})));
    assert_eq!(r.json(), json!({"counted": true}), "{r:?}");
    let r = s.spend(body(json!({"customer": "c1", "user": null})));
    assert_eq!(
        r.json(),
        json!({"counted": true, "duplicate": true}),
        "{r:?}"
    );
    for other in [
        json!({"customer": "c2"}),
        json!({"user": "c1"}),
        Value::Null,
    ] {
        s.spend(body(other))
            .assert_error(409, "idempotency_key \"call-1\" was used before");
    }
    assert_eq!(held(&s, "customer", "c1"), (250_000_000, 0), "counted once");
}

#[test]
fn a_bad_identity_is_a_400_naming_its_field_and_counts_nothing() {
    let s = Server::start(CONFIG, &[]);
    let d = json!({"model": "gpt-4o"});
    let long = "x".repeat(257);
    let cases = [
        (
            json!({"group": "x"}),
            "identity: unknown field \"group\" (key, user, team, org or customer)",
        ),
        (json!({"team": 5}), "expected a string for identity.team"),
        (
            json!({"user": long}),
            "identity.user: must be 1 to 256 bytes, got 257",
        ),
        (
            json!({"org": ""}),
            "identity.org: must be 1 to 256 bytes, got 0",
        ),
        (json!("k1"), "expected identity: an object"),
    ];
    for (identity, want) in cases {
        s.spend(json!({"deployment": d, "cost": 1, "identity": identity}))
            .assert_error(400, want);
        s.post(
            "/v1/filter",
            &json!({"deployments": [d], "identity": identity}).to_string(),
        )
        .assert_error(400, want);
        s.reserve(json!({"deployments": [d], "estimate": 1, "identity": identity}))
            .assert_error(400, want);
    }
    // As tags: only with deployments (a provider alone charges its own budgets only).
    s.spend(json!({"provider": "openai", "cost": 1, "identity": {"key": "k1"}}))
        .assert_error(400, "identity: only with \"deployment\"");
    s.reserve(json!({"provider": "openai", "estimate": 1, "identity": {"key": "k1"}}))
        .assert_error(400, "identity: only with \"deployments\"");
    assert_eq!(held(&s, "provider", "openai"), (0, 0));
    assert_eq!(held(&s, "key", "k1"), (0, 0));
}
