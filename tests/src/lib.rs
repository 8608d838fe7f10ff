//! troupe's end-to-end tests live in `tests/e2e`; this library is empty.
