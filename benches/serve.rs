//! Load benchmark of the HTTP sidecar (see below).

fn main() {}
