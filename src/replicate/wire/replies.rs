//! What Redis answers to one round: the reply types and their parsers (the merge script's
//! replies, and the plain reads of [`Mode::Read`](super::Mode::Read) groups). Every reply has a
//! constant size per key, whatever the number of nodes.

use redis::{ErrorKind, ServerErrorKind, Value};

use crate::model::text::flat;

use super::{first_key, one_line, GrantReply, Group, GroupOutcome, SyncItem, WireError};

/// One window key's reply: constant size, whatever the number of nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReply {
    /// This node id's field, when present and a canonical total.
    pub field: Option<u64>,
    /// The instance recorded as the writer of the field (`~owner:{node}`).
    pub owner: Option<String>,
    /// Our instance's kept-apart total (`~retired:{node}:{instance}`), 0 when absent.
    pub mine: u64,
    /// `~total`: the sum of every contribution (saturating at `u64::MAX`).
    pub total: u64,
    /// The script recomputed the total from the fields in this call.
    pub repaired: bool,
    /// Read without the script, the key's state needs it (a missing, malformed or too low
    /// total, malformed or flagged fields): the values are not to be used; send the budget
    /// through the script next round.
    pub needs_script: bool,
    /// One line per problem: skipped fields, an unusable own field.
    pub problems: Vec<String>,
    /// Not read this round ([`SyncItem::skip`]): nothing changed since the last read, the
    /// values are not to be used.
    pub unread: bool,
    /// Strict windows (sent with a [`GrantAsk`](super::GrantAsk)): the grant state.
    pub grant: Option<GrantReply>,
}

impl KeyReply {
    /// The reply of a key that was not read ([`SyncItem::skip`]).
    pub fn unread() -> KeyReply {
        KeyReply {
            unread: true,
            ..KeyReply::default()
        }
    }
}

/// The state of a budget's lease after the script ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Ours (taken, renewed or released).
    Held,
    /// Nobody holds it (seen by a plain read, which does not take it).
    Free,
    /// Another live instance holds it: nothing was written.
    Refused { holder: String },
    /// The lease key is unusable (e.g. of the wrong type): nothing was written.
    Broken(String),
}

/// One budget's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReply {
    pub lease: Lease,
    /// Per item: its reply, or why that key failed (one line naming the key).
    pub keys: Vec<Result<KeyReply, String>>,
}

/// What the tracking prelude of a pipeline answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackReply {
    /// Why `CLIENT TRACKING ON NOLOOP` failed (e.g. `unknown command`: a proxy or a managed
    /// Redis without it), `None` when tracking is on.
    pub error: Option<String>,
    /// `CLIENT ID`: the server side of our connection (a different id than last round means
    /// another connection, which tracks none of our earlier reads).
    pub client_id: Option<i64>,
}

/// Parses one script reply: `{lease, per_key}`.
pub(super) fn parse_group(items: &[SyncItem], value: Value) -> GroupOutcome {
    let first = || items.first().map(|i| i.key.clone()).unwrap_or_default();
    let bad = |detail: String| WireError::Reply {
        key: first(),
        detail,
    };
    let (lease, per_key) = match value {
        Value::Array(mut parts) if parts.len() == 2 => {
            let per_key = parts.pop();
            let lease = parts.pop();
            match (lease, per_key) {
                (Some(lease), Some(Value::Array(per_key))) if per_key.len() == items.len() => {
                    (lease, per_key)
                }
                other => return Err(bad(format!("expected {{lease, per-key}}, got {other:?}"))),
            }
        }
        other => return Err(bad(format!("expected {{lease, per-key}}, got {other:?}"))),
    };
    let lease = {
        // `'held'` alone is a plain string (the common case: no table to convert).
        let lease = match lease {
            Value::Array(words) => words,
            word => vec![word],
        };
        let mut words = lease.into_iter().map(|v| text(v).unwrap_or_default());
        match (words.next().as_deref(), words.next()) {
            (Some("held"), _) => Lease::Held,
            (Some("refused"), Some(holder)) => Lease::Refused { holder },
            (Some("broken"), Some(error)) => Lease::Broken(flat(&error)),
            other => return Err(bad(format!("unexpected lease state {other:?}"))),
        }
    };
    let keys = items
        .iter()
        .zip(per_key)
        .map(|(item, reply)| parse_key(&item.key, reply))
        .collect();
    Ok(GroupReply { lease, keys })
}

