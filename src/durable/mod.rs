//! The data dir: the corrections' audit trail (`audit`), the runtime budget definitions
//! (`definitions`), the value codec (`codec`), the sled layout (`store`) and its error
//! (`error`), the high-water record (`highwater`), a charge's budget windows (`items`), the
//! journal thread that makes spend durable (`journal`), the idempotency records it writes with keyed spends (`idempotency`), and what
//! a start (or a repair) reads back from disk (`restore`).

pub(crate) mod audit;
pub(crate) mod codec;
pub(crate) mod definitions;
pub(crate) mod error;
pub(crate) mod event;
pub(crate) mod highwater;
pub(crate) mod idempotency;
pub(crate) mod items;
pub(crate) mod journal;
pub(crate) mod restore;
pub(crate) mod store;
