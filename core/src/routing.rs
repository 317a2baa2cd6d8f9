//! Cryptokey routing: the allowed-IPs table (placeholder being replaced).
