//! The image registry: short-lived, repository-scoped tokens for the distribution registry's `token`
//! auth, and merging per-platform images into one OCI image index.
