//! Redis Cluster routing for sync rounds.
//!
//! Decision: the replicator routes by itself instead of using the `redis` crate's cluster
//! client. A round must be one pipeline per master, sent to all masters concurrently, and a
//! failing master must fail only the budgets it serves; the crate's cluster connection routes
//! command by command and offers neither. Routing is simple here because every key of a budget
//! shares the budget's hash tag (`{provider:period}`, see [`super::wire::window_key`]): one
//! budget is one slot, so one script call per budget is always valid.
//!
//! * Detection: after connecting to any configured URL, `INFO cluster` says
//!   `cluster_enabled:1`;
//! * topology: `CLUSTER SLOTS` (slot ranges → master address), refreshed after a `MOVED`/`ASK`
//!   reply or a failed master (failover), from any reachable master or seed;
//! * masters are reached with the seed URL's settings (password, database, TLS), only the
//!   address changes.

use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Value};

/// A master's address as the cluster announces it.
pub(crate) type Addr = (String, u16);

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;

/// CRC16/XMODEM, the hash Redis Cluster uses for key slots.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key: of its hash tag (the text between the first `{` and the next `}`, when
/// not empty), else of the whole key.
pub(crate) fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tag = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&len| len > 0)
            .map(|len| &rest[..len])
    });
    crc16(tag.unwrap_or(bytes)) % SLOTS
}

/// Slot ranges and their masters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SlotMap {
    ranges: Vec<(u16, u16, Addr)>,
}

impl SlotMap {
    /// The master serving `slot`, if any (an incomplete cluster leaves slots unserved).
    pub(crate) fn master(&self, slot: u16) -> Option<&Addr> {
        self.ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, addr)| addr)
    }

    /// Every master, once.
    pub(crate) fn masters(&self) -> Vec<Addr> {
        let mut out: Vec<Addr> = self.ranges.iter().map(|(_, _, a)| a.clone()).collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Whether the server is a Redis Cluster node (`INFO cluster` → `cluster_enabled:1`).
pub(crate) async fn is_cluster(conn: &mut MultiplexedConnection) -> RedisResult<bool> {
    let info: String = redis::cmd("INFO").arg("cluster").query_async(conn).await?;
    Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

/// The slot map from `CLUSTER SLOTS`. An empty announced host means the host we asked.
pub(crate) async fn slot_map(
    conn: &mut MultiplexedConnection,
    asked_host: &str,
) -> Result<SlotMap, String> {
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    parse_slots(reply, asked_host)
}

fn parse_slots(reply: Value, asked_host: &str) -> Result<SlotMap, String> {
    let Value::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS answered {reply:?}"));
    };
    let mut map = SlotMap::default();
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err("CLUSTER SLOTS: a range is not an array".into());
        };
        let mut parts = parts.into_iter();
        let (start, end, master) = (parts.next(), parts.next(), parts.next());
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (start, end, master)
        else {
            return Err("CLUSTER SLOTS: unexpected range layout".into());
        };
        let mut node = master.into_iter();
        let host = match node.next() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(&h).into_owned(),
            Some(Value::SimpleString(h)) => h,
            other => return Err(format!("CLUSTER SLOTS: unexpected host {other:?}")),
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.to_owned()
        } else {
            host
        };
        let port = match node.next() {
            Some(Value::Int(p)) => u16::try_from(p).map_err(|_| format!("bad port {p}"))?,
            other => return Err(format!("CLUSTER SLOTS: unexpected port {other:?}")),
        };
        let (start, end) = (
            u16::try_from(start).map_err(|_| "bad slot".to_string())?,
            u16::try_from(end).map_err(|_| "bad slot".to_string())?,
        );
        map.ranges.push((start, end, (host, port)));
    }
    map.ranges.sort();
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot("foo"), 12_182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
        // Every key of a budget shares its slot.
        assert_eq!(
            key_slot("pb:{openai:1d}:1700000000"),
            key_slot("pb:{openai:1d}:lease:n1")
        );
    }

    #[test]
    fn slot_map_parses_and_answers() {
        let range = |a: i64, b: i64, host: &str, port: i64| {
            Value::Array(vec![
                Value::Int(a),
                Value::Int(b),
                Value::Array(vec![
                    Value::BulkString(host.as_bytes().to_vec()),
                    Value::Int(port),
                    Value::BulkString(b"id".to_vec()),
                ]),
            ])
        };
        let map = parse_slots(
            Value::Array(vec![
                range(5461, 10922, "127.0.0.1", 7001),
                range(0, 5460, "", 7000),
            ]),
            "10.0.0.9",
        )
        .unwrap();
        assert_eq!(map.master(0), Some(&("10.0.0.9".to_owned(), 7000)));
        assert_eq!(map.master(10922), Some(&("127.0.0.1".to_owned(), 7001)));
        assert_eq!(map.master(10923), None);
        assert_eq!(map.masters().len(), 2);
        assert!(parse_slots(Value::Int(1), "h").is_err());
    }
}
