//! Routes and handlers of the sidecar. Every error is `{"error": "<one line>"}` with a 4xx or
//! 5xx status; nothing is recorded when a request is refused.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State as Extract};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::idempotency::{fingerprint, Begin, Outcome, MAX_KEY_LEN};
use super::identity::IdentityIn;
use super::money::{clip, money_from_json};
use super::usage::{self, Counted, UsageIn};
use super::{State, BODY_LIMIT};
use crate::status_json::{amount, nanos};
use provider_budgets::{
    Deployment, Exceeded, Identity, Money, NoDeployments, RecordError, Scope, Target, Unit, Usage,
};

type Shared = Arc<State>;

// ---- responses ----------------------------------------------------------------------------------

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(super) fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_bytes(status, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("encoding: {e}")),
    }
}

/// `{"error": "<one line>"}`.
pub(super) fn error(status: StatusCode, reason: &str) -> Response {
    json(status, &error_value(reason))
}

/// The body of [`error`].
pub(super) fn error_value(reason: &str) -> serde_json::Value {
    let line = reason.lines().map(str::trim).collect::<Vec<_>>().join("; ");
    serde_json::json!({ "error": line })
}

pub(super) fn bad_request(reason: &str) -> Response {
    error(StatusCode::BAD_REQUEST, reason)
}

/// A refused request: status and one-line reason (rendered by [`error`]).
#[derive(Debug)]
pub(super) struct Reject(pub StatusCode, pub String);

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

/// The body, or the JSON error for a body over the limit (413) or unreadable (400).
pub(super) fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Reject> {
    body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Reject(
                status,
                format!("request body over the limit of {BODY_LIMIT} bytes"),
            )
        } else {
            Reject(
                status,
                format!("cannot read the request body: {}", r.body_text()),
            )
        }
    })
}

/// Parses a JSON body; the error names the field or position (serde_json's message).
pub(super) fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Reject> {
    serde_json::from_slice(bytes)
        .map_err(|e| Reject(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

// ---- admission ---------------------------------------------------------------------------------

/// Bounded concurrency without a queue: a request that finds every permit taken gets 503.
pub(super) async fn admit(
    Extract(state): Extract<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = Arc::clone(&state.permits).try_acquire_owned() else {
        metrics::counter!("provider_budgets_http_overloaded_total").increment(1);
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight (--max-in-flight); retry",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    next.run(request).await
}

pub(super) async fn not_found(request: Request<Body>) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("no route {} {}", request.method(), request.uri().path()),
    )
}

pub(super) async fn method_not_allowed(request: Request<Body>) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!(
            "method {} not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

// ---- /v1/filter -------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterRequest<'a> {
    #[serde(borrow)]
    deployments: Vec<DeploymentIn<'a>>,
    /// The request's tags (litellm's `metadata.tags`): their tag budgets must have room.
    #[serde(borrow, default)]
    tags: Vec<Cow<'a, str>>,
    /// The request's identities: their budgets must have room.
    #[serde(borrow, default)]
    identity: Option<IdentityIn<'a>>,
}

/// One candidate, echoed back as given when it may be used.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeploymentIn<'a> {
    #[serde(borrow)]
    pub model: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    /// Opaque, echoed back as given (clients match answers to their list with it; `id` is
    /// the deployment's budget identity).
    #[serde(
        borrow,
        default,
        rename = "ref",
        skip_serializing_if = "Option::is_none"
    )]
    reference: Option<Cow<'a, str>>,
}

impl Deployment for DeploymentIn<'_> {
    fn model(&self) -> &str {
        &self.model
    }
    fn provider(&self) -> Option<&str> {
        self.provider.as_deref()
    }
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

#[derive(Serialize)]
struct FilterResponse<'r, 'a> {
    deployments: Vec<&'r DeploymentIn<'a>>,
}

