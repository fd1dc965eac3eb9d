//! Durations (humantime), budget periods and money amounts from one short text; periods are
//! also cut into windows. See `provider_budgets_fuzz::durations` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = provider_budgets_fuzz::durations(data);
});
