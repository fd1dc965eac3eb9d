//! The API's edge, in front of the `--max-in-flight` admission: who may call, what they may
//! send, and how long they may take to send it.
//!
//! For every `/v1/*` request, in this order:
//!
//! 1. `Origin`: absent, or a loopback origin (`http://127.0.0.1:3000`, `http://localhost`);
//!    anything else is a browser page of another site: `403`.
//! 2. `Host` (only when bound to a loopback address): absent, a loopback address or
//!    `localhost`; anything else is DNS rebinding: `403`.
//! 3. The bearer token, when one is configured: `Authorization: Bearer TOKEN`, compared in
//!    constant time; missing or wrong: `401`. The token is never logged nor echoed.
//! 4. A `POST` or `PUT` with a body must say `Content-Type: application/json` (`415`); a
//!    body-less `POST` (`/v1/reload`) may omit it. A `Content-Length` over [`BODY_LIMIT`] is `413` at
//!    once, before a byte of the body is read.
//! 5. The body is read whole under `--body-timeout` (`408` when it does not arrive in time,
//!    `413` when a chunked body grows over the limit). Only then does the request take an
//!    admission permit: a client that never sends its body holds a connection, not a permit.
//!
//! `/healthz` and `/metrics` are not behind the edge.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::api::error;
use super::{State, BODY_LIMIT};

/// The environment variable holding the bearer token (when `--auth-token-file` is not given).
pub(crate) const TOKEN_VAR: &str = "PROVIDER_BUDGETS_AUTH_TOKEN";

/// A bearer token. `Debug` does not show it.
#[derive(Clone)]
pub(crate) struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The token of `--auth-token-file`, else of [`TOKEN_VAR`] (empty counts as unset), else
    /// none. The error is one line naming the file or the variable, never the token.
    pub(crate) fn load(file: Option<&Path>) -> Result<Option<Token>, String> {
        let (text, source) = match file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| {
                    format!("cannot read the auth token file {}: {e}", path.display())
                })?;
                let text = String::from_utf8(text).map_err(|_| {
                    format!("the auth token file {} is not UTF-8 text", path.display())
                })?;
                (text, format!("the auth token file {}", path.display()))
            }
            None => match std::env::var_os(TOKEN_VAR) {
                None => return Ok(None),
                Some(v) if v.is_empty() => return Ok(None),
                Some(v) => (
                    v.into_string()
                        .map_err(|_| format!("{TOKEN_VAR} is not UTF-8 text"))?,
                    TOKEN_VAR.to_owned(),
                ),
            },
        };
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("{source} is empty: it must hold the bearer token"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{source}: the token must be one word of printable ASCII (no spaces or control characters)"
            ));
        }
        Ok(Some(Token(Arc::from(token.as_bytes()))))
    }

    /// Constant time in the length of the presented value (the length of the token leaks).
    fn matches(&self, presented: &[u8]) -> bool {
        let expected: &[u8] = &self.0;
        let mut diff = u8::from(presented.len() != expected.len());
        for (i, b) in presented.iter().enumerate() {
            diff |= b ^ expected.get(i).copied().unwrap_or(0);
        }
        std::hint::black_box(diff) == 0
    }
}

/// The edge's settings (from the `serve` flags).
#[derive(Debug, Clone)]
pub(crate) struct Edge {
    pub token: Option<Token>,
    /// Bound to a loopback address: the `Host` header must name loopback.
    pub loopback: bool,
    pub body_timeout: Duration,
}

impl Edge {
    /// Checks the flags: a token source that does not work, or a non-loopback address without
    /// a token (and without `--insecure-no-auth`), refuses to start.
    pub(crate) fn new(
        listen: SocketAddr,
        token_file: Option<&Path>,
        insecure_no_auth: bool,
        body_timeout: Duration,
    ) -> Result<Edge, String> {
        let token = Token::load(token_file)?;
        let loopback = listen.ip().is_loopback();
        if token.is_none() && !loopback && !insecure_no_auth {
            return Err(format!(
                "refusing to listen on {listen} without authentication: give \
                 --auth-token-file FILE (or {TOKEN_VAR}), listen on a loopback address, or \
                 pass --insecure-no-auth"
            ));
        }
        if token.is_none() && !loopback {
            tracing::warn!(%listen, "serving the API without authentication (--insecure-no-auth)");
        }
        Ok(Edge {
            token,
            loopback,
            body_timeout,
        })
    }
}

