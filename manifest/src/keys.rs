//! ed25519 keys: generation, the text files they live in, and the trust
//! store of public keys a node accepts (baked into its initramfs).
//!
//! File format (both kinds): optional `#` comment lines, then one line of
//! lowercase hex — the 32-byte seed for a signing key, the 32-byte public key
//! for a verifying key.

use ed25519_dalek::{Signer, VerifyingKey};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Errors reading or parsing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("reading key file {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not hold 32 bytes of hex.
    #[error("key file {0}: expected one line of 64 hex characters")]
    Format(PathBuf),
    /// The bytes are not a valid ed25519 public key.
    #[error("key file {0}: not a valid ed25519 public key")]
    Invalid(PathBuf),
    /// The OS random source failed.
    #[error("random source: {0}")]
    Random(String),
}

/// Short identifier of a public key: the first 8 bytes of its sha256, in hex.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct KeyId(pub String);

impl KeyId {
    /// The id of a public key.
    pub fn of(key: &VerifyingKey) -> KeyId {
        let h = Sha256::digest(key.as_bytes());
        KeyId(hex::encode(&h[..8]))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A signing key (kept by the operator, never on a node).
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A new random key from the OS random source.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// From a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    /// The public key's id.
    pub fn id(&self) -> KeyId {
        KeyId::of(&self.verifying_key())
    }

    /// Signs raw bytes.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// Reads a signing key file.
    pub fn read(path: &Path) -> Result<SigningKey, KeyError> {
        Ok(SigningKey::from_seed(read_hex32(path)?))
    }

    /// The text of the secret key file.
    pub fn to_file_text(&self) -> String {
        format!(
            "# cairn ed25519 signing key, id {} -- keep secret\n{}\n",
            self.id(),
            hex::encode(self.0.to_bytes())
        )
    }

    /// The text of the matching public key file.
    pub fn public_file_text(&self) -> String {
        public_file_text(&self.verifying_key())
    }
}

/// The text of a public key file.
pub fn public_file_text(key: &VerifyingKey) -> String {
    format!(
        "# cairn ed25519 public key, id {}\n{}\n",
        KeyId::of(key),
        hex::encode(key.as_bytes())
    )
}

fn read_hex32(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_hex32(&text).ok_or_else(|| KeyError::Format(path.to_path_buf()))
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let bytes = hex::decode(line).ok()?;
    bytes.try_into().ok()
}

/// Reads a public key file.
pub fn read_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    let bytes = read_hex32(path)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Invalid(path.to_path_buf()))
}

/// The public keys a node trusts, by id.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: BTreeMap<KeyId, VerifyingKey>,
}

impl TrustStore {
    /// An empty store.
    pub fn new() -> TrustStore {
        TrustStore::default()
    }

    /// Adds a key.
    pub fn add(&mut self, key: VerifyingKey) -> KeyId {
        let id = KeyId::of(&key);
        self.keys.insert(id.clone(), key);
        id
    }

    /// Loads every `*.pub` file of a directory. Unreadable files are returned
    /// as errors beside the keys that did load, so one bad file does not
    /// remove all trust.
    pub fn load_dir(dir: &Path) -> (TrustStore, Vec<KeyError>) {
        let mut store = TrustStore::new();
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(source) => {
                errors.push(KeyError::Io {
                    path: dir.to_path_buf(),
                    source,
                });
                return (store, errors);
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pub"))
            .collect();
        paths.sort();
        for p in paths {
            match read_public(&p) {
                Ok(k) => {
                    store.add(k);
                }
                Err(e) => errors.push(e),
            }
        }
        (store, errors)
    }

    /// Keeps only the listed ids (the command line's `cairn.trust=`): it can
    /// narrow trust, never widen it. Returns the ids that are not baked in.
    pub fn select(&self, ids: &[String]) -> (TrustStore, Vec<String>) {
        let mut out = TrustStore::new();
        let mut unknown = Vec::new();
        for id in ids {
            match self.keys.get(&KeyId(id.clone())) {
                Some(k) => {
                    out.keys.insert(KeyId(id.clone()), *k);
                }
                None => unknown.push(id.clone()),
            }
        }
        (out, unknown)
    }

    /// Looks a key up.
    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    /// The ids in the store.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.keys().cloned().collect()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("cairn-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = SigningKey::generate().unwrap();
        std::fs::write(dir.join("a.key"), k.to_file_text()).unwrap();
        std::fs::write(dir.join("a.pub"), k.public_file_text()).unwrap();
        std::fs::write(dir.join("junk.pub"), "# nothing\nzz\n").unwrap();
        let k2 = SigningKey::read(&dir.join("a.key")).unwrap();
        assert_eq!(k.id(), k2.id());
        let (store, errs) = TrustStore::load_dir(&dir);
        assert_eq!(store.ids(), vec![k.id()]);
        assert_eq!(errs.len(), 1, "the junk file is reported");
        assert!(errs[0].to_string().contains("junk.pub"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn select_narrows_and_names_unknown_ids() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        let mut store = TrustStore::new();
        store.add(a.verifying_key());
        store.add(b.verifying_key());
        let (sel, unknown) = store.select(&[a.id().0, "deadbeefdeadbeef".into()]);
        assert_eq!(sel.ids(), vec![a.id()]);
        assert_eq!(unknown, vec!["deadbeefdeadbeef".to_string()]);
    }
}
