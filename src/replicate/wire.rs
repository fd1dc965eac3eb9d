//! Redis wire protocol for one sync round.
