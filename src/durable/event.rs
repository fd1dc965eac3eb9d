//! What the request path tells the journal ([`Event`]): one value per channel send, kept
//! small (see [`Items`]) because each crosses between two cores through the channel's ring.

use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::durable::idempotency::Ended;
use crate::durable::items::Items;
use crate::durable::store::ReservationValue;
use crate::durable::store::StoreError;
use crate::model::window::Window;

/// Result sent to a durability waiter.
pub(crate) type AckResult = Result<(), StoreError>;

/// How a waiter wants to hear that its event is durable.
#[derive(Debug)]
pub(crate) enum Ack {
    Blocking(Sender<AckResult>),
    Async(tokio::sync::oneshot::Sender<AckResult>),
}

impl Ack {
    pub(crate) fn send(self, result: AckResult) {
        // A waiter that gave up (dropped its receiver) needs no answer.
        match self {
            Ack::Blocking(tx) => drop(tx.send(result)),
            Ack::Async(tx) => drop(tx.send(result)),
        }
    }
}

/// What the request path tells the journal.
#[derive(Debug)]
pub(crate) enum Event {
    /// `amount` more spend of this node for a budget window.
    Add {
        budget: u32,
        window: Window,
        amount: u64,
        ack: Option<Ack>,
    },
    /// `amount` more spend in each of several budget windows (one `charge`: one channel send).
    AddMany {
        items: Items,
        amount: u64,
        ack: Option<Ack>,
    },
    /// A spend with an idempotency key: as `AddMany`, plus the key's record in the same sled
    /// batch. Boxed: a key is rare on the request path and must not grow every event.
    AddKeyed(Box<KeyedAdd>),
    /// Raise this node's total of a window to at least `total`: the replicator found a larger
    /// own field in Redis (this node's data dir was wiped), so the durable total adopts it.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Adopt {
        budget: u32,
        window: Window,
        total: u64,
        /// Commit at once (the replicator's find: a loss to repair); a new slot taking over
        /// stored totals joins the next group commit (a restore: a few fsyncs, not thousands).
        urgent: bool,
    },
    /// Journal an open reservation (`reserve` waits for its ack: a crash after `reserve`
    /// returned finds it on disk and counts its estimate).
    Reserve {
        id: Arc<str>,
        value: Box<ReservationValue>,
        ack: Ack,
    },
    /// The end of a reservation: `amount` more own spend in each of its windows (zero for a
    /// release) and the removal of its record, in one sled batch; with `remember`, also an
    /// idempotency record of how it ended (the id, and `amount` for a commit).
    Finish {
        id: Arc<str>,
        items: Arc<[(u32, Window)]>,
        /// What each of `items` counts (in its budget's unit).
        spent: Box<[u64]>,
        /// The dollars committed (for the idempotency record).
        amount: u64,
        ack: Option<Ack>,
        remember: Option<Ended>,
    },
    /// Acknowledge once everything queued before is durable.
    Flush(Ack),
    /// Commit what is queued, acknowledge, and stop.
    Stop(Ack),
    /// Run the periodic work (retries, retention) now, then acknowledge: lets tests observe
    /// retention deterministically instead of sleeping through ticks.
    Maintain(Ack),
    /// Fault injection for tests: the thread panics, as a bug would make it.
    Panic,
}

/// A keyed spend ([`Event::AddKeyed`]): the fields of `AddMany`, the key and the fingerprint
/// of its request.
#[derive(Debug)]
pub(crate) struct KeyedAdd {
    pub items: Items,
    pub amount: u64,
    /// Budgets of other units than USD, each with its own amount.
    pub others: Vec<(u32, Window, u64)>,
    pub key: Box<str>,
    pub fingerprint: u64,
    pub ack: Option<Ack>,
}
