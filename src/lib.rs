//! provider-budgets (work in progress)
mod clock;
mod config;
mod money;
mod provider;
#[cfg(feature = "redis")]
mod replicate;
mod window;

pub use clock::{Clock, FakeClock, SystemClock};
pub use config::*;
pub use money::{Money, MoneyError};
pub use provider::*;
pub use window::{Period, PeriodError, Schedule, Window};
