//! Reservation estimates made from the request (`ReserveRequest::estimate_from`,
//! `Limiter::estimate`): the prompt's tokens (counted exactly for OpenAI models, by the
//! conservative rule for others), `max_tokens` (else the catalog's `max_output_tokens`),
//! priced by the catalog for each candidate's own model; capped per budget by `max_estimate`;
//! an unpriced model under `deny` reserves nothing.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use provider_budgets::{
    Catalog, Counting, EstimateInput, FakeClock, Limiter, Message, Money, Prompt, RecordError,
    ReserveError, Scope, StatusQuery, Usage,
};

fn clock() -> FakeClock {
    FakeClock::new("2024-06-01T12:00:00Z".parse().unwrap())
}

fn open(yaml: &str, dir: &tempfile::TempDir) -> Limiter {
    support::open(support::yaml(yaml, dir.path()), &clock())
}

fn chat() -> Prompt {
    Prompt::Messages(vec![
        Message::new("system", "You are helpful."),
        Message::new("user", "Hello, world!"),
    ])
}

fn price(model: &str, input: u64, output: u64) -> Money {
    Catalog::builtin()
        .unwrap()
        .price(model, &Usage::new(input, output))
        .unwrap()
        .cost
}

const BUDGETS: &str = "provider_budgets:
  budgets:
    - {provider: openai, limit: 100, period: 1d}
    - {provider: anthropic, limit: 100, period: 1d}
    - {provider: openai, unit: tokens, limit: 1000000, period: 1d}
";

#[test]
fn an_openai_chat_is_counted_exactly_and_priced_with_its_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(BUDGETS, &dir);
    let e = l
        .estimate("openai/gpt-4o", &EstimateInput::new(chat(), Some(500)))
        .unwrap();
    // As litellm's token_counter counts it: 19 (3 per message, role, content, 3 for the reply).
    assert_eq!(e.counting, Counting::Exact("o200k_base"));
    assert_eq!(e.estimate.input_tokens, Some(19));
    assert_eq!(e.estimate.output_tokens, Some(500));
    assert_eq!(e.estimate.tokens, Some(519));
    assert_eq!(e.estimate.usd, price("gpt-4o", 19, 500));
    // No max_tokens: the catalog's max_output_tokens for the model.
    let e = l
        .estimate("gpt-4o", &EstimateInput::new(Prompt::Tokens(10), None))
        .unwrap();
    let max = Catalog::builtin()
        .unwrap()
        .max_output_tokens("gpt-4o")
        .unwrap();
    assert!(max >= 4096, "{max}");
    assert_eq!(e.estimate.output_tokens, Some(max));
    assert_eq!(e.counting, Counting::Given);
}

#[test]
fn each_candidate_holds_the_price_of_its_own_model() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(BUDGETS, &dir);
    let input = EstimateInput::new(chat(), Some(1000));
    let candidates = ["anthropic/claude-haiku-4-5", "openai/gpt-4o"];
    let r = l
        .reserve(&candidates, Money::ZERO)
        .estimate_from(&input)
        .wait()
        .unwrap();
    assert_eq!(r.deployment_index(), 0);
    let e = r.estimates();
    let conservative = l.estimate(candidates[0], &input).unwrap();
    assert_eq!(conservative.counting, Counting::Conservative);
    assert_eq!(e, conservative.estimate);
    assert!(
        e.input_tokens.unwrap() >= 19,
        "never fewer than OpenAI counts: {e:?}"
    );
    let held = |name: &str| {
        l.status(StatusQuery::all().scope(Scope::Provider))
            .into_iter()
            .find(|s| s.name == name && s.unit == provider_budgets::Unit::Usd)
            .unwrap()
            .reserved
    };
    assert_eq!(held("anthropic"), e.usd);
    assert_eq!(held("openai"), Money::ZERO);
    r.release().unwrap();
    // The openai candidate holds its own price, in dollars and in tokens.
    let r = l
        .reserve(&candidates[1..], Money::ZERO)
        .estimate_from(&input)
        .wait()
        .unwrap();
    assert_eq!(held("openai"), price("gpt-4o", 19, 1000));
    let tokens = l
        .status(StatusQuery::all().scope(Scope::Provider))
        .into_iter()
        .find(|s| s.unit == provider_budgets::Unit::Tokens)
        .unwrap();
    assert_eq!(tokens.reserved.as_nanos(), 1019);
    drop(r);
}

