//! Linux TUN devices.
