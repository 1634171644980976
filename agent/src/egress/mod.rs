//! egress (in progress)
