//! `POST /v1/spend/batch`: several spends in one request, each answered as `/v1/spend`
//! answers it.
//!
//! Why: a client that records every call (the litellm plugin) pays for an HTTP exchange per
//! spend in its own process (~100–300 µs of Python per post). Batching the posts that pile
//! up while one is in flight costs one exchange per batch, with no added wait when the client
//! is idle.
//!
//! * Body: `{"spends": [S, …]}`, each `S` a `/v1/spend` body; at most [`MAX_BATCH`] of them
//!   (and the sidecar's body limit).
//! * Answer: `200 {"results": [R, …]}` in the same order, each `R` the `/v1/spend` answer's
//!   body plus its `"status"`. One bad spend fails alone (its `R` has `status` 400); the whole
//!   batch is refused (400) only when it is not `{"spends": [...]}` or is too long.
//! * Each spend is recorded as if posted alone: idempotency keys, pricing, durability and
//!   metrics are the same. They run concurrently, so durable ones share a group commit.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::api::{bad_request, body, json, parse, spend_answer};
use super::State;

/// Most spends in one batch. Why 1 000: the body limit (64 KiB) allows fewer real spends
/// than that anyway; this bounds the work of one request made of tiny, invalid items.
pub const MAX_BATCH: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    spends: Vec<&'a RawValue>,
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
    json(StatusCode::OK, &serde_json::json!({ "results": results }))
}
