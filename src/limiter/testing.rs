//! Hooks for tests (not part of the stable API): deterministic maintenance instead of
//! sleeping through ticks, and fault injection. Hidden from the docs.

use crate::durable::journal::Event;
use crate::durable::store::StoreError;
use crate::limiter::spend::AckWait;
use crate::limiter::Limiter;

/// Expires the reservations past `reservation_timeout` (they count their estimate), then
/// runs the journal's periodic work (failed-write retries, retention) now and waits for it.
/// Both also run on their own (every second, every 250 ms); tests call this instead of
/// sleeping.
///
/// # Errors
///
/// As [`Limiter::flush`].
pub fn maintain(limiter: &Limiter) -> Result<(), StoreError> {
    // Expired reservations count their estimate first, so the pass below makes it durable.
    limiter.reap();
    match AckWait::request(&limiter.inner.journal, false, Event::Maintain).and_then(AckWait::recv) {
        Some(result) => result,
        None => limiter.flush(),
    }
}

/// Fault injection: makes the journal thread panic, as a bug would.
pub fn inject_journal_panic(limiter: &Limiter) {
    let _ = limiter.inner.journal.send(Event::Panic);
}

/// The resolution cache of the current configuration: how many maps it published (one per
/// batch of misses) and how many entries the published one holds.
pub fn resolution_cache(limiter: &Limiter) -> (u64, usize) {
    limiter.inner.resolver.load().cache_figures()
}
