//! The signed envelope: what the hub serves and a node verifies.
//!
//! Wire layout (postcard): `magic: [u8; 4] = b"CRN1"`, `format: u32`,
//! `key_id: String`, `payload: Vec<u8>`, `signature: [u8; 64]` (as bytes).
//! The envelope layout never changes; `format` says how to decode `payload`.
//! The signature covers `b"cairn-manifest\0" || format (LE u32) || payload`,
//! so a payload cannot be replayed under another format number.

use crate::keys::{KeyId, SigningKey};
use crate::types::Manifest;
use serde::{Deserialize, Serialize};

/// Envelope magic bytes.
pub const MAGIC: [u8; 4] = *b"CRN1";
/// Format 1: `types::Manifest` in postcard.
pub const FORMAT_V1: u32 = 1;
/// Payload format 2: the manifest as JSON (see `types.rs` for the rules).
pub const FORMAT_V2: u32 = 2;
/// Every payload format this build decodes (older ones stay here forever).
pub const SUPPORTED_FORMATS: &[u32] = &[FORMAT_V1, FORMAT_V2];

const DOMAIN: &[u8] = b"cairn-manifest\0";

/// A signed manifest as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    magic: [u8; 4],
    /// Payload format.
    pub format: u32,
    /// Which key signed it.
    pub key_id: KeyId,
    /// The encoded manifest.
    pub payload: Vec<u8>,
    /// ed25519 signature (64 bytes).
    pub signature: Vec<u8>,
}

/// Errors decoding an envelope or its payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a postcard envelope at all.
    #[error("not a cairn manifest envelope: {0}")]
    Malformed(String),
    /// The magic bytes are wrong.
    #[error("not a cairn manifest envelope (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A payload format this build does not know.
    #[error(
        "manifest format {0} is not supported by this node (supported: {SUPPORTED_FORMATS:?})"
    )]
    UnknownFormat(u32),
    /// The payload does not decode in its format.
    #[error("manifest payload (format {format}) does not decode: {reason}")]
    BadPayload {
        /// Format.
        format: u32,
        /// Decoder message.
        reason: String,
    },
}

impl Envelope {
    /// Encodes and signs a manifest in the current format.
    pub fn seal(manifest: &Manifest, key: &SigningKey) -> Envelope {
        let payload = serde_json::to_vec(manifest).expect("manifest types always encode");
        Envelope::sign_payload(FORMAT_V2, payload, key)
    }

    /// Signs an already-encoded payload.
    pub fn sign_payload(format: u32, payload: Vec<u8>, key: &SigningKey) -> Envelope {
        let signature = key.sign(&signed_bytes(format, &payload)).to_vec();
        Envelope {
            magic: MAGIC,
            format,
            key_id: key.id(),
            payload,
            signature,
        }
    }

    /// The bytes that the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes(self.format, &self.payload)
    }

    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("envelope always encodes")
    }

    /// Parses wire bytes (no signature check: see `verify`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        let (env, rest): (Envelope, &[u8]) = postcard::take_from_bytes(bytes)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if env.magic != MAGIC {
            return Err(EnvelopeError::BadMagic(env.magic));
        }
        if !rest.is_empty() {
            return Err(EnvelopeError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        Ok(env)
    }

    /// Decodes the payload according to its format.
    pub fn decode_payload(&self) -> Result<Manifest, EnvelopeError> {
        match self.format {
            FORMAT_V1 => postcard::from_bytes::<crate::v1::Manifest>(&self.payload)
                .map(Manifest::from)
                .map_err(|e| self.bad_payload(e)),
            FORMAT_V2 => serde_json::from_slice(&self.payload).map_err(|e| self.bad_payload(e)),
            other => Err(EnvelopeError::UnknownFormat(other)),
        }
    }
}

impl Envelope {
    fn bad_payload(&self, e: impl std::fmt::Display) -> EnvelopeError {
        EnvelopeError::BadPayload {
            format: self.format,
            reason: e.to_string(),
        }
    }
}

fn signed_bytes(format: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DOMAIN.len() + 4 + payload.len());
    v.extend_from_slice(DOMAIN);
    v.extend_from_slice(&format.to_le_bytes());
    v.extend_from_slice(payload);
    v
}
