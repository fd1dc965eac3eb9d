//! Raw bytes as a stored sled value or key (`fuzz_decode_value`): garbage must be an error,
//! never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = provider_budgets_fuzz::value_decode(data);
});
