//! Connections to Redis: clients (TLS, moved addresses), the single connection or the
//! cluster's connections per master, and one exchange of a round over them (with a
//! reconnection, a slot map refresh and the re-read of tracked keys).

use super::round::Groups;
use super::*;

/// A client with `seed`'s settings (TLS, auth, database) at another address: a cluster
/// master or a node named in a `MOVED`/`ASK` answer.
pub(crate) fn client_moved(
    seed: &redis::Client,
    host: &str,
    port: u16,
) -> redis::RedisResult<redis::Client> {
    let info = seed.get_connection_info().clone();
    let moved = match info.addr().clone() {
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure,
            tls_params,
        },
        _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    redis::Client::open(info.set_addr(moved))
}

/// A client for `url` with the TLS settings of `provider_budgets.redis.tls` (for other users
/// of Redis than the replicator, e.g. fleet-wide soft-limit claims).
pub(crate) fn client(
    url: &str,
    tls: &crate::config::RedisTls,
) -> redis::RedisResult<redis::Client> {
    tls::client(url, tls).map_err(|e| match e {
        tls::ClientError::Url(e) => e,
        tls::ClientError::Tls(e) => redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "unusable TLS settings",
            e.to_string(),
        )),
    })
}

/// Where rounds go.
pub(super) enum Backend {
    /// One server (or a proxy): one pipeline per round.
    Single(Conn),
    /// A Redis Cluster: one pipeline per master per round, concurrently.
    Cluster(Cluster),
}

/// One replication connection and what it can vouch for (see [`tracking`]).
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) conn: MultiplexedConnection,
    /// Ours, one per connection opened ([`Tracker::connection`]): fresh marks count only on
    /// the connection they were made on.
    pub(super) epoch: u64,
    /// Send the tracking prelude: a RESP3 connection whose server has not refused tracking.
    pub(super) track: bool,
    /// `CLIENT ID` at the last round (another one later means another server connection).
    pub(super) client_id: Option<i64>,
}

/// What one connection's round says about its tracking.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    /// The server refused tracking (why).
    pub(super) refused: Option<String>,
    /// The connection's earlier marks cannot be trusted (another client id, tracking off).
    pub(super) lost: bool,
}

/// A Redis Cluster's slot map and the connections to its masters.
pub(super) struct Cluster {
    pub(super) map: cluster::SlotMap,
    pub(super) conns: FxHashMap<cluster::Addr, Conn>,
    /// Read the slot map again before the next exchange (a redirect, a failed master).
    pub(super) stale: bool,
}

pub(super) fn shard_name(addr: &cluster::Addr) -> String {
    format!("{}:{}", addr.0, addr.1)
}

impl Worker {
    /// One exchange on the current (or a new) connection. On failure, says whether the
    /// connection is dead (and drops it).
    pub(super) async fn send(
        &mut self,
        groups: &mut Groups,
    ) -> Result<Vec<GroupOutcome>, (ReplicationError, bool)> {
        if self.backend.is_none() {
            let backend = self.establish().await.map_err(|e| (e, false))?;
            self.backend = Some(backend);
        }
        if matches!(self.backend, Some(Backend::Cluster(_))) {
            if let Some(Backend::Cluster(mut cluster)) = self.backend.take() {
                let sent = self.send_cluster(&mut cluster, groups).await;
                self.backend = Some(Backend::Cluster(cluster));
                return sent.map_err(|e| (e, false));
            }
        }
        let Some(Backend::Single(mut conn)) = self.backend.take() else {
            return Err((self.protocol("no redis connection"), false));
        };
        let timeout = self.parts.redis.command_timeout;
        set_skips(&self.tracker, &conn, &mut groups.wire);
        let id = self.identity();
        let sent = tokio::time::timeout(
            timeout,
            round_on(&self.wire, &mut conn, &id, &mut groups.wire),
        )
        .await;
        match sent {
            Ok(Ok((replies, verdict))) => {
                // Every budget failed for a connection-level reason (a failover left us on a
                // read-only replica, the server is loading): treat the connection as dead.
                let all_failed = !replies.is_empty() && replies.iter().all(Result::is_err);
                if all_failed {
                    if let Some(Err(e)) = replies
                        .iter()
                        .find(|r| r.as_ref().is_err_and(|e| e.is_connection_error()))
                    {
                        return Err((self.protocol(&e.to_string()), true));
                    }
                }
                let mut replies = replies;
                let label = self.url();
                let settled = self
                    .settle(&mut conn, &mut groups.wire, &mut replies, verdict, &label)
                    .await;
                if let Err(e) = settled {
                    let dead = e.is_connection_error();
                    if !dead {
                        self.backend = Some(Backend::Single(conn));
                    }
                    return Err((self.protocol(&e.to_string()), dead));
                }
                self.tracker.set_on(conn.track);
                self.backend = Some(Backend::Single(conn));
                Ok(replies)
            }
            Ok(Err(e)) => {
                let dead = e.is_connection_error();
                if !dead {
                    self.backend = Some(Backend::Single(conn));
                }
                Err((self.protocol(&e.to_string()), dead))
            }
            Err(_) => Err((
                ReplicationError::Timeout {
                    url: self.url(),
                    after: humantime::format_duration(timeout).to_string(),
                },
                false,
            )),
        }
    }

