//! `provider_budgets.alerts`: where the sidecar delivers alerts (soft limits crossed,
//! exhaustion, forecasts) and how far ahead it forecasts. The library only parses and checks
//! it; delivery (outbox, retries) is the sidecar's (`docs/guide/observability.md`).

use std::time::Duration;

use serde::Deserialize;

use super::error::ConfigError;
use super::values::{HumanDuration, Text, UniqueMap};
use crate::model::text::redact_urls;

/// Default of [`AlertsConfig::lead_time`].
pub const DEFAULT_LEAD_TIME: Duration = Duration::from_secs(3600);
/// Default of [`AlertsConfig::outbox_cap`].
pub const DEFAULT_OUTBOX_CAP: usize = 10_000;

/// `provider_budgets.alerts`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlertsConfig {
    /// Receivers of every alert; none: alerts stay a callback, a metric and a log line.
    pub webhooks: Vec<Webhook>,
    /// A forecast alert fires when a budget is projected to run out before its window ends
    /// and within this time from now (default 1 h).
    pub lead_time: Duration,
    /// Most deliveries pending in the outbox; a new alert beyond it is dropped (counted and
    /// logged) rather than filling the disk while a receiver is down.
    pub outbox_cap: usize,
}

impl Default for AlertsConfig {
    fn default() -> AlertsConfig {
        AlertsConfig {
            webhooks: Vec::new(),
            lead_time: DEFAULT_LEAD_TIME,
            outbox_cap: DEFAULT_OUTBOX_CAP,
        }
    }
}

/// The body a webhook is posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebhookFormat {
    /// The alert as a JSON object (fields in `docs/guide/observability.md`).
    Json,
    /// `{"text": "..."}`: a Slack incoming webhook (and anything that reads `text`).
    Slack,
}

/// One receiver of `provider_budgets.alerts.webhooks`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Webhook {
    /// `http://` or `https://` URL posted to.
    pub url: String,
    /// The body's shape.
    pub format: WebhookFormat,
    /// Extra request headers (an `Authorization` token, say); their values are secrets and
    /// never appear in `Debug` output.
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, _)| format!("{k}: ***"))
            .collect();
        f.debug_struct("Webhook")
            .field("url", &redact_urls(&self.url))
            .field("format", &self.format)
            .field("headers", &headers)
            .finish()
    }
}

/// `provider_budgets.alerts` as written.
#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a map: {webhooks, lead_time, outbox_cap}"
)]
pub(super) struct RawAlerts {
    webhooks: Option<Vec<RawWebhook>>,
    lead_time: Option<HumanDuration>,
    outbox_cap: Option<u32>,
}

impl std::fmt::Debug for RawAlerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawAlerts")
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a map: {url, format: json | slack, headers}"
)]
struct RawWebhook {
    url: Text,
    format: Option<Text>,
    headers: Option<UniqueMap<Text>>,
}

fn refuse(key: String, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Syntax {
        path: key,
        message: message.to_string(),
    }
}

impl RawAlerts {
    pub(super) fn into_alerts(self) -> Result<AlertsConfig, ConfigError> {
        let mut out = AlertsConfig::default();
        if let Some(d) = self.lead_time {
            out.lead_time = d.0;
        }
        if let Some(cap) = self.outbox_cap {
            if cap == 0 {
                return Err(refuse(
                    "provider_budgets.alerts.outbox_cap".into(),
                    "must be at least 1",
                ));
            }
            out.outbox_cap = cap as usize;
        }
        for (i, w) in self.webhooks.unwrap_or_default().into_iter().enumerate() {
            out.webhooks.push(w.into_webhook(i)?);
        }
        Ok(out)
    }
}

