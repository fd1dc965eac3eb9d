//! `rediss://` with rustls (no OpenSSL): the system's root certificates by default,
//! `provider_budgets.redis.tls.ca_file` (PEM) for a private CA, or — tests only —
//! `tls.insecure_skip_verify` (no verification at all, one warning per client built).

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
