//! cairn manifests: the types a node is told to run, their TOML authoring
//! form, the signed envelope that travels to nodes, and the
//! verification rules of the trust model (docs/manifest.md, docs/design.md).
//!
//! The crate is shared by PID 1, the hub and `cairnctl`; it does no I/O
//! beyond reading key files.
#![warn(missing_docs)]

pub mod envelope;
pub mod keys;
pub mod netcheck;
pub mod time;
pub mod types;
mod v1;
pub mod verify;

pub use envelope::{Envelope, EnvelopeError, FORMAT_V1, FORMAT_V2, SUPPORTED_FORMATS};
pub use keys::{KeyError, KeyId, SigningKey, TrustStore};
pub use types::*;
pub use verify::{verify, verify_stored, Applied, Decision, Rejection};
