//! The budget routes: `GET /v1/budgets` (filters and paging) and the runtime budgets,
//! `PUT`, `GET` and `DELETE /v1/budgets/{scope}/{name}` (contract in
//! `docs/guide/sidecar.md`). A put or delete runs on the blocking pool: it stores the
//! definition (fsync), applies it through the limiter's reload machinery and waits for Redis
//! (bounded by the timeouts), none of which may hold a runtime worker.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State as Extract};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::api::{body, error, json, parse, Reject};
use super::State;
use provider_budgets::{
    BudgetChange, BudgetConfig, BudgetError, BudgetFields, Limiter, Scope, StatusQuery,
};

type Shared = Arc<State>;

/// Rows of `GET /v1/budgets` without `limit`: a small config keeps its whole document, a
/// fleet with 100 000 budgets gets pages of a few hundred kilobytes instead of one document
/// of tens of megabytes.
const DEFAULT_PAGE: usize = 1000;

/// The largest `limit` of `GET /v1/budgets`.
const MAX_PAGE: usize = 10_000;

// ---- GET /v1/budgets --------------------------------------------------------------------------

/// The query of `GET /v1/budgets`.
#[derive(Debug, Default)]
struct ListQuery {
    scope: Option<Scope>,
    name: Option<String>,
    limit: usize,
    /// (scope, name, period part) of the last row of the previous page.
    after: Option<(Scope, String, String)>,
}

fn list_query(raw: Option<&str>) -> Result<ListQuery, Reject> {
    let bad = |what: String| Reject(StatusCode::BAD_REQUEST, what);
    let mut q = ListQuery {
        limit: DEFAULT_PAGE,
        ..ListQuery::default()
    };
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "scope" => q.scope = Some(value.parse().map_err(|e| bad(format!("scope: {e}")))?),
            "name" => q.name = Some(value.into_owned()),
            "limit" => {
                q.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "limit: {value:?} is not a number from 1 to {MAX_PAGE}"
                        ))
                    })?;
            }
            "cursor" => {
                q.after = Some(decode_cursor(&value).ok_or_else(|| {
                    bad(format!("cursor: {value:?} is not a cursor this API gave"))
                })?);
            }
            other => {
                return Err(bad(format!(
                    "unknown query parameter {other:?} (scope, name, limit, cursor)"
                )))
            }
        }
    }
    Ok(q)
}

/// A cursor: the last row's scope, name and period part, hex-encoded (URL-safe, opaque).
fn encode_cursor(scope: Scope, name: &str, period: &str) -> String {
    format!("{}\0{name}\0{period}", scope.as_str())
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(text: &str) -> Option<(Scope, String, String)> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '\0');
    let scope = parts.next()?.parse().ok()?;
    Some((scope, parts.next()?.to_owned(), parts.next()?.to_owned()))
}

pub(super) async fn list(Extract(state): Extract<Shared>, RawQuery(raw): RawQuery) -> Response {
    let q = match list_query(raw.as_deref()) {
        Ok(q) => q,
        Err(r) => return r.into_response(),
    };
    let mut query = StatusQuery::all().limit(q.limit + 1);
    if let Some(s) = q.scope {
        query = query.scope(s);
    }
    if let Some(n) = &q.name {
        query = query.name(n);
    }
    if let Some((scope, name, period)) = &q.after {
        query = query.after(*scope, name, period);
    }
    let mut rows = state.limiter.status(query);
    let more = rows.len() > q.limit;
    rows.truncate(q.limit);
    let mut doc = crate::status_json::status_document(&state.limiter, &rows);
    if let (true, Some(last)) = (more, rows.last()) {
        doc["next_cursor"] = encode_cursor(last.scope, &last.name, &last.period_key).into();
    }
    json(StatusCode::OK, &doc)
}

// ---- /v1/budgets/{scope}/{name} ---------------------------------------------------------------

/// The body of `PUT /v1/budgets/{scope}/{name}`: the fields of a budget in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutRequest<'a> {
    #[serde(borrow)]
    limit: &'a RawValue,
    /// Absent for a concurrent budget, which has none.
    #[serde(default)]
    period: String,
    #[serde(default)]
    soft_limits: Vec<f64>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    enforcement: Option<String>,
    #[serde(default)]
    offline: Option<String>,
    /// `fixed` (default) or `sliding`.
    #[serde(default)]
    window: Option<String>,
    #[serde(default)]
    time_zone: Option<String>,
    /// A template's (name `*`) bound on its live series.
    #[serde(default)]
    max_series: Option<u32>,
    /// What it counts: `usd` (default), `tokens`, `input_tokens`, `output_tokens`,
    /// `requests` or `concurrent`.
    #[serde(default)]
    unit: Option<String>,
    /// The most a reservation holds in it, in its unit.
    #[serde(default)]
    max_estimate: Option<serde_json::Value>,
}

