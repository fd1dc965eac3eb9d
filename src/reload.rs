//! [`Limiter::reload`]: a new configuration for a running limiter.

use crate::config::Config;
use crate::error::Error;
use crate::limiter::Limiter;

impl Limiter {
    /// Applies a new configuration (placeholder: not implemented yet on this branch).
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub fn reload(&self, config: Config) -> Result<(), Error> {
        drop(config);
        Err(Error::Replication("reload is not implemented yet".into()))
    }
}
