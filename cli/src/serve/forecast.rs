//! The exhaustion forecast: every [`EVERY`], per budget (templated series and `concurrent`
//! budgets excepted), the burn rate of its current window (spend so far over the time since the
//! window started) gives `provider_budgets_exhaustion_eta_seconds` (0 when spent; `+Inf` with no spend yet). A budget
//! projected to run out before its window ends, and within `alerts.lead_time`, gets one
//! `forecast` alert per window: once per fleet where Redis is configured (claimed through
//! [`Limiter::once_per_fleet`], like a soft limit), once per node otherwise.

use std::collections::HashMap;
use std::time::Duration;

use provider_budgets::{BudgetStatus, Limiter, StatusQuery, Unit};

use super::alerts::{Alert, Alerts};

/// Time between two forecasts.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// Runs the forecast until the runtime stops.
pub(crate) async fn run(limiter: Limiter, alerts: Alerts, lead_time: Duration) {
    // Forecast alerts sent, by key, with the end of their window (pruned after it).
    let mut fired: HashMap<String, i64> = HashMap::new();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        check(&limiter, &alerts, lead_time, &mut fired);
    }
}

/// Seconds until `s` runs out at its window's average burn rate so far.
pub(crate) fn eta_seconds(s: &BudgetStatus, now_secs: f64) -> f64 {
    if s.exhausted {
        return 0.0;
    }
    let elapsed = now_secs - s.window.start_secs() as f64;
    eta(
        s.spend.as_nanos() as f64,
        s.limit.as_nanos() as f64,
        elapsed,
    )
}

/// What is left over the burn rate `spend / elapsed`: 0 when spent, +Inf with no burn yet.
fn eta(spend: f64, limit: f64, elapsed: f64) -> f64 {
    if spend >= limit {
        return 0.0;
    }
    if spend <= 0.0 || elapsed <= 0.0 {
        return f64::INFINITY;
    }
    (limit - spend) / (spend / elapsed)
}

fn check(
    limiter: &Limiter,
    alerts: &Alerts,
    lead_time: Duration,
    fired: &mut HashMap<String, i64>,
) {
    let now = limiter.now();
    let now_secs = now.as_millisecond() as f64 / 1000.0;
    fired.retain(|_, end| (*end as f64) > now_secs);
    for s in limiter.status(StatusQuery::all().without_templated()) {
        // Slots held have no burn rate (and no window to run out in).
        if s.unit == Unit::Concurrent {
            continue;
        }
        let eta = eta_seconds(&s, now_secs);
        let labels = [
            ("provider", s.provider.clone()),
            ("period", s.period_key.clone()),
            ("unit", s.unit.as_str().to_owned()),
        ];
        metrics::gauge!("provider_budgets_exhaustion_eta_seconds", &labels).set(eta);
        let until_end = s.window.end_secs() as f64 - now_secs;
        let alarming = eta > 0.0 && eta < until_end && eta <= lead_time.as_secs_f64();
        if !alerts.enabled() || !alarming {
            continue;
        }
        let scope = s.scope.to_string();
        let start = s.window.start_secs();
        let id = Alert::key_of("forecast", &scope, &s.name, &s.period_key, start, 0);
        if fired.insert(id.clone(), s.window.end_secs()).is_some() {
            continue;
        }
        let alert = Alert {
            id: id.clone(),
            kind: "forecast".to_owned(),
            scope,
            name: s.name.clone(),
            period: s.period_key.clone(),
            threshold: None,
            spend: s.spend.to_string(),
            limit: s.limit.to_string(),
            window_start: s.window.start().to_string(),
            window_end: s.window.end().to_string(),
            eta_seconds: Some(eta.round()),
        };
        let a = alerts.clone();
        // Once per fleet where Redis is configured (a claim like a soft limit's).
        limiter.once_per_fleet(&id, s.window, move || a.send(alert));
    }
}

#[cfg(test)]
mod tests {
    use super::eta;

    #[test]
    fn eta_is_what_is_left_over_the_burn_rate() {
        // 60 of 100 in 12 h: 40 left at 5 per hour.
        assert!((eta(60.0, 100.0, 43_200.0) - 28_800.0).abs() < 1e-6);
        assert_eq!(eta(100.0, 100.0, 10.0), 0.0);
        assert_eq!(eta(0.0, 100.0, 10.0), f64::INFINITY);
        assert_eq!(eta(1.0, 100.0, 0.0), f64::INFINITY);
    }
}
