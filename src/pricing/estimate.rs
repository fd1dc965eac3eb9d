//! Reservation estimates from a request, before the call: its prompt (a token count, or its
//! messages, counted here) and its `max_tokens`, priced by the catalog.
//!
//! * **Prompt tokens.** Given as a count, taken as it is. Given as messages:
//!   - OpenAI models (those tiktoken knows: `gpt-4o`, `gpt-4.1`, `gpt-5`, `o1`/`o3`/`o4`,
//!     `gpt-4`, `gpt-3.5`, after a `provider/` prefix) are counted exactly with their encoding
//!     (`o200k_base`, `cl100k_base`) as OpenAI's cookbook counts a chat: 3 tokens per message,
//!     its role and content (and 1 more for a `name`), plus 3 that prime the reply;
//!   - every other model by the **conservative rule**: each role and content counted with
//!     `cl100k_base` and [`CONSERVATIVE_MARGIN_PERCENT`] added (rounded up), plus 4 per
//!     message and 3 for the reply. The tokenizers litellm ships for other models (Anthropic's,
//!     DeepSeek's) count at most 12 % more than `cl100k_base` on `tests/fixtures`' mixed
//!     corpus (English, code, JSON, six other languages); the margin covers that with room;
//!   - without the `tokenizer` feature, every model by the **byte rule**: one token per two
//!     UTF-8 bytes, rounded up, plus 4 per message and 3 for the reply. Tokenizers of current
//!     models average 3 to 4 bytes of English per token and about one token per CJK character
//!     (3 bytes), so it over-counts (about 2× on English);
//!   - a content part that is not text (an image, audio) counts [`NON_TEXT_PART_TOKENS`].
//! * **Output tokens**: the request's `max_tokens`, else the model's `max_output_tokens` in
//!   the catalog, else [`DEFAULT_MAX_OUTPUT_TOKENS`].
//! * **Price**: the catalog's price of that usage ([`Catalog::price`](super::Catalog::price),
//!   overrides and the `pricing.unpriced` policy included), rounded up to the nano-dollar.
//!
//! The estimate holds every unit: USD budgets hold its cost, token budgets its tokens (input,
//! output, both).

use crate::model::budget::model_part;
use crate::model::money::Money;
use crate::model::unit::Estimate;

/// What the conservative rule adds to a `cl100k_base` count, in percent. Why 30: the largest
/// excess of another tokenizer litellm ships over `cl100k_base` on the estimate fixtures is
/// 12 %, and published comparisons put current Claude tokenizers 15 to 30 % above it on
/// English. Larger would hold more than needed: the median estimate of the fixtures must stay
/// within 1.5× the cost.
pub const CONSERVATIVE_MARGIN_PERCENT: u64 = 30;

/// Output tokens assumed when neither the request nor the catalog says.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// Tokens counted for a content part that is not text (an image, audio): OpenAI's cost of a
/// high-detail 1024×1024 image (765) rounded up.
pub const NON_TEXT_PART_TOKENS: u64 = 1000;

/// One chat message, as far as counting its tokens goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`…
    pub role: String,
    /// Its text (the text parts joined).
    pub content: String,
    /// Its `name`, if any.
    pub name: Option<String>,
    /// Content parts that are not text (images, audio).
    pub other_parts: u64,
}

impl Message {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            ..Message::default()
        }
    }
}

/// A request's prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Prompt {
    /// Its token count, as the caller knows it.
    Tokens(u64),
    /// Its messages, counted here.
    Messages(Vec<Message>),
}

/// What an estimate is made from: the prompt and the most output tokens the call may use.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EstimateInput {
    /// The prompt.
    pub prompt: Prompt,
    /// The request's `max_tokens` (`max_completion_tokens`), if it sets one.
    pub max_tokens: Option<u64>,
}

impl EstimateInput {
    /// An estimate of `prompt` with at most `max_tokens` of output.
    pub fn new(prompt: Prompt, max_tokens: Option<u64>) -> EstimateInput {
        EstimateInput { prompt, max_tokens }
    }
}

/// How the prompt's tokens were counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Counting {
    /// Given by the caller.
    Given,
    /// Exactly, with this encoding (`o200k_base`, `cl100k_base`).
    Exact(&'static str),
    /// By the conservative rule (see the module docs).
    Conservative,
}

impl Counting {
    /// `given`, the encoding's name, or `conservative`.
    pub fn as_str(self) -> &'static str {
        match self {
            Counting::Given => "given",
            Counting::Exact(encoding) => encoding,
            Counting::Conservative => "conservative",
        }
    }
}

/// An estimate made from a request ([`Limiter::estimate`](crate::Limiter::estimate)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Estimated {
    /// What a reservation holds: the cost, and the input, output and total tokens.
    pub estimate: Estimate,
    /// How the prompt was counted.
    pub counting: Counting,
    /// How the cost was priced.
    pub source: super::PriceSource,
}

/// The prompt tokens of `prompt` for `model` and how they were counted.
pub fn prompt_tokens(model: &str, prompt: &Prompt) -> (u64, Counting) {
    let messages = match prompt {
        Prompt::Tokens(n) => return (*n, Counting::Given),
        Prompt::Messages(m) => m,
    };
    if let Some((name, count)) = exact::encoding(model_part(model)) {
        return (chat_tokens(messages, 3, 3, count), Counting::Exact(name));
    }
    let tokens = match exact::fallback() {
        Some(count) => chat_tokens(messages, 4, 3, |text| with_margin(count(text))),
        None => chat_tokens(messages, 4, 3, by_bytes),
    };
    (tokens, Counting::Conservative)
}