pub(super) async fn filter(
    Extract(state): Extract<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let bytes = match body(bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let request: FilterRequest<'_> = match parse(&bytes) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let identity = request.identity.unwrap_or_default();
    if let Err(e) = identity.check() {
        return bad_request(&e);
    }
    metrics::counter!("provider_budgets_filter_calls_total").increment(1);
    let allowed =
        state
            .limiter
            .filter_for(&request.deployments, &request.tags, &identity.identity());
    match allowed {
        Ok(allowed) => {
            let dropped = request.deployments.len() - allowed.len();
            if dropped > 0 {
                metrics::counter!("provider_budgets_filtered_deployments_total")
                    .increment(dropped as u64);
            }
            json(
                StatusCode::OK,
                &FilterResponse {
                    deployments: allowed,
                },
            )
        }
        Err(none) => {
            metrics::counter!("provider_budgets_filtered_deployments_total")
                .increment(request.deployments.len() as u64);
            no_deployments(&state, &none)
        }
    }
}

/// 429: each refusing budget with its reset time, `Retry-After` until the earliest moment
/// one may admit again: its window's reset for a spent budget, the next grant round for a
/// strict budget refused by this node's grant (`"refused_by": "grant"`).
pub(super) fn no_deployments(state: &State, none: &NoDeployments) -> Response {
    let now = state.limiter.now();
    // Why not the reset for a grant refusal: the budget is not spent, a grant round (every
    // sync interval, Redis permitting) may admit again long before the window ends.
    let next_grant = state
        .limiter
        .config()
        .redis
        .as_ref()
        .map_or(Duration::from_secs(1), |r| r.sync_interval);
    let next_grant = now.checked_add(next_grant).unwrap_or(Timestamp::MAX);
    // A concurrent budget frees a slot at any commit, release or expiry: worth a retry soon.
    let next_slot = now
        .checked_add(Duration::from_secs(1))
        .unwrap_or(Timestamp::MAX);
    let retry_at = |e: &Exceeded| {
        if e.by_grant() {
            next_grant
        } else if e.unit == Unit::Concurrent {
            next_slot
        } else {
            e.resets_at
        }
    };
    let earliest = none.exceeded.iter().map(retry_at).min();
    let exceeded: Vec<serde_json::Value> = none.exceeded.iter().map(exceeded_json).collect();
    let mut r = json(
        StatusCode::TOO_MANY_REQUESTS,
        &serde_json::json!({
            "error": none.to_string(),
            "exceeded": exceeded,
            "unknown": none.unknown,
            "template_refused": none.template_refused,
        }),
    );
    if let Some(t) = earliest {
        // Whole seconds, rounded up, at least 1.
        let nanos = t.duration_since(now).as_nanos().max(1);
        let secs = (nanos + 999_999_999) / 1_000_000_000;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    super::ratelimit::insert(r.headers_mut(), &none.exceeded, now, retry_at);
    r
}

/// One refusing budget of a 429: `limit` is always the configured limit; a strict budget
/// refused by this node's grant has `"refused_by": "grant"` and the grant in `grant`.
fn exceeded_json(e: &Exceeded) -> serde_json::Value {
    serde_json::json!({
        "provider": (e.scope == Scope::Provider).then_some(&e.name),
        "scope": e.scope.as_str(),
        "name": e.name,
        "period": (e.unit != Unit::Concurrent).then_some(&e.period),
        "unit": e.unit.as_str(),
        "refused_by": if e.by_grant() { "grant" } else { "limit" },
        "spend": amount(e.unit, e.spend),
        "limit": amount(e.unit, e.limit),
        "grant": e.grant.map(|g| amount(e.unit, g)),
        "spend_nanos": nanos(e.unit, e.spend),
        "limit_nanos": nanos(e.unit, e.limit),
        "grant_nanos": e.grant.map(|g| nanos(e.unit, g)),
        "resets_at": e.resets_at.to_string(),
    })
}

// ---- /v1/spend --------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpendRequest<'a> {
    /// The provider's budgets only (as before scopes).
    #[serde(borrow, default)]
    provider: Option<Cow<'a, str>>,
    /// Every budget that applies to the deployment and the tags (as `/v1/filter` resolves).
    #[serde(borrow, default)]
    deployment: Option<DeploymentIn<'a>>,
    #[serde(borrow, default)]
    tags: Vec<Cow<'a, str>>,
    /// The request's identities: each one's budgets count the spend too.
    #[serde(borrow, default)]
    identity: Option<IdentityIn<'a>>,
    /// The cost; absent: `usage` priced by the catalog.
    #[serde(borrow, default)]
    cost: Option<&'a RawValue>,
    #[serde(default)]
    usage: Option<UsageIn>,
    #[serde(borrow, default)]
    at: Option<&'a RawValue>,
    #[serde(default)]
    durable: Option<bool>,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// A validated spend: to a provider's budgets, or to every budget of a deployment and tags.
#[derive(Debug, Clone)]
enum Against {
    Provider(String),
    Deployment(Target, Vec<String>),
}

/// A validated spend.
#[derive(Debug, Clone)]
struct Spend {
    against: Against,
    identity: IdentityIn<'static>,
    /// `None`: price `usage`.
    cost: Option<Money>,
    usage: Option<Usage>,
    at: Option<Timestamp>,
    durable: bool,
}

impl SpendRequest<'_> {
    fn validate(&self) -> Result<Spend, String> {
        let against = match (&self.provider, &self.deployment) {
            (Some(p), None) if p.is_empty() => return Err("provider: empty".into()),
            (Some(p), None) if !self.tags.is_empty() => {
                return Err(format!(
                    "tags: only with \"deployment\" (\"provider\" {p:?} charges the provider's budgets only)"
                ))
            }
            (Some(p), None) if self.identity.as_ref().is_some_and(|i| !i.is_empty()) => {
                return Err(format!(
                    "identity: only with \"deployment\" (\"provider\" {p:?} charges the provider's budgets only)"
                ))
            }
            (Some(p), None) => Against::Provider(p.clone().into_owned()),
            (None, Some(d)) if d.model.is_empty() => return Err("deployment.model: empty".into()),
            (None, Some(d)) => Against::Deployment(
                Target::from_parts(d.model.clone().into_owned(), d.provider.clone().map(Cow::into_owned), d.id.clone().map(Cow::into_owned)),
                self.tags.iter().map(|t| t.clone().into_owned()).collect(),
            ),
            (Some(_), Some(_)) => {
                return Err("give either \"provider\" or \"deployment\", not both".into())
            }
            (None, None) => return Err("missing \"deployment\" (or \"provider\")".into()),
        };
        let identity = self.identity.clone().unwrap_or_default();
        identity.check()?;
        let (cost, usage) = cost_and_usage(self.cost, self.usage.as_ref())?;
        if let (Against::Provider(p), None) = (&against, cost) {
            return Err(format!(
                "usage: priced only with \"deployment\" (its model); give \"cost\" for \"provider\" {p:?}"
            ));
        }
        let at = match self.at {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(parse_at(raw.get()).map_err(|e| format!("at: {e}"))?),
        };
        if let Some(k) = &self.idempotency_key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(format!(
                    "idempotency_key: must be 1 to {MAX_KEY_LEN} bytes, got {}",
                    k.len()
                ));
            }
        }
        Ok(Spend {
            against,
            identity: identity.into_owned(),
            cost,
            usage,
            at,
            durable: self.durable.unwrap_or(false),
        })
    }
}

