//! Helpers live in the test binary.
