//! Who is calling the identity service, as the tailnet knows it.
//!
//! A request reaches the identity service over the tailnet from a tailnet
//! address. Cryptokey routing guarantees that address belongs to the peer
//! whose key authenticated the packets, and the control server's state says
//! which node that key is. [`Caller`] is that answer; the service resolves it
//! once per connection and hands it to every endpoint (workload tokens, the
//! OIDC provider), which never look at addresses themselves.

use crate::control::proto::NodeInfo;
use serde_json::Value;
use std::collections::BTreeMap;

/// The node (and, for user-owned nodes, the person) behind a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The node as the map shows it (ID, name, addresses, node key, tags, owner).
    pub node: NodeInfo,
    /// The owning user's login when the node is user-owned (no tags);
    /// `None` for tagged nodes, which cannot sign in as a person.
    pub user: Option<User>,
    /// Application capabilities the policy grants this caller on the
    /// identity service's node, by capability name (values as the grants
    /// wrote them, in grant order). Empty when no policy is set.
    pub capabilities: BTreeMap<String, Vec<Value>>,
    /// Whether a policy is set at all (no policy: everything is allowed,
    /// including any workload-token audience).
    pub policy_set: bool,
}

/// A person who owns a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The login (an e-mail address for users created as such).
    pub login: String,
    /// The display name.
    pub display_name: String,
    /// The policy's groups (`group:name`) the user is in.
    pub groups: Vec<String>,
}

impl Caller {
    /// The values granted for one capability (empty when not granted).
    pub fn capability(&self, name: &str) -> &[Value] {
        self.capabilities.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}
