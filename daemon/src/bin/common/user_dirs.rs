//! Where a node agent run by an ordinary user keeps its state and its local
//! API socket when not told: the XDG Base Directory places, so
//! `wiremeshd node --userspace` and `wiremesh status` need no flags and no
//! root-owned directory. Shared by both binaries (included as source; the
//! library's `node::local::default_socket` is the root default).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The agent's socket name inside its runtime or state directory.
pub const SOCKET_NAME: &str = "api.sock";

/// A user's default places for the node agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDirs {
    /// `$XDG_STATE_HOME/wiremesh`, else `$HOME/.local/state/wiremesh`.
    pub state: PathBuf,
    /// `$XDG_RUNTIME_DIR/wiremesh/api.sock`, else `api.sock` in the state directory.
    pub socket: PathBuf,
}

/// The variable's value if it is an absolute path (the XDG specification
/// says a relative one is invalid and must be ignored).
fn absolute(env: &impl Fn(&str) -> Option<OsString>, name: &str) -> Option<PathBuf> {
    env(name).map(PathBuf::from).filter(|p| p.is_absolute())
}

impl UserDirs {
    /// The places from the environment `env` gives; `state` overrides the
    /// state directory (the socket then falls back into it). An error names
    /// the flag to pass when no place can be found.
    pub fn from_env(env: impl Fn(&str) -> Option<OsString>, state: Option<&Path>) -> Result<UserDirs, String> {
        let state = match state {
            Some(s) => s.to_path_buf(),
            None => match (absolute(&env, "XDG_STATE_HOME"), absolute(&env, "HOME")) {
                (Some(x), _) => x.join("wiremesh"),
                (None, Some(home)) => home.join(".local/state/wiremesh"),
                (None, None) => {
                    return Err("neither XDG_STATE_HOME nor HOME is set to an absolute path: pass --state DIR".into())
                }
            },
        };
        let socket = match absolute(&env, "XDG_RUNTIME_DIR") {
            Some(run) => run.join("wiremesh").join(SOCKET_NAME),
            None => state.join(SOCKET_NAME),
        };
        Ok(UserDirs { state, socket })
    }

    /// The places for the user running this process.
    pub fn current(state: Option<&Path>) -> Result<UserDirs, String> {
        UserDirs::from_env(|name| std::env::var_os(name), state)
    }
}

/// Whether this process runs as root (effective user 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Creates `dir` and its missing parents, the new ones private to the user
/// (mode 0700, as the XDG specification asks of the runtime directory).
pub fn create_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn xdg_places_win() {
        let d = UserDirs::from_env(
            env(&[("HOME", "/home/ann"), ("XDG_STATE_HOME", "/st"), ("XDG_RUNTIME_DIR", "/run/user/1000")]),
            None,
        )
        .unwrap();
        assert_eq!(d.state, Path::new("/st/wiremesh"));
        assert_eq!(d.socket, Path::new("/run/user/1000/wiremesh/api.sock"));
    }

    #[test]
    fn home_is_the_fallback() {
        let d = UserDirs::from_env(env(&[("HOME", "/home/ann")]), None).unwrap();
        assert_eq!(d.state, Path::new("/home/ann/.local/state/wiremesh"));
        assert_eq!(d.socket, Path::new("/home/ann/.local/state/wiremesh/api.sock"));
        // Relative XDG values are invalid and ignored.
        let d = UserDirs::from_env(
            env(&[("HOME", "/home/ann"), ("XDG_STATE_HOME", "st"), ("XDG_RUNTIME_DIR", "run")]),
            None,
        )
        .unwrap();
        assert_eq!(d.state, Path::new("/home/ann/.local/state/wiremesh"));
        assert_eq!(d.socket, Path::new("/home/ann/.local/state/wiremesh/api.sock"));
    }

    #[test]
    fn a_given_state_dir_holds_the_socket_without_a_runtime_dir() {
        let d = UserDirs::from_env(env(&[]), Some(Path::new("/srv/node"))).unwrap();
        assert_eq!(d, UserDirs { state: "/srv/node".into(), socket: "/srv/node/api.sock".into() });
        let d = UserDirs::from_env(env(&[("XDG_RUNTIME_DIR", "/run/user/7")]), Some(Path::new("/srv/node"))).unwrap();
        assert_eq!(d.socket, Path::new("/run/user/7/wiremesh/api.sock"));
    }

    #[test]
    fn no_home_is_an_error_naming_the_flag() {
        let e = UserDirs::from_env(env(&[("HOME", "relative")]), None).unwrap_err();
        assert!(e.contains("--state"), "{e}");
    }
}