/// A body's `cost` and `usage`: at least one (a given cost wins; the usage is still checked).
pub(super) fn cost_and_usage(
    cost: Option<&RawValue>,
    usage: Option<&UsageIn>,
) -> Result<(Option<Money>, Option<Usage>), String> {
    let usage = usage.map(UsageIn::usage).transpose()?;
    let cost = match cost {
        Some(raw) if raw.get() != "null" => {
            Some(money_from_json(raw).map_err(|e| format!("cost: {e}"))?)
        }
        _ if usage.is_some() => None,
        _ => return Err("missing field `cost` (or `usage`, priced by the catalog)".into()),
    };
    Ok((cost, usage))
}

/// `at`: an RFC 3339 string or whole Unix seconds (number or string).
pub(super) fn parse_at(text: &str) -> Result<Timestamp, String> {
    let s: Cow<'_, str> = if text.starts_with('"') {
        Cow::Owned(serde_json::from_str::<String>(text).map_err(|e| e.to_string())?)
    } else {
        Cow::Borrowed(text)
    };
    let t = s.trim();
    if let Ok(secs) = t.parse::<i64>() {
        return Timestamp::from_second(secs)
            .map_err(|e| format!("Unix seconds {t} out of range: {e}"));
    }
    t.parse::<Timestamp>().map_err(|_| {
        let well_formed = jiff::fmt::temporal::DateTimeParser::new()
            .parse_pieces(t)
            .is_ok_and(|p| p.time().is_some() && p.offset().is_some());
        if well_formed {
            // RFC 3339, only outside what a timestamp can hold.
            format!(
                "{} is out of range: a spend may be at most {} in the future",
                clip(text),
                humantime::format_duration(provider_budgets::MAX_FUTURE_SKEW)
            )
        } else {
            format!(
                "{} is neither RFC 3339 (2024-05-01T12:00:00Z) nor whole Unix seconds",
                clip(text)
            )
        }
    })
}

