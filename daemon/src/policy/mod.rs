//! The tailnet policy: a Tailscale-style policy file in huJSON (`groups`,
//! `tagOwners`, `hosts`, `acls`, `grants`, `tests`, autogroups), checked,
//! tested and compiled into each node's inbound packet filter, the peers it
//! may see and the application capabilities granted to it. See
//! docs/policy.md for what is supported and how it behaves.
//!
//! * [`hujson`]: the file syntax, with positions for every error.
//! * [`model`]: the sections, their checks, and what is refused by name.
//! * [`compile`]: policy plus nodes to per-node filters, peers and capabilities.
//! * [`wire`]: the compiled policy as the network map carries it.
//! * [`check`]: parse, check and run the policy's `tests` (what the control
//!   server does before it accepts a policy, and `wiremesh policy check`).

pub mod compile;
mod error;
pub mod hujson;
pub mod model;
pub mod wire;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_headscale;

pub use compile::{compile, run_tests, CapGrant, Node, NodePolicy};
pub use error::{ErrorKind, PolicyError};
pub use model::Policy;

/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

/// Parses and checks a policy file without running its tests.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(PolicyError {
            pos: None,
            kind: ErrorKind::Invalid,
            message: format!("the policy is larger than {MAX_POLICY_BYTES} bytes"),
        });
    }
    let doc = hujson::parse(text).map_err(|e| PolicyError {
        pos: Some(e.pos),
        kind: ErrorKind::Syntax,
        message: e.message,
    })?;
    model::from_value(&doc)
}

/// Parses, checks and tests a policy file: what must pass before a policy
/// is accepted.
pub fn check(text: &str) -> Result<Policy, PolicyError> {
    let policy = parse(text)?;
    run_tests(&policy)?;
    Ok(policy)
}
