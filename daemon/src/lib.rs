//! Coordination, policy and identity for wiremesh.
