//! What a budget counts: its [`Unit`], and the [`Usage`] of a call that token and request
//! budgets take their amounts from.
//!
//! Every amount on disk, in memory and on the wire is a `u64` in its budget's unit
//! (nano-dollars for [`Unit::Usd`], tokens, requests or held slots otherwise), so the journal,
//! replication and grants carry no unit logic: only the charge path asks a budget's unit
//! which amount of a spend it counts ([`Unit::amount`]).

use std::fmt;

use crate::model::money::Money;

/// What a budget counts (`unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Unit {
    /// Dollars (the cost of each spend). The default.
    #[default]
    Usd,
    /// Input plus output tokens.
    Tokens,
    /// Input (prompt) tokens, cached ones included.
    InputTokens,
    /// Output (completion) tokens, reasoning ones included.
    OutputTokens,
    /// One per spend or commit.
    Requests,
    /// Requests in flight: held from `reserve` to commit, release or expiry; no period.
    Concurrent,
}

impl Unit {
    /// Every unit, in the order of their codes.
    pub const ALL: [Unit; 6] = [
        Unit::Usd,
        Unit::Tokens,
        Unit::InputTokens,
        Unit::OutputTokens,
        Unit::Requests,
        Unit::Concurrent,
    ];

    /// `usd`, `tokens`, `input_tokens`, `output_tokens`, `requests` or `concurrent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Usd => "usd",
            Unit::Tokens => "tokens",
            Unit::InputTokens => "input_tokens",
            Unit::OutputTokens => "output_tokens",
            Unit::Requests => "requests",
            Unit::Concurrent => "concurrent",
        }
    }

    /// Whether its amounts are whole counts (every unit but USD): its limit is a whole
    /// number, and status shows integers, never dollars.
    pub fn is_count(self) -> bool {
        self != Unit::Usd
    }

    /// Whether it counts tokens (needs a spend's usage).
    pub fn is_tokens(self) -> bool {
        matches!(self, Unit::Tokens | Unit::InputTokens | Unit::OutputTokens)
    }

    /// A compact code (the view keeps it in a byte).
    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    /// The unit of a [`Unit::code`]; USD for anything else.
    pub(crate) fn from_code(code: u8) -> Unit {
        Unit::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or_default()
    }

    /// The amount a spend of `cost` and `usage` counts in a budget of this unit: `None` when
    /// the spend lacks what the unit needs (token units without usage): such a budget is
    /// left uncounted and reported, never guessed. [`Unit::Concurrent`] counts nothing on a
    /// spend (its slots are held by reservations).
    #[inline]
    pub fn amount(self, cost: Money, usage: Option<&Usage>) -> Option<u64> {
        match self {
            Unit::Usd => Some(cost.as_nanos()),
            Unit::Requests => Some(1),
            Unit::Concurrent => Some(0),
            Unit::Tokens => usage.map(|u| u.input_tokens.saturating_add(u.output_tokens)),
            Unit::InputTokens => usage.map(|u| u.input_tokens),
            Unit::OutputTokens => usage.map(|u| u.output_tokens),
        }
    }

    /// The suffix of a budget's period part (`~tokens`; nothing for USD, whose keys are those
    /// of the releases before units).
    pub(crate) fn key_suffix(self) -> &'static str {
        match self {
            Unit::Usd => "",
            Unit::Tokens => "~tokens",
            Unit::InputTokens => "~input_tokens",
            Unit::OutputTokens => "~output_tokens",
            Unit::Requests => "~requests",
            Unit::Concurrent => "~concurrent",
        }
    }

    /// `amount` in this unit as text: dollars for USD (`0.25`), the whole count otherwise.
    pub fn format_amount(self, amount: u64) -> String {
        match self {
            Unit::Usd => Money::from_nanos(amount).to_string(),
            _ => amount.to_string(),
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Unit {
    type Err = String;
    fn from_str(s: &str) -> Result<Unit, String> {
        Unit::ALL
            .into_iter()
            .find(|u| u.as_str() == s)
            .ok_or_else(|| {
                "expected `usd`, `tokens`, `input_tokens`, `output_tokens`, `requests` or `concurrent`"
                    .into()
            })
    }
}

/// Token counts of one call, as litellm's `Usage` counts them.
///
/// `input_tokens` is the whole prompt **including** the cached tokens (`cache_read_tokens`,
/// `cache_creation_tokens`), as OpenAI's `prompt_tokens` and litellm's `Usage.prompt_tokens`
/// count it; `output_tokens` is the whole completion **including** `reasoning_tokens`. The
/// parts are billed at their own rates and the rest at the input (output) rate. Parts larger
/// than their whole leave nothing at the plain rate (litellm clamps the same way); they are
/// still billed in full at their own rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input_tokens: u64,
    /// Completion tokens, reasoning ones included.
    pub output_tokens: u64,
    /// Prompt tokens read from the provider's cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's cache.
    pub cache_creation_tokens: u64,
    /// Completion tokens spent on reasoning.
    pub reasoning_tokens: u64,
}

/// A borrowed usage where one is taken by value (`Spend::deployment_usage(&d, &usage)`).
impl From<&Usage> for Usage {
    fn from(u: &Usage) -> Usage {
        *u
    }
}

impl Usage {
    /// `input` prompt tokens and `output` completion tokens, nothing cached, no reasoning.
    pub const fn new(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_read_tokens: 0,
            cache_creation_tokens: 0,
            reasoning_tokens: 0,
        }
    }

    /// With `tokens` read from the cache (builder style; part of `input_tokens`).
    pub const fn cache_read(mut self, tokens: u64) -> Usage {
        self.cache_read_tokens = tokens;
        self
    }

    /// With `tokens` written to the cache (builder style; part of `input_tokens`).
    pub const fn cache_creation(mut self, tokens: u64) -> Usage {
        self.cache_creation_tokens = tokens;
        self
    }

    /// With `tokens` of reasoning (builder style; part of `output_tokens`).
    pub const fn reasoning(mut self, tokens: u64) -> Usage {
        self.reasoning_tokens = tokens;
        self
    }
}

