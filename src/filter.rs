//! The request-path filter: which deployments may still be used.
//!
//! One clock read per call; per deployment a cached resolution and, per distinct budget, one
//! atomic read of its current window (a per-call bitmask remembers the answer for the first 64
//! budgets, so 50 deployments over 3 providers cost 3 window reads). Nothing is allocated
//! except the result, and nothing is locked.
//!
//! Being over budget is not an error of the limiter, but an empty result is something the
//! router must handle, so it comes back as [`NoDeployments`], whose message is the reference's.

use std::fmt;

use crate::money::Money;

/// No deployment is left: every candidate's provider has spent its budget (or was denied
/// as unknown). The message matches litellm's: `No deployments available - crossed budget:
/// Exceeded budget for provider openai: 10.5 >= 10`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NoDeployments {
    /// Each exhausted provider among the candidates, once, with its spend and limit.
    pub exceeded: Vec<Exceeded>,
    /// Candidates dropped because their provider could not be resolved and
    /// `unknown_provider` is `deny`.
    pub unknown: Vec<String>,
}

/// One provider over its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// The provider.
    pub provider: String,
    /// Its spend in the current window.
    pub spend: Money,
    /// Its limit.
    pub limit: Money,
}

impl fmt::Display for NoDeployments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("No deployments available - crossed budget:")?;
        let mut sep = " ";
        for e in &self.exceeded {
            write!(
                f,
                "{sep}Exceeded budget for provider {}: {} >= {}",
                e.provider, e.spend, e.limit
            )?;
            sep = ", ";
        }
        for m in &self.unknown {
            write!(
                f,
                "{sep}Unknown provider for deployment {m:?} (unknown_provider: deny)"
            )?;
            sep = ", ";
        }
        Ok(())
    }
}

impl std::error::Error for NoDeployments {}

/// What a deployment needs checked, resolved once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Check this budget.
    Budget(u32),
    /// Always passes (provider without budget, or unknown with `allow`).
    Pass,
    /// Never passes (unknown with `deny`).
    Deny,
}

/// Remembers, within one call, which budgets were already checked (first 64 budgets).
#[derive(Debug, Default)]
pub(crate) struct Memo {
    checked: u64,
    exhausted: u64,
}

impl Memo {
    /// `is_exhausted(b)` through the memo.
    #[inline]
    pub fn exhausted(&mut self, budget: u32, is_exhausted: impl FnOnce() -> bool) -> bool {
        if budget >= 64 {
            return is_exhausted();
        }
        let bit = 1u64 << budget;
        if self.checked & bit == 0 {
            self.checked |= bit;
            if is_exhausted() {
                self.exhausted |= bit;
            }
        }
        self.exhausted & bit != 0
    }
}
