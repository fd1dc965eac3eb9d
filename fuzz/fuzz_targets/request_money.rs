//! Request amounts as the sidecar reads them (`Money::from_decimal_exponent` for JSON strings,
//! `Money::parse_json_number` for JSON numbers), compared with an exact decimal reading written
//! apart. See `provider_budgets_fuzz::request_money` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = provider_budgets_fuzz::request_money(data);
});
