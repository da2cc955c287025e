//! The redis binder: in progress.
