//! `cairn-image`: builds what a cairn node boots and runs — the initramfs
//! (cpio newc holding PID 1, the trusted keys and the build epoch) and OCI
//! image layouts for static binaries — and pushes layouts to a registry.
//!
//! Every artifact is reproducible: the same inputs give the same bytes
//! (docs/image-builder.md lists the rules).
#![warn(missing_docs)]

pub mod boot;
pub mod epoch;
pub mod initramfs;
pub mod iso;
pub mod modules;
pub mod oci;
pub mod output;
pub mod push;

use sha2::{Digest as _, Sha256};

/// Lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An OCI content digest (`sha256:<hex>`) of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}