/// One key's state (`{field, owner, mine, total}`, ten, or the eleven of a strict key of
/// [`SCRIPT`]) or
/// `{'err', error}`.
fn parse_key(key: &str, reply: Value) -> Result<KeyReply, String> {
    let Value::Array(mut parts) = reply else {
        return Err(format!("key {key}: unexpected reply {reply:?}"));
    };
    if matches!(parts.len(), 4 | 10 | 11) {
        return parse_state(key, parts);
    }
    let body = if parts.len() == 2 { parts.pop() } else { None };
    let tag = parts.pop().and_then(|v| text(v).ok());
    match (tag.as_deref(), body) {
        (Some("err"), Some(error)) => Err(format!(
            "key {key}: {} (window not synced)",
            flat(&text(error).unwrap_or_default())
        )),
        (tag, body) => Err(format!("key {key}: unexpected reply {tag:?} {body:?}")),
    }
}

/// The six parts of a key's state (see [`SCRIPT`]).
fn parse_state(key: &str, state: Vec<Value>) -> Result<KeyReply, String> {
    let mut it = state.into_iter();
    let mut next = || it.next().map(text).unwrap_or_else(|| Ok(String::new()));
    let (field, owner, mine, total) = (next(), next(), next(), next());
    let repaired = next();
    let mut out = KeyReply {
        repaired: repaired.as_deref() == Ok("1"),
        ..KeyReply::default()
    };
    let total = total.map_err(|t| format!("key {key}: total {t:?} is not text"))?;
    out.total = parse_sum(&total)
        .ok_or_else(|| format!("key {key}: total {total:?} is not a decimal number"))?;
    match field {
        Ok(f) if f.is_empty() => {}
        Ok(f) => match parse_total(&f) {
            Some(v) => out.field = Some(v),
            None => out.problems.push(format!(
                "key {key}: this node's field = {f:?} is not a canonical u64 total (rewritten by its next send)"
            )),
        },
        Err(f) => out.problems.push(format!("key {key}: this node's field {f:?} is not UTF-8")),
    }
    out.owner = owner.ok().filter(|o| !o.is_empty());
    out.mine = match mine {
        Ok(m) if m.is_empty() => 0,
        Ok(m) => parse_total(&m).unwrap_or_else(|| {
            out.problems.push(format!(
                "key {key}: this instance's kept-apart field = {m:?} is not a canonical u64 total"
            ));
            0
        }),
        Err(m) => {
            out.problems.push(format!(
                "key {key}: this instance's kept-apart field {m:?} is not UTF-8"
            ));
            0
        }
    };
    let bad = it.next();
    let mut words = it.map(|v| text(v).unwrap_or_default());
    let (grant, granted, holders, frozen, ids) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    );
    if let Some(g) = grant.filter(|g| !g.is_empty()) {
        let grant = parse_total(&g)
            .ok_or_else(|| format!("key {key}: this node's grant {g:?} is not a canonical u64"))?;
        out.grant = Some(GrantReply {
            grant,
            granted: granted.as_deref().and_then(parse_sum).unwrap_or(u64::MAX),
            holders: holders.as_deref().and_then(parse_sum).unwrap_or(0),
            frozen: frozen.as_deref() == Some("1"),
            holder_ids: ids
                .filter(|i| !i.is_empty())
                .map(|i| i.split(',').map(str::to_owned).collect()),
        });
    }
    if let Some(Value::Array(bad)) = bad {
        let mut bad = bad.into_iter().map(|v| text(v).unwrap_or_else(|e| e));
        let count: usize = bad.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut shown = Vec::new();
        while let (Some(f), Some(v)) = (bad.next(), bad.next()) {
            shown.push(format!("{f:?} = {v:?}"));
        }
        if count > 0 {
            let more = count.saturating_sub(shown.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            out.problems.push(format!(
                "key {key}: fields {}{more} are not canonical u64 totals (left out of the total)",
                shown.join(", ")
            ));
        }
    }
    Ok(out)
}

