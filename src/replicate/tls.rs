//! `rediss://` with rustls (no OpenSSL): the system's root certificates by default,
//! `provider_budgets.redis.tls.ca_file` (PEM) for a private CA, or — tests only —
//! `tls.insecure_skip_verify` (no verification at all, one warning per client built).
//!
//! A URL whose scheme does not match the server (`redis://` at a TLS port, `rediss://` at a
//! plain one) fails as a reset or a timeout that says nothing about TLS: [`scheme_hint`] adds
//! the likely cause to such a failure.

use std::time::Duration;

use crate::config::RedisTls;
use crate::error::ReplicationError;

/// Why a client could not be built.
pub(crate) enum ClientError {
    /// The URL does not parse.
    Url(redis::RedisError),
    /// The TLS settings cannot be used (the CA file is unreadable or holds no certificate).
    Tls(ReplicationError),
}

/// Installs the process's rustls crypto provider (ring) once; a provider installed by the
/// embedder first is kept.
fn provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client for `url` with the TLS settings (which only matter for `rediss://`).
pub(crate) fn client(url: &str, tls: &RedisTls) -> Result<redis::Client, ClientError> {
    let secure = url.starts_with("rediss://");
    if !secure {
        return redis::Client::open(url).map_err(ClientError::Url);
    }
    provider();
    if tls.insecure_skip_verify {
        tracing::warn!(
            "provider_budgets.redis.tls.insecure_skip_verify is set: the Redis server's \
             certificate is NOT verified (tests only)"
        );
        let insecure = match url.split_once('#') {
            Some((base, _)) => format!("{base}#insecure"),
            None => format!("{url}#insecure"),
        };
        return redis::Client::open(insecure.as_str()).map_err(ClientError::Url);
    }
    let Some(path) = &tls.ca_file else {
        return redis::Client::open(url).map_err(ClientError::Url);
    };
    let unusable = |reason: String| {
        ClientError::Tls(ReplicationError::Tls {
            what: format!("provider_budgets.redis.tls.ca_file {}", path.display()),
            reason,
        })
    };
    let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(unusable("no PEM certificate in it".into()));
    }
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| match e.kind() {
        redis::ErrorKind::InvalidClientConfig => ClientError::Url(e),
        _ => unusable(e.to_string()),
    })
}

/// Adds the likely cause to a TLS handshake failure (one line).
pub(crate) fn explain(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        format!(
            "{message} (the server's certificate is not signed by a trusted CA: set \
             provider_budgets.redis.tls.ca_file to the CA's PEM file)"
        )
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        format!("{message} (the server's certificate does not name the host of the URL)")
    } else {
        message.to_owned()
    }
}

/// The hint for a `redis://` URL whose connection the server reset or closed: a TLS port
/// drops a client that speaks plain RESP.
const PLAIN_AT_TLS: &str =
    " (is the server TLS? the URL says redis://: use rediss:// for a TLS port)";

/// The hint for a `rediss://` URL at a server that answers plain RESP.
const TLS_AT_PLAIN: &str = " (the URL says rediss:// but the server does not speak TLS: it \
     answers plain RESP; use redis://, or the server's TLS port)";

/// The longest a [`scheme_hint`] probe takes: a plain server answers `PING` within one round
/// trip after the TCP handshake.
const PROBE_WITHIN: Duration = Duration::from_millis(500);

/// The likely cause of a failed connection when the URL's scheme may not match the server
/// (appended to the reason), or `""`. `message` is the failure (redacted).
///
/// * `redis://` and the server reset or closed the connection: a TLS server does that to
///   plain RESP (a plain Redis answers, even to refuse). Told from the message alone, so
///   worded as a question.
/// * `rediss://` and anything but a refused connection or a certificate problem: one plain
///   `PING` on a fresh TCP connection (at most `PROBE_WITHIN`, bounded by `within`) tells;
///   a plain Redis answers it (`+PONG`, `-NOAUTH …`), a TLS server does not. The hint is
///   given only when it answered, so a partitioned network never reads as a scheme problem.
pub(crate) async fn scheme_hint(
    client: &redis::Client,
    message: &str,
    within: Duration,
) -> &'static str {
    let lower = message.to_ascii_lowercase();
    let (host, port, secure) = match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port, false),
        redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, true),
        _ => return "",
    };
    if !secure {
        let dropped = ["reset", "broken pipe", "closed", "end of file", "eof"]
            .iter()
            .any(|w| lower.contains(w));
        return if dropped { PLAIN_AT_TLS } else { "" };
    }
    let explained = explain(message).len() != message.len();
    if explained || lower.contains("refused") {
        return "";
    }
    if answers_plain_ping(&host, port, within.min(PROBE_WITHIN)).await {
        TLS_AT_PLAIN
    } else {
        ""
    }
}

/// Whether the server at `host:port` answers a plain-text `PING` with a RESP reply (`+` or
/// `-`) within `within`.
async fn answers_plain_ping(host: &str, port: u16, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut first = [0u8; 1];
        let read = stream.read(&mut first).await.ok()?;
        (read == 1).then_some(first[0])
    };
    matches!(
        tokio::time::timeout(within, probe).await,
        Ok(Some(b'+' | b'-'))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain-URL hint, from the message alone (no probe, no network).
    #[test]
    fn a_plain_url_dropped_by_the_server_asks_whether_it_is_tls() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let hint =
            |message: &str| rt.block_on(scheme_hint(&client, message, Duration::from_millis(10)));
        for dropped in [
            "Connection reset by peer (os error 104)",
            "broken pipe",
            "Connection closed unexpectedly",
            "unexpected end of file",
        ] {
            assert_eq!(hint(dropped), PLAIN_AT_TLS, "{dropped}");
        }
        for other in [
            "Connection refused (os error 111)",
            "Password authentication failed - AuthenticationFailed",
            "timed out",
        ] {
            assert_eq!(hint(other), "", "{other}");
        }
    }
}
