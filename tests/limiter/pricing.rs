//! Spend given as token usage: priced by the limiter's catalog (`Spend::deployment_usage`,
//! `Limiter::price`), a given cost wins, the `pricing.unpriced` policies, and the catalog's
//! reload (a malformed or shrunken catalog is refused, the old one keeps pricing).

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use std::path::Path;

use provider_budgets::{
    Catalog, Config, Error, FakeClock, Limiter, Money, PriceSource, RecordError, Spend,
    StatusQuery, Target, Usage,
};

const NOW: &str = "2024-06-01T12:00:00Z";
const BUDGET: &str = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn open(dir: &Path, pricing: &str) -> Limiter {
    support::open(config(dir, pricing), &FakeClock::new(NOW.parse().unwrap()))
}

fn config(dir: &Path, pricing: &str) -> Config {
    Config::from_yaml_str(&format!(
        "{BUDGET}provider_budgets:\n  pricing: {pricing}\n"
    ))
    .unwrap()
    .data_dir(dir.join("data"))
}

fn spent(l: &Limiter) -> Money {
    l.status(StatusQuery::provider("openai"))[0].spend
}

/// A catalog of `n` models `m0`… at $1 in / $2 out per million tokens (`m0`: $3 / $4).
fn catalog(dir: &Path, name: &str, n: usize) -> String {
    let mut entries: Vec<String> = (0..n)
        .map(|i| {
            let (i_cost, o_cost) = if i == 0 { ("3e-6", "4e-6") } else { ("1e-6", "2e-6") };
            format!(r#""m{i}": {{"litellm_provider": "openai", "input_cost_per_token": {i_cost}, "output_cost_per_token": {o_cost}}}"#)
        })
        .collect();
    entries.push(r#""sample_spec": {"input_cost_per_token": 0}"#.into());
    let path = dir.join(name);
    std::fs::write(&path, format!("{{{}}}", entries.join(",\n"))).unwrap();
    path.display().to_string()
}

#[test]
#[allow(clippy::needless_borrows_for_generic_args)] // the by-reference form compiles too
fn usage_is_priced_by_the_builtin_catalog_when_no_cost_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), "{}");
    let d = Target::parse("gpt-4o");
    let usage = Usage::new(1200, 300).cache_read(1000);
    let want = Catalog::builtin()
        .unwrap()
        .price("gpt-4o", &usage)
        .unwrap()
        .cost;
    assert!(want > Money::ZERO);
    let r = l.charge(Spend::deployment_usage(&d, &usage)).unwrap();
    assert_eq!((r.budgets(), r.cost(), r.priced()), (1, want, true));
    assert!(matches!(r.price_source(), Some(PriceSource::Catalog { key }) if key == "gpt-4o"));
    drop(r);
    assert_eq!(spent(&l), want);
    assert_eq!(l.price("gpt-4o", &usage).unwrap().cost, want);
}

#[test]
#[allow(clippy::needless_borrows_for_generic_args)] // the by-reference form compiles too
fn a_given_cost_wins_over_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), "{}");
    let d = Target::parse("gpt-4o");
    let spend = Spend::deployment(&d, usd("0.5")).usage(&Usage::new(1_000_000, 0));
    assert_eq!(spend.given_cost(), Some(usd("0.5")));
    let r = l.charge(spend).unwrap();
    assert_eq!(
        (r.cost(), r.priced(), r.price_source()),
        (usd("0.5"), false, None)
    );
    drop(r);
    assert_eq!(spent(&l), usd("0.5"));
}

