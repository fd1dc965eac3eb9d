//! The JSON document of `status --json` and the sidecar's `GET /v1/budgets` (one builder, so
//! both stay the same). The field names are the contract of both.

use jiff::Timestamp;
use provider_budgets::{BudgetStatus, Enforcement, Limiter, Money, Scope, Unit};

/// The JSON document of `status --json` and the sidecar's `GET /v1/budgets` (one builder, so
/// both stay the same): `{"node_id": …, "budgets": [one object per budget]}`.
pub(crate) fn status_document(limiter: &Limiter, budgets: &[BudgetStatus]) -> serde_json::Value {
    let health = limiter.health();
    serde_json::json!({
        "node_id": limiter.node_id(),
        "storage": {
            "ok": health.storage_ok(),
            "fault": health.storage_fault,
        },
        "budgets": budget_rows(budgets),
    })
}

/// The rows of `budgets`, as the document's `budgets` list has them.
pub(crate) fn budget_rows(budgets: &[BudgetStatus]) -> Vec<serde_json::Value> {
    budgets.iter().map(status_json).collect()
}

/// One budget in the JSON contract. Money is USD as JSON numbers; the `*_nanos` fields carry
/// the exact integer nano-dollars for consumers that must not round.
fn status_json(s: &BudgetStatus) -> serde_json::Value {
    let r = &s.replication;
    let mut row = serde_json::json!({
        "provider": (s.scope == Scope::Provider).then_some(&s.name),
        "scope": s.scope.as_str(),
        "name": s.name,
        "mode": s.mode.as_str(),
        "soft_limits": s.soft_limits.iter().map(|x| x.fraction()).collect::<Vec<_>>(),
        "thresholds_crossed": s.thresholds_crossed.iter().map(|x| x.fraction()).collect::<Vec<_>>(),
        "would_deny": s.would_deny,
        "period": (s.unit != Unit::Concurrent).then(|| s.period.to_string()),
        "window_start": s.window.start().to_string(),
        "resets_at": s.window.end().to_string(),
        "time_zone": s.time_zone,
        "window_start_local": local(s.window.start(), &s.time_zone),
        "resets_at_local": local(s.window.end(), &s.time_zone),
        "spend": amount(s.unit, s.spend),
        "limit": amount(s.unit, s.limit),
        "remaining": amount(s.unit, s.remaining),
        "own_spend": amount(s.unit, s.own_spend),
        "spend_nanos": nanos(s.unit, s.spend),
        "limit_nanos": nanos(s.unit, s.limit),
        "remaining_nanos": nanos(s.unit, s.remaining),
        "own_spend_nanos": nanos(s.unit, s.own_spend),
        "credited": amount(s.unit, s.credited),
        "credited_nanos": nanos(s.unit, s.credited),
        "reserved": amount(s.unit, s.reserved),
        "reserved_nanos": nanos(s.unit, s.reserved),
        "exhausted": s.exhausted,
        "storage_fault": s.storage_fault,
        "replication": {
            "enabled": r.enabled,
            "last_sync": r.last_sync.map(|t| t.to_string()),
            "stale": r.stale,
            "last_error": r.last_error,
            "problem": s.replication_problem,
            "last_round": {
                "duration_ms": r.last_round.duration_ms,
                "keys_written": r.last_round.keys_written,
                "keys_read": r.last_round.keys_read,
                "keys_unchanged": r.last_round.keys_unchanged,
                "keys_deferred": r.last_round.keys_deferred,
                "bytes_out": r.last_round.bytes_out,
                "bytes_in": r.last_round.bytes_in,
            },
            "rounds": r.rounds,
            "late_rounds": r.late_rounds,
            "tracking": r.tracking,
            "evicting": r.evicting,
            "maxmemory_policy": r.maxmemory_policy,
            "data_loss": r.data_loss,
        },
    });
    // Strict budgets, added apart: one `json!` of every field passes the macro's
    // recursion limit.
    if let Some(map) = row.as_object_mut() {
        let strict = s.enforcement == Enforcement::Strict;
        map.insert("unit".into(), s.unit.as_str().into());
        map.insert("enforcement".into(), s.enforcement.as_str().into());
        map.insert("window".into(), s.window_shape.as_str().into());
        map.insert(
            "sliding_spend".into(),
            s.sliding_spend.map(|m| amount(s.unit, m)).into(),
        );
        map.insert(
            "sliding_spend_nanos".into(),
            s.sliding_spend.map(|m| nanos(s.unit, m)).into(),
        );
        map.insert("templated".into(), s.templated.into());
        map.insert("offline".into(), strict.then(|| s.offline.as_str()).into());
        let unit = s.unit;
        map.insert("grant".into(), s.grant.map(|g| amount(unit, g)).into());
        map.insert("grant_nanos".into(), s.grant.map(|g| nanos(unit, g)).into());
        map.insert(
            "granted_total".into(),
            s.granted_total.map(|g| amount(unit, g)).into(),
        );
        map.insert(
            "granted_total_nanos".into(),
            s.granted_total.map(|g| nanos(unit, g)).into(),
        );
    }
    row
}

/// An amount as the JSON contract shows it: USD as a number of dollars, any other unit as
/// its whole count (tokens, requests, slots), never dollars.
pub(crate) fn amount(unit: Unit, m: Money) -> serde_json::Value {
    match unit {
        Unit::Usd => m.as_usd().into(),
        _ => m.as_nanos().into(),
    }
}

/// The exact nano-dollars of a USD amount (`*_nanos`); `null` for the other units, whose
/// amounts are exact integers already.
pub(crate) fn nanos(unit: Unit, m: Money) -> serde_json::Value {
    match unit {
        Unit::Usd => m.as_nanos().into(),
        _ => serde_json::Value::Null,
    }
}

/// An instant in a time zone, RFC 3339 with the offset and the zone name.
pub(crate) fn local(at: Timestamp, zone: &str) -> String {
    match jiff::tz::TimeZone::get(zone) {
        Ok(tz) => at.to_zoned_datetime(tz).to_string(),
        Err(_) => at.to_string(),
    }
}
