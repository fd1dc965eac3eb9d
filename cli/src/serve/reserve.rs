//! `POST /v1/reserve`, `POST /v1/commit`, `POST /v1/release`: the library's reservations
//! ([`provider_budgets::Reservation`]) over HTTP.
//!
//! * The sidecar holds each open [`Reservation`] in a table under its id. At most
//!   `--max-open-reservations` are open at once (checked before admission; concurrent
//!   requests may pass it by at most `--max-in-flight`): one more is answered 503.
//! * A commit or release is idempotent: the answer of an ended reservation is kept (at most
//!   [`FINISHED_CAPACITY`], for [`FINISHED_TTL`]) and a repeat gets it again, with
//!   `"duplicate": true`. A repeat that arrives while the first is still being made durable
//!   waits for it. A release after a commit (or the reverse) is 409, naming what happened.
//! * Also across a restart: every end is made with
//!   [`Reservation::remember_end`](provider_budgets::Reservation::remember_end), so the
//!   journal writes how it ended (committed and the cost, or released) in the sled batch of
//!   the end itself; at start the table is seeded from those records ([`Table::seed`]). A kill
//!   after the end's fsync and before its answer leaves the record: the repeat after the
//!   restart gets the same answer, counted once.
//! * An id this sidecar never issued (or ended longer ago than [`FINISHED_TTL`], or open at
//!   a restart: its estimate was counted then, or one in which no budget applied that ended
//!   before a restart) is 404.
//! * A commit or release after expiry is 409 with `"expired": true`: the estimate was counted
//!   instead of the cost (decision: 409 Conflict, since the request is well-formed but the
//!   reservation's state no longer allows it; a client should not retry it).
//! * The fsyncs are awaited (the reservation request and the end's `Receipt` are `.await`ed)
//!   without blocking a worker; an end runs in a task of its own, so a client that disconnects does
//!   not leave a reservation half-ended.
//! * Shutdown (SIGTERM): the table is dropped with the server, so each reservation still open
//!   counts its estimate (as a drop does; each was journaled when it was made, so a crash
//!   counts it at the next start just the same). A client cannot commit it to the next run.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;

use super::api::{
    bad_request, body, cost_and_usage, error, json, no_deployments, parse, DeploymentIn, Reject,
};
use super::identity::IdentityIn;
use super::money::estimate_from_json;
use super::usage::{Counted, UsageIn};
use super::State;
use provider_budgets::{
    Deployment, Estimate, EstimateInput, Message, Money, Prompt, RecordError, Reservation,
    ReserveError, Target, Usage,
};

type Shared = Arc<State>;

/// How long the answer of an ended reservation is kept for a repeated commit or release.
pub(crate) const FINISHED_TTL: Duration = Duration::from_secs(3600);
/// Most ended reservations remembered at once (the oldest is forgotten first).
pub(crate) const FINISHED_CAPACITY: usize = 262_144;
/// Longest reservation id accepted (ours are about 20 bytes).
const MAX_ID_LEN: usize = 128;
/// Expired reservations are taken out of the table at most this often (on `/v1/reserve`).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which end a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Commit,
    Release,
}

impl Op {
    fn done(self) -> &'static str {
        match self {
            Op::Commit => "committed",
            Op::Release => "released",
        }
    }
}

/// The answer of an ended reservation, replayed for a repeat.
#[derive(Debug, Clone)]
struct Answer {
    /// The end that was asked for; `None` when it expired (every request gets that answer).
    op: Option<Op>,
    status: StatusCode,
    body: serde_json::Value,
}

#[derive(Debug)]
enum Slot {
    /// With the model of the reserved deployment (`None` for a provider reservation), which
    /// prices a commit given as usage.
    Open(Reservation, Option<Arc<str>>),
    /// A commit or release is being made durable; repeats wait for its answer.
    Ending(Op, watch::Receiver<Option<Answer>>),
    Done(Answer),
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Arc<str>, Slot>,
    open: usize,
    /// Ended ids in the order they ended, with when they may be forgotten.
    ended: VecDeque<(Arc<str>, Instant)>,
    last_sweep: Option<Instant>,
}

