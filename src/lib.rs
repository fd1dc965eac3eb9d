//! provider-budgets (work in progress)
mod clock;
mod config;
mod error;
mod journal;
mod money;
mod provider;
#[cfg(feature = "redis")]
mod replicate;
mod status;
mod store;
mod view;
mod window;

pub use clock::{Clock, FakeClock, SystemClock};
pub use config::*;
pub use error::*;
pub use money::{Money, MoneyError};
pub use provider::*;
pub use status::*;
pub use store::*;
pub use window::{Period, PeriodError, Schedule, Window};