pub(super) async fn spend(
    Extract(state): Extract<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let bytes = match body(bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let (status, answer) = spend_answer(&state, &bytes).await;
    json(status, &answer)
}

/// The answer to one spend request's JSON: its status and body (`/v1/spend`, and each item
/// of `/v1/spend/batch`).
pub(super) async fn spend_answer(state: &Shared, bytes: &[u8]) -> (StatusCode, serde_json::Value) {
    let request: SpendRequest<'_> = match parse(bytes) {
        Ok(r) => r,
        Err(Reject(status, reason)) => return (status, error_value(&reason)),
    };
    let spend = match request.validate() {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, error_value(&e)),
    };
    let Some(key) = request.idempotency_key.as_deref() else {
        let (status, outcome) = record(state, &spend, None).await;
        return (status, spend_value(status, &outcome, false));
    };
    let request_id = fingerprint(&spend.canonical());
    keyed_spend(Arc::clone(state), spend, key, request_id).await
}

/// A spend with an idempotency key: counted once per key (module `idempotency`), its key
/// journaled with it.
async fn keyed_spend(
    state: Shared,
    spend: Spend,
    key: &str,
    request_id: u64,
) -> (StatusCode, serde_json::Value) {
    loop {
        match state.keys.begin(key, request_id) {
            Begin::Mismatch => return (StatusCode::CONFLICT, error_value(&format!(
                "idempotency_key {key:?} was used before with another request (target, cost, usage or at differ); a new request needs a new key"
            ))),
            Begin::Done(outcome) => {
                return (StatusCode::OK, spend_value(StatusCode::OK, &outcome, true))
            }
            Begin::Wait(mut rx) => {
                let first = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|o| o.clone());
                match first {
                    Some(outcome) if outcome.settled => {
                        return (StatusCode::OK, spend_value(StatusCode::OK, &outcome, true))
                    }
                    _ => continue, // the first attempt counted nothing: run again
                }
            }
            Begin::Fresh(ticket) => {
                // In its own task: a client that disconnects (and retries) does not cancel
                // a record halfway, so the key always ends with the true outcome.
                let state = Arc::clone(&state);
                let key = key.to_owned();
                let task = tokio::spawn(async move {
                    let (status, outcome) = record(&state, &spend, Some((&key, request_id))).await;
                    ticket.finish(outcome.clone());
                    (status, outcome)
                });
                return match task.await {
                    Ok((status, outcome)) => (status, spend_value(status, &outcome, false)),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        error_value(&format!("spend task: {e}")),
                    ),
                };
            }
        }
    }
}

