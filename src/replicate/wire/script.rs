//! The merge script ([`SCRIPT`], `merge.lua`) and the commands of one budget's part of a
//! pipeline: one `EVALSHA` of the script, or the plain reads of a clean budget.

use redis::Pipeline;

use super::{Group, Identity, Mode};

/// The merge script (`merge.lua`). `KEYS[1]` is the budget's lease key, `KEYS[2]` its strict marker
/// ([`strict_key`](super::strict_key)), `KEYS[3..]` its window keys. `ARGV[1]` is the node id,
/// `ARGV[2]` the instance id, `ARGV[3]` the lease time in ms, `ARGV[4]` `1` to release the lease
/// (last round) or `0`, `ARGV[5]` `1` to recompute every key's total from its fields (verify) or
/// `0`, `ARGV[6]` the guard after a strict marker's (re)creation in ms, `ARGV[7]` the grant lease
/// in ms (`0`: never reclaim), `ARGV[8]` `1` to renew a lease we hold or `0` (then it is set only
/// when absent); then six per window key `KEYS[i]`, from `ARGV[8 + 6(i-3) + 1]`: the node's own
/// total (canonical decimal u64; `0` only reads), the unix second at which the key expires, and for
/// a strict window the limit, the node's durable grant, the grant it wants and the node ids it
/// knows held a grant in the window, comma-separated (`''`, `0`, `0`, `''` otherwise). Grants:
/// see `docs/strict-budgets.md` (the reply per key gains `grant, granted, holders, frozen,
/// holder_ids`).
///
/// 1. Lease: held by another instance -> `refused`; unreadable -> `broken`; else ours,
///    set at the end when absent or `ARGV[8]` is `1` (or released).
/// 2. Per window key, under `pcall`: check (or repair) `~total`; when the own total is not
///    `0`: with the lease, retire another instance's total (see the module doc), take back
///    our own retired total, raise our field to the max of what we know (a non-canonical
///    value in our field is replaced: we are its only writer) and mark us its owner; without
///    it, leave the node's field alone and raise our own instance's field
///    `~retired:{node}:{instance}` instead. `~total` moves by exactly the net change of the
///    contribution fields, in one `HSET` with the fields. Then `EXPIREAT key expire_at`
///    (callers pass window end + grace) when the raised field was created, on a repair or
///    verify, and for strict windows (see "Expiry" in the module doc).
///
/// Returns `{lease, per_key}`: `lease` is `'held'` (a string), `{'refused', holder}` or
/// `{'broken', error}`; `per_key[i]` is `{field, owner, mine, total, repaired, bad, grant,
/// granted, holders, frozen, holder_ids}` (the last five `''` unless strict and the lease is ours; `''`
/// for an absent field; `bad` the skipped `field, value` pairs of a recomputation), only its
/// first four when the key was neither repaired nor strict, or `{'err', error}`. Every table
/// of the reply costs Redis to convert: the common reply has three.
pub const SCRIPT: &str = include_str!("merge.lua");

/// Appends the commands of `group` to `pipe` (see [`super::commands`] for how many): the
/// lease renewal and one `HMGET` per window read of a [`Mode::Read`] group, else one
/// `EVALSHA` of the script under `sha`.
pub(super) fn push_group(pipe: &mut Pipeline, sha: &str, id: &Identity<'_>, group: &Group) {
    match group.mode {
        Mode::Read { renew } => push_read(pipe, id, group, renew),
        Mode::Script { .. } => push_script(pipe, sha, id, group),
    }
}

fn push_read(pipe: &mut Pipeline, id: &Identity<'_>, group: &Group, renew: bool) {
    if renew {
        pipe.cmd("PEXPIRE")
            .arg(&group.lease)
            .arg(id.read_lease_ms.max(1));
    }
    let owner = format!("~owner:{}", id.node);
    let mine = format!("~retired:{}:{}", id.node, id.instance);
    for item in group.items.iter().filter(|x| !x.skip) {
        pipe.cmd("HMGET")
            .arg(&item.key)
            .arg(id.node)
            .arg(&owner)
            .arg(&mine)
            .arg("~total")
            .arg("~bad");
    }
}

fn push_script(pipe: &mut Pipeline, sha: &str, id: &Identity<'_>, group: &Group) {
    let cmd = pipe
        .cmd("EVALSHA")
        .arg(sha)
        .arg(group.items.len() + 2)
        .arg(&group.lease)
        .arg(&group.marker);
    for item in &group.items {
        cmd.arg(&item.key);
    }
    cmd.arg(id.node)
        .arg(id.instance)
        .arg(id.lease_ms.max(1).to_string())
        .arg(if id.release { "1" } else { "0" })
        .arg(if id.verify { "1" } else { "0" })
        .arg(id.guard_ms.to_string())
        .arg(id.grant_lease_ms.to_string())
        .arg(match group.mode {
            Mode::Script { renew: false } => "0",
            _ => "1",
        });
    for item in &group.items {
        // Decimal strings, not integers: the script compares them as strings.
        cmd.arg(item.own.to_string())
            .arg(item.expire_at.to_string());
        match &item.grant {
            Some(ask) => cmd
                .arg(ask.limit.to_string())
                .arg(ask.durable.to_string())
                .arg(ask.want.to_string())
                .arg(&ask.known),
            None => cmd.arg("").arg("0").arg("0").arg(""),
        };
    }
}
