//! Runtime budgets over HTTP (`PUT`, `GET`, `DELETE /v1/budgets/{scope}/{name}`) and the
//! filters and paging of `GET /v1/budgets`, through the real binary.

use provider_budgets_test_support::cli::Cli;

use serde_json::{json, Value};

use super::api::{Reply, Server, CONFIG, DEADLINE, NOW};

const NANOS: u64 = 1_000_000_000;

impl Server {
    /// `METHOD path` with `headers` (`name: value`) and a `body` (none when `None`), JSON
    /// unless the headers say otherwise.
    fn call(&self, method: &str, path: &str, headers: &[&str], body: Option<&str>) -> Reply {
        let uri = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(uri);
        for h in headers {
            let (k, v) = h.split_once(':').unwrap();
            request = request.header(k.trim(), v.trim());
        }
        let typed = headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("content-type"));
        if body.is_some() && !typed {
            request = request.header("content-type", "application/json");
        }
        let sent = match body {
            Some(b) => self.agent.run(request.body(b.to_owned()).unwrap()),
            None => self.agent.run(request.body(()).unwrap()),
        };
        Server::reply(sent)
    }

    pub(super) fn put_budget(&self, path: &str, body: Value) -> Reply {
        self.call("PUT", path, &[], Some(&body.to_string()))
    }
}

