//! The kafka binder: in progress.