/// Open and recently ended reservations.
#[derive(Debug)]
pub(crate) struct Table {
    inner: Mutex<Inner>,
    max_open: usize,
}

/// What [`Table::begin`] found.
enum Begin {
    Run(Reservation, watch::Sender<Option<Answer>>),
    Wait(watch::Receiver<Option<Answer>>),
    Done(Answer),
    Unknown,
}

impl Table {
    pub(crate) fn new(max_open: usize) -> Table {
        Table {
            inner: Mutex::default(),
            max_open,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Single-step updates only: a poisoned table is consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers reservations ended before a restart (`(id, how it ended, age)`, oldest
    /// first): a repeat gets the same answer until [`FINISHED_TTL`] after the end. Returns
    /// how many were taken.
    pub(crate) fn seed(
        &self,
        ended: impl IntoIterator<Item = (String, provider_budgets::Remembered, Duration)>,
    ) -> usize {
        use provider_budgets::Remembered;
        let now = Instant::now();
        let mut t = self.lock();
        let mut taken = 0;
        for (id, what, age) in ended {
            let Some(left) = FINISHED_TTL.checked_sub(age).filter(|l| !l.is_zero()) else {
                continue;
            };
            let answer = match what {
                Remembered::Committed { cost } => answer_of(&id, Op::Commit, Some(cost), Ok(())),
                Remembered::Released => answer_of(&id, Op::Release, None, Ok(())),
                _ => continue,
            };
            let key: Arc<str> = Arc::from(id);
            // Oldest first: `ended` stays in deadline order, as `forget_old` needs.
            t.ended.push_back((Arc::clone(&key), now + left));
            t.slots.insert(key, Slot::Done(answer));
            taken += 1;
        }
        t.forget_old(now);
        taken
    }

    fn has_room(&self) -> bool {
        self.lock().open < self.max_open
    }

    fn insert(&self, r: Reservation, model: Option<Arc<str>>) {
        let mut t = self.lock();
        t.open += 1;
        t.slots.insert(Arc::from(r.id()), Slot::Open(r, model));
    }

    /// The model of an open reservation: `None` when it is not open (ended, unknown),
    /// `Some(None)` for a provider reservation.
    fn model_of(&self, id: &str) -> Option<Option<Arc<str>>> {
        match self.lock().slots.get(id) {
            Some(Slot::Open(_, model)) => Some(model.clone()),
            _ => None,
        }
    }

    fn begin(&self, id: &str, op: Op) -> Begin {
        let mut t = self.lock();
        t.forget_old(Instant::now());
        let Some((key, slot)) = t.slots.remove_entry(id) else {
            return Begin::Unknown;
        };
        let (put_back, begin) = match slot {
            Slot::Open(r, _) => {
                let (tx, rx) = watch::channel(None);
                t.open -= 1;
                (Slot::Ending(op, rx), Begin::Run(r, tx))
            }
            Slot::Ending(o, rx) => (Slot::Ending(o, rx.clone()), Begin::Wait(rx)),
            Slot::Done(a) => (Slot::Done(a.clone()), Begin::Done(a)),
        };
        t.slots.insert(key, put_back);
        begin
    }

    fn finish(&self, id: &str, answer: Answer, tx: &watch::Sender<Option<Answer>>) {
        let mut t = self.lock();
        if let Some((key, _)) = t.slots.remove_entry(id) {
            t.ended
                .push_back((Arc::clone(&key), Instant::now() + FINISHED_TTL));
            t.slots.insert(key, Slot::Done(answer.clone()));
        }
        drop(t);
        let _ = tx.send(Some(answer));
    }

    /// Takes the expired open reservations out (their answer becomes "expired"); dropped by
    /// the caller outside the lock (a drop of an expired reservation counts its estimate
    /// unless the library's reaper did already).
    fn sweep(&self, now: jiff::Timestamp) -> Vec<Reservation> {
        let mut t = self.lock();
        let at = Instant::now();
        if t.last_sweep
            .is_some_and(|s| at.duration_since(s) < SWEEP_EVERY)
        {
            return Vec::new();
        }
        t.last_sweep = Some(at);
        t.forget_old(at);
        let due: Vec<Arc<str>> = t
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Open(r, _) if r.expires_at() <= now))
            .map(|(k, _)| Arc::clone(k))
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for key in due {
            if let Some(Slot::Open(r, _)) = t.slots.remove(&key) {
                let answer = expired_answer(&ReserveError::Expired {
                    id: r.id().to_owned(),
                    expired_at: r.expires_at(),
                    estimate: r.estimate(),
                });
                t.open -= 1;
                t.ended.push_back((Arc::clone(&key), at + FINISHED_TTL));
                t.slots.insert(key, Slot::Done(answer));
                out.push(r);
            }
        }
        out
    }
}

impl Inner {
    /// Forgets ended answers past their time, and the oldest beyond the capacity.
    fn forget_old(&mut self, now: Instant) {
        while let Some((key, until)) = self.ended.front() {
            if *until > now && self.ended.len() <= FINISHED_CAPACITY {
                break;
            }
            if matches!(self.slots.get(key), Some(Slot::Done(_))) {
                self.slots.remove(key);
            }
            self.ended.pop_front();
        }
    }
}

fn expired_answer(e: &ReserveError) -> Answer {
    Answer {
        op: None,
        status: StatusCode::CONFLICT,
        body: serde_json::json!({ "error": e.to_string(), "expired": true }),
    }
}

fn respond(answer: &Answer, duplicate: bool) -> Response {
    let mut body = answer.body.clone();
    if duplicate {
        body["duplicate"] = true.into();
    }
    json(answer.status, &body)
}

/// A repeat: the same answer, or 409 when the other end was asked for.
fn replay(id: &str, answer: &Answer, op: Op) -> Response {
    match answer.op {
        Some(done) if done != op => error(
            StatusCode::CONFLICT,
            &format!(
                "reservation {id:?} was already {} (a reservation ends once)",
                done.done()
            ),
        ),
        _ => respond(answer, true),
    }
}

// ---- /v1/reserve ------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveRequest<'a> {
    /// Candidates, in order of preference (as `/v1/filter`): the first with room is reserved.
    #[serde(borrow, default)]
    deployments: Option<Vec<DeploymentIn<'a>>>,
    /// Or a provider: its budgets only (as `/v1/spend`).
    #[serde(borrow, default)]
    provider: Option<Cow<'a, str>>,
    /// Dollars, or an object of units; absent when the sidecar estimates from the request
    /// (`messages` or `prompt_tokens`, and `max_tokens`).
    #[serde(borrow, default)]
    estimate: Option<&'a RawValue>,
    /// The request's chat messages (OpenAI's shape): the sidecar counts their tokens.
    #[serde(default)]
    messages: Option<Vec<serde_json::Value>>,
    /// The prompt's token count, as the client knows it.
    #[serde(default)]
    prompt_tokens: Option<u64>,
    /// The most output tokens of the call (`max_completion_tokens` is read too).
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<u64>,
    #[serde(borrow, default)]
    tags: Vec<Cow<'a, str>>,
    /// The request's identities: their budgets hold the estimate too.
    #[serde(borrow, default)]
    identity: Option<IdentityIn<'a>>,
}