#[test]
fn max_estimate_caps_what_a_budget_holds_and_not_what_a_commit_counts() {
    let yaml = "provider_budgets:
  budgets:
    - {provider: openai, limit: 1, period: 1d, max_estimate: 0.01}
    - {provider: openai, unit: tokens, limit: 100000, period: 1d, max_estimate: 2000}
";
    let dir = tempfile::tempdir().unwrap();
    let l = open(yaml, &dir);
    let input = EstimateInput::new(Prompt::Tokens(50_000), Some(50_000));
    let r = l
        .reserve(&["gpt-4o"], Money::ZERO)
        .estimate_from(&input)
        .wait()
        .unwrap();
    let rows = l.status(StatusQuery::all());
    let held: Vec<u64> = rows.iter().map(|s| s.reserved.as_nanos()).collect();
    assert_eq!(held, vec![10_000_000, 2000], "capped: {rows:?}");
    r.commit_usage("0.3".parse().unwrap(), Usage::new(3000, 0))
        .unwrap()
        .wait()
        .unwrap();
    let spent: Vec<u64> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| s.spend.as_nanos())
        .collect();
    assert_eq!(spent, vec![300_000_000, 3000], "the actual counts in full");
    let msg = provider_budgets::Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {provider: openai, unit: tokens, limit: 10, period: 1d, max_estimate: 2.5}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("max_estimate") && msg.contains("whole number"),
        "{msg}"
    );
}

#[test]
fn an_unpriced_model_under_deny_reserves_nothing() {
    let yaml = "provider_budgets:
  pricing: {unpriced: deny}
  budgets:
    - {provider: openai, limit: 1, period: 1d}
";
    let dir = tempfile::tempdir().unwrap();
    let l = open(yaml, &dir);
    let input = EstimateInput::new(chat(), Some(10));
    let err = l
        .reserve(&["openai/no-such-model"], Money::ZERO)
        .estimate_from(&input)
        .wait()
        .unwrap_err();
    assert!(
        matches!(err, ReserveError::Record(RecordError::Unpriced(_))),
        "{err:?}"
    );
    assert_eq!(l.health().open_reservations, 0);
    assert_eq!(l.status(StatusQuery::all())[0].reserved, Money::ZERO);
}

/// One line of `tests/fixtures/estimate_accuracy.jsonl` (made by
/// `scripts/estimate_fixtures.py`, which says how its usage was chosen).
#[derive(serde::Deserialize)]
struct Case {
    model: String,
    messages: Vec<Slice>,
    max_tokens: u64,
    usage: CaseUsage,
    whole_range_output: u64,
}

#[derive(serde::Deserialize)]
struct Slice {
    role: String,
    start: usize,
    len: usize,
}

#[derive(serde::Deserialize)]
struct CaseUsage {
    input: u64,
    output: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Issue 22's target, on ≥ 1 000 generated requests across the catalog: the estimate of
/// `/v1/reserve` (messages counted by our rule for the model, plus `max_tokens` of output)
/// covers the cost of the usage litellm counts for the request in ≥ 99 % of them, and the
/// median estimate is ≤ 1.5× that cost. A rule that under-counts prompts (one token per four
/// bytes, say) misses the first; one that ignores `max_tokens` for the catalog's
/// `max_output_tokens` misses the second.
#[test]
fn estimates_cover_the_actual_cost_of_the_fixtures() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let corpus: Vec<char> = std::fs::read_to_string(root.join("estimate_corpus.txt"))
        .unwrap()
        .chars()
        .collect();
    let lines = std::fs::read_to_string(root.join("estimate_accuracy.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let l = open(BUDGETS, &dir);
    let catalog = Catalog::builtin().unwrap();
    let (mut covered, mut ratios, mut whole_range, mut prompt_ratios) = (0, vec![], vec![], vec![]);
    let mut short = vec![];
    for line in lines.lines() {
        let case: Case = serde_json::from_str(line).unwrap();
        let messages = case.messages.iter().map(|s| {
            let text: String = corpus[s.start..(s.start + s.len).min(corpus.len())]
                .iter()
                .collect();
            Message::new(s.role.clone(), text)
        });
        let input = EstimateInput::new(Prompt::Messages(messages.collect()), Some(case.max_tokens));
        let e = l.estimate(&case.model, &input).unwrap();
        let cost = |output| {
            let usage = Usage::new(case.usage.input, output);
            catalog.price(&case.model, &usage).unwrap().cost.as_nanos()
        };
        let (estimate, actual) = (e.estimate.usd.as_nanos(), cost(case.usage.output));
        if estimate >= actual {
            covered += 1;
        } else {
            short.push(format!(
                "{} ({:?}): {estimate} < {actual}",
                case.model, e.counting
            ));
        }
        ratios.push(estimate as f64 / actual.max(1) as f64);
        whole_range.push(estimate as f64 / cost(case.whole_range_output).max(1) as f64);
        let prompt = e.estimate.input_tokens.unwrap();
        prompt_ratios.push(prompt as f64 / case.usage.input.max(1) as f64);
    }
    let n = ratios.len();
    assert!(n >= 1000, "{n} fixtures");
    let (median, whole, prompt) = (median(ratios), median(whole_range), median(prompt_ratios));
    println!("not covered: {short:#?}");
    println!(
        "{n} fixtures: estimate >= actual in {covered} ({:.2} %); median estimate/actual {median:.3} \
         (outputs over the whole range of max_tokens: {whole:.3}); median prompt tokens ours/litellm {prompt:.3}",
        100.0 * covered as f64 / n as f64
    );
    assert!(
        covered * 100 >= n * 99,
        "covered {covered} of {n}: {short:#?}"
    );
    assert!(median <= 1.5, "median estimate/actual {median}");
}