/// A refused request.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
    /// `Connection: close`: the rest of the request may still be on its way.
    close: bool,
}

fn refuse(status: StatusCode, reason: &str) -> Refusal {
    Refusal {
        status,
        reason: reason.to_owned(),
        close: false,
    }
}

fn closing(mut r: Refusal) -> Refusal {
    r.close = true;
    r
}

impl Refusal {
    fn response(self) -> Response {
        let mut r = error(self.status, &self.reason);
        if self.close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A host name (no port, no brackets) that is loopback.
fn loopback_name(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || host
            .rsplit_once('.')
            .is_some_and(|(_, tld)| tld.eq_ignore_ascii_case("localhost"))
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `host[:port]`, `[v6][:port]`: the host part.
fn host_part(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// `scheme://host[:port]` naming loopback (`null` and anything unparsable do not).
fn loopback_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        && !rest.contains('/')
        && !rest.contains('@')
        && loopback_name(host_part(rest))
}

fn clip(value: &str) -> String {
    let mut s: String = value.chars().take(80).collect();
    if s.len() < value.len() {
        s.push_str("...");
    }
    s
}

/// Steps 1 to 4 of the module's list: `Err` is the refusal.
fn check_head(edge: &Edge, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
    check_origin(edge, headers)?;
    check_token(edge, headers)?;
    if method == Method::POST || method == Method::PUT {
        check_body_head(headers)?;
    }
    Ok(())
}

/// A browser page of another site (`Origin`), or a DNS-rebinding name (`Host`) when bound to
/// loopback, is refused.
fn check_origin(edge: &Edge, headers: &HeaderMap) -> Result<(), Refusal> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let text = origin.to_str().unwrap_or("");
        if !loopback_origin(text) {
            metrics::counter!("provider_budgets_http_refused_total", "reason" => "origin")
                .increment(1);
            return Err(refuse(
                StatusCode::FORBIDDEN,
                &format!(
                    "Origin {:?} refused: the API does not serve browser pages of other sites",
                    clip(text)
                ),
            ));
        }
    }
    if edge.loopback {
        if let Some(host) = headers.get(header::HOST) {
            let text = host.to_str().unwrap_or("");
            if !loopback_name(host_part(text)) {
                metrics::counter!("provider_budgets_http_refused_total", "reason" => "host")
                    .increment(1);
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "Host {:?} refused: the sidecar listens on loopback and answers only \
                         to a loopback address or localhost",
                        clip(text)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// With a token configured, `Authorization: Bearer TOKEN` (compared in constant time).
fn check_token(edge: &Edge, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(token) = &edge.token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| {
            let (scheme, rest) = v.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
        });
    if presented.is_some_and(|p| token.matches(p.trim_ascii())) {
        return Ok(());
    }
    metrics::counter!("provider_budgets_http_refused_total", "reason" => "auth").increment(1);
    let reason = if headers.contains_key(header::AUTHORIZATION) {
        "wrong bearer token"
    } else {
        "missing Authorization: Bearer TOKEN (the sidecar runs with a token)"
    };
    Err(refuse(StatusCode::UNAUTHORIZED, reason))
}

/// A POST or PUT's `Content-Length` (at most [`BODY_LIMIT`], refused at once) and its JSON
/// `Content-Type` (one without a body may leave it out).
fn check_body_head(headers: &HeaderMap) -> Result<(), Refusal> {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()));
    let length = match length {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            return Err(closing(refuse(
                StatusCode::BAD_REQUEST,
                "invalid Content-Length",
            )))
        }
    };
    if length.is_some_and(|n| n > BODY_LIMIT as u64) {
        metrics::counter!("provider_budgets_http_refused_total", "reason" => "too_large")
            .increment(1);
        return Err(closing(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body over the limit of {BODY_LIMIT} bytes"),
        )));
    }
    let has_body = length.is_some_and(|n| n > 0) || headers.contains_key(header::TRANSFER_ENCODING);
    match headers.get(header::CONTENT_TYPE) {
        Some(ct) if is_json(ct) => Ok(()),
        None if !has_body => Ok(()),
        other => {
            metrics::counter!("provider_budgets_http_refused_total", "reason" => "content_type")
                .increment(1);
            let given = other.map_or_else(
                || "none".to_owned(),
                |v| format!("{:?}", clip(v.to_str().unwrap_or("?"))),
            );
            Err(closing(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &format!("Content-Type must be application/json, got {given}"),
            )))
        }
    }
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(value: &HeaderValue) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// Reads the whole body (at most [`BODY_LIMIT`] bytes).
async fn read_body(mut body: Body) -> Result<Vec<u8>, Refusal> {
    let mut buf = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| {
            closing(refuse(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            ))
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > BODY_LIMIT {
                return Err(closing(refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body over the limit of {BODY_LIMIT} bytes"),
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// The edge middleware of the `/v1/*` routes (outside [`super::api::admit`]).
pub(super) async fn guard(
    Extract(state): Extract<Arc<State>>,
    request: Request,
    next: Next,
) -> Response {
    let edge = &state.edge;
    if let Err(r) = check_head(edge, request.method(), request.headers()) {
        // Refused before its body was read: the body may still be on its way, so the
        // connection closes (a keep-alive client would otherwise reuse a connection the
        // server drops under it).
        let r = if has_body(request.headers()) {
            closing(r)
        } else {
            r
        };
        return r.response();
    }
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(edge.body_timeout, read_body(body)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(r)) => return r.response(),
        Err(_) => {
            metrics::counter!("provider_budgets_http_refused_total", "reason" => "body_timeout")
                .increment(1);
            return closing(refuse(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the request body did not arrive within {} (--body-timeout)",
                    humantime::format_duration(edge.body_timeout)
                ),
            ))
            .response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Whether a request announces a body (a non-zero `Content-Length`, or chunked).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// `message` with the value of every environment variable it contains (6 characters or
/// more) replaced by `$NAME`: an HTTP answer never carries a value from the environment (a
/// password, a token, a path). Longer values first, so that a value containing another is
/// replaced whole.
pub(crate) fn redact_env(message: &str) -> String {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(_, v)| v.len() >= 6)
        .collect();
    vars.sort_by_key(|v| std::cmp::Reverse(v.1.len()));
    let mut out = message.to_owned();
    for (name, value) in vars {
        if out.contains(&value) {
            out = out.replace(&value, &format!("${name}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_origins() {
        for h in [
            "127.0.0.1:8787",
            "localhost",
            "LOCALHOST:1",
            "[::1]:80",
            "127.1.2.3",
            "a.localhost",
        ] {
            assert!(loopback_name(host_part(h)), "{h}");
        }
        for h in [
            "evil.com",
            "10.0.0.1:8787",
            "[::2]",
            "localhost.evil.com",
            "",
        ] {
            assert!(!loopback_name(host_part(h)), "{h}");
        }
        assert!(loopback_origin("http://localhost:3000"));
        assert!(loopback_origin("https://127.0.0.1"));
        for o in [
            "null",
            "http://evil.com",
            "file://",
            "http://evil.com@127.0.0.1",
        ] {
            assert!(!loopback_origin(o), "{o}");
        }
    }

    #[test]
    fn token_comparison() {
        let t = Token(Arc::from(&b"s3cret"[..]));
        assert!(t.matches(b"s3cret"));
        for p in [&b""[..], b"s3cre", b"s3cret!", b"S3cret"] {
            assert!(!t.matches(p));
        }
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }
}