pub(super) async fn reserve(
    Extract(state): Extract<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let bytes = match body(bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let request: ReserveRequest<'_> = match parse(&bytes) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let identity = request.identity.clone().unwrap_or_default();
    if let Err(e) = identity.check() {
        return bad_request(&e);
    }
    let targets: Vec<Target> = match (&request.deployments, &request.provider) {
        (Some(_), Some(_)) => {
            return bad_request("give either \"deployments\" or \"provider\", not both")
        }
        (None, None) => return bad_request("missing \"deployments\" (or \"provider\")"),
        (Some(ds), None) if ds.is_empty() => return bad_request("deployments: empty list"),
        (Some(ds), None) => match ds.iter().position(|d| d.model.is_empty()) {
            Some(i) => return bad_request(&format!("deployments[{i}].model: empty")),
            None => ds
                .iter()
                .map(|d| Target::from_parts(d.model.clone().into_owned(), d.provider.clone().map(Cow::into_owned), d.id.clone().map(Cow::into_owned)))
                .collect(),
        },
        (None, Some(p)) if p.is_empty() => return bad_request("provider: empty"),
        (None, Some(p)) if !request.tags.is_empty() => {
            return bad_request(&format!(
                "tags: only with \"deployments\" (\"provider\" {p:?} reserves in the provider's budgets only)"
            ))
        }
        (None, Some(p)) if !identity.is_empty() => {
            return bad_request(&format!(
                "identity: only with \"deployments\" (\"provider\" {p:?} reserves in the provider's budgets only)"
            ))
        }
        (None, Some(p)) => vec![Target::from_parts(String::new(), Some(p.clone().into_owned()), None)],
    };
    let (estimate, from_request) = match reserve_estimate(&request) {
        Ok(e) => e,
        Err(e) => return bad_request(&e),
    };
    for r in state.reservations.sweep(state.limiter.now()) {
        drop(r);
    }
    if !state.reservations.has_room() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many open reservations (--max-open-reservations); commit or release some, or retry",
        );
    }
    let r = state
        .limiter
        .reserve(&targets, estimate.usd)
        .estimate(estimate);
    let r = match from_request.as_ref() {
        Some(input) => r.estimate_from(input),
        None => r,
    };
    let r = match r.tags(&request.tags).identity(&identity.identity()).await {
        Ok(r) => r,
        Err(ReserveError::Denied(none)) => return no_deployments(&state, &none),
        Err(ReserveError::Record(e @ RecordError::Unpriced(_))) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("estimate: {e}; nothing reserved"),
            )
        }
        Err(ReserveError::NoCandidates) => return bad_request("deployments: empty list"),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let index = r.deployment_index();
    let deployment = match (&request.deployments, &request.provider) {
        (Some(ds), _) => serde_json::to_value(&ds[index]).unwrap_or_default(),
        (None, Some(p)) => serde_json::Value::from(p.as_ref()),
        (None, None) => serde_json::Value::Null,
    };
    let body = serde_json::json!({
        "reservation": r.id(),
        "deployment": deployment,
        "index": index,
        "estimate": r.estimate().as_usd(),
        "estimate_nanos": r.estimate().as_nanos(),
        "estimate_input_tokens": r.estimates().input_tokens,
        "estimate_output_tokens": r.estimates().output_tokens,
        "expires_at": r.expires_at().to_string(),
    });
    // The model that prices a commit given as usage (none for a provider reservation).
    let model = targets
        .get(index)
        .map(Deployment::model)
        .filter(|m| !m.is_empty())
        .map(Arc::from);
    state.reservations.insert(r, model);
    json(StatusCode::OK, &body)
}