    /// A cluster round: per master one pipeline, all concurrently; a master that fails fails
    /// only the budgets it serves. Budgets answered with `MOVED`/`ASK` or whose master failed
    /// are sent once more within the round, after the slot map is refreshed (a failover, a
    /// resharding). Fails as a whole only when no slot map can be read.
    pub(super) async fn send_cluster(
        &mut self,
        cluster: &mut Cluster,
        groups: &Groups,
    ) -> Result<Vec<GroupOutcome>, ReplicationError> {
        let n = groups.wire.len();
        let mut state = Shards {
            results: (0..n).map(|_| None).collect(),
            pending: (0..n).collect(),
            all_tracked: true,
        };
        let timeout = self.parts.redis.command_timeout;
        for pass in 0..2 {
            if cluster.stale || pass == 1 {
                self.refresh(cluster).await?;
            }
            let by_master = route(cluster, groups, &mut state);
            let calls = self
                .connect_masters(cluster, groups, by_master, pass, &mut state)
                .await;
            let id = self.identity();
            let wire = &self.wire;
            let outcomes = futures_util::future::join_all(calls.into_iter().map(
                |(addr, members, mut conn, mut sub)| {
                    let id = &id;
                    async move {
                        let r =
                            tokio::time::timeout(timeout, round_on(wire, &mut conn, id, &mut sub))
                                .await;
                        (addr, members, conn, sub, r)
                    }
                },
            ))
            .await;
            for (addr, members, conn, sub, outcome) in outcomes {
                let outcome = outcome.map_err(|_| WireError::Shard {
                    shard: shard_name(&addr),
                    message: format!("timed out after {}", humantime::format_duration(timeout)),
                });
                self.absorb(
                    cluster,
                    pass,
                    &mut state,
                    (addr, members, conn, sub),
                    outcome,
                )
                .await;
            }
            if state.pending.is_empty() {
                break;
            }
        }
        self.tracker.set_on(state.all_tracked);
        Ok(state
            .results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(WireError::Shard {
                        shard: "cluster".into(),
                        message: "no reply".into(),
                    })
                })
            })
            .collect())
    }

    /// The connection to each master with pending budgets (kept or new), with its part of
    /// the round; the budgets of a master that cannot be reached fail (or wait for the second
    /// pass).
    async fn connect_masters(
        &mut self,
        cluster: &mut Cluster,
        groups: &Groups,
        by_master: FxHashMap<cluster::Addr, Vec<usize>>,
        pass: usize,
        state: &mut Shards,
    ) -> Vec<MasterCall> {
        let mut calls = Vec::new();
        for (addr, members) in by_master {
            let conn = match cluster.conns.get(&addr) {
                Some(c) => Ok(c.clone()),
                None => match self.client_at(&addr) {
                    Ok(client) => self.connect_client(&client, &shard_name(&addr)).await,
                    Err(e) => Err(e),
                },
            };
            match conn {
                Ok(c) => {
                    cluster.conns.insert(addr.clone(), c.clone());
                    let mut sub: Vec<Group> =
                        members.iter().map(|&i| groups.wire[i].clone()).collect();
                    set_skips(&self.tracker, &c, &mut sub);
                    calls.push((addr, members, c, sub));
                }
                Err(e) => {
                    cluster.stale = true;
                    state.fail(&members, pass, &addr, &e.to_string());
                }
            }
        }
        calls
    }

    /// Takes one master's outcome into `state`: its replies (redirected budgets wait for the
    /// second pass), or its failure for every budget it serves.
    async fn absorb(
        &mut self,
        cluster: &mut Cluster,
        pass: usize,
        state: &mut Shards,
        call: MasterCall,
        outcome: Result<Result<(Vec<GroupOutcome>, Verdict), WireError>, WireError>,
    ) {
        let (addr, members, mut conn, mut sub) = call;
        let outcome = match outcome {
            Ok(Ok((mut replies, verdict))) => {
                let label = shard_name(&addr);
                self.settle(&mut conn, &mut sub, &mut replies, verdict, &label)
                    .await
                    .map(|()| replies)
            }
            Ok(Err(e)) | Err(e) => Err(e),
        };
        let failure = match outcome {
            Ok(replies) => {
                state.all_tracked &= conn.track;
                cluster.conns.insert(addr.clone(), conn);
                for (i, reply) in members.into_iter().zip(replies) {
                    let redirected = matches!(&reply, Err(e) if e.is_redirect());
                    if redirected {
                        cluster.stale = true;
                    }
                    if redirected && pass == 0 {
                        state.pending.push(i);
                    } else {
                        state.results[i] = Some(reply);
                    }
                }
                return;
            }
            Err(WireError::Shard { message, .. }) => message,
            Err(e) => e.to_string(),
        };
        cluster.conns.remove(&addr);
        cluster.stale = true;
        state.fail(&members, pass, &addr, &failure);
    }

    /// Reads the slot map again from any reachable master, else from any seed.
    pub(super) async fn refresh(&self, cluster: &mut Cluster) -> Result<(), ReplicationError> {
        let mut last = None;
        let known: Vec<(cluster::Addr, MultiplexedConnection)> = cluster
            .conns
            .iter()
            .map(|(a, c)| (a.clone(), c.conn.clone()))
            .collect();
        for (addr, mut conn) in known {
            match cluster::slot_map(&mut conn, &addr.0).await {
                Ok(map) if !map.masters().is_empty() => {
                    cluster.map = map;
                    cluster.stale = false;
                    return Ok(());
                }
                Ok(_) => last = Some("the cluster serves no slot".to_owned()),
                Err(e) => {
                    cluster.conns.remove(&addr);
                    last = Some(e);
                }
            }
        }
        for url in self.urls() {
            let attempt = async {
                let client = self.client(url)?;
                let mut conn = self.connect_client(&client, &redact_url(url)).await?.conn;
                let host = match client.get_connection_info().addr() {
                    redis::ConnectionAddr::Tcp(h, _)
                    | redis::ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
                    redis::ConnectionAddr::Unix(_) => String::new(),
                    _ => String::new(),
                };
                cluster::slot_map(&mut conn, &host)
                    .await
                    .map_err(|e| self.protocol(&e))
            };
            match attempt.await {
                Ok(map) if !map.masters().is_empty() => {
                    cluster.map = map;
                    cluster.stale = false;
                    return Ok(());
                }
                Ok(_) => last = Some("the cluster serves no slot".to_owned()),
                Err(e) => last = Some(e.to_string()),
            }
        }
        Err(self.protocol(&format!(
            "cannot read the cluster's slot map: {}",
            last.unwrap_or_default()
        )))
    }

    /// The configured URL, then the further seeds.
    pub(super) fn urls(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.parts.redis.url).chain(self.parts.redis.seeds.iter())
    }

    /// Connects to the first reachable configured URL and finds out whether it is a cluster.
    pub(super) async fn establish(&self) -> Result<Backend, ReplicationError> {
        let mut first_error = None;
        for url in self.urls() {
            let client = self.client(url)?;
            match self.connect_client(&client, &redact_url(url)).await {
                Ok(mut conn) => {
                    let timeout = self.parts.redis.command_timeout;
                    let detected =
                        tokio::time::timeout(timeout, cluster::is_cluster(&mut conn.conn)).await;
                    return match detected {
                        Ok(Ok(false)) => Ok(Backend::Single(conn)),
                        Ok(Ok(true)) => {
                            let mut cluster = Cluster {
                                map: cluster::SlotMap::default(),
                                conns: FxHashMap::default(),
                                stale: true,
                            };
                            self.refresh(&mut cluster).await?;
                            Ok(Backend::Cluster(cluster))
                        }
                        Ok(Err(e)) => Err(ReplicationError::Unreachable {
                            url: redact_url(url),
                            reason: flat(&self.protocol(&e.to_string()).to_string()),
                        }),
                        Err(_) => Err(ReplicationError::Timeout {
                            url: redact_url(url),
                            after: humantime::format_duration(timeout).to_string(),
                        }),
                    };
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(ReplicationError::Stopped))
    }

    /// A lower layer's message, on one line and redacted.
    pub(super) fn protocol(&self, message: &str) -> ReplicationError {
        let mut message = scrub(message, &self.parts.redis.url);
        for seed in &self.parts.redis.seeds {
            message = scrub(&message, seed);
        }
        ReplicationError::Protocol {
            message: flat(&message),
        }
    }

    /// A client for one configured URL, with the TLS settings.
    pub(super) fn client(&self, url: &str) -> Result<redis::Client, ReplicationError> {
        let invalid = |e: &dyn std::fmt::Display| ReplicationError::InvalidUrl {
            url: redact_url(url),
            reason: flat(&scrub(&e.to_string(), url)),
        };
        tls::client(url, &self.parts.redis.tls).map_err(|e| match e {
            tls::ClientError::Url(e) => invalid(&e),
            tls::ClientError::Tls(e) => e,
        })
    }

    /// A client for a cluster master: the first URL's settings at another address.
    pub(super) fn client_at(
        &self,
        addr: &cluster::Addr,
    ) -> Result<redis::Client, ReplicationError> {
        let seed = self.client(&self.parts.redis.url)?;
        client_moved(&seed, &addr.0, addr.1).map_err(|e| self.protocol(&e.to_string()))
    }

    /// Connects in RESP3 with a push sender (for tracking invalidations, see [`tracking`]);
    /// when the server answers but refuses that (`HELLO 3`: Redis < 6, some proxies), in
    /// RESP2 without tracking.
    pub(super) async fn connect_client(
        &self,
        client: &redis::Client,
        label: &str,
    ) -> Result<Conn, ReplicationError> {
        let (epoch, pushes) = self.tracker.connection();
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let tracked = redis::Client::open(info.set_redis_settings(resp3))
            .map_err(|e| self.protocol(&e.to_string()))?;
        let (mut conn, track) = match self
            .open(&tracked, self.conn_config().set_push_sender(pushes), label)
            .await
        {
            Ok(conn) => (conn, true),
            Err((_, Some(refusal))) => {
                let conn = self
                    .open(client, self.conn_config(), label)
                    .await
                    .map_err(|(e, _)| e)?;
                self.tracker.refused(label, &flat(&refusal));
                (conn, false)
            }
            Err((e, None)) => return Err(e),
        };
        self.probe_eviction(&mut conn, label).await;
        Ok(Conn {
            conn,
            epoch,
            track,
            client_id: None,
        })
    }

    pub(super) fn conn_config(&self) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.parts.redis.connect_timeout))
            .set_response_timeout(Some(self.parts.redis.command_timeout))
    }

    /// Opens one connection. On failure, also the server's answer when there was one (it
    /// refused something: worth another try without RESP3), as opposed to no server at all.
    pub(super) async fn open(
        &self,
        client: &redis::Client,
        config: redis::AsyncConnectionConfig,
        label: &str,
    ) -> Result<MultiplexedConnection, (ReplicationError, Option<String>)> {
        // The outer timeout also bounds DNS resolution, which the connection timeout may not.
        let bound = self.parts.redis.connect_timeout + Duration::from_millis(100);
        match tokio::time::timeout(
            bound,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => {
                let answered = !(e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped());
                let message = self.protocol(&e.to_string()).to_string();
                let hint = tls::scheme_hint(client, &message, bound).await;
                Err((
                    ReplicationError::Unreachable {
                        url: label.to_owned(),
                        reason: format!("{}{hint}", tls::explain(&message)),
                    },
                    answered.then_some(message),
                ))
            }
            Err(_) => {
                let after = humantime::format_duration(self.parts.redis.connect_timeout);
                let error = match tls::scheme_hint(client, "timed out", bound).await {
                    "" => ReplicationError::Timeout {
                        url: label.to_owned(),
                        after: after.to_string(),
                    },
                    // With the cause known, the failure is a connection that cannot work.
                    hint => ReplicationError::Unreachable {
                        url: label.to_owned(),
                        reason: format!("no answer within {after}{hint}"),
                    },
                };
                Err((error, None))
            }
        }
    }

    /// After one connection's round: drops the marks it cannot vouch for, marks the keys it
    /// read with tracking on and unmarks the others (written by the script, failed, in need
    /// of the script), then applies the invalidations that came with the replies: they win
    /// over the marks just made (see [`tracking`], "Ordering"), and a skipped key among them
    /// (changed before Redis ran our pipeline, its invalidation still on the way when the
    /// round was planned) is read in a second round trip, so that a round sees every change
    /// Redis made before it, as without tracking.
    pub(super) async fn settle(
        &mut self,
        conn: &mut Conn,
        groups: &mut [Group],
        replies: &mut [GroupOutcome],
        verdict: Verdict,
        label: &str,
    ) -> Result<(), WireError> {
        if verdict.lost {
            self.tracker.forget_epoch(conn.epoch);
        }
        if let Some(reason) = verdict.refused {
            self.tracker.refused(label, &reason);
        }
        self.mark(conn, groups, replies, None);
        if self.tracker.drain() {
            self.flushed = true;
        }
        let raced: Vec<(usize, usize)> = positions(groups, |x| {
            x.skip && !self.tracker.is_marked(&x.key, conn.epoch)
        });
        if !raced.is_empty() {
            let id = self.identity();
            let timeout = self.parts.redis.command_timeout;
            let again = reread(&self.wire, conn, &id, groups, replies, &raced);
            match tokio::time::timeout(timeout, again).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(WireError::Shard {
                        shard: label.to_owned(),
                        message: format!("timed out after {}", humantime::format_duration(timeout)),
                    })
                }
            }
            self.mark(conn, groups, replies, Some(&raced));
            if self.tracker.drain() {
                self.flushed = true;
            }
        }
        self.unchanged += positions(groups, |x| x.skip).len() as u64;
        Ok(())
    }

    /// Marks the keys read by plain reads on a tracking connection, unmarks the other
    /// non-skipped ones (all of them, or those at `only`).
    pub(super) fn mark(
        &mut self,
        conn: &Conn,
        groups: &[Group],
        replies: &[GroupOutcome],
        only: Option<&[(usize, usize)]>,
    ) {
        for (g, (group, reply)) in groups.iter().zip(replies).enumerate() {
            let read = matches!(group.mode, Mode::Read { .. });
            for (j, item) in group.items.iter().enumerate() {
                if item.skip || only.is_some_and(|o| !o.contains(&(g, j))) {
                    continue;
                }
                let usable = reply
                    .as_ref()
                    .ok()
                    .and_then(|r| r.keys.get(j))
                    .and_then(|k| k.as_ref().ok())
                    .is_some_and(|k| !k.needs_script && !k.unread);
                if conn.track && read && usable {
                    self.tracker.mark(&item.key, conn.epoch);
                } else {
                    self.tracker.unmark(&item.key);
                }
            }
        }
    }
}

