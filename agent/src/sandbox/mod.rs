//! sandbox (in progress)
