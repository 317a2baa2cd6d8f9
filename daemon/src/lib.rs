//! Coordination, policy and identity for wiremesh; for now the standalone
//! interface (`wiremeshd interface`) and its configuration file.
#![warn(missing_docs)]

/// Writes a line to standard output like `println!`, except that a closed
/// or failing standard output (its reader went away) is ignored instead of
/// panicking: a running daemon's work must not depend on anyone reading
/// its log lines.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub mod conf;
pub mod control;
pub mod identity;
pub mod interface;
pub mod node;
pub mod policy;
pub mod relay;
