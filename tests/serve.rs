//! HTTP sidecar tests (filled in below).