impl PutRequest<'_> {
    /// The budget, read and checked as the config file reads one (422 naming the field).
    fn budget(&self, scope: Scope, name: &str) -> Result<BudgetConfig, Reject> {
        let raw = self.limit.get().trim();
        let limit = if raw.starts_with('"') {
            serde_json::from_str::<String>(raw)
                .map_err(|e| Reject(StatusCode::BAD_REQUEST, format!("limit: {e}")))?
        } else if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            raw.to_owned()
        } else {
            return Err(Reject(
                StatusCode::BAD_REQUEST,
                format!("limit: expected a JSON number or a decimal string, got {raw}"),
            ));
        };
        let mut fields = BudgetFields::new(limit, self.period.clone());
        fields.soft_limits.clone_from(&self.soft_limits);
        fields.mode.clone_from(&self.mode);
        fields.enforcement.clone_from(&self.enforcement);
        fields.offline.clone_from(&self.offline);
        fields.window.clone_from(&self.window);
        fields.time_zone.clone_from(&self.time_zone);
        fields.max_series = self.max_series;
        fields.unit.clone_from(&self.unit);
        fields.max_estimate = match &self.max_estimate {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(Reject(
                    StatusCode::BAD_REQUEST,
                    format!("max_estimate: expected a number or a decimal string, got {other}"),
                ))
            }
        };
        BudgetConfig::from_fields(scope, name, &fields).map_err(|e| {
            let msg = e.to_string();
            let msg = msg.strip_prefix("config: ").unwrap_or(&msg);
            Reject(StatusCode::UNPROCESSABLE_ENTITY, msg.to_owned())
        })
    }
}

/// The scope of the path (400 naming it when unknown).
fn scope_of(text: &str) -> Result<Scope, Reject> {
    text.parse()
        .map_err(|e| Reject(StatusCode::BAD_REQUEST, format!("scope: {e}")))
}

/// A refused put or delete as an HTTP answer; a series the file defines names the file.
fn refused(state: &State, e: &BudgetError) -> Reject {
    let status = match e {
        BudgetError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        BudgetError::DefinedByConfig { budget } => {
            return Reject(
                StatusCode::CONFLICT,
                format!(
                    "{budget} is defined by the config file {}; change it there (the file stays the source of truth for what it names)",
                    state.config_path.display()
                ),
            )
        }
        BudgetError::NotFound { .. } => StatusCode::NOT_FOUND,
        BudgetError::Ambiguous { .. } => StatusCode::BAD_REQUEST,
        BudgetError::NoRoom { .. } => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    Reject(status, e.to_string())
}

/// The answer of a put or delete: what changed, and the budget's rows as `/v1/budgets` shows
/// them.
fn changed(limiter: &Limiter, c: &BudgetChange) -> Response {
    let rows = limiter.status(StatusQuery::all().scope(c.scope).name(&c.name));
    json(
        StatusCode::OK,
        &serde_json::json!({
            "scope": c.scope.as_str(),
            "name": c.name,
            "period": c.period_key,
            "deleted": c.deleted,
            "version": c.version,
            "node": c.node,
            "replicated": c.replicated,
            "budgets": crate::status_json::budget_rows(&rows),
        }),
    )
}

/// Runs a put or delete on the blocking pool.
async fn blocking(
    state: &Shared,
    change: impl FnOnce(&Limiter) -> Result<BudgetChange, BudgetError> + Send + 'static,
) -> Response {
    let limiter = state.limiter.clone();
    let done = tokio::task::spawn_blocking(move || (change(&limiter), limiter)).await;
    match done {
        Ok((Ok(c), limiter)) => changed(&limiter, &c),
        Ok((Err(e), _)) => refused(state, &e).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("budget task: {e}"),
        ),
    }
}

pub(super) async fn put(
    Extract(state): Extract<Shared>,
    Path((scope, name)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let budget = (|| {
        let scope = scope_of(&scope)?;
        let bytes = body(bytes)?;
        let request: PutRequest<'_> = parse(&bytes)?;
        request.budget(scope, &name)
    })();
    match budget {
        Ok(b) => blocking(&state, move |l| l.put_budget(b)).await,
        Err(r) => r.into_response(),
    }
}

/// The optional query of `DELETE /v1/budgets/{scope}/{name}`: `period`.
fn period_query(raw: Option<&str>) -> Result<Option<String>, Reject> {
    let mut period = None;
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "period" => period = Some(value.into_owned()),
            other => {
                return Err(Reject(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {other:?} (period)"),
                ))
            }
        }
    }
    Ok(period)
}

pub(super) async fn delete(
    Extract(state): Extract<Shared>,
    Path((scope, name)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Response {
    let asked = scope_of(&scope).and_then(|s| Ok((s, period_query(raw.as_deref())?)));
    match asked {
        Ok((scope, period)) => {
            blocking(&state, move |l| {
                l.delete_budget(scope, &name, period.as_deref())
            })
            .await
        }
        Err(r) => r.into_response(),
    }
}

pub(super) async fn get(
    Extract(state): Extract<Shared>,
    Path((scope, name)): Path<(String, String)>,
) -> Response {
    let scope = match scope_of(&scope) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let rows = state
        .limiter
        .status(StatusQuery::all().scope(scope).name(&name));
    let runtime: Vec<serde_json::Value> = state
        .limiter
        .runtime_budgets()
        .into_iter()
        .filter(|r| r.budget.scope == scope && r.budget.name == name)
        .map(|r| {
            serde_json::json!({
                "period": r.period_key,
                "version": r.version,
                "node": r.node,
                "shadowed": r.shadowed,
            })
        })
        .collect();
    if rows.is_empty() && runtime.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no budget {scope} {name:?}"),
        );
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "scope": scope.as_str(),
            "name": name,
            "budgets": crate::status_json::budget_rows(&rows),
            "runtime": runtime,
        }),
    )
}
