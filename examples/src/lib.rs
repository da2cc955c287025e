//! Examples: filled by the examples issue.
