//! Benchmark support for wiremesh.
