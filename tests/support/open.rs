//! One way to open a limiter in a test: on a [`FakeClock`] (clones share its time, so the
//! test moves the clock it keeps), panicking with the error (a test failure naming it).

use std::path::Path;
use std::sync::Arc;

use provider_budgets::{Config, FakeClock, Limiter};

/// Opens `config` on `clock`.
pub fn open(config: Config, clock: &FakeClock) -> Limiter {
    Limiter::builder(config)
        .clock(Arc::new(clock.clone()))
        .open()
        .unwrap_or_else(|e| panic!("open: {e}"))
}

/// A config from a YAML document, with its data dir.
pub fn yaml(yaml: &str, dir: &Path) -> Config {
    Config::from_yaml_str(yaml)
        .unwrap_or_else(|e| panic!("config: {e}"))
        .data_dir(dir)
}