impl Spend {
    /// The library's spend for it (provider and deployment spends share one type), for the
    /// request's `identity` (borrowed from `self.identity`), with its idempotency key and
    /// request fingerprint when it has one (journaled with the spend).
    fn spend<'a>(
        &'a self,
        identity: &'a Identity<'a>,
        key: Option<(&'a str, u64)>,
    ) -> provider_budgets::Spend<'a, dyn Deployment, String> {
        const NO_TAGS: &[String] = &[];
        let d = |d| d as &dyn Deployment;
        let spend = match (&self.against, self.cost, self.usage) {
            (Against::Provider(p), cost, _) => {
                // `validate` refuses a provider spend without a cost.
                provider_budgets::Spend::provider(p, cost.unwrap_or(Money::ZERO)).tags(NO_TAGS)
            }
            (Against::Deployment(t, tags), Some(cost), _) => {
                provider_budgets::Spend::deployment(d(t), cost).tags(tags)
            }
            (Against::Deployment(t, tags), None, usage) => {
                provider_budgets::Spend::deployment_usage(d(t), usage.unwrap_or_default())
                    .tags(tags)
            }
        };
        let spend = match (self.cost, self.usage) {
            (Some(_), Some(usage)) => spend.usage(usage),
            _ => spend,
        };
        let spend = spend.identity(identity);
        let spend = match self.at {
            Some(at) => spend.at(at),
            None => spend,
        };
        match key {
            Some((key, fingerprint)) => spend.idempotency_key(key, fingerprint),
            None => spend,
        }
    }

    /// What an idempotency key stands for, as bytes to fingerprint: target, tags, cost, `at`
    /// (not `durable`: a durable retry is the same spend) and the identity, each field tagged
    /// and length-prefixed so that no two requests share an encoding. Stable across versions:
    /// a fingerprint stored before an upgrade must still match, so the identity is appended
    /// only when one is given (`i`, then its names: see `IdentityIn::encode`). The encoding
    /// without it ends where its own fields end, so no request without identity encodes as
    /// one with.
    fn canonical(&self) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, text: Option<&str>) {
            match text {
                None => out.push(0),
                Some(t) => {
                    out.push(1);
                    out.extend_from_slice(&(t.len() as u64).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
            }
        }
        let mut out = Vec::with_capacity(96);
        match &self.against {
            Against::Provider(p) => {
                out.push(b'p');
                field(&mut out, Some(p));
            }
            Against::Deployment(d, tags) => {
                out.push(b'd');
                field(&mut out, Some(d.model()));
                field(&mut out, d.provider());
                field(&mut out, d.id());
                out.extend_from_slice(&(tags.len() as u64).to_be_bytes());
                for t in tags {
                    field(&mut out, Some(t));
                }
            }
        }
        out.extend_from_slice(&self.cost.unwrap_or(Money::ZERO).as_nanos().to_be_bytes());
        match self.at {
            None => out.push(0),
            Some(at) => {
                out.push(1);
                out.extend_from_slice(&at.as_nanosecond().to_be_bytes());
            }
        }
        if !self.identity.is_empty() {
            out.push(b'i');
            self.identity.encode(&mut out);
        }
        // Last, and only when given: a retry with another usage is another request.
        usage::encode(&mut out, self.usage.as_ref(), self.cost.is_some());
        out
    }
}

