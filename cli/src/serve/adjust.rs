//! `POST /v1/adjust`: a correction (see `Limiter::adjust`). Authenticated like every `/v1/*`
//! route; the credit is durable and audited before the answer, and `by` in the audit trail is
//! what the request names (`"by"`), prefixed with `http:`, so that the trail tells the
//! sidecar's credits from the CLI's.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::api::{bad_request, body, error, json, parse, parse_at};
use super::money::money_from_json;
use super::State;
use provider_budgets::{AdjustError, Adjustment, Period, RecordError};

/// The body of `POST /v1/adjust`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustRequest<'a> {
    /// The budget's key name, as `/v1/budgets` shows it (`openai`, `tag:team-a`).
    #[serde(borrow)]
    budget: Cow<'a, str>,
    /// Its period, when it has several.
    #[serde(borrow, default)]
    period: Option<Cow<'a, str>>,
    /// Its unit, when it has budgets of several units of one period.
    #[serde(borrow, default)]
    unit: Option<Cow<'a, str>>,
    /// USD, or the whole count of a budget of another unit.
    #[serde(borrow)]
    amount: &'a RawValue,
    #[serde(borrow, default)]
    at: Option<&'a RawValue>,
    #[serde(borrow)]
    reason: Cow<'a, str>,
    /// Who asks, for the audit trail.
    #[serde(borrow, default)]
    by: Option<Cow<'a, str>>,
}

impl AdjustRequest<'_> {
    fn adjustment(&self) -> Result<Adjustment, String> {
        let amount = money_from_json(self.amount).map_err(|e| format!("amount: {e}"))?;
        let by = match &self.by {
            Some(b) => format!("http:{b}"),
            None => "http".to_owned(),
        };
        let mut a = Adjustment::credit(self.budget.as_ref(), amount, self.reason.as_ref()).by(by);
        if let Some(p) = &self.period {
            let p: Period = p.parse().map_err(|e| format!("period: {e}"))?;
            a = a.period(p);
        }
        if let Some(u) = &self.unit {
            a = a.unit(u.parse().map_err(|e| format!("unit: {e}"))?);
        }
        match self.at {
            Some(raw) if raw.get() != "null" => {
                a = a.at(parse_at(raw.get()).map_err(|e| format!("at: {e}"))?);
            }
            _ => {}
        }
        Ok(a)
    }
}

pub(super) async fn adjust(
    Extract(state): Extract<Arc<State>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let bytes = match body(bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let request: AdjustRequest<'_> = match parse(&bytes) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let adjustment = match request.adjustment() {
        Ok(a) => a,
        Err(e) => return bad_request(&e),
    };
    let limiter = state.limiter.clone();
    // It waits for an fsync: off the async workers.
    let result = tokio::task::spawn_blocking(move || limiter.adjust(adjustment)).await;
    match result {
        Ok(Ok(c)) => json(
            StatusCode::OK,
            &serde_json::json!({
                "credited": true,
                "budget": c.budget,
                "period": c.period_key,
                "window_start": c.window.start().to_string(),
                "resets_at": c.window.end().to_string(),
                "amount": c.amount.as_usd(),
                "amount_nanos": c.amount.as_nanos(),
                "credited_total": c.credited.as_usd(),
                "credited_total_nanos": c.credited.as_nanos(),
                "spend": c.spend.as_usd(),
                "spend_nanos": c.spend.as_nanos(),
            }),
        ),
        Ok(Err(e @ AdjustError::NotDurable(_))) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"credited": true, "error": e.to_string()}),
        ),
        Ok(Err(e)) => error(status_of(&e), &e.to_string()),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("adjust task: {e}"),
        ),
    }
}

/// 404 for an unknown budget, 422 for a credit that cannot apply (amount, reason, time),
/// 503 when the disk or the limiter cannot take it (nothing credited; a credit counted but
/// not yet durable is a 503 with `"credited": true`, answered above).
fn status_of(e: &AdjustError) -> StatusCode {
    match e {
        AdjustError::UnknownBudget { .. } => StatusCode::NOT_FOUND,
        AdjustError::Record(RecordError::Storage(_) | RecordError::Closed) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}
