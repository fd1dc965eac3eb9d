//! Replays the committed fuzz corpus (`tests/corpus/<target>/`) through the very checks the
//! cargo-fuzz targets run (`tests/support/fuzz_checks.rs`, which is also the fuzz crate's
//! library), so that plain `cargo test` on the stable toolchain guards (both live in the main
//! package, so the published crate's tests build and pass too):
//!
//! * the parsers fuzzed by `fuzz/` — `parse_duration`, `Period` and `Money` from text,
//!   the sidecar's request amounts (`Money::from_decimal_exponent`,
//!   `Money::parse_json_number`, checked against an exact decimal reading),
//!   `Config::from_yaml_str` / `from_toml_str`, and the stored-value decoding behind
//!   `fuzz_decode_value` — still never panic (nor break their properties) on any corpus
//!   input (seeds, and crash reproducers once they are added to the corpus);
//! * known seeds still parse or decode (or are still refused) as they should, so a broken
//!   parser or a stale corpus fails here instead of silently fuzzing nothing useful;
//! * the committed stored-value seed is byte for byte what the store writes today, so the
//!   `value_decode` fuzzer starts from the real on-disk format. After a deliberate format
//!   change, regenerate it with `PROVIDER_BUDGETS_WRITE_SEEDS=1 cargo test -p provider-budgets --test model fuzz_corpus`.
//!
//! It does not replace fuzzing (`cargo fuzz run -s none <target>`, see `.ci/run`); it makes
//! the corpus a regression test.

use provider_budgets_test_support::fuzz_checks as checks;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use checks::{Accepted, ConfigInput};
use jiff::Timestamp;
use provider_budgets::Spend;
use provider_budgets::{fuzz_decode_value, Config, FakeClock, Limiter, Money};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

/// Every file of a target's corpus, sorted by name. Fails when the corpus is missing or empty.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.expect("corpus entry");
        if !entry.file_type().expect("file type").is_file() {
            continue;
        }
        let data = std::fs::read(entry.path()).expect("corpus file");
        files.push((entry.file_name().to_string_lossy().into_owned(), data));
    }
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    files
}

fn seed<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, d)| d.as_slice())
        .unwrap_or_else(|| panic!("seed {name} is missing from the corpus"))
}

#[test]
fn duration_corpus_replays() {
    let files = corpus("duration");
    let mut accepted = Vec::new();
    for (name, data) in &files {
        let a = checks::durations(data)
            .unwrap_or_else(|| panic!("seed {name} is longer than MAX_TEXT, the fuzzer skips it"));
        accepted.push((name.as_str(), a));
    }
    let of = |name: &str| checks::durations(seed(&files, name)).expect("within MAX_TEXT");
    let only = |duration, period, money| Accepted {
        duration,
        period,
        money,
    };
    for p in [
        "period-30s",
        "period-15m",
        "period-1h",
        "period-1d",
        "period-7d",
        "period-2w",
    ] {
        assert_eq!(of(p), only(true, true, false), "{p}");
    }
    for p in [
        "period-1mo",
        "period-3mo",
        "period-24h-padded",
        "period-max-months",
    ] {
        assert!(of(p).period, "{p}");
    }
    for p in ["period-too-long", "period-bad-unit"] {
        assert!(!of(p).period, "{p}");
    }
    for d in ["duration-2ms", "duration-250ms", "duration-1h-30m"] {
        assert_eq!(of(d), only(true, false, false), "{d}");
    }
    for m in [
        "money-tenth",
        "money-12.5",
        "money-one-nano",
        "money-exponent",
        "money-max",
    ] {
        assert_eq!(of(m), only(false, false, true), "{m}");
    }
    for m in ["money-too-large", "money-negative", "money-nan"] {
        assert!(!of(m).money, "{m}");
    }
    let money = |name: &str| {
        std::str::from_utf8(seed(&files, name))
            .expect("UTF-8")
            .parse::<Money>()
            .expect("parses")
    };
    assert_eq!(money("money-tenth"), Money::from_nanos(100_000_000));
    assert_eq!(money("money-one-nano"), Money::from_nanos(1));
    assert_eq!(money("money-round-half-up"), Money::from_nanos(1));
    assert_eq!(money("money-exponent"), Money::from_nanos(1_000_000));
    assert_eq!(money("money-max"), Money::MAX);
    assert_eq!(money("money-negative-zero"), Money::ZERO);
}

