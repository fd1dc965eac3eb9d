//! Reading back the idempotency records (module `durable::idempotency`): the keyed spends
//! ([`Spend::idempotency_key`](crate::Spend::idempotency_key)) and remembered reservation ends
//! ([`Reservation::remember_end`](crate::Reservation::remember_end)) that are on disk, for a
//! service that answers retries across a restart (the sidecar seeds its key table from them
//! before it serves). Not a stable API.

use rustc_hash::FxHashMap;

use crate::durable::idempotency::{IdempotencyRecord, Remembered, IDEMPOTENCY_TTL};
use crate::durable::store::StoreError;
use crate::limiter::Limiter;
use crate::model::clock::floor_secs;

impl Limiter {
    /// The idempotency records on disk that are younger than `IDEMPOTENCY_TTL` by this
    /// limiter's clock, oldest first, one per key (the newest: a key written again after its
    /// first record was forgotten). Spend keys and reservation ids are apart (a spend key equal
    /// to a reservation id is another record). What is still queued to the journal is not on
    /// disk yet: call it before taking requests.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the data dir cannot be read. A record that does not decode is
    /// skipped with a warning, not an error.
    #[doc(hidden)]
    pub fn idempotency_records(&self) -> Result<Vec<IdempotencyRecord>, StoreError> {
        let ttl = i64::try_from(IDEMPOTENCY_TTL.as_secs()).unwrap_or(i64::MAX);
        let cutoff = floor_secs(self.now()).saturating_sub(ttl);
        let all = self.inner.store.load_remembered()?;
        // Stored oldest first: the last index per key is its newest record.
        let mut newest: FxHashMap<(bool, &str), usize> = FxHashMap::default();
        for (i, r) in all.iter().enumerate() {
            let spend = matches!(r.what, Remembered::Spend { .. });
            newest.insert((spend, r.key.as_str()), i);
        }
        let mut keep: Vec<usize> = newest
            .into_values()
            .filter(|&i| all[i].at.as_second() >= cutoff)
            .collect();
        keep.sort_unstable();
        let mut keep = keep.into_iter().peekable();
        Ok(all
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| (keep.next_if_eq(&i).is_some()).then_some(r))
            .collect())
    }
}
