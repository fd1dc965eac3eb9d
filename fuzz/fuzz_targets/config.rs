//! YAML and TOML configs through `Config::from_yaml_str` / `from_toml_str`. See
//! `provider_budgets_fuzz::config` for the properties checked.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use provider_budgets_fuzz::{ConfigInput, MAX_CONFIG};

/// What libFuzzer's bytes become. `ConfigInput::from_bytes` is the same decoding written out
/// by hand for the corpus test; the two are checked against each other on every input.
#[derive(Debug, Arbitrary)]
struct Input {
    toml: bool,
    text: String,
}

fuzz_target!(|data: &[u8]| {
    // Cap before decoding: configs are small, and big inputs only slow the fuzzer down.
    if data.len() > MAX_CONFIG + 1 {
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(arbitrary::Unstructured::new(data)) else {
        return;
    };
    let input = ConfigInput {
        toml: input.toml,
        text: input.text,
    };
    assert_eq!(
        input,
        ConfigInput::from_bytes(data),
        "arbitrary's decoding changed: update ConfigInput::from_bytes"
    );
    let _ = provider_budgets_fuzz::config(&input);
});