/// Marks the clean window keys that `conn` tracks unchanged as not to be read.
pub(super) fn set_skips(tracker: &Tracker, conn: &Conn, groups: &mut [Group]) {
    for group in groups {
        let read = matches!(group.mode, Mode::Read { .. });
        for item in &mut group.items {
            item.skip = read && conn.track && tracker.is_fresh(&item.key, conn.epoch);
        }
    }
}

/// One connection's part of a round: the tracking prelude when the connection tracks, the
/// pipeline, and, when the connection turns out unable to vouch for the keys it skipped
/// (another client id, tracking refused), a second pipeline reading them: then the replies
/// hold every key read, and the skipped items of `groups` are cleared.
pub(super) async fn round_on(
    wire: &Wire,
    conn: &mut Conn,
    id: &Identity<'_>,
    groups: &mut [Group],
) -> Result<(Vec<GroupOutcome>, Verdict), WireError> {
    let (mut replies, tracked) = wire
        .sync_round_tracked(&mut conn.conn, id, groups, conn.track)
        .await?;
    let mut verdict = Verdict::default();
    if let Some(t) = tracked {
        match (t.error, t.client_id) {
            (None, Some(client)) => {
                verdict.lost = conn.client_id.is_some_and(|old| old != client);
                conn.client_id = Some(client);
            }
            (error, _) => {
                conn.track = false;
                verdict.lost = true;
                verdict.refused =
                    Some(error.unwrap_or_else(|| "CLIENT ID answered no id".to_owned()));
            }
        }
    }
    if !verdict.lost {
        return Ok((replies, verdict));
    }
    let skipped = positions(groups, |x| x.skip);
    if !skipped.is_empty() {
        reread(wire, conn, id, groups, &mut replies, &skipped).await?;
    }
    Ok((replies, verdict))
}