impl RawWebhook {
    fn into_webhook(self, i: usize) -> Result<Webhook, ConfigError> {
        let path = format!("provider_budgets.alerts.webhooks[{i}]");
        check_url(&self.url.value)
            .map_err(|m| refuse(format!("{path}.url"), format!("{}: {m}", self.url.shown())))?;
        let format = match self.format.as_ref().map(|f| f.value.as_str()) {
            None | Some("json") => WebhookFormat::Json,
            Some("slack") => WebhookFormat::Slack,
            Some(other) => {
                return Err(refuse(
                    format!("{path}.format"),
                    format!("{other:?}: give json or slack"),
                ))
            }
        };
        let mut headers = Vec::new();
        for (name, value) in self.headers.map(|h| h.0).unwrap_or_default() {
            if !is_header_name(&name) {
                return Err(refuse(
                    format!("{path}.headers"),
                    format!("{name:?} is not a header name (letters, digits, !#$%&'*+-.^_`|~)"),
                ));
            }
            if reserved_header(&name) {
                return Err(refuse(
                    format!("{path}.headers"),
                    format!("{name:?} is set by the sender; leave it out"),
                ));
            }
            if value
                .value
                .bytes()
                .any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
            {
                return Err(refuse(
                    format!("{path}.headers.{name}"),
                    "control characters are not allowed in a header value",
                ));
            }
            headers.push((name, value.value));
        }
        Ok(Webhook {
            url: self.url.value,
            format,
            headers,
        })
    }
}

impl Text {
    /// A URL as an error shows it: as written when from the environment, else redacted.
    fn shown(&self) -> String {
        if self.value == self.written {
            format!("{:?}", redact_urls(&self.value))
        } else {
            format!("from {}", self.written)
        }
    }
}

/// An absolute `http://` or `https://` URL with a host and no whitespace.
fn check_url(url: &str) -> Result<(), &'static str> {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
        .ok_or("give an http:// or https:// URL")?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a URL has no whitespace");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err("no host");
    }
    Ok(())
}

/// An HTTP token (RFC 9110 `tchar`s).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Headers the sender sets itself.
fn reserved_header(name: &str) -> bool {
    ["content-type", "content-length", "host", "idempotency-key"]
        .iter()
        .any(|r| name.eq_ignore_ascii_case(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("http://127.0.0.1:9/hook").is_ok());
        assert!(check_url("HTTPS://hooks.slack.com/services/x").is_ok());
        assert!(check_url("ftp://x").is_err());
        assert!(check_url("http://").is_err());
        assert!(check_url("http://a b").is_err());
        assert!(check_url("http://u:p@/x").is_err());
    }

    #[test]
    fn parses_and_refuses_with_one_line_naming_the_key() {
        use crate::config::testing::{env, yaml_err};
        use crate::Config;
        let ok = Config::from_yaml_str_with_env(
            "provider_budgets:\n  alerts:\n    lead_time: 30m\n    outbox_cap: 5\n    webhooks:\n      - {url: \"http://h:1/x\", format: slack, headers: {X-Token: os.environ/T}}\n      - {url: \"https://h/y\"}\n",
            env(&[("T", "tok")]),
        )
        .unwrap();
        let a = &ok.alerts;
        assert_eq!((a.lead_time, a.outbox_cap), (Duration::from_secs(1800), 5));
        assert_eq!(a.webhooks[0].format, WebhookFormat::Slack);
        assert_eq!(
            a.webhooks[0].headers,
            vec![("X-Token".into(), "tok".into())]
        );
        assert_eq!(a.webhooks[1].format, WebhookFormat::Json);
        let no = |body: &str, key: &str| {
            let msg = yaml_err(&format!("provider_budgets:\n  alerts:\n    {body}\n"));
            assert!(msg.contains(key), "{key} not in {msg}");
            assert!(!msg.contains("s3cret"), "{msg}");
        };
        no("webhooks: [{url: \"ftp://h/\"}]", "webhooks[0].url");
        no(
            "webhooks: [{url: \"http://u:s3cret@/\"}]",
            "webhooks[0].url",
        );
        no(
            "webhooks: [{url: \"http://h/\", format: xml}]",
            "webhooks[0].format",
        );
        no(
            "webhooks: [{url: \"http://h/\", headers: {\"a b\": s3cret}}]",
            "webhooks[0].headers",
        );
        no(
            "webhooks: [{url: \"http://h/\", headers: {Idempotency-Key: s3cret}}]",
            "webhooks[0].headers",
        );
        no("webhooks: [{url: \"http://h/\", method: PUT}]", "method");
        no("lead_tme: 1h", "lead_tme");
        no("outbox_cap: 0", "alerts.outbox_cap");
    }

    #[test]
    fn debug_hides_secrets() {
        let w = Webhook {
            url: "http://user:pw@example.com/x".into(),
            format: WebhookFormat::Json,
            headers: vec![("Authorization".into(), "Bearer s3cret".into())],
        };
        let text = format!("{w:?}");
        assert!(!text.contains("s3cret") && !text.contains("pw@"), "{text}");
    }
}
