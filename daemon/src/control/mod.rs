//! The coordination server (`wiremeshd control`), its protocol, and the
//! client the node agent and the CLI use. See docs/control.md.

pub mod alloc;
pub mod client;
pub mod db;
pub mod federation;
pub mod federation_store;
pub mod identity_store;
pub mod proto;
pub mod provider_store;
pub mod routes;
pub mod server;
pub mod store;
pub mod tls;

use proto::ErrorBody;

/// An API failure: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Machine-readable reason.
    pub code: String,
    /// A sentence for people.
    pub message: String,
}

impl ApiError {
    /// Any status and code.
    pub fn new(status: u16, code: &str, message: &str) -> Self {
        ApiError { status, code: code.into(), message: message.into() }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: String) -> Self {
        ApiError { status: 400, code: "bad_request".into(), message }
    }

    /// 401: missing or wrong credentials.
    pub fn unauthorized(message: &str) -> Self {
        Self::new(401, "unauthorized", message)
    }

    /// 404: no such thing.
    pub fn not_found(message: &str) -> Self {
        Self::new(404, "not_found", message)
    }

    /// 409: the request clashes with the state.
    pub fn conflict(message: String) -> Self {
        ApiError { status: 409, code: "conflict".into(), message }
    }

    /// 500: our fault.
    pub fn internal(message: String) -> Self {
        ApiError { status: 500, code: "internal".into(), message }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code.clone(), error: self.message.clone() }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, HTTP {})", self.message, self.code, self.status)
    }
}

impl std::error::Error for ApiError {}
