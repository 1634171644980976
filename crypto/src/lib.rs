//! delegate-crypto (in progress)
