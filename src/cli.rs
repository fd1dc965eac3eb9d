//! The `provider-budgets` command line (feature `cli`); the binary only calls [`run`].
