//! The Linux data plane driving `wiremesh-core`.
