//! `rediss://` with rustls (no OpenSSL): the system's root certificates by default,
//! `provider_budgets.redis.tls.ca_file` (PEM) for a private CA, or — tests only —
//! `tls.insecure_skip_verify` (no verification at all, one warning per client built).
//!
//! A URL whose scheme does not match the server (`redis://` at a TLS port, `rediss://` at a
//! plain one) fails as a reset or a timeout that says nothing about TLS: [`scheme_hint`] probes
//! the server and names the cause.

use std::sync::Arc;
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

/// The hint for a `redis://` URL at a server that answers a TLS handshake.
const PLAIN_AT_TLS: &str =
    " (is the server TLS? it answers a TLS handshake, but the URL says redis://: use rediss://)";

/// The hint for a `rediss://` URL at a server that answers plain RESP.
const TLS_AT_PLAIN: &str = " (the URL says rediss:// but the server does not speak TLS: it \
     answers plain RESP; use redis://, or the server's TLS port)";

/// The longest a [`scheme_hint`] probe takes: a server answers either probe within one round
/// trip after the TCP handshake.
const PROBE_WITHIN: Duration = Duration::from_millis(500);

/// The cause of a failed connection when the URL's scheme does not match the server
/// (appended to the reason), or `""`. `message` is the failure (redacted).
///
/// One probe on a fresh TCP connection (at most `PROBE_WITHIN`, bounded by `within`), and only
/// after a failure such a mismatch produces, tells what the server speaks; the hint is given
/// only when the server answered the other protocol, so a partition, or a proxy that drops
/// every connection, never reads as a scheme problem:
///
/// * `redis://` whose connection the server reset or closed (what a TLS port does to plain
///   RESP): a TLS `ClientHello`; a TLS server answers with a handshake record.
/// * `rediss://` failing for anything but a refused connection or a certificate problem
///   (a plain Redis waits for a line the handshake never sends: a timeout): a plain `PING`;
///   a plain Redis answers it (`+PONG`, `-NOAUTH …`).
pub(crate) async fn scheme_hint(
    client: &redis::Client,
    message: &str,
    within: Duration,
) -> &'static str {
    let lower = message.to_ascii_lowercase();
    let within = within.min(PROBE_WITHIN);
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => {
            let dropped = ["reset", "broken pipe", "closed", "end of file", "eof"]
                .iter()
                .any(|w| lower.contains(w));
            if dropped && first_byte(host, *port, &client_hello(host), within).await == Some(0x16) {
                return PLAIN_AT_TLS;
            }
        }
        redis::ConnectionAddr::TcpTls { host, port, .. } => {
            let explained = explain(message).len() != message.len();
            if !explained
                && !lower.contains("refused")
                && matches!(
                    first_byte(host, *port, b"PING\r\n", within).await,
                    Some(b'+' | b'-')
                )
            {
                return TLS_AT_PLAIN;
            }
        }
        _ => {}
    }
    ""
}

/// A TLS `ClientHello` for `host` as rustls writes it (nothing is verified: only the server's
/// first byte is read), or nothing when it cannot be built.
fn client_hello(host: &str) -> Vec<u8> {
    let hello = || -> Option<Vec<u8>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
        let mut out = Vec::new();
        tls.write_tls(&mut out).ok()?;
        Some(out)
    };
    hello().unwrap_or_default()
}

/// The first byte the server at `host:port` answers to `probe` on a fresh TCP connection,
/// within `within`; `None` when it answers nothing (closed, reset, silent, unreachable).
async fn first_byte(host: &str, port: u16, probe: &[u8], within: Duration) -> Option<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if probe.is_empty() {
        return None;
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        stream.write_all(probe).await.ok()?;
        let mut first = [0u8; 1];
        let read = stream.read(&mut first).await.ok()?;
        (read == 1).then_some(first[0])
    };
    tokio::time::timeout(within, exchange).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that drops every connection (a proxy without a backend) resets a `redis://`
    /// client as a TLS port does, but answers no handshake: no hint.
    #[test]
    fn a_server_that_drops_every_connection_is_not_called_tls() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dropper = std::thread::spawn(move || {
            // The probe's connection: accepted and closed unanswered.
            if let Ok((conn, _)) = listener.accept() {
                drop(conn);
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let within = Duration::from_secs(5);
        let hint = rt.block_on(scheme_hint(&client, "Connection reset by peer", within));
        assert_eq!(hint, "");
        dropper.join().unwrap();
        // Failures a scheme mismatch does not produce get no hint.
        for other in [
            "Connection refused (os error 111)",
            "WRONGPASS",
            "timed out",
        ] {
            assert_eq!(
                rt.block_on(scheme_hint(&client, other, within)),
                "",
                "{other}"
            );
        }
    }

    #[test]
    fn a_client_hello_is_a_tls_handshake_record() {
        for host in ["127.0.0.1", "redis.example", "::1"] {
            let hello = client_hello(host);
            assert_eq!(hello.first(), Some(&0x16), "{host}");
        }
    }
}
