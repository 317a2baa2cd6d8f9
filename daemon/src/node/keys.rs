//! The node's two keys, kept in its state directory readable by root only:
//! the Ed25519 machine key (its long-term identity towards the control
//! server, `machine.key`, PKCS#8) and the X25519 node key (its WireGuard key,
//! `node.key`, base64 as `wg genkey` writes it).

use crate::control::proto;
use crate::control::tls::write_private;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::path::Path;
use wiremesh_core::keys::PrivateKey;

/// The machine key.
pub struct MachineKey {
    pair: Ed25519KeyPair,
}

impl MachineKey {
    /// A fresh key and its PKCS#8 encoding.
    pub fn generate() -> Result<(MachineKey, Vec<u8>), String> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| "no randomness")?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| "bad generated key")?;
        Ok((MachineKey { pair }, pkcs8.as_ref().to_vec()))
    }

    /// Loads `path`, making the key on first use.
    pub fn load_or_create(path: &Path) -> Result<MachineKey, String> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let pair = Ed25519KeyPair::from_pkcs8(&bytes)
                    .map_err(|_| format!("{}: not an Ed25519 PKCS#8 key", path.display()))?;
                Ok(MachineKey { pair })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, pkcs8) = Self::generate()?;
                write_private(path, &pkcs8).map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(key)
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        proto::hex(self.pair.public_key().as_ref())
    }

    /// An Ed25519 signature of `message`, hex.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        proto::hex(self.pair.sign(message).as_ref())
    }
}

/// Loads the node key from `path`, making it on first use.
pub fn load_or_create_node_key(path: &Path) -> Result<PrivateKey, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => proto::unb64_key(text.trim())
            .map(PrivateKey::from_bytes)
            .ok_or_else(|| format!("{}: not a base64 32-byte key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 32];
            SystemRandom::new().fill(&mut b).map_err(|_| "no randomness")?;
            let text = format!("{}\n", proto::b64_key(&b));
            write_private(path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(PrivateKey::from_bytes(b))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_persist_with_owner_only_permissions() {
        let dir = std::env::temp_dir().join(format!("wiremesh-keys-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let m1 = MachineKey::load_or_create(&dir.join("machine.key")).unwrap();
        let m2 = MachineKey::load_or_create(&dir.join("machine.key")).unwrap();
        assert_eq!(m1.public_hex(), m2.public_hex());
        let n1 = load_or_create_node_key(&dir.join("node.key")).unwrap();
        let n2 = load_or_create_node_key(&dir.join("node.key")).unwrap();
        assert_eq!(n1.public_key(), n2.public_key());
        for f in ["machine.key", "node.key"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let msg = b"hello";
        let sig = proto::unhex::<64>(&m1.sign_hex(msg)).unwrap();
        let pk = proto::unhex::<32>(&m1.public_hex()).unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk).verify(msg, &sig).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
