//! [`Hot`]: the request path's summary of which budgets may be spent.

use std::sync::atomic::{AtomicU64, Ordering};

/// The budgets (slots below 128) whose peak may have reached their limit, as one bit set:
/// bit `b` is set once budget `b`'s `peak >= limit` could hold, and never cleared while the
/// view lives (like the peak itself). A clear bit means the budget cannot be spent.
///
/// Why: the request path reads this once per call (two loads) and then skips every budget
/// whose bit is clear, instead of three loads per budget (its slot, peak and limit); the
/// filter's memo starts from it (`filter::Check::new`). Slots from 128 up have no bit and are
/// always read.
#[derive(Debug, Default)]
pub(crate) struct Hot([AtomicU64; 2]);

impl Hot {
    #[inline]
    pub(super) fn mark(&self, slot: u32) {
        if let Some(word) = self.0.get(slot as usize / 64) {
            let bit = 1u64 << (slot % 64);
            // A load first: once set, later charges of a spent budget do not write the
            // shared word again.
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    #[inline]
    pub(super) fn load(&self) -> u128 {
        u128::from(self.0[0].load(Ordering::Relaxed))
            | u128::from(self.0[1].load(Ordering::Relaxed)) << 64
    }
}