/// The `(scope, name, period, limit_nanos)` of each row of a budget document.
fn rows(doc: &Value) -> Vec<(String, String, String, u64)> {
    doc["budgets"]
        .as_array()
        .unwrap_or_else(|| panic!("no budgets: {doc}"))
        .iter()
        .map(|b| {
            (
                b["scope"].as_str().unwrap().to_owned(),
                b["name"].as_str().unwrap().to_owned(),
                b["period"].as_str().unwrap().to_owned(),
                b["limit_nanos"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn put_get_delete_a_runtime_budget_and_it_survives_a_restart() {
    let mut s = Server::start(CONFIG, &[]);
    let r = s.put_budget(
        "/v1/budgets/tag/team-a",
        json!({"limit": "2.5", "period": "1d", "soft_limits": [0.5], "mode": "enforce", "enforcement": "shared", "time_zone": "Europe/Berlin"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let doc = r.json();
    assert_eq!(
        (
            &doc["scope"],
            &doc["name"],
            &doc["period"],
            &doc["replicated"],
            &doc["version"]
        ),
        (
            &json!("tag"),
            &json!("team-a"),
            &json!("1d@Europe/Berlin"),
            &json!(false),
            &json!(1)
        )
    );
    let row = &doc["budgets"][0];
    assert_eq!(
        (row["limit_nanos"].as_u64(), row["time_zone"].as_str()),
        (Some(5 * NANOS / 2), Some("Europe/Berlin"))
    );
    assert_eq!(row["soft_limits"], json!([0.5]));
    // Its rows are those `GET /v1/budgets` shows.
    let all = s.get("/v1/budgets").json();
    assert!(all["budgets"].as_array().unwrap().contains(row), "{all}");

    // Enforced at once: a limit of 0 leaves nothing for the tag.
    assert_eq!(
        s.put_budget(
            "/v1/budgets/tag/team-b",
            json!({"limit": 0, "period": "1h"})
        )
        .status,
        200
    );
    let denied = s.call(
        "POST",
        "/v1/filter",
        &[],
        Some(&json!({"deployments": [{"model": "gpt-4o"}], "tags": ["team-b"]}).to_string()),
    );
    assert_eq!(denied.status, 429, "{denied:?}");

    let got = s.get("/v1/budgets/tag/team-a");
    assert_eq!(got.status, 200, "{got:?}");
    let got = got.json();
    assert_eq!(got["budgets"], doc["budgets"]);
    assert_eq!(got["runtime"][0]["period"], "1d@Europe/Berlin");
    // A name with '/' (a model after its provider prefix) works encoded or not.
    assert_eq!(
        s.put_budget(
            "/v1/budgets/model/meta/llama-3",
            json!({"limit": 1, "period": "1d"})
        )
        .status,
        200
    );
    assert_eq!(
        s.get("/v1/budgets/model/meta%2Fllama-3").json()["name"],
        "meta/llama-3"
    );
    // Delete: 200, then 404; the spend of a deleted budget is kept for a put to resume.
    let gone = s.call(
        "DELETE",
        "/v1/budgets/tag/team-a?period=1d@Europe/Berlin",
        &[],
        None,
    );
    assert_eq!(
        (gone.status, &gone.json()["deleted"]),
        (200, &json!(true)),
        "{gone:?}"
    );
    assert_eq!(gone.json()["budgets"], json!([]));
    s.call("DELETE", "/v1/budgets/tag/team-a", &[], None)
        .assert_error(404, "no runtime budget");
    s.call("DELETE", "/v1/budgets/tag/team-b?colour=red", &[], None)
        .assert_error(400, "unknown query parameter \"colour\"");

    // Runtime budgets survive a restart of the sidecar.
    s.signal("TERM");
    assert!(s.wait_exit(DEADLINE).success(), "{}", s.stderr());
    let cli = s.cli.status_json(NOW);
    let names: Vec<String> = rows(&cli).into_iter().map(|r| r.1).collect();
    assert_eq!(names, ["anthropic", "openai", "meta/llama-3", "team-b"]);
}

#[test]
fn changes_the_file_defines_or_bad_requests_are_refused_and_change_nothing() {
    let s = Server::start(CONFIG, &[]);
    // The file's budgets show too, and refuse changes naming the file.
    assert_eq!(
        s.get("/v1/budgets/provider/openai").json()["runtime"],
        json!([])
    );
    let config = s.cli.config.display().to_string();
    s.put_budget(
        "/v1/budgets/provider/openai",
        json!({"limit": 5, "period": "1d"}),
    )
    .assert_error(409, &format!("is defined by the config file {config}"));
    s.call("DELETE", "/v1/budgets/provider/openai", &[], None)
        .assert_error(409, &config);

    // Bad requests name what is wrong; nothing changes.
    s.get("/v1/budgets/tag/nobody")
        .assert_error(404, "no budget tag \"nobody\"");
    for (path, body, status, words) in [
        (
            "/v1/budgets/galaxy/x",
            r#"{"limit": 1, "period": "1d"}"#,
            400,
            "scope: unknown scope \"galaxy\"",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": 1, "period": "1d""#,
            400,
            "invalid JSON body",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": 1, "period": "1d", "colour": "red"}"#,
            400,
            "unknown field `colour`",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"period": "1d"}"#,
            400,
            "missing field `limit`",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": true, "period": "1d"}"#,
            400,
            "limit: expected a JSON number",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": -1, "period": "1d"}"#,
            422,
            "limit: \"-1\"",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": 1, "period": "3x"}"#,
            422,
            "period:",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": 1, "period": "1d", "soft_limits": [2]}"#,
            422,
            "soft_limits: 2",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": 1, "period": "1d", "mode": "loud"}"#,
            422,
            "mode: invalid value \"loud\"",
        ),
        (
            "/v1/budgets/tag/x",
            r#"{"limit": 1, "period": "1d", "time_zone": "Mars/Base"}"#,
            422,
            "time_zone: unknown time zone",
        ),
        (
            "/v1/budgets/tag/a%7Bb",
            r#"{"limit": 1, "period": "1d"}"#,
            422,
            "the name is not allowed",
        ),
    ] {
        s.call("PUT", path, &[], Some(body))
            .assert_error(status, words);
    }
    s.call(
        "PUT",
        "/v1/budgets/tag/x",
        &["content-type: text/plain"],
        Some(r#"{"limit": 1, "period": "1d"}"#),
    )
    .assert_error(415, "Content-Type must be application/json");
    s.get("/v1/budgets/tag/x").assert_error(404, "no budget");
    let left = rows(&s.get("/v1/budgets").json());
    assert_eq!(left.len(), 2, "only the file's: {left:?}");
    assert_eq!(left[1].3, 1_000_000_000, "openai's limit as in the file");
}

#[test]
fn the_budget_routes_need_the_token_like_every_v1_route() {
    let cli = Cli::new(CONFIG);
    let token = cli.write_config("token", "t0ken-0f-the-sidecar\n");
    let s = Server::start_in(cli, &["--auth-token-file", token.to_str().unwrap()]);
    let body = r#"{"limit": 1, "period": "1d"}"#;
    s.call("PUT", "/v1/budgets/tag/a", &[], Some(body))
        .assert_error(401, "missing Authorization");
    s.call("GET", "/v1/budgets/tag/a", &[], None)
        .assert_error(401, "missing Authorization");
    s.call(
        "DELETE",
        "/v1/budgets/tag/a",
        &["authorization: Bearer nope"],
        None,
    )
    .assert_error(401, "wrong bearer token");
    let auth = "authorization: Bearer t0ken-0f-the-sidecar";
    assert_eq!(
        s.call("PUT", "/v1/budgets/tag/a", &[auth], Some(body))
            .status,
        200
    );
    assert_eq!(
        s.call("GET", "/v1/budgets/tag/a", &[auth], None).status,
        200
    );
    assert_eq!(
        s.call("DELETE", "/v1/budgets/tag/a", &[auth], None).status,
        200
    );
}

#[test]
fn budgets_filter_by_scope_and_name_and_page_with_a_cursor() {
    let yaml = "provider_budget_config:
  openai: {budget_limit: 1, time_period: 1d}
  anthropic: {budget_limit: 2, time_period: 1d}
tag_budget_config:
  t1: {max_budget: 3, budget_duration: 1d}
";
    let s = Server::start(yaml, &[]);
    for (name, period) in [("t2", "1d"), ("t2", "1h"), ("t3", "1d")] {
        assert_eq!(
            s.put_budget(
                &format!("/v1/budgets/tag/{name}"),
                json!({"limit": 1, "period": period})
            )
            .status,
            200
        );
    }
    let whole = s.get("/v1/budgets").json();
    assert!(whole.get("next_cursor").is_none(), "one page: {whole}");
    let all = rows(&whole);
    assert_eq!(all.len(), 6, "{whole}");

    // Pages of two, following the cursor: the same rows, in order, each once.
    let mut paged = Vec::new();
    let mut path = "/v1/budgets?limit=2".to_owned();
    loop {
        let page = s.get(&path).json();
        let got = rows(&page);
        assert!(got.len() <= 2, "{page}");
        paged.extend(got);
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/budgets?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(paged, all);

    let tags = rows(&s.get("/v1/budgets?scope=tag").json());
    assert_eq!(
        tags.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["t1", "t2", "t2", "t3"]
    );
    let t2 = rows(&s.get("/v1/budgets?scope=tag&name=t2&limit=1").json());
    assert_eq!(t2, [all[3].clone()]);
    let by_name = rows(&s.get("/v1/budgets?name=openai").json());
    assert_eq!(by_name.len(), 1);
    for (query, words) in [
        ("limit=0", "limit: \"0\""),
        ("limit=10001", "from 1 to 10000"),
        ("cursor=zz", "cursor: \"zz\""),
        ("scope=galaxy", "scope: unknown scope"),
        ("page=2", "unknown query parameter \"page\""),
    ] {
        s.get(&format!("/v1/budgets?{query}"))
            .assert_error(400, words);
    }
}

#[test]
fn put_window_sliding_round_trips_through_the_status_json() {
    let s = Server::start(CONFIG, &[]);
    let r = s.put_budget(
        "/v1/budgets/tag/team-s",
        json!({"limit": 1, "period": "1h", "window": "sliding"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["budgets"][0]["window"], "sliding", "{r:?}");
    // Spent in the previous hour, a quarter of an hour before the boundary (NOW).
    let spent = s.post(
        "/v1/spend",
        &json!({"deployment": {"model": "gpt-4o"}, "tags": ["team-s"], "cost": 0.6, "at": "2024-05-01T11:45:00Z"})
            .to_string(),
    );
    assert_eq!(spent.status, 200, "{spent:?}");
    let got = s.get("/v1/budgets/tag/team-s").json();
    let row = &got["budgets"][0];
    assert_eq!(
        (
            &row["window"],
            &row["spend_nanos"],
            &row["sliding_spend_nanos"]
        ),
        (&json!("sliding"), &json!(0), &json!(600_000_000u64)),
        "{got}"
    );
    let all = s.get("/v1/budgets").json();
    assert!(all["budgets"].as_array().unwrap().contains(row), "{all}");
    let openai = all["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "openai")
        .unwrap();
    assert_eq!(
        (&openai["window"], &openai["sliding_spend"]),
        (&json!("fixed"), &Value::Null)
    );
    // 0.6 + 0.5 > 1: refused; 0.4 fits.
    let reserve = |estimate: f64| {
        s.post(
            "/v1/reserve",
            &json!({"deployments": [{"model": "gpt-4o"}], "tags": ["team-s"], "estimate": estimate})
                .to_string(),
        )
        .status
    };
    assert_eq!(reserve(0.5), 429);
    assert_eq!(reserve(0.4), 200);
    s.put_budget(
        "/v1/budgets/tag/team-x",
        json!({"limit": 1, "period": "1h", "window": "rolling"}),
    )
    .assert_error(422, "tag \"team-x\": window: invalid value \"rolling\"");
    s.put_budget(
        "/v1/budgets/tag/team-x",
        json!({"limit": 1, "period": "1h", "window": "sliding", "enforcement": "strict"}),
    )
    .assert_error(
        422,
        "window: sliding is not supported with enforcement: strict",
    );
}