#[test]
fn request_money_corpus_replays() {
    use checks::Amount::{Malformed, Nanos, Negative, TooLarge};
    let files = corpus("request_money");
    for (name, data) in &files {
        checks::request_money(data).unwrap_or_else(|| {
            panic!("seed {name} is longer than MAX_AMOUNT, the fuzzer skips it")
        });
    }
    let of = |name: &str| checks::request_money(seed(&files, name)).expect("within MAX_AMOUNT");
    let max = u64::MAX;
    for (name, amount) in [
        ("plain-tenth", Nanos(100_000_000)),
        ("exponent-python", Nanos(15_000)),
        ("exponent-upper-plus", Nanos(2_000_000_000_000)),
        ("float-printer", Nanos(300_000_000)),
        ("round-half-up", Nanos(1)),
        ("round-down", Nanos(0)),
        ("max", Nanos(max)),
        ("max-exponent", Nanos(max)),
        ("leading-zeros", Nanos(1_500_000_000)),
        ("long-fraction", Nanos(0)),
        ("zero-huge-exponent", Nanos(0)),
        ("tiny-exponent-min", Nanos(0)),
        ("negative-zero", Nanos(0)),
        ("negative-zero-huge-exponent", Nanos(0)),
        ("whitespace", Nanos(12_500_000_000)),
        ("decimal-not-json-leading-dot", Nanos(500_000_000)),
        ("decimal-not-json-leading-plus", Nanos(1_000_000_000)),
        ("too-large-by-one-nano", TooLarge),
        ("too-large-by-rounding", TooLarge),
        ("huge-exponent", TooLarge),
        ("huge-exponent-fraction", TooLarge),
        ("negative", Negative),
        ("negative-tiny", Negative),
        ("huge-exponent-negative", Negative),
        ("exponent-beyond-i64", Malformed),
        ("minus-dot", Malformed),
        ("double-plus-exponent", Malformed),
        ("nan", Malformed),
        ("infinity", Malformed),
    ] {
        assert_eq!(of(name), amount, "{name}");
    }
    // The reference agrees with the parser on these (checked above); the sidecar's JSON
    // numbers are a subset: a leading point or plus is a decimal string's, not a number's.
    for (name, json) in [
        ("exponent-python", true),
        ("huge-exponent", true),
        ("huge-exponent-negative", true),
        ("decimal-not-json-leading-dot", false),
        ("decimal-not-json-leading-plus", false),
        ("whitespace", false),
    ] {
        let text = std::str::from_utf8(seed(&files, name)).expect("UTF-8");
        assert_eq!(checks::is_json_number(text), json, "{name}");
        let accepted = json && matches!(of(name), Nanos(_));
        assert_eq!(Money::parse_json_number(text).is_ok(), accepted, "{name}");
    }
}

#[test]
fn config_corpus_replays() {
    let files = corpus("config");
    for (name, data) in &files {
        let input = ConfigInput::from_bytes(data);
        // Seeds are written as a format byte (0 YAML, 1 TOML) and the text, unmangled.
        assert_eq!(
            &input.to_bytes(),
            data,
            "{name}: not a format byte and UTF-8 text"
        );
        checks::config(&input).unwrap_or_else(|| {
            panic!("seed {name} is longer than MAX_CONFIG, the fuzzer skips it")
        });
    }
    let parse = |name: &str| {
        let input = ConfigInput::from_bytes(seed(&files, name));
        assert_eq!(
            input.toml,
            name.ends_with(".toml"),
            "{name}: wrong format byte"
        );
        let parsed = if input.toml {
            Config::from_toml_str(&input.text)
        } else {
            Config::from_yaml_str(&input.text)
        };
        assert_eq!(checks::config(&input), Some(parsed.is_ok()), "{name}");
        parsed
    };
    let providers = |c: &Config| {
        c.budgets
            .iter()
            .map(|b| format!("{} {} {}", b.name, b.limit, b.period))
            .collect::<Vec<_>>()
    };

    let c = parse("litellm-proxy.yaml").expect("litellm's own config file parses");
    assert_eq!(
        providers(&c),
        [
            "anthropic 15.5 30s",
            "azure 100 1mo",
            "openai 0.000000001 1d"
        ]
    );
    let c = parse("litellm-top-level.yaml").expect("top-level block parses");
    assert_eq!(providers(&c), ["anthropic 0.1 1h", "openai 1 1d"]);
    let c = parse("full-own-section.yaml").expect("our section parses");
    assert_eq!(c.node_id.as_deref(), Some("edge-7"));
    assert!(c.redis.is_some());
    let c = parse("json.yaml").expect("JSON is YAML");
    assert_eq!(providers(&c), ["openai 2.5 7d"]);
    let c = parse("own-section.toml").expect("TOML parses");
    assert_eq!(providers(&c), ["anthropic 0.1 1h", "openai 25 1w"]);
    assert_eq!(c.node_id.as_deref(), Some("edge-1"));
    let c = parse("router-settings.toml").expect("TOML under router_settings parses");
    assert_eq!(providers(&c), ["openai 3.75 30s"]);

    let e = parse("typo-in-own-section.yaml").expect_err("unknown key is refused");
    assert!(e.to_string().contains("max_dely"), "{e}");
    let e = parse("bad-period.toml").expect_err("bad period is refused");
    assert!(e.to_string().contains("1fortnight"), "{e}");

    // Configs that used to mean something else silently.
    for (seed, culprit) in [
        ("duplicate-provider.yaml", "\"openai\""),
        ("duplicate-prefix.yaml", "\"llama-\""),
        ("duplicate-table.toml", "duplicate"),
        ("null-limit.yaml", "got null"),
        ("slash-provider.yaml", "\"azure/gpt-4o\""),
        ("os-environ-unset.yaml", "PROVIDER_BUDGETS_FUZZ_UNSET"),
    ] {
        let e = parse(seed).expect_err(seed);
        assert!(e.to_string().contains(culprit), "{seed}: {e}");
    }
    let c = parse("os-environ-path.yaml").expect("PATH is set, the URL may come from --redis");
    assert_eq!(
        c.storage.dir.as_deref(),
        std::env::var_os("PATH")
            .as_deref()
            .map(std::path::Path::new)
    );
    assert_eq!(c.redis.map(|r| r.url), Some(String::new()));
}

