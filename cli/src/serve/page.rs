//! `GET /`: the status page. One self-contained HTML document (`page.html`: inline style and
//! script, no external asset, so it works air-gapped) with the budgets embedded as JSON; the
//! script renders them with search, sort and paging (state in the URL fragment, so the
//! periodic reload keeps it). `Content-Security-Policy` forbids every request the page could
//! make off the host (and every fetch at all: the data comes with the page). With
//! `Accept: text/plain` (curl) the same route answers the `status` table.
//!
//! Why server-rendered data rather than a script fetching `/v1/budgets`: a browser cannot send
//! the bearer token with a navigation, so the page carries its data and refreshes by reloading
//! itself; with a token configured, `/` needs it like every `/v1/*` route (put the page behind
//! a proxy that adds it, or use curl).

use std::sync::Arc;

use axum::extract::State as Extract;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use provider_budgets::{BudgetStatus, Limiter, StatusQuery};

use super::State;

/// The page's template; `__DATA__` becomes the budgets' JSON.
const TEMPLATE: &str = include_str!("page.html");
/// How often the page reloads itself.
const REFRESH_SECONDS: u64 = 10;
/// Closed windows shown per budget in the chart (besides the current one).
const HISTORY: usize = 7;
/// No request off the page itself: inline style and script only, images from data URLs.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) async fn index(Extract(state): Extract<Arc<State>>, headers: HeaderMap) -> Response {
    let limiter = state.limiter.clone();
    let plain = wants_text(&headers);
    // Status of thousands of budgets is CPU work: off the async workers.
    let body = tokio::task::spawn_blocking(move || {
        let budgets = limiter.status(StatusQuery::all());
        if plain {
            let mut out = Vec::new();
            crate::status_table::write_table(&mut out, &budgets).map(|()| out)
        } else {
            Ok(html(&limiter, &budgets).into_bytes())
        }
    })
    .await;
    let body = match body {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    let kind = if plain {
        "text/plain; charset=utf-8"
    } else {
        "text/html; charset=utf-8"
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("accept"));
    if !plain {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    r
}

/// `Accept` asks for text/plain and not for HTML (curl sends `*/*`: that is HTML; `curl -H
/// 'Accept: text/plain'` is the table).
fn wants_text(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    accept.contains("text/plain") && !accept.contains("text/html")
}

/// The page with the budgets embedded.
fn html(limiter: &Limiter, budgets: &[BudgetStatus]) -> String {
    let health = limiter.health();
    let rows: Vec<serde_json::Value> = budgets.iter().map(|s| row(limiter, s)).collect();
    let doc = serde_json::json!({
        "node_id": limiter.node_id(),
        "generated_at": limiter.now().to_string(),
        "storage_ok": health.storage_ok(),
        "storage_fault": health.storage_fault,
        "refresh_seconds": REFRESH_SECONDS,
        "budgets": rows,
    });
    // Inside a <script> element: no `<` at all, so no `</script>` or `<!--` can end it early
    // (`\u003c` is the same JSON string).
    let data = doc.to_string().replace('<', "\\u003c");
    TEMPLATE.replace("__DATA__", &data)
}

/// One budget's row for the page's script.
fn row(limiter: &Limiter, s: &BudgetStatus) -> serde_json::Value {
    let pct = if s.limit.as_nanos() == 0 {
        100.0
    } else {
        s.spend.as_nanos() as f64 * 100.0 / s.limit.as_nanos() as f64
    };
    let history: Vec<serde_json::Value> = limiter
        .history(s.scope, &s.name, &s.period_key, HISTORY + 1)
        .into_iter()
        .map(|(w, spend)| {
            let (spend, limit) = (
                crate::status_json::amount(s.unit, spend),
                crate::status_json::amount(s.unit, s.limit),
            );
            serde_json::json!({"start": w.start().to_string(), "spend": spend, "limit": limit})
        })
        .collect();
    let r = &s.replication;
    let repl = match (r.enabled, r.stale, &r.last_error) {
        (false, ..) => "local".to_owned(),
        (true, _, Some(e)) => format!("failing: {e}"),
        (true, true, None) => "stale".to_owned(),
        (true, false, None) => "in sync".to_owned(),
    };
    let soft: Vec<String> = s
        .thresholds_crossed
        .iter()
        .map(|x| format!("{}%", x.fraction() * 100.0))
        .collect();
    serde_json::json!({
        "scope": s.scope.as_str(),
        "name": s.name,
        // The period part without its `~unit` (the unit has its own column).
        "period": s.period_key.split('~').next().unwrap_or_default(),
        "unit": s.unit.as_str(),
        "pct": pct,
        "spend": crate::status_json::amount(s.unit, s.spend),
        "spend_text": s.unit.format_amount(s.spend.as_nanos()),
        "limit_text": s.unit.format_amount(s.limit.as_nanos()),
        "resets": crate::status_json::local(s.window.end(), &s.time_zone),
        "soft": soft.join(", "),
        "mode": format!("{} {}", s.mode.as_str(), s.enforcement.as_str()),
        "repl": repl,
        "problem": s.replication_problem.is_some() || s.storage_fault.is_some(),
        "history": history,
    })
}
