//! [`Fleet`]: the facade's one handle on fleet replication (the replicator thread and the
//! fleet-wide soft-limit claims). Everything the facade does with Redis goes through it, so
//! the redis-less build differs in this file only: the `imp` module below is chosen by one
//! `cfg` (the real handle with the `redis` feature, a stub without it that refuses a
//! configured Redis with [`ReplicationError::NotBuilt`](crate::ReplicationError::NotBuilt)).

use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use crate::config::RedisConfig;
use crate::durable::journal::{DurableTotals, Event};
use crate::durable::store::{GrantValue, PeersValue, Store, WindowKey};
use crate::model::budget::SoftLimitHandler;
use crate::model::clock::Clock;
use crate::model::slots::SlotKeys;
use crate::view::View;

pub(crate) use imp::{DefinitionLink, Fleet};

/// Applies the runtime definitions (the limiter's reload machinery), called by the
/// definitions thread after it took a change from Redis.
pub(crate) type Applier = Arc<dyn Fn() + Send + Sync>;

/// What [`DefinitionLink::start`] needs (unread without the feature).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct DefinitionLinkParts<'a> {
    pub redis: &'a RedisConfig,
    pub table: &'a Arc<crate::durable::definitions::Definitions>,
    pub store: &'a Arc<Store>,
    pub clock: &'a Arc<dyn Clock>,
    pub retention: std::time::Duration,
}

/// What [`Fleet::start`] needs from the opening limiter (unread without the feature).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct FleetParts<'a> {
    pub redis: &'a RedisConfig,
    pub node_id: &'a str,
    pub keys: &'a Arc<SlotKeys>,
    pub clock: &'a Arc<dyn Clock>,
    pub view: &'a Arc<View>,
    pub store: &'a Arc<Store>,
    pub durable: &'a Arc<DurableTotals>,
    pub journal: Sender<Event>,
    pub peers: Vec<(WindowKey, PeersValue)>,
    pub grants: Vec<(WindowKey, GrantValue)>,
    pub soft_handler: &'a Arc<Mutex<Option<SoftLimitHandler>>>,
}

#[cfg(feature = "redis")]
mod imp {
    use std::sync::Arc;
    use std::time::Duration;

    use jiff::Timestamp;

    use super::{DefinitionLinkParts, FleetParts};
    use crate::config::{Config, RedisConfig};
    use crate::error::{Error, ReplicationError};
    use crate::limiter::status::ReplicationStatus;
    use crate::model::budget::SoftLimitCrossed;
    use crate::model::money::Money;
    use crate::model::window::Window;
    use crate::replicate::alerts::FleetAlerts;
    use crate::replicate::definitions::{DefinitionParts, DefinitionSync};
    use crate::replicate::{Replicator, ReplicatorParts};

    /// The replicator and the fleet alerts, when Redis is configured (else empty).
    #[derive(Debug)]
    pub(crate) struct Fleet {
        replicator: Option<Replicator>,
        alerts: Option<FleetAlerts>,
    }

    impl Fleet {
        /// No fleet (no Redis configured).
        pub(crate) fn none() -> Fleet {
            Fleet {
                replicator: None,
                alerts: None,
            }
        }

        /// Checks what can be checked before the data dir opens: an unusable Redis URL fails
        /// here, naming it (redacted), not later in every round.
        pub(crate) fn check(redis: Option<&RedisConfig>) -> Result<(), Error> {
            if let Some(r) = redis {
                crate::replicate::check_url(&r.url)?;
            }
            Ok(())
        }

        /// Starts the replicator (and its first round) and the fleet alerts.
        pub(crate) fn start(parts: FleetParts<'_>) -> Result<Fleet, Error> {
            let r = Replicator::start(ReplicatorParts {
                redis: parts.redis.clone(),
                node_id: parts.node_id.to_owned(),
                keys: Arc::clone(parts.keys),
                clock: Arc::clone(parts.clock),
                view: Arc::clone(parts.view),
                store: Arc::clone(parts.store),
                durable: Arc::clone(parts.durable),
                journal: parts.journal,
                peers: parts.peers,
                grants: parts.grants,
            })?;
            // First round before any record: own = max(disk, own field in Redis), so a node
            // whose disk was wiped does not count its spend twice. Redis being down is not
            // an error here (status reports it); the round is bounded by the timeouts.
            if let Err(e) = r.sync() {
                tracing::warn!(error = %e, "initial redis sync failed; starting from local data");
            }
            let alerts = FleetAlerts::start(
                parts.redis,
                parts.node_id.to_owned(),
                Arc::clone(parts.soft_handler),
            )
            .map_err(|source| Error::Thread {
                what: "alerts",
                source,
            })?;
            Ok(Fleet {
                replicator: Some(r),
                alerts: Some(alerts),
            })
        }