/// `n` plus [`CONSERVATIVE_MARGIN_PERCENT`], rounded up.
fn with_margin(n: u64) -> u64 {
    n.saturating_add(n.saturating_mul(CONSERVATIVE_MARGIN_PERCENT).div_ceil(100))
}

/// The tokens of a chat: `per_message` for each message plus its role, content and name,
/// plus `reply` (the tokens that prime the answer).
fn chat_tokens(
    messages: &[Message],
    per_message: u64,
    reply: u64,
    count: impl Fn(&str) -> u64,
) -> u64 {
    messages.iter().fold(reply, |sum, m| {
        let name = m.name.as_deref().map_or(0, |n| count(n).saturating_add(1));
        sum.saturating_add(per_message)
            .saturating_add(count(&m.role))
            .saturating_add(count(&m.content))
            .saturating_add(name)
            .saturating_add(m.other_parts.saturating_mul(NON_TEXT_PART_TOKENS))
    })
}

/// One token per two bytes, rounded up.
#[cfg_attr(feature = "tokenizer", allow(dead_code))]
fn by_bytes(text: &str) -> u64 {
    u64::try_from(text.len().div_ceil(2)).unwrap_or(u64::MAX)
}

/// The output tokens an estimate assumes.
pub(crate) fn output_tokens(max_tokens: Option<u64>, catalog: Option<u64>) -> u64 {
    max_tokens.or(catalog).unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS)
}

/// The estimate of `input` prompt and `output` completion tokens costing `cost`.
pub(crate) fn estimate(cost: Money, input: u64, output: u64) -> Estimate {
    Estimate::new(cost, Some(input.saturating_add(output))).split(Some(input), Some(output))
}

#[cfg(feature = "tokenizer")]
mod exact {
    use tiktoken_rs::tokenizer::Tokenizer;

    /// The encoding of an OpenAI model, by tiktoken's own table, and its counter.
    pub(super) fn encoding(model: &str) -> Option<(&'static str, impl Fn(&str) -> u64)> {
        let (name, bpe) = match tiktoken_rs::tokenizer::get_tokenizer(model)? {
            Tokenizer::O200kBase | Tokenizer::O200kHarmony => {
                ("o200k_base", tiktoken_rs::o200k_base_singleton())
            }
            Tokenizer::Cl100kBase => ("cl100k_base", tiktoken_rs::cl100k_base_singleton()),
            // Older encodings (p50k, r50k: completion models of 2022): the conservative rule.
            _ => return None,
        };
        Some((name, counter(bpe)))
    }

    /// The counter of the conservative rule: `cl100k_base`.
    pub(super) fn fallback() -> Option<impl Fn(&str) -> u64> {
        Some(counter(tiktoken_rs::cl100k_base_singleton()))
    }

    fn counter(bpe: &'static tiktoken_rs::CoreBPE) -> impl Fn(&str) -> u64 {
        move |text: &str| u64::try_from(bpe.count_ordinary(text)).unwrap_or(u64::MAX)
    }
}

#[cfg(not(feature = "tokenizer"))]
mod exact {
    /// A token counter.
    type Count = fn(&str) -> u64;

    /// Without the `tokenizer` feature no model is counted exactly.
    pub(super) fn encoding(_model: &str) -> Option<(&'static str, Count)> {
        None
    }

    /// Without the `tokenizer` feature the conservative rule counts bytes.
    pub(super) fn fallback() -> Option<Count> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(texts: &[(&str, &str)]) -> Prompt {
        Prompt::Messages(texts.iter().map(|(r, c)| Message::new(*r, *c)).collect())
    }

    #[test]
    fn given_counts_are_taken_and_other_models_count_conservatively() {
        assert_eq!(
            prompt_tokens("x", &Prompt::Tokens(42)),
            (42, Counting::Given)
        );
        // "user" 2 + "hello!" 3 + 4 per message + 3 for the reply.
        let p = chat(&[("user", "hello!")]);
        assert_eq!(
            prompt_tokens("anthropic/claude-sonnet-4", &p),
            (12, Counting::Conservative)
        );
        let mut image = Message::new("user", "");
        image.other_parts = 2;
        let p = Prompt::Messages(vec![image]);
        assert_eq!(prompt_tokens("mistral/x", &p).0, 3 + 4 + 2 + 2000);
        assert_eq!(output_tokens(None, None), DEFAULT_MAX_OUTPUT_TOKENS);
        assert_eq!(output_tokens(Some(5), Some(9)), 5);
        assert_eq!(output_tokens(None, Some(9)), 9);
    }

    #[cfg(feature = "tokenizer")]
    #[test]
    fn openai_models_count_as_the_cookbook_counts_a_chat() {
        // tiktoken: "You are helpful." is 4 tokens in o200k, "Hello, world!" 4; roles 1 each.
        let p = chat(&[("system", "You are helpful."), ("user", "Hello, world!")]);
        let (n, how) = prompt_tokens("openai/gpt-4o", &p);
        assert_eq!(how, Counting::Exact("o200k_base"));
        assert_eq!(n, 3 + (3 + 1 + 4) + (3 + 1 + 4));
        let (_, how) = prompt_tokens("gpt-4-0613", &p);
        assert_eq!(how, Counting::Exact("cl100k_base"));
    }
}