/// What a reservation holds ([`Limiter::reserve`](crate::Limiter::reserve)): dollars for
/// USD budgets and, for token budgets, the tokens the call may use. Requests and concurrent
/// slots are held as 1 whatever the estimate. A `Money` is an estimate in dollars only.
///
/// A token budget takes its own kind when given (`input_tokens`, `output_tokens`), else
/// `tokens` for a `tokens` budget (else the sum of the kinds given); a kind not given holds
/// nothing (never guessed): the budget still refuses once it is spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Estimate {
    /// Dollars.
    pub usd: Money,
    /// Input plus output tokens.
    pub tokens: Option<u64>,
    /// Input tokens.
    pub input_tokens: Option<u64>,
    /// Output tokens.
    pub output_tokens: Option<u64>,
}

impl From<Money> for Estimate {
    fn from(usd: Money) -> Estimate {
        Estimate {
            usd,
            ..Estimate::default()
        }
    }
}

impl Estimate {
    /// An estimate of `usd` dollars and `tokens` tokens in all.
    pub fn new(usd: Money, tokens: Option<u64>) -> Estimate {
        Estimate {
            usd,
            tokens,
            ..Estimate::default()
        }
    }

    /// With `input` and `output` tokens (builder style).
    pub fn split(mut self, input: Option<u64>, output: Option<u64>) -> Estimate {
        self.input_tokens = input;
        self.output_tokens = output;
        self
    }

    /// The amount held in a budget of `unit`.
    #[inline]
    pub fn held(&self, unit: Unit) -> u64 {
        let sum = || match (self.input_tokens, self.output_tokens) {
            (None, None) => None,
            (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
        };
        match unit {
            Unit::Usd => self.usd.as_nanos(),
            Unit::Requests | Unit::Concurrent => 1,
            Unit::Tokens => self.tokens.or_else(sum).unwrap_or(0),
            Unit::InputTokens => self.input_tokens.unwrap_or(0),
            Unit::OutputTokens => self.output_tokens.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_back_and_count_their_own_amount() {
        for u in Unit::ALL {
            assert_eq!(u.as_str().parse::<Unit>(), Ok(u));
            assert_eq!(Unit::from_code(u.code()), u);
        }
        assert!("token".parse::<Unit>().is_err());
        let cost = Money::from_nanos(7);
        let usage = Usage::new(100, 20);
        let counted: Vec<_> = Unit::ALL.map(|u| u.amount(cost, Some(&usage))).to_vec();
        assert_eq!(
            counted,
            [Some(7), Some(120), Some(100), Some(20), Some(1), Some(0)]
        );
        let without: Vec<_> = Unit::ALL.map(|u| u.amount(cost, None)).to_vec();
        assert_eq!(without, [Some(7), None, None, None, Some(1), Some(0)]);
        assert_eq!(Unit::Tokens.format_amount(1500), "1500");
        assert_eq!(Unit::Usd.format_amount(1_500_000_000), "1.5");
    }

    #[test]
    fn estimates_hold_each_unit_its_own_amount() {
        let e = Estimate::from(Money::from_nanos(5));
        let held: Vec<_> = Unit::ALL.map(|u| e.held(u)).to_vec();
        assert_eq!(held, [5, 0, 0, 0, 1, 1]);
        let e = Estimate::new(Money::ZERO, None).split(Some(30), Some(70));
        assert_eq!(e.held(Unit::Tokens), 100);
        assert_eq!(e.held(Unit::InputTokens), 30);
        let e = Estimate::new(Money::ZERO, Some(500)).split(Some(30), None);
        assert_eq!(e.held(Unit::Tokens), 500);
        assert_eq!(e.held(Unit::OutputTokens), 0);
    }
}
