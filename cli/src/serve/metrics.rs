//! The Prometheus exporter: installed as the global `metrics` recorder by the sidecar only.
//!
//! Counters and histograms come from the library as they happen. Budget gauges (spend,
//! limit, remaining per provider) and the health gauges are set from [`Limiter::status`] and
//! [`Limiter::health`] right before each render, so a scrape equals `GET /v1/budgets` at that
//! moment.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use provider_budgets::{Limiter, Money, Unit};

/// Journal flush latency buckets, seconds (an fsync takes 0.1-50 ms on most disks).
const FLUSH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The installed recorder's handle.
#[derive(Debug, Clone)]
pub(crate) struct Exporter {
    handle: PrometheusHandle,
}

impl Exporter {
    /// Installs the global recorder and describes every metric (the HELP lines).
    pub(crate) fn install() -> Result<Exporter, String> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("provider_budgets_journal_flush_seconds".into()),
                FLUSH_BUCKETS,
            )
            .map_err(|e| e.to_string())?
            .install_recorder()
            .map_err(|e| e.to_string())?;
        describe();
        Ok(Exporter { handle })
    }

    /// The text exposition, with the gauges refreshed from `limiter`.
    pub(crate) fn render(&self, limiter: &Limiter) -> String {
        // A template's series are in its aggregates (below), not one gauge each.
        for s in limiter.status(provider_budgets::StatusQuery::all().without_templated()) {
            // `provider`: the provider, or `scope:name` for the other scopes (the key name);
            // `period`: several budgets per name are told apart.
            // `unit`: the gauges without `_usd` carry every budget in its unit (dollars,
            // tokens, requests, slots); the `_usd` ones only USD budgets.
            let (p, q, unit) = (s.provider, s.period_key, s.unit);
            let value = |m: Money| match unit {
                Unit::Usd => m.as_usd(),
                _ => m.as_nanos() as f64,
            };
            let labels = [
                ("provider", p.clone()),
                ("period", q.clone()),
                ("unit", unit.as_str().to_owned()),
            ];
            metrics::gauge!("provider_budgets_spend", &labels).set(value(s.spend));
            metrics::gauge!("provider_budgets_limit", &labels).set(value(s.limit));
            metrics::gauge!("provider_budgets_remaining", &labels).set(value(s.remaining));
            if unit != Unit::Usd {
                continue;
            }
            metrics::gauge!("provider_budgets_spend_usd", "provider" => p.clone(), "period" => q.clone())
                .set(s.spend.as_usd());
            metrics::gauge!("provider_budgets_limit_usd", "provider" => p.clone(), "period" => q.clone())
                .set(s.limit.as_usd());
            metrics::gauge!("provider_budgets_remaining_usd", "provider" => p, "period" => q)
                .set(s.remaining.as_usd());
        }
        render_templates(limiter);
        let health = limiter.health();
        let fault = if health.storage_ok() { 0.0 } else { 1.0 };
        metrics::gauge!("provider_budgets_storage_fault").set(fault);
        let r = &health.replication;
        metrics::gauge!("provider_budgets_sync_stale").set(if r.enabled && r.stale {
            1.0
        } else {
            0.0
        });
        // Also set by the library at each connection; here for the servers it never reached.
        metrics::gauge!("provider_budgets_redis_evicting").set(if r.evicting == Some(true) {
            1.0
        } else {
            0.0
        });
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// The aggregates of each template, labelled by scope and period (bounded by the config, not
/// by the names its series are for).
fn render_templates(limiter: &Limiter) {
    for t in limiter.templates() {
        let (scope, period) = (t.scope.as_str(), t.period_key);
        let labels = [("scope", scope.to_owned()), ("period", period)];
        metrics::gauge!("provider_budgets_template_live_series", &labels).set(t.live_series as f64);
        metrics::gauge!("provider_budgets_template_exhausted_series", &labels)
            .set(t.exhausted_series as f64);
        metrics::gauge!("provider_budgets_template_spend_usd", &labels).set(t.spend.as_usd());
        metrics::gauge!("provider_budgets_template_limit_usd", &labels).set(t.limit.as_usd());
        metrics::gauge!("provider_budgets_template_max_series", &labels)
            .set(f64::from(t.max_series));
    }
}

/// The gauges the exporter describes (`# HELP` lines), beside the library's names.
const GAUGES: &[(&str, &str)] = &[
    (
        "provider_budgets_spend",
        "Spend of the fleet in the budget's current window, in its unit (USD, tokens, requests, slots held)",
    ),
    (
        "provider_budgets_limit",
        "Budget limit, in its unit",
    ),
    (
        "provider_budgets_remaining",
        "Limit minus spend in the current window (0 when over), in its unit",
    ),
    (
        "provider_budgets_spend_usd",
        "Spend of the fleet in the budget's current window, USD",
    ),
    (
        "provider_budgets_limit_usd",
        "Budget limit, USD",
    ),
    (
        "provider_budgets_remaining_usd",
        "Limit minus spend in the current window (0 when over), USD",
    ),
    (
        "provider_budgets_exhaustion_eta_seconds",
        "Seconds until the budget runs out at its current window's burn rate (0 when spent, +Inf with no spend)",
    ),
    (
        "provider_budgets_webhook_outbox",
        "Alert deliveries pending in the outbox (alerts.webhooks)",
    ),
    (
        "provider_budgets_template_live_series",
        "Names with a series of the scope's templates (bounded by max_series)",
    ),
    (
        "provider_budgets_template_exhausted_series",
        "Series of the template spent in their current window",
    ),
    (
        "provider_budgets_template_spend_usd",
        "Spend of all the template's series in their current windows, USD",
    ),
    (
        "provider_budgets_template_limit_usd",
        "Limit of each series of the template, USD",
    ),
    (
        "provider_budgets_template_max_series",
        "The template's bound on live series",
    ),
    (
        "provider_budgets_sync_lag_seconds",
        "Time since the last successful replication round",
    ),
    (
        "provider_budgets_sync_stale",
        "1 when replication is enabled and no round succeeded recently",
    ),
    (
        "provider_budgets_idempotency_keys",
        "Idempotency keys of spend requests remembered by the sidecar",
    ),
    (
        "provider_budgets_http_in_flight",
        "API requests being handled (bounded by --max-in-flight)",
    ),
    (
        "provider_budgets_storage_fault",
        "1 while the store cannot take writes (disk full, journal dead)",
    ),
    (
        "provider_budgets_redis_evicting",
        "1 when a Redis connected to may evict this library's keys (maxmemory-policy other than noeviction)",
    ),
];

/// The counters the exporter describes.
const COUNTERS: &[(&str, &str)] = &[
    (
        "provider_budgets_uncounted_total",
        "Spends a budget could not count because they lacked what its unit needs (no usage for a token budget)",
    ),
    (
        "provider_budgets_records_total",
        "Spend records made durable by the journal",
    ),
    (
        "provider_budgets_filter_calls_total",
        "Filter requests answered by the sidecar",
    ),
    (
        "provider_budgets_filtered_deployments_total",
        "Deployments removed by filter requests (over budget or unknown and denied)",
    ),
    (
        "provider_budgets_no_deployments_total",
        "Filter calls that left no deployment",
    ),
    (
        "provider_budgets_unknown_provider_total",
        "Deployments whose provider could not be resolved",
    ),
    (
        "provider_budgets_spend_requests_total",
        "Spend requests answered by the sidecar, by outcome",
    ),
    (
        "provider_budgets_journal_errors_total",
        "Journal batches that could not be written (retried)",
    ),
    (
        "provider_budgets_sync_rounds_total",
        "Successful replication rounds with Redis",
    ),
    (
        "provider_budgets_sync_errors_total",
        "Failed replication rounds with Redis",
    ),
    (
        "provider_budgets_http_overloaded_total",
        "Requests refused with 503 because --max-in-flight requests were in flight",
    ),
    (
        "provider_budgets_unpriced_total",
        "Spend given as usage whose model has no price, by model and pricing.unpriced policy",
    ),
    (
        "provider_budgets_template_refused_total",
        "New names refused by a template (full: max_series; a name that cannot be a series)",
    ),
    (
        "provider_budgets_template_series_made_total",
        "Series made for a template's names (first use, or again after they left as idle)",
    ),
    (
        "provider_budgets_webhook_deliveries_total",
        "Webhook delivery attempts by outcome: delivered, failed (retried), rejected (4xx, not retried), dropped (outbox full)",
    ),
    (
        "provider_budgets_data_loss_total",
        "Sync reads that found this node's acknowledged spend missing from Redis (evicted, deleted, flushed, failed over)",
    ),
];

/// Counters with labels: their series appear with their first event.
const LABELLED: &[&str] = &[
    "provider_budgets_spend_requests_total",
    "provider_budgets_webhook_deliveries_total",
];

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit as MetricUnit};
    for &(name, help) in GAUGES {
        describe_gauge!(name, help);
    }
    for &(name, help) in COUNTERS {
        describe_counter!(name, help);
        // Exported from the start, at 0 until the first event: `rate()` and a dashboard see
        // the series before it moves. (`increment(0)`: one the limiter already counted at
        // open keeps its value.) A labelled counter gets its series with its first event.
        if !LABELLED.contains(&name) {
            metrics::counter!(name).increment(0);
        }
    }
    describe_histogram!(
        "provider_budgets_journal_flush_seconds",
        MetricUnit::Seconds,
        "Time of one journal flush (write + fsync of a batch)"
    );
}