        /// Whether a replicator runs.
        pub(crate) fn replicating(&self) -> bool {
            self.replicator.is_some()
        }

        /// Stops the replicator after `flush` made everything durable (its last round ships it).
        pub(crate) fn stop(&self, flush: impl FnOnce()) {
            if let Some(r) = &self.replicator {
                flush();
                r.stop();
            }
        }

        /// One round now; `None` without Redis.
        pub(crate) fn sync(&self) -> Option<Result<(), ReplicationError>> {
            self.replicator.as_ref().map(Replicator::sync)
        }

        /// Claims a crossed soft limit fleet-wide; gives the event back when there is no fleet
        /// (it is delivered locally then).
        pub(crate) fn claim(&self, key: &str, event: SoftLimitCrossed) -> Option<SoftLimitCrossed> {
            match &self.alerts {
                Some(alerts) => {
                    alerts.claim(key, event);
                    None
                }
                None => Some(event),
            }
        }

        /// Claims `name` fleet-wide and runs `action` if this node wins; gives the action
        /// back when there is no fleet (it runs locally then).
        pub(crate) fn claim_once(
            &self,
            name: &str,
            window: Window,
            action: Box<dyn FnOnce() + Send>,
        ) -> Option<Box<dyn FnOnce() + Send>> {
            match &self.alerts {
                Some(alerts) => {
                    alerts.claim_once(name, window, action);
                    None
                }
                None => Some(action),
            }
        }

        /// Waits up to `redis.grant_wait` for an out-of-cycle grant round.
        pub(crate) fn grant_round(&self, config: &Config) -> bool {
            match &self.replicator {
                Some(r) => r.grant_round(grant_wait(config)),
                None => false,
            }
        }

        /// [`Fleet::grant_round`] for async code.
        pub(crate) async fn grant_round_async(&self, config: &Config) -> bool {
            match &self.replicator {
                Some(r) => r.grant_round_async(grant_wait(config)).await,
                None => false,
            }
        }

        /// Per budget index: the window and the fleet's granted total of a strict budget.
        pub(crate) fn grants(&self) -> Vec<Option<(Window, Money)>> {
            self.replicator.as_ref().map_or_else(Vec::new, |r| {
                r.health()
                    .grants
                    .iter()
                    .map(|g| g.map(|g| (g.window, g.granted_total)))
                    .collect()
            })
        }

        /// The replication state and the problems per budget index.
        pub(crate) fn status(
            &self,
            config: &Config,
            now: Timestamp,
        ) -> (ReplicationStatus, Vec<Option<String>>) {
            let (Some(r), Some(redis)) = (&self.replicator, &config.redis) else {
                return (ReplicationStatus::default(), Vec::new());
            };
            let h = r.health();
            // Stale: no successful round within three intervals (or none yet).
            let limit = redis.sync_interval.saturating_mul(3);
            let stale = h
                .last_sync
                .is_none_or(|t| now.duration_since(t).unsigned_abs() > limit);
            let (evicting, maxmemory_policy) = crate::replicate::eviction::summary(&h.eviction);
            let status = ReplicationStatus {
                enabled: true,
                last_sync: h.last_sync,
                stale,
                last_error: h.last_error,
                rounds: h.rounds,
                round_trips: h.round_trips,
                last_round: h.last_round,
                late_rounds: h.late_rounds,
                tracking: h.tracking,
                evicting,
                maxmemory_policy,
                data_loss: h.data_loss,
            };
            (status, h.problems)
        }
    }

    /// The runtime definitions' exchange with Redis (module `replicate::definitions`): empty
    /// until started, and without Redis.
    #[derive(Debug, Default)]
    pub(crate) struct DefinitionLink(std::sync::Mutex<Option<DefinitionSync>>);

    impl DefinitionLink {
        /// Not started.
        pub(crate) fn none() -> DefinitionLink {
            DefinitionLink::default()
        }

        fn get(&self) -> std::sync::MutexGuard<'_, Option<DefinitionSync>> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        /// Starts the definitions thread (its first round runs at once, applying through
        /// `applier`).
        pub(crate) fn start(
            &self,
            parts: DefinitionLinkParts<'_>,
            applier: super::Applier,
        ) -> Result<(), Error> {
            let sync = DefinitionSync::start(
                DefinitionParts {
                    redis: parts.redis.clone(),
                    table: Arc::clone(parts.table),
                    store: Arc::clone(parts.store),
                    clock: Arc::clone(parts.clock),
                    retention: parts.retention,
                },
                applier,
            )
            .map_err(|source| Error::Thread {
                what: "definitions",
                source,
            })?;
            *self.get() = Some(sync);
            Ok(())
        }

