//! End-to-end tests of the built binaries live in tests/tests/; this crate has no code of its own.