/// Records one spend (with its idempotency key and request fingerprint, if any): the HTTP
/// status and the outcome to remember for its key.
async fn record(state: &State, s: &Spend, key: Option<(&str, u64)>) -> (StatusCode, Outcome) {
    let identity = s.identity.identity();
    // What the receipt counted: only a charge that went through has a cost to report.
    let mut counted = None;
    let mut uncounted = Vec::new();
    let result = match state.limiter.charge(s.spend(&identity, key)) {
        Ok(receipt) if s.durable => {
            counted = Some(Counted::of(&receipt));
            uncounted = usage::uncounted_json(&receipt);
            let durable = receipt.await;
            if let (Ok(_), Some((key, _))) = (&durable, key) {
                state.after_fsync(key).await;
            }
            durable
        }
        Ok(receipt) => {
            counted = Some(Counted::of(&receipt));
            uncounted = usage::uncounted_json(&receipt);
            Ok(receipt.budgets())
        }
        Err(e) => Err(e),
    };
    let (status, outcome, label) = match result {
        Ok(0) => {
            let reason = match &s.against {
                Against::Provider(p) => format!("provider {p:?} has no budget configured"),
                Against::Deployment(..) => {
                    "no budget applies to the deployment, tags and identity".into()
                }
            };
            (StatusCode::OK, Outcome::refused(reason), "no_budget")
        }
        Ok(_) => (StatusCode::OK, Outcome::counted(), "counted"),
        Err(e @ RecordError::Expired { .. }) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Outcome::transient(e.to_string()),
            "expired",
        ),
        Err(e @ RecordError::Unpriced(_)) => (
            // Not settled: a reload of the catalog may price it.
            StatusCode::UNPROCESSABLE_ENTITY,
            Outcome::transient(format!("usage: {e}")),
            "unpriced",
        ),
        Err(e @ RecordError::Future { .. }) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Outcome::transient(format!("at: {e}")),
            "future",
        ),
        Err(e @ RecordError::Storage(_)) => (
            // Counted in memory and retried by the journal; only durability is unconfirmed.
            StatusCode::SERVICE_UNAVAILABLE,
            Outcome {
                counted: true,
                reason: Some(format!("counted, but not durable yet: {e}")),
                settled: true,
                cost: None,
                uncounted: Vec::new(),
            },
            "not_durable",
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Outcome::transient(e.to_string()),
            "unavailable",
        ),
    };
    metrics::counter!("provider_budgets_spend_requests_total", "outcome" => label).increment(1);
    // Reported for a request with usage only: the answer of a plain cost is what it was.
    let outcome = match counted {
        Some(c) if s.usage.is_some() => outcome.with_cost(c),
        _ => outcome,
    };
    let outcome = match outcome.counted {
        true => outcome.with_uncounted(uncounted),
        false => outcome,
    };
    (status, outcome)
}

fn spend_value(status: StatusCode, outcome: &Outcome, duplicate: bool) -> serde_json::Value {
    let mut body = serde_json::json!({ "counted": outcome.counted });
    if let Some(reason) = &outcome.reason {
        let key = if status.is_success() {
            "reason"
        } else {
            "error"
        };
        body[key] = reason.clone().into();
    }
    if duplicate {
        body["duplicate"] = true.into();
    }
    if let Some(c) = &outcome.cost {
        c.write(&mut body);
    }
    if !outcome.uncounted.is_empty() {
        body["uncounted"] = outcome.uncounted.clone().into();
    }
    body
}

// ---- the rest ---------------------------------------------------------------------------------

pub(super) async fn metrics(Extract(state): Extract<Shared>) -> Response {
    metrics::gauge!("provider_budgets_idempotency_keys").set(state.keys.len() as f64);
    metrics::gauge!("provider_budgets_open_reservations")
        .set(state.limiter.health().open_reservations as f64);
    let in_flight = state.max_in_flight - state.permits.available_permits();
    metrics::gauge!("provider_budgets_http_in_flight").set(in_flight as f64);
    let text = state.metrics.render(&state.limiter);
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

pub(super) async fn healthz(Extract(state): Extract<Shared>) -> Response {
    let h = state.limiter.health();
    let r = &h.replication;
    // Seconds since the last successful sync round (null before the first, and without
    // Redis): what an alert on replication lag compares (`docs/guide/deploy.md`).
    let staleness = r
        .enabled
        .then_some(r.last_sync)
        .flatten()
        .map(|t| state.limiter.now().duration_since(t).as_secs_f64().max(0.0));
    let replication = serde_json::json!({
        "enabled": r.enabled,
        "last_sync": r.last_sync.map(|t| t.to_string()),
        "staleness_seconds": staleness,
        "stale": r.stale,
        "last_error": r.last_error,
    });
    if h.storage_ok() {
        json(
            StatusCode::OK,
            &serde_json::json!({
                "status": "ok",
                "node_id": state.limiter.node_id(),
                "replication": replication,
            }),
        )
    } else {
        let fault = h
            .storage_fault
            .unwrap_or_else(|| "the journal is not running".to_owned());
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "status": "faulted",
                "error": fault,
                "node_id": state.limiter.node_id(),
                "replication": replication,
            }),
        )
    }
}

