//! tasks (in progress)
