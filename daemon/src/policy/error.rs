//! Why a policy was refused. (Its own file, so that the fuzz target can
//! include the parser and the compiler without the rest of the daemon.)

use super::hujson::Pos;
use std::fmt;

/// What kind of problem a policy has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not huJSON.
    Syntax,
    /// A section or value is malformed or names something undefined.
    Invalid,
    /// Something wiremesh does not implement (refused rather than ignored).
    Unsupported,
    /// A test in `tests` failed.
    TestFailed,
}

impl ErrorKind {
    /// The machine-readable code the API answers with.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Syntax => "policy_syntax",
            ErrorKind::Invalid => "policy_invalid",
            ErrorKind::Unsupported => "policy_unsupported",
            ErrorKind::TestFailed => "policy_test_failed",
        }
    }
}

/// Why a policy was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Where in the file (none for the file as a whole).
    pub pos: Option<Pos>,
    /// What kind of problem.
    pub kind: ErrorKind,
    /// What, for people.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(f, "{p}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PolicyError {}
