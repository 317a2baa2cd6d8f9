//! Coordination, policy and identity for wiremesh; for now the standalone
//! interface (`wiremeshd interface`) and its configuration file.
#![warn(missing_docs)]

pub mod conf;
pub mod control;
pub mod identity;
pub mod interface;
pub mod node;
pub mod policy;
pub mod relay;