/// The optional body of `POST /v1/reload`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadOptions {
    /// Apply a config without any budget (refused otherwise).
    #[serde(default)]
    allow_empty: bool,
}

pub(super) async fn reload(
    Extract(state): Extract<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let bytes = match body(bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let options = if bytes.trim_ascii().is_empty() {
        ReloadOptions::default()
    } else {
        match parse::<ReloadOptions>(&bytes) {
            Ok(o) => o,
            Err(r) => return r.into_response(),
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if state.reload.send((options.allow_empty, tx)).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match rx.await {
        Ok(Ok(r)) => json(
            StatusCode::OK,
            &serde_json::json!({
                "reloaded": true,
                "budgets": r.budgets,
                "added": r.added,
                "changed": r.changed,
                "removed": r.removed,
            }),
        ),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(json: &str) -> Spend {
        parse::<SpendRequest<'_>>(json.as_bytes())
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn the_fingerprint_of_a_spend_without_identity_is_what_earlier_versions_stored() {
        // Pinned: a key stored by an earlier version must still match its retry.
        let plain = r#"{"deployment": {"model": "gpt-4o", "id": "east"}, "tags": ["a"], "cost": "0.5", "at": 1714564800}"#;
        let mut layout = b"d".to_vec();
        for field in [
            &b"\x01\0\0\0\0\0\0\0\x06gpt-4o"[..],
            b"\0",
            b"\x01\0\0\0\0\0\0\0\x04east",
        ] {
            layout.extend_from_slice(field);
        }
        layout.extend_from_slice(&1u64.to_be_bytes());
        layout.extend_from_slice(b"\x01\0\0\0\0\0\0\0\x01a");
        layout.extend_from_slice(&500_000_000u64.to_be_bytes());
        layout.push(1);
        layout.extend_from_slice(&(1_714_564_800i128 * 1_000_000_000).to_be_bytes());
        assert_eq!(spend(plain).canonical(), layout);
        assert_eq!(fingerprint(&layout), 0xB016_A830_036C_5214);
        let with_null = r#"{"deployment": {"model": "gpt-4o", "id": "east"}, "tags": ["a"], "cost": "0.5", "at": 1714564800, "identity": {"team": null}}"#;
        assert_eq!(spend(with_null).canonical(), spend(plain).canonical());
        // Each identity is part of the request.
        let team = |t: &str| {
            spend(&plain.replace(
                "\"at\"",
                &format!("\"identity\": {{\"team\": \"{t}\"}}, \"at\""),
            ))
            .canonical()
        };
        let key =
            spend(&plain.replace("\"at\"", "\"identity\": {\"key\": \"a\"}, \"at\"")).canonical();
        assert_ne!(team("a"), spend(plain).canonical());
        assert_ne!(team("a"), team("b"));
        assert_ne!(team("a"), key);
    }

    #[test]
    fn a_provider_spend_takes_no_identity() {
        let r = parse::<SpendRequest<'_>>(
            br#"{"provider": "openai", "cost": 1, "identity": {"key": "k"}}"#,
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(r.starts_with("identity: only with \"deployment\""), "{r}");
        let ok = r#"{"provider": "openai", "cost": 1, "identity": {}}"#;
        assert!(matches!(spend(ok).against, Against::Provider(_)));
    }
}
