//! Models and parsers: property tests comparing the limiter with a simple model, and the
//! committed fuzz corpus replayed through the fuzz targets' checks.

#![allow(clippy::unwrap_used)]

mod fuzz_corpus;
mod proptests;
