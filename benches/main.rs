//! Benchmarks of the request path and the durability machinery.
//!
//! ```text
//! cargo bench --bench main                 # full run
//! cargo bench --bench main -- --quick      # what CI runs (a minute or two on 2 cores)
//! cargo bench --bench main -- filter/      # one group (criterion's name filter)
//! ```
//!
//! Criterion reports the time per operation (and records/s where a throughput is set); after
//! the last group a table of per-call p50/p99 is printed (see `common`), because the README
//! wants medians and p99 and criterion only measures batches.
//!
//! One module per scenario, each with `pub fn bench(c: &mut Criterion)`. To add a scenario,
//! create `benches/NAME.rs` and add one line `NAME,` to the `scenarios!` list below.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

/// Declares the scenario modules and one function that runs them in order.
macro_rules! scenarios {
    ($($name:ident,)*) => {
        $(mod $name;)*
        fn all_scenarios(c: &mut Criterion) {
            $($name::bench(c);)*
        }
    };
}

scenarios! {
    filter,
    record,
    durable,
    reopen,
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = all_scenarios
}
criterion_group!(summary, common::print_summary);
criterion_main!(benches, summary);