/// A reservation's estimate: the one given (`estimate`), or none and the request to make
/// each candidate's from (`messages` or `prompt_tokens`, with `max_tokens`).
fn reserve_estimate(
    request: &ReserveRequest<'_>,
) -> Result<(Estimate, Option<EstimateInput>), String> {
    let prompt = match (&request.messages, request.prompt_tokens) {
        (Some(_), Some(_)) => return Err("give \"messages\" or \"prompt_tokens\", not both".into()),
        (Some(m), None) => Some(Prompt::Messages(messages(m)?)),
        (None, Some(n)) => Some(Prompt::Tokens(n)),
        (None, None) => None,
    };
    match (request.estimate, prompt) {
        (Some(_), Some(_)) => Err(
            "give \"estimate\" or the request to estimate (\"messages\" or \"prompt_tokens\"), not both"
                .into(),
        ),
        (Some(raw), None) => {
            let e = estimate_from_json(raw).map_err(|e| format!("estimate: {e}"))?;
            Ok((e, None))
        }
        (None, Some(p)) => Ok((
            Estimate::default(),
            Some(EstimateInput::new(p, request.max_tokens)),
        )),
        (None, None) => Err(
            "missing \"estimate\" (or \"messages\" / \"prompt_tokens\" with \"max_tokens\", estimated by the catalog)"
                .into(),
        ),
    }
}

