//! provider-budgets (work in progress)
#[cfg(feature = "redis")]
mod replicate;