/// `(group, item)` positions of the items that satisfy `which`.
pub(super) fn positions(
    groups: &[Group],
    which: impl Fn(&SyncItem) -> bool,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for (j, item) in group.items.iter().enumerate() {
            if which(item) {
                out.push((g, j));
            }
        }
    }
    out
}

/// Reads the skipped items at `which` with plain reads in one pipeline: their replies replace
/// the `unread` ones and they are no longer skipped. A budget whose reads fail gets the error.
pub(super) async fn reread(
    wire: &Wire,
    conn: &mut Conn,
    id: &Identity<'_>,
    groups: &mut [Group],
    replies: &mut [GroupOutcome],
    which: &[(usize, usize)],
) -> Result<(), WireError> {
    let mut budgets: Vec<usize> = which.iter().map(|&(g, _)| g).collect();
    budgets.dedup();
    let reads: Vec<Group> = budgets
        .iter()
        .map(|&g| Group {
            mode: Mode::Read { renew: false },
            items: which
                .iter()
                .filter(|&&(b, _)| b == g)
                .map(|&(_, j)| SyncItem {
                    skip: false,
                    ..groups[g].items[j].clone()
                })
                .collect(),
            ..groups[g].clone()
        })
        .collect();
    let second = wire.sync_round(&mut conn.conn, id, &reads).await?;
    for (&g, reply) in budgets.iter().zip(second) {
        let items: Vec<usize> = which
            .iter()
            .filter(|&&(b, _)| b == g)
            .map(|&(_, j)| j)
            .collect();
        for &j in &items {
            groups[g].items[j].skip = false;
        }
        match (&mut replies[g], reply) {
            (Ok(first), Ok(second)) => {
                for (&j, read) in items.iter().zip(second.keys) {
                    if let Some(slot) = first.keys.get_mut(j) {
                        *slot = read;
                    }
                }
            }
            (Ok(_), Err(e)) => replies[g] = Err(e),
            // The first reply failed as a whole: it stands.
            (Err(_), _) => {}
        }
    }
    Ok(())
}

