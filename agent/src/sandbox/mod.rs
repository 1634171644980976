//! sandbox (in progress)

pub mod archive;
mod hcl;
