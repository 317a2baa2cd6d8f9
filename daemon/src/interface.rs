//! `wiremeshd interface <ifname>`: a standalone WireGuard interface, a
//! drop-in for `wireguard-go <ifname>`. It creates the TUN device, serves
//! the wg(8) configuration socket, optionally reads a `wg setconf` file, and
//! removes the socket and the device on SIGTERM or SIGINT.

use std::io::Write;
use std::path::PathBuf;
use wiremesh_dataplane::driver::Worker;
use wiremesh_dataplane::tun::{Options as TunOptions, Tun};
use wiremesh_dataplane::uapi::{parse_set, serve_uapi, DeviceConfig, Limits, UapiSocket};

/// What `wiremeshd interface` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The interface name.
    pub ifname: String,
    /// A `wg setconf` file to apply at start.
    pub config: Option<PathBuf>,
    /// Data-plane worker threads wanted (one is used today; see docs/performance.md).
    pub threads: usize,
    /// Run on the userspace netstack instead of a TUN device (`--userspace`).
    pub userspace: Option<crate::node::userspace::Interface>,
}

/// Runs the interface until SIGTERM or SIGINT. `ready` is called once the
/// device and the socket exist (the daemonizing parent waits for it).
pub fn run(opts: &Options, ready: impl FnOnce()) -> Result<(), String> {
    let mut config = DeviceConfig::default();
    if let Some(path) = &opts.config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let body = crate::conf::to_uapi_set(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let ops = parse_set(&body).map_err(|e| format!("{}: {e}", path.display()))?;
        config.apply(&ops).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(us) = &opts.userspace {
        return crate::node::userspace::run_interface(&opts.ifname, config, us, ready);
    }
    let tun_opts = TunOptions { nonblocking: true, ..TunOptions::with_offloads() };
    let tun = Tun::create(&opts.ifname, &tun_opts).map_err(|e| e.to_string())?;
    let socket = UapiSocket::bind(&opts.ifname)
        .map_err(|e| format!("cannot serve the configuration socket for {}: {e}", opts.ifname))?;
    let (worker, control) = Worker::new(tun, config).map_err(|e| format!("cannot start the data plane: {e}"))?;
    let listener = socket.try_clone_listener().map_err(|e| e.to_string())?;
    let uapi_control = control.clone();
    std::thread::Builder::new()
        .name("uapi".into())
        .spawn(move || serve_uapi(listener, Limits::default(), move |req| uapi_control.uapi(req)))
        .map_err(|e| e.to_string())?;
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
        .map_err(|e| e.to_string())?;
    let stop_control = control.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                stop_control.stop();
            }
        })
        .map_err(|e| e.to_string())?;
    let worker =
        std::thread::Builder::new().name("dataplane".into()).spawn(move || worker.run()).map_err(|e| e.to_string())?;
    ready();
    let result = worker.join().map_err(|_| "data plane thread panicked".to_string())?;
    // Dropping the socket removes its file; the TUN device goes with the worker.
    drop(socket);
    let _ = std::io::stderr().flush();
    result.map_err(|e| format!("data plane failed: {e}"))
}