/// One master's part of a cluster pass: its address, the budgets (indexes) it serves, its
/// connection and their groups.
type MasterCall = (cluster::Addr, Vec<usize>, Conn, Vec<Group>);

/// A cluster round's state across its two passes.
struct Shards {
    results: Vec<Option<GroupOutcome>>,
    /// Budgets to send (again) in the next pass.
    pending: Vec<usize>,
    /// Every master's connection tracks.
    all_tracked: bool,
}

impl Shards {
    /// `members` failed on the master at `addr`: sent again in the second pass, or failed.
    fn fail(&mut self, members: &[usize], pass: usize, addr: &cluster::Addr, message: &str) {
        for &i in members {
            if pass == 0 {
                self.pending.push(i);
            } else {
                self.results[i] = Some(Err(WireError::Shard {
                    shard: shard_name(addr),
                    message: message.to_owned(),
                }));
            }
        }
    }
}

/// The pending budgets by the master serving their hash tag's slot; a budget whose slot has
/// no master fails.
fn route(
    cluster: &Cluster,
    groups: &Groups,
    state: &mut Shards,
) -> FxHashMap<cluster::Addr, Vec<usize>> {
    let mut by_master: FxHashMap<cluster::Addr, Vec<usize>> = FxHashMap::default();
    for i in state.pending.drain(..) {
        let slot = cluster::key_slot(&groups.wire[i].lease);
        match cluster.map.master(slot) {
            Some(addr) => by_master.entry(addr.clone()).or_default().push(i),
            None => {
                state.results[i] = Some(Err(WireError::Shard {
                    shard: format!("slot {slot}"),
                    message: "no master serves this slot (the cluster is incomplete)".into(),
                }))
            }
        }
    }
    by_master
}
