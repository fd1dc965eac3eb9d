//! The data dir: the value codec and the sled layout (`store`), the high-water record
//! (`highwater`), the journal thread that makes spend durable (`journal`), and what a start
//! reads back from disk (`restore`).

pub(crate) mod codec;
pub(crate) mod highwater;
pub(crate) mod journal;
pub(crate) mod restore;
pub(crate) mod store;