        /// Writes a runtime definition to Redis now: `true` once it reached Redis (false
        /// without Redis, or when it could not be reached).
        pub(crate) fn push(&self, field: &str) -> bool {
            // The handle is taken out of the lock for the wait: a stop must not wait for it.
            let handle = self.get().as_ref().map(DefinitionSync::handle);
            handle.is_some_and(|h| h.push(field))
        }

        /// Waits (boundedly) for the first definitions round of this process.
        pub(crate) fn first_round(&self) {
            let handle = self.get().as_ref().map(DefinitionSync::handle);
            if let Some(h) = handle {
                h.first_round();
            }
        }

        /// One definitions round now, alongside `other` (see `Handle::sync`); its outcome is
        /// `None` without Redis.
        pub(crate) fn sync<R>(
            &self,
            other: impl FnOnce() -> R,
        ) -> (R, Option<Result<(), ReplicationError>>) {
            let handle = self.get().as_ref().map(DefinitionSync::handle);
            match handle {
                Some(h) => {
                    let (r, round) = h.sync(other);
                    (r, Some(round))
                }
                None => (other(), None),
            }
        }

        /// Stops the thread (idempotent).
        pub(crate) fn stop(&self) {
            let sync = self.get().take();
            if let Some(s) = sync {
                s.stop();
            }
        }
    }

    /// How long a reservation refused by its grant alone waits for a grant round
    /// (`redis.grant_wait`; zero without Redis).
    fn grant_wait(config: &Config) -> Duration {
        config
            .redis
            .as_ref()
            .map_or(Duration::ZERO, |r| r.grant_wait)
    }
}

#[cfg(not(feature = "redis"))]
mod imp {
    use jiff::Timestamp;

    use super::{DefinitionLinkParts, FleetParts};
    use crate::config::{Config, RedisConfig};
    use crate::error::{Error, ReplicationError};
    use crate::limiter::status::ReplicationStatus;
    use crate::model::budget::SoftLimitCrossed;
    use crate::model::money::Money;
    use crate::model::window::Window;

    /// Without the `redis` feature there is no fleet: every answer is "none".
    #[derive(Debug)]
    pub(crate) struct Fleet;

    /// Without the `redis` feature runtime definitions stay local.
    #[derive(Debug)]
    pub(crate) struct DefinitionLink;

    impl DefinitionLink {
        pub(crate) fn none() -> DefinitionLink {
            DefinitionLink
        }

        pub(crate) fn start(
            &self,
            parts: DefinitionLinkParts<'_>,
            applier: super::Applier,
        ) -> Result<(), Error> {
            drop((parts, applier));
            Err(ReplicationError::NotBuilt.into())
        }

        pub(crate) fn push(&self, _field: &str) -> bool {
            false
        }

        pub(crate) fn first_round(&self) {}

        pub(crate) fn sync<R>(
            &self,
            other: impl FnOnce() -> R,
        ) -> (R, Option<Result<(), ReplicationError>>) {
            (other(), None)
        }

        pub(crate) fn stop(&self) {}
    }

    impl Fleet {
        pub(crate) fn none() -> Fleet {
            Fleet
        }

        /// A configured Redis cannot be used by this build.
        pub(crate) fn check(redis: Option<&RedisConfig>) -> Result<(), Error> {
            match redis {
                Some(_) => Err(ReplicationError::NotBuilt.into()),
                None => Ok(()),
            }
        }

        pub(crate) fn start(parts: FleetParts<'_>) -> Result<Fleet, Error> {
            drop(parts);
            Err(ReplicationError::NotBuilt.into())
        }

        pub(crate) fn replicating(&self) -> bool {
            false
        }

        pub(crate) fn stop(&self, _flush: impl FnOnce()) {}

        pub(crate) fn sync(&self) -> Option<Result<(), ReplicationError>> {
            None
        }

        pub(crate) fn claim(
            &self,
            _key: &str,
            event: SoftLimitCrossed,
        ) -> Option<SoftLimitCrossed> {
            Some(event)
        }

        pub(crate) fn claim_once(
            &self,
            _name: &str,
            _window: Window,
            action: Box<dyn FnOnce() + Send>,
        ) -> Option<Box<dyn FnOnce() + Send>> {
            Some(action)
        }

        pub(crate) fn grant_round(&self, _config: &Config) -> bool {
            false
        }

        pub(crate) async fn grant_round_async(&self, _config: &Config) -> bool {
            false
        }

        pub(crate) fn grants(&self) -> Vec<Option<(Window, Money)>> {
            Vec::new()
        }

        pub(crate) fn status(
            &self,
            _config: &Config,
            _now: Timestamp,
        ) -> (ReplicationStatus, Vec<Option<String>>) {
            (ReplicationStatus::default(), Vec::new())
        }
    }
}
