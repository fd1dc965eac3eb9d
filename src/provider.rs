//! Provider resolution.