/// Parses a [`Mode::Read`] group's replies: maybe `PEXPIRE lease`, one `HMGET` per item.
pub(super) fn parse_read(
    group: &Group,
    renew: bool,
    replies: &mut impl Iterator<Item = redis::RedisResult<Value>>,
) -> GroupOutcome {
    let short = || WireError::Reply {
        key: first_key(group),
        detail: "the pipeline returned fewer replies than commands".into(),
    };
    let renewed = if renew {
        Some(replies.next().ok_or_else(short)?)
    } else {
        None
    };
    let states: Vec<redis::RedisResult<Value>> = group
        .items
        .iter()
        .filter(|x| !x.skip)
        .map(|_| replies.next().ok_or_else(short))
        .collect::<Result<_, _>>()?;
    // A redirect (cluster slot moved) or an unreachable shard concerns the whole budget:
    // report it as the group's failure, as a script call's would be.
    let whole = renewed
        .iter()
        .chain(states.iter())
        .filter_map(|r| r.as_ref().err())
        .find(|e| {
            matches!(
                e.kind(),
                ErrorKind::Server(
                    ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::BusyLoading
                )
            )
        });
    if let Some(error) = whole {
        return Err(WireError::Rejected {
            key: group.lease.clone(),
            error: error.clone(),
        });
    }
    // Read mode runs only while the lease was ours at the last look; `PEXPIRE` answers 0
    // when the key is gone (expired or released): the script takes it again next round.
    let lease = match renewed {
        None | Some(Ok(Value::Int(1))) => Lease::Held,
        Some(Ok(Value::Int(0))) => Lease::Free,
        Some(Ok(v)) => Lease::Broken(format!("unexpected PEXPIRE reply {v:?}")),
        Some(Err(e)) => Lease::Broken(one_line(&e)),
    };
    let mut replies = states.into_iter();
    let mut keys = Vec::with_capacity(group.items.len());
    for item in &group.items {
        if item.skip {
            keys.push(Ok(KeyReply::unread()));
            continue;
        }
        let key = &item.key;
        keys.push(match replies.next().ok_or_else(short)? {
            Ok(Value::Array(parts)) if parts.len() == 5 => Ok(read_state(parts)),
            Ok(other) => Err(format!("key {key}: unexpected reply {other:?}")),
            Err(e) => Err(format!("key {key}: {} (window not synced)", one_line(&e))),
        });
    }
    Ok(GroupReply { lease, keys })
}

/// A key's state from `HMGET node ~owner:node ~retired:node:inst ~total ~bad`; anything the
/// script would repair makes it `needs_script`.
fn read_state(parts: Vec<Value>) -> KeyReply {
    let mut it = parts.into_iter().map(|v| match v {
        Value::Nil => None,
        v => Some(text(v).unwrap_or_else(|e| e)),
    });
    let (field, owner, mine, total, bad) = (
        it.next().flatten(),
        it.next().flatten(),
        it.next().flatten(),
        it.next().flatten(),
        it.next().flatten(),
    );
    let mut out = KeyReply {
        owner,
        ..KeyReply::default()
    };
    let field_ok = field.as_deref().map(parse_total);
    let mine_ok = mine.as_deref().map(parse_total);
    out.field = field_ok.flatten();
    out.mine = mine_ok.flatten().unwrap_or(0);
    let malformed = matches!(field_ok, Some(None)) || matches!(mine_ok, Some(None));
    match total.as_deref().map(parse_sum) {
        Some(Some(t)) => out.total = t,
        // An absent total is right only for an absent key (no field of ours either).
        None if field.is_none() && mine.is_none() => out.total = 0,
        _ => out.needs_script = true,
    }
    let ours = out.field.unwrap_or(0).saturating_add(out.mine);
    if malformed || bad.is_some() || ours > out.total {
        out.needs_script = true;
    }
    out
}

/// The RESP size of a reply value (what Redis sent for it, for the traffic figures).
pub(super) fn resp_len(value: &Value) -> usize {
    fn header(n: usize) -> usize {
        n.to_string().len() + 3
    }
    match value {
        Value::Nil => 5,
        Value::Int(i) => i.to_string().len() + 3,
        Value::BulkString(b) => header(b.len()) + b.len() + 2,
        Value::SimpleString(s) => s.len() + 3,
        Value::Okay => 5,
        Value::Array(items) | Value::Set(items) => {
            header(items.len()) + items.iter().map(resp_len).sum::<usize>()
        }
        Value::Map(pairs) => {
            header(pairs.len())
                + pairs
                    .iter()
                    .map(|(k, v)| resp_len(k) + resp_len(v))
                    .sum::<usize>()
        }
        other => format!("{other:?}").len(),
    }
}

/// Parses a canonical decimal of any length as a total, saturating at `u64::MAX` (the sum of
/// many u64 fields may exceed it).
fn parse_sum(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

/// A bulk or simple string reply as UTF-8 text.
///
/// # Errors
///
/// The lossy text when it is not UTF-8, the reply's debug form when it is neither a string
/// nor an integer (an integer reads as its decimal text).
pub fn text(value: Value) -> Result<String, String> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        }
        Value::SimpleString(s) => Ok(s),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(format!("{other:?}")),
    }
}

/// Parses a canonical decimal u64, the exact form the script compares: digits only, no sign,
/// no leading zeros (which `str::parse` would accept but would break string comparison).
fn parse_total(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_u64_totals_parse() {
        assert_eq!(parse_total("0"), Some(0));
        assert_eq!(parse_total("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "007",
            "+5",
            "-1",
            "1.5",
            "abc",
            "18446744073709551616",
            " 5",
        ] {
            assert_eq!(parse_total(bad), None, "{bad:?}");
        }
        // A sum saturates instead.
        assert_eq!(parse_sum("18446744073709551616"), Some(u64::MAX));
        assert_eq!(parse_sum("007"), None);
    }
}
