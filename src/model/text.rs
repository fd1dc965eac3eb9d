//! Keeping Redis passwords out of errors, `status` and logs, and keeping messages on one line
//! ([`one_line`], [`flat`]).
//!
//! Every message that can carry the Redis URL goes through [`redact_url`] (the URL itself),
//! [`scrub`] (a text produced by a lower layer, e.g. the `redis` crate, that may embed it) or
//! [`redact_urls`] (any text: every URL in it); all three mask a userinfo the same way
//! (`mask_userinfo`).

// Some of it is used by replication only.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

/// The URL with its password replaced by `***`: `redis://:***@host:6379/`,
/// `redis://user:***@host/`, `rediss://***@host/` (a lone userinfo without `:` may be a token,
/// so it is masked whole), and `?password=***` / `?pass=***` query parameters (unix sockets).
/// A text that is not a URL is redacted the same way, best effort: everything up to the last
/// `@` of the authority is treated as userinfo.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The query (if any) starts at the first `?`; a userinfo never legitimately holds one
    // unencoded, and masking too much is the safe side.
    let (before_query, query) = match rest.find('?') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    // The userinfo ends at the last `@` before the query: a password with an unencoded `@` or
    // `/` stays masked whole.
    let body = match before_query.rfind('@') {
        Some(at) => {
            let (userinfo, host) = before_query.split_at(at);
            format!("{}{host}", mask_userinfo(userinfo))
        }
        None => before_query.to_owned(),
    };
    format!("{scheme}{body}{}", redact_query(query))
}

/// The one masking of a URL's userinfo, shared by [`redact_url`] and [`redact_urls`]:
/// `user:***`, or `***` for a userinfo without `:` (a lone token is all password for Redis).
fn mask_userinfo(userinfo: &str) -> String {
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_owned(),
    }
}

/// `?a=1&password=x` -> `?a=1&password=***` (also `pass`, any case).
fn redact_query(query: &str) -> String {
    let Some(params) = query.strip_prefix('?') else {
        return query.to_owned();
    };
    let parts: Vec<String> = params
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _))
                if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") =>
            {
                format!("{k}=***")
            }
            _ => p.to_owned(),
        })
        .collect();
    format!("?{}", parts.join("&"))
}

/// The secrets of `url`: its password (raw and percent-decoded), its query passwords, and a
/// lone userinfo (a token).
fn secrets(url: &str) -> Vec<String> {
    let rest = url.find("://").map_or(url, |i| &url[i + 3..]);
    let (before_query, query) = match rest.find('?') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let mut out = Vec::new();
    if let Some(at) = before_query.rfind('@') {
        let userinfo = &before_query[..at];
        let secret = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
        out.push(secret.to_owned());
    }
    for p in query.split('&') {
        if let Some((k, v)) = p.split_once('=') {
            if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") {
                out.push(v.to_owned());
            }
        }
    }
    let decoded: Vec<String> = out.iter().map(|s| percent_decode(s)).collect();
    out.extend(decoded);
    // Very short secrets would mangle unrelated text; the URL itself is replaced whole anyway.
    out.retain(|s| s.len() >= 3);
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out.dedup();
    out
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` (e.g. an error rendered by the `redis` crate) with `url` replaced by its redacted
/// form and any remaining occurrence of its password replaced by `***`.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let mut out = if url.is_empty() {
        text.to_owned()
    } else {
        text.replace(url, &redact_url(url))
    };
    for secret in secrets(url) {
        out = out.replace(&secret, "***");
    }
    out
}

/// Replaces the password of every `scheme://user:password@host` in `text` with `***`
/// (`redis://:***@host`); a userinfo without `:` is all password for Redis, so it becomes
/// `***` too. Config errors may quote a value (a parser's "invalid type: string ..."), or a
/// TOML line: a Redis URL in them must not leak its password.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#', quote or whitespace.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(userinfo_end) => {
                out.push_str(&mask_userinfo(&authority[..userinfo_end]));
                out.push_str(&authority[userinfo_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Parser messages may span lines (TOML draws the offending line); errors here are one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `s` with every run of whitespace (line breaks included) made one space: server details
/// (Lua tracebacks, client errors) on one line.
pub(crate) fn flat(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        for (url, want) in [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            (
                "redis://:s3cret@127.0.0.1:6379/",
                "redis://:***@127.0.0.1:6379/",
            ),
            ("redis://user:s3cret@host/0", "redis://user:***@host/0"),
            ("rediss://user:p@ss/w@host:1/", "rediss://user:***@host:1/"),
            ("redis://token@host", "redis://***@host"),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=s3cret",
                "redis+unix:///tmp/r.sock?db=1&pass=***",
            ),
            ("not a url", "not a url"),
            ("user:s3cret@host", "user:***@host"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
            assert!(!redact_url(url).contains("s3cret"));
        }
    }

    #[test]
    fn scrub_removes_the_url_and_the_password() {
        let url = "redis://:hunter22%21@127.0.0.1:1/";
        let text = format!("cannot connect to {url}: auth hunter22! failed (hunter22%21)");
        let out = scrub(&text, url);
        assert!(!out.contains("hunter22"), "{out}");
        assert!(out.contains("redis://:***@127.0.0.1:1/"), "{out}");
    }
}