#[test]
fn unpriced_models_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = Target::parse("openai/no-such-model");
    let usage = Usage::new(1_000_000, 1_000_000);

    // deny (the default): refused, nothing counted, the error names the model.
    let l = open(dir.path(), "{unpriced: deny}");
    let e = l.charge(Spend::deployment_usage(&d, usage)).unwrap_err();
    assert!(matches!(&e, RecordError::Unpriced(u) if u.model == "openai/no-such-model"));
    assert!(
        e.to_string()
            .contains("\"openai/no-such-model\" is unpriced"),
        "{e}"
    );
    assert_eq!(spent(&l), Money::ZERO);
    drop(l);

    // allow_zero: counted as zero, reported unpriced.
    let l = open(dir.path(), "{unpriced: allow_zero}");
    let r = l.charge(Spend::deployment_usage(&d, usage)).unwrap();
    assert_eq!((r.cost(), r.priced()), (Money::ZERO, false));
    assert!(matches!(
        r.price_source(),
        Some(PriceSource::UnpricedZero(_))
    ));
    drop(r);
    drop(l);

    // default: priced at default_per_mtok.
    let l = open(
        dir.path(),
        "{unpriced: default, default_per_mtok: {input_per_mtok: 1, output_per_mtok: 2}}",
    );
    let r = l.charge(Spend::deployment_usage(&d, usage)).unwrap();
    assert_eq!((r.cost(), r.priced()), (usd("3"), false));
    assert!(matches!(
        r.price_source(),
        Some(PriceSource::UnpricedDefault(_))
    ));
    drop(r);
    assert_eq!(spent(&l), usd("3"));
}

#[test]
fn overrides_price_and_are_reported_priced() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(
        dir.path(),
        "{overrides: {my-model: {input_per_mtok: 1, output_per_mtok: 2}}}",
    );
    let d = Target::parse("openai/my-model");
    let r = l
        .charge(Spend::deployment_usage(&d, Usage::new(2_000_000, 0)))
        .unwrap();
    assert_eq!((r.cost(), r.priced()), (usd("2"), true));
    assert!(matches!(
        r.price_source(),
        Some(PriceSource::Override { .. })
    ));
}

#[test]
fn a_broken_catalog_fails_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let c = config(dir.path(), &format!("{{catalog: {}}}", missing.display()));
    let e = Limiter::open(c).unwrap_err();
    assert!(e.to_string().contains("missing.json"), "{e}");
}

#[test]
fn the_catalog_reloads_with_the_config_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = catalog(dir.path(), "big.json", 10);
    let l = open(dir.path(), &format!("{{catalog: {big}}}"));
    let usage = Usage::new(1_000_000, 1_000_000);
    assert_eq!(l.price("m0", &usage).unwrap().cost, usd("7"));

    // Malformed (the same file, rewritten): refused, the old catalog keeps pricing.
    std::fs::write(&big, r#"{"m0": {"input_cost_per_token": "cheap"}}"#).unwrap();
    let e = l
        .reload(config(dir.path(), &format!("{{catalog: {big}}}")))
        .unwrap_err();
    assert!(
        matches!(&e, Error::Reload(m) if m.contains("big.json") && m.contains("cheap")),
        "{e}"
    );
    assert_eq!(l.price("m0", &usage).unwrap().cost, usd("7"));

    // The same file shrank by more than half (4 + sample_spec of 11): refused.
    let small = catalog(dir.path(), "big.json", 4);
    let e = l
        .reload(config(dir.path(), &format!("{{catalog: {small}}}")))
        .unwrap_err();
    assert!(e.to_string().contains("fewer than half"), "{e}");
    assert!(l.price("m5", &usage).is_ok());

    // Half or more: taken, with the new policy.
    let half = catalog(dir.path(), "big.json", 6);
    l.reload(config(
        dir.path(),
        &format!("{{catalog: {half}, unpriced: allow_zero}}"),
    ))
    .unwrap();
    let p = l.price("m7", &usage).unwrap();
    assert!(matches!(p.source, PriceSource::UnpricedZero(_)));
    assert_eq!(l.price("m1", &usage).unwrap().cost, usd("3"));

    // Another source is a new catalog, whatever its size.
    let three = catalog(dir.path(), "three.json", 2);
    l.reload(config(dir.path(), &format!("{{catalog: {three}}}")))
        .unwrap();
    assert_eq!(l.price("m0", &usage).unwrap().cost, usd("7"));
}

#[test]
fn a_catalog_loaded_lazily_may_be_replaced_by_a_small_file() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), "{}");
    assert!(l.price("gpt-4o", &Usage::new(10, 10)).is_ok()); // loads the builtin one
    let mine = catalog(dir.path(), "mine.json", 1);
    l.reload(config(dir.path(), &format!("{{catalog: {mine}}}")))
        .unwrap();
    assert!(l.price("gpt-4o", &Usage::new(10, 10)).is_err());
    assert_eq!(
        l.price("m0", &Usage::new(1_000_000, 0)).unwrap().cost,
        usd("3")
    );
}
