//! Where "now" comes from.
//!
//! All window math takes its instants from a [`Clock`], so tests (and the CLI's `--now`) can fix
//! or advance time instead of sleeping. The request path reads the clock once per call.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};

/// A source of the current UTC instant.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;

    /// The current instant in whole Unix seconds (rounded down): what the request path
    /// (`filter`, `charge`, `record`) needs to find a window. A clock may answer it more
    /// cheaply than [`Clock::now`] ([`SystemClock`] does).
    fn now_secs(&self) -> i64 {
        floor_secs(self.now())
    }

    /// Time elapsed on a monotonic clock since an arbitrary origin. Unlike [`Clock::now`], it
    /// never jumps: the journal compares the two so that a wall clock that steps (NTP, a VM
    /// resumed from a snapshot, a bad RTC) never makes it delete current spend.
    fn monotonic(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
}

/// The system's wall clock. Windows are aligned to UTC, so this is a wall clock on purpose, not
/// a monotonic one: every instance of a fleet must compute the same window from its own clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    /// On Linux, `CLOCK_REALTIME_COARSE`: the wall clock as of the last kernel tick (at most a
    /// few milliseconds behind, never ahead), read in a few nanoseconds instead of ~50 on a VM.
    /// Windows are whole seconds, so the only effect is that a call in the first milliseconds
    /// of a window may still be counted in (and checked against) the window before, exactly
    /// as if it had come those milliseconds earlier; both `filter` and `charge` read the same
    /// clock, so they agree.
    #[cfg(target_os = "linux")]
    fn now_secs(&self) -> i64 {
        rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse).tv_sec
    }
}

/// A clock that only moves when told to. Clones share the same time, so a test keeps one and
/// hands the other to the limiter.
///
/// Its wall clock ([`Clock::now`]) moves only by [`FakeClock::advance`], [`FakeClock::step`] and
/// [`FakeClock::set`]: to the limiter these are clock *steps* (an NTP correction, a VM resumed
/// from a snapshot), as far as retention is concerned. Its monotonic clock is real elapsed time
/// plus whatever [`FakeClock::pass`] added: `pass` is time really passing (both move), the way
/// to test that retention still deletes ended windows.
#[derive(Debug, Clone)]
pub struct FakeClock {
    // Nanoseconds since the Unix epoch; i64 covers the years 1678..2262.
    nanos: Arc<AtomicI64>,
    // Monotonic time: real time since creation plus what `pass` added.
    origin: Instant,
    passed: Arc<AtomicU64>,
}

impl FakeClock {
    /// A clock stopped at `at`.
    pub fn new(at: Timestamp) -> FakeClock {
        FakeClock {
            nanos: Arc::new(AtomicI64::new(to_nanos(at))),
            origin: Instant::now(),
            passed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Moves the wall clock forward (or backward, for a negative duration). Monotonic time
    /// does not follow: to the limiter this is a clock step (use [`FakeClock::pass`] for time
    /// that really passes).
    pub fn advance(&self, by: SignedDuration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        self.nanos.fetch_add(by, Ordering::SeqCst);
    }

    /// Same as [`FakeClock::advance`]: steps the wall clock by `by` either way.
    pub fn step(&self, by: SignedDuration) {
        self.advance(by);
    }

    /// Lets `by` pass: the wall clock and the monotonic clock both move forward.
    pub fn pass(&self, by: std::time::Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos
            .fetch_add(i64::try_from(nanos).unwrap_or(i64::MAX), Ordering::SeqCst);
        self.passed.fetch_add(nanos, Ordering::SeqCst);
    }

    /// Sets the wall clock to `at` (a step: monotonic time does not move).
    pub fn set(&self, at: Timestamp) {
        self.nanos.store(to_nanos(at), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_nanosecond(i128::from(self.nanos.load(Ordering::SeqCst)))
            .unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed() + Duration::from_nanos(self.passed.load(Ordering::SeqCst))
    }
}

fn to_nanos(at: Timestamp) -> i64 {
    i64::try_from(at.as_nanosecond()).unwrap_or(if at.as_second() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// Whole seconds since the epoch, rounded toward minus infinity (jiff truncates toward zero),
/// so that instants before a boundary never land in the window after it.
pub(crate) fn floor_secs(at: Timestamp) -> i64 {
    let s = at.as_second();
    if at.subsec_nanosecond() < 0 {
        s - 1
    } else {
        s
    }
}
