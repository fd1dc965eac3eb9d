//! The vocabulary every other layer speaks: money, windows, the clock, budgets and their
//! identity, and text helpers. Nothing here does I/O or imports another layer.

pub(crate) mod budget;
pub(crate) mod clock;
pub(crate) mod identity;
pub(crate) mod key;
pub(crate) mod money;
pub(crate) mod prefixes;
pub(crate) mod slots;
pub(crate) mod text;
pub(crate) mod unit;
pub(crate) mod window;
