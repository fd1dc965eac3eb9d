//! `POST /v1/spend/batch`: several spends in one request, each answered as `/v1/spend`
//! answers it.
//!
//! Why: a client that records every call (the litellm plugin) pays for an HTTP exchange per
//! spend in its own process (0.3–1 ms of Python per post). Posting what has queued up
//! (the plugin waits `spend_linger` for it) costs one exchange per batch.
//!
//! * Body: `{"spends": [S, …]}`, each `S` a `/v1/spend` body; at most [`MAX_BATCH`] of them
//!   (and the sidecar's body limit).
//! * Answer: `200 {"results": [R, …]}` in the same order, each `R` the `/v1/spend` answer's
//!   body plus its `"status"`. One bad spend fails alone (its `R` has `status` 400); the whole
//!   batch is refused (400) only when it is not `{"spends": [...]}` or is too long.
//! * Each spend is recorded as if posted alone: idempotency keys, pricing, durability and
//!   metrics are the same. They run concurrently, so durable ones share a group commit.
//! * `"admission": true` adds `"admitted": false` to the answer when, after the batch, a
//!   `/v1/filter` would refuse the deployment (with its tags and identity) of one of its
//!   spends, else `"admitted": true`. A spend counts only in budgets that a filter of its own
//!   deployment checks, so while it is true no filter answer a client holds was changed by
//!   this batch to a refusal: the litellm plugin keeps its cached filter answers then. A
//!   spend given by `"provider"` alone makes it false (no deployment to check).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::api::{bad_request, body, json, parse, spend_answer, DeploymentIn};
use super::identity::IdentityIn;
use super::State;

/// Most spends in one batch. Why 1 000: the body limit (64 KiB) allows fewer real spends
/// than that anyway; this bounds the work of one request made of tiny, invalid items.
pub const MAX_BATCH: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    spends: Vec<&'a RawValue>,
    /// Answer `"admitted"` (see the module docs).
    #[serde(default)]
    admission: bool,
}

/// What a filter of a spend's target reads (the rest of its body is ignored here).
#[derive(Deserialize)]
struct Target<'a> {
    #[serde(borrow, default)]
    deployment: Option<DeploymentIn<'a>>,
    #[serde(borrow, default)]
    tags: Vec<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    identity: Option<IdentityIn<'a>>,
}

/// Whether a filter still admits the deployment of every spend in `spends` (see the module
/// docs). A spend that is not a deployment spend (or not readable: it was refused) is
/// skipped when it was refused (`counted` false), else makes it false.
fn admitted(state: &State, spends: &[&RawValue], results: &[serde_json::Value]) -> bool {
    spends.iter().zip(results).all(|(raw, result)| {
        if result["counted"] != true {
            return true; // counted nowhere: changed no budget
        }
        let Ok(target) = serde_json::from_str::<Target<'_>>(raw.get()) else {
            return false;
        };
        let Some(deployment) = target.deployment else {
            return false;
        };
        let identity = target.identity.unwrap_or_default();
        state
            .limiter
            .filter_for(&[deployment], &target.tags, &identity.identity())
            .is_ok()
    })
}

pub(super) async fn spend_batch(
    Extract(state): Extract<Arc<State>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let bytes = match body(bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let batch: Batch<'_> = match parse(&bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if batch.spends.len() > MAX_BATCH {
        return bad_request(&format!(
            "spends: at most {MAX_BATCH} per batch, got {}",
            batch.spends.len()
        ));
    }
    let answers = batch
        .spends
        .iter()
        .map(|raw| spend_answer(&state, raw.get().as_bytes()));
    let results: Vec<serde_json::Value> = futures_util::future::join_all(answers)
        .await
        .into_iter()
        .map(|(status, mut answer)| {
            answer["status"] = status.as_u16().into();
            answer
        })
        .collect();
    let admission = batch
        .admission
        .then(|| admitted(&state, &batch.spends, &results));
    let mut answer = serde_json::json!({ "results": results });
    if let Some(admitted) = admission {
        answer["admitted"] = admitted.into();
    }
    json(StatusCode::OK, &answer)
}
