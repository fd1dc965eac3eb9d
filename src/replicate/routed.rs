//! A plain (blocking) Redis connection for the side tasks of replication — soft-limit claims
//! (`alerts`), runtime budget definitions (`definitions`) — that follows Redis Cluster
//! redirects: a command is sent to the node that served its key's slot last, or to the first
//! reachable URL (`redis.url`, then the seeds of a cluster); a `MOVED` reply names the slot's
//! master (the command is sent there, with the first
//! URL's settings, and later commands of that slot go there directly), an `ASK` reply is
//! followed once with `ASKING`. Connects within `redis.connect_timeout`; every command is
//! bounded by `redis.command_timeout`.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};
use rustc_hash::FxHashMap;

use crate::config::RedisConfig;

/// Connections to the first URL and to the masters that redirects named.
pub(crate) struct Routed {
    url: String,
    /// Further seed URLs of a cluster, tried in turn when `url` cannot be reached.
    seeds: Vec<String>,
    /// The replicator's TLS settings (private CA, test-only skip-verify) for `rediss://`.
    tls: crate::config::RedisTls,
    connect_timeout: Duration,
    command_timeout: Duration,
    conn: Option<redis::Connection>,
    /// Redis Cluster: connections to the masters that redirects named (`host:port`).
    redirected: FxHashMap<String, redis::Connection>,
    /// Redis Cluster: slot → the master a `MOVED` reply named for it.
    routes: FxHashMap<u16, String>,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("url", &crate::model::text::redact_url(&self.url))
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl Routed {
    pub(crate) fn new(redis: &RedisConfig) -> Routed {
        Routed {
            url: redis.url.clone(),
            seeds: redis.seeds.clone(),
            tls: redis.tls.clone(),
            connect_timeout: redis.connect_timeout,
            command_timeout: redis.command_timeout,
            conn: None,
            redirected: FxHashMap::default(),
            routes: FxHashMap::default(),
        }
    }

    /// Whether a connection is open (a command may then fail on a connection that died
    /// since: worth one retry on a fresh one).
    pub(crate) fn connected(&self) -> bool {
        self.conn.is_some() || !self.redirected.is_empty()
    }

    /// Drops every connection and route (after an error: the next command connects again).
    pub(crate) fn reset(&mut self) {
        self.conn = None;
        self.redirected.clear();
        self.routes.clear();
    }

    /// Runs `command` on the connection of the node serving `key` (following cluster
    /// redirects: the routed or first node, then at most two redirects, for a resharding in
    /// between). `what` names the command in the error after too many redirects.
    pub(crate) fn run<T>(
        &mut self,
        key: &str,
        what: &str,
        mut command: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let slot = crate::replicate::cluster::key_slot(key);
        let mut target = self.routes.get(&slot).cloned();
        let mut asking = false;
        for _ in 0..3 {
            let conn = self.connection(target.as_deref())?;
            if asking {
                redis::cmd("ASKING").query::<()>(conn)?;
            }
            let e = match command(conn) {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            let Some((addr, _)) = e.redirect_node() else {
                return Err(e);
            };
            let addr = addr.to_owned();
            asking = e.kind() == ErrorKind::Server(ServerErrorKind::Ask);
            if !asking {
                self.routes.insert(slot, addr.clone());
            }
            target = Some(addr);
        }
        Err(RedisError::from((
            ErrorKind::Server(ServerErrorKind::Moved),
            "too many cluster redirects",
            format!("{what} {key}"),
        )))
    }

    /// The connection to `target` (`host:port` named by a redirect), or to the first URL.
    fn connection(&mut self, target: Option<&str>) -> redis::RedisResult<&mut redis::Connection> {
        let (connect, command) = (self.connect_timeout, self.command_timeout);
        let missing = || RedisError::from((ErrorKind::InvalidClientConfig, "no redis connection"));
        match target {
            None => {
                if self.conn.is_none() {
                    let mut last = None;
                    for url in std::iter::once(&self.url).chain(&self.seeds) {
                        let opened = crate::replicate::client(url, &self.tls)
                            .and_then(|client| open_with(&client, connect, command));
                        match opened {
                            Ok(conn) => {
                                self.conn = Some(conn);
                                break;
                            }
                            Err(e) => last = Some(e),
                        }
                    }
                    if let (None, Some(e)) = (&self.conn, last) {
                        return Err(e);
                    }
                }
                self.conn.as_mut().ok_or_else(missing)
            }
            Some(addr) => {
                if !self.redirected.contains_key(addr) {
                    let conn = open_with(&self.client_at(addr)?, connect, command)?;
                    self.redirected.insert(addr.to_owned(), conn);
                }
                self.redirected.get_mut(addr).ok_or_else(missing)
            }
        }
    }

    /// A client for a cluster master: the first URL's settings (password, database, TLS),
    /// another address.
    fn client_at(&self, addr: &str) -> redis::RedisResult<redis::Client> {
        let bad = || {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "unusable redirect address",
                addr.to_owned(),
            ))
        };
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let seed = crate::replicate::client(&self.url, &self.tls)?;
        crate::replicate::client_moved(&seed, host, port)
    }
}

/// A connection whose connect, reads and writes are bounded by the configured timeouts.
fn open_with(
    client: &redis::Client,
    connect_timeout: Duration,
    command_timeout: Duration,
) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(connect_timeout)?;
    conn.set_read_timeout(Some(command_timeout))?;
    conn.set_write_timeout(Some(command_timeout))?;
    Ok(conn)
}