#[test]
fn value_decode_corpus_replays() {
    if std::env::var_os("PROVIDER_BUDGETS_WRITE_SEEDS").is_some() {
        return; // the seeds are being rewritten by the test below
    }
    let files = corpus("value_decode");
    for (name, data) in &files {
        checks::value_decode(data)
            .unwrap_or_else(|| panic!("seed {name} is longer than MAX_VALUE, the fuzzer skips it"));
    }
    for good in [
        "own-openai-1d",
        "own-key-openai-1d",
        "peers-two-nodes",
        "high-water-record",
    ] {
        assert!(
            fuzz_decode_value(seed(&files, good)),
            "{good} no longer decodes"
        );
    }
    for bad in ["bad-version", "huge-length", "trailing-byte"] {
        assert!(!fuzz_decode_value(seed(&files, bad)), "{bad} is accepted");
    }
}

/// The seeds `own-openai-1d` (value) and `own-key-openai-1d` (key) are what a limiter writes
/// for $12.5 recorded to a daily openai budget on 2024-11-26; `peers-two-nodes` and the
/// garbage seeds are derived from them.
#[test]
fn value_seeds_are_what_the_store_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at: Timestamp = "2024-11-26T12:00:00Z".parse().expect("timestamp");
    let config = Config::from_yaml_str(
        "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n",
    )
    .expect("config")
    .data_dir(dir.path());
    let limiter = Limiter::builder(config)
        .clock(Arc::new(FakeClock::new(at)))
        .open()
        .expect("limiter opens");
    limiter
        .charge(Spend::provider("openai", "12.5".parse().expect("money")).at(at))
        .expect("recorded")
        .wait()
        .expect("recorded");
    drop(limiter);

    let db = sled::Config::new()
        .path(dir.path())
        .open()
        .expect("sled opens");
    let own = db.open_tree("own").expect("own tree");
    let entries: Vec<_> = own.iter().collect::<Result<_, _>>().expect("own entries");
    // Keys starting with 0xff are reserved (the journal's batch sequence), not windows.
    let entries: Vec<_> = entries
        .into_iter()
        .filter(|(k, _)| k.first() != Some(&0xff))
        .collect();
    assert_eq!(entries.len(), 1, "one window was written");
    let (key, value) = (entries[0].0.to_vec(), entries[0].1.to_vec());
    assert!(fuzz_decode_value(&key) && fuzz_decode_value(&value));

    // A peers value: the same version byte and leading `end`, then (node, total) pairs.
    let mut peers = value.clone();
    let own_total_len = value.len() - 1 - varint_len(&value[1..]);
    peers.truncate(value.len() - own_total_len);
    peers.push(2); // two nodes
    for (node, total) in [("edge-1", 5u8), ("edge-2", 7)] {
        peers.push(node.len() as u8);
        peers.extend_from_slice(node.as_bytes());
        peers.push(total);
    }
    assert!(fuzz_decode_value(&peers));
    let mut bad_version = value.clone();
    bad_version[0] = 2;
    let mut trailing = value.clone();
    trailing.push(0);
    let mut huge_length = vec![1];
    huge_length.extend_from_slice(&[0xff; 10]);

    let expected = [
        ("own-openai-1d", value),
        ("own-key-openai-1d", key),
        ("peers-two-nodes", peers),
        ("bad-version", bad_version),
        ("trailing-byte", trailing),
        ("huge-length", huge_length),
    ];
    let dir = corpus_dir("value_decode");
    let write = std::env::var_os("PROVIDER_BUDGETS_WRITE_SEEDS").is_some();
    for (name, bytes) in expected {
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(&path, &bytes).expect("seed written");
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert_eq!(
            committed,
            bytes,
            "{} differs from what the store writes now; if the format changed on purpose, \
             regenerate with PROVIDER_BUDGETS_WRITE_SEEDS=1 cargo test -p provider-budgets --test model fuzz_corpus",
            path.display()
        );
    }
}

/// Length of the bincode varint at the start of `b` (`standard()` config).
fn varint_len(b: &[u8]) -> usize {
    match b.first() {
        Some(0xfb) => 3,
        Some(0xfc) => 5,
        Some(0xfd) => 9,
        Some(0xfe) => 17,
        _ => 1,
    }
}