/// OpenAI's chat messages, as far as their tokens go: `role`, `content` (a string, or a
/// list of parts: `text` parts are counted as text, others as non-text parts), `name`.
fn messages(list: &[serde_json::Value]) -> Result<Vec<Message>, String> {
    use serde_json::Value;
    let text = |v: Option<&Value>, what: &str, i: usize| match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("messages[{i}].{what}: expected a string")),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(format!("messages[{i}]: expected an object"));
            };
            let mut out = Message::new(text(m.get("role"), "role", i)?, String::new());
            out.name = m
                .get("name")
                .map(|n| text(Some(n), "name", i))
                .transpose()?;
            match m.get("content") {
                Some(Value::Array(parts)) => {
                    for part in parts {
                        match part.get("text").and_then(Value::as_str) {
                            Some(t) => out.content.push_str(t),
                            None => out.other_parts += 1,
                        }
                    }
                }
                other => out.content = text(other, "content", i)?,
            }
            Ok(out)
        })
        .collect()
}

// ---- /v1/commit, /v1/release ------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest<'a> {
    #[serde(borrow)]
    reservation: Cow<'a, str>,
    /// The actual cost; absent: `usage` priced on the reserved deployment's model.
    #[serde(borrow, default)]
    cost: Option<&'a RawValue>,
    #[serde(default)]
    usage: Option<UsageIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest<'a> {
    #[serde(borrow)]
    reservation: Cow<'a, str>,
}

/// The 400 answer for an id that cannot be ours, if it is one.
fn bad_id(id: &str) -> Option<Response> {
    (id.is_empty() || id.len() > MAX_ID_LEN).then(|| {
        bad_request(&format!(
            "reservation: must be 1 to {MAX_ID_LEN} bytes, got {}",
            id.len()
        ))
    })
}

pub(super) async fn commit(
    Extract(state): Extract<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    end_route(state, bytes, Op::Commit).await
}

pub(super) async fn release(
    Extract(state): Extract<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    end_route(state, bytes, Op::Release).await
}

/// The commit and release routes: body, JSON (a commit's with `cost`, a release's without),
/// id, cost, in this order, then [`end`].
async fn end_route(state: Shared, bytes: Result<Bytes, BytesRejection>, op: Op) -> Response {
    let bytes = match body(bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let (reservation, commit) = match op {
        Op::Commit => match parse::<CommitRequest<'_>>(&bytes) {
            Ok(r) => (r.reservation, Some((r.cost, r.usage))),
            Err(r) => return r.into_response(),
        },
        Op::Release => match parse::<ReleaseRequest<'_>>(&bytes) {
            Ok(r) => (r.reservation, None),
            Err(r) => return r.into_response(),
        },
    };
    if let Some(r) = bad_id(&reservation) {
        return r;
    }
    let cost = match commit {
        None => None,
        Some((cost, usage)) => match commit_cost(&state, &reservation, cost, usage.as_ref()) {
            Ok(c) => Some(c),
            Err(r) => return r.into_response(),
        },
    };
    end(state, &reservation, op, cost).await
}

/// A commit's cost, what to report of it, and its usage (token budgets count it).
type CommitCost = (Money, Option<Counted>, Option<Usage>);

/// A commit's cost: the one given, or its usage priced on the reserved deployment's model
/// (before the reservation is taken: an unpriced model leaves it open, answered 422), and
/// what to report of it (for a commit with usage).
fn commit_cost(
    state: &State,
    id: &str,
    cost: Option<&RawValue>,
    usage: Option<&UsageIn>,
) -> Result<(Money, Option<Counted>, Option<Usage>), Reject> {
    let (cost, usage) =
        cost_and_usage(cost, usage).map_err(|e| Reject(StatusCode::BAD_REQUEST, e))?;
    match (cost, usage) {
        (Some(c), None) => Ok((c, None, None)),
        (Some(c), Some(u)) => Ok((c, Some(Counted::given(c)), Some(u))),
        (None, usage) => {
            let usage = usage.unwrap_or_default();
            let model = match state.reservations.model_of(id) {
                // Not open: its stored answer is replayed, the cost is not used.
                None => return Ok((Money::ZERO, None, None)),
                Some(None) => return Err(Reject(
                    StatusCode::BAD_REQUEST,
                    "usage: priced only for a reservation of \"deployments\" (their model); give \"cost\"".into(),
                )),
                Some(Some(m)) => m,
            };
            match state.limiter.price(&model, &usage) {
                Ok(p) => Ok((
                    p.cost,
                    Some(Counted::priced(p.cost, Some(&p.source))),
                    Some(usage),
                )),
                Err(e) => Err(Reject(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("usage: {e} (pricing.unpriced: deny); not committed, reservation {id:?} stays open"),
                )),
            }
        }
    }
}

async fn end(state: Shared, id: &str, op: Op, cost: Option<CommitCost>) -> Response {
    let (cost, counted, usage) = match cost {
        Some((c, counted, usage)) => (Some(c), counted, usage),
        None => (None, None, None),
    };
    match state.reservations.begin(id, op) {
        Begin::Unknown => error(
            StatusCode::NOT_FOUND,
            &format!(
                "unknown reservation {id:?}: never issued by this sidecar, ended more than {} ago, or still open when the sidecar restarted (its estimate was counted)",
                humantime::format_duration(FINISHED_TTL)
            ),
        ),
        Begin::Done(answer) => replay(id, &answer, op),
        Begin::Wait(mut rx) => {
            let answer = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|a| a.clone());
            match answer {
                Some(a) => replay(id, &a, op),
                None => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("reservation {id:?}: the first end did not finish"),
                ),
            }
        }
        Begin::Run(r, tx) => {
            // In a task of its own: a client that disconnects does not cancel it halfway.
            let id: Arc<str> = Arc::from(id);
            let task = tokio::spawn(async move {
                // Remembered on disk with the end itself: a repeat after a restart gets this
                // answer too.
                let r = r.remember_end();
                let ended = match (cost, usage) {
                    (Some(c), Some(u)) => r.commit_usage(c, u),
                    (Some(c), None) => r.commit(c),
                    (None, _) => r.release(),
                };
                let mut uncounted = Vec::new();
                let ended = match ended {
                    Ok(receipt) => {
                        uncounted = super::usage::uncounted_json(&receipt);
                        receipt.await.map(drop).map_err(ReserveError::from)
                    }
                    Err(e) => Err(e),
                };
                if ended.is_ok() {
                    state.after_fsync(&id).await;
                }
                let mut answer = answer_of(&id, op, cost, ended);
                if let (Some(c), true) = (counted, answer.status.is_success()) {
                    c.write_commit(&mut answer.body);
                }
                if !uncounted.is_empty() && answer.status.is_success() {
                    answer.body["uncounted"] = uncounted.into();
                }
                state.reservations.finish(&id, answer.clone(), &tx);
                answer
            });
            match task.await {
                Ok(answer) => respond(&answer, false),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("end task: {e}")),
            }
        }
    }
}

fn answer_of(id: &str, op: Op, cost: Option<Money>, ended: Result<(), ReserveError>) -> Answer {
    let ok = |mut body: serde_json::Value| {
        body["reservation"] = id.into();
        if let Some(c) = cost {
            body["cost"] = c.as_usd().into();
            body["cost_nanos"] = c.as_nanos().into();
        }
        body
    };
    let (status, body) = match ended {
        Ok(()) => (StatusCode::OK, ok(serde_json::json!({ op.done(): true }))),
        Err(e @ ReserveError::Expired { .. }) => return expired_answer(&e),
        Err(ReserveError::Record(e @ RecordError::Storage(_))) => (
            // Counted (or freed) in memory and retried by the journal: only durability is
            // unconfirmed, and a repeat must not count again.
            StatusCode::SERVICE_UNAVAILABLE,
            ok(serde_json::json!({
                op.done(): true,
                "error": format!("{}, but not durable yet: {e}", op.done()),
            })),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": e.to_string() }),
        ),
    };
    Answer {
        op: Some(op),
        status,
        body,
    }
}
