//! The trust model's checks, as one pure function (docs/design.md, "Trust").
//!
//! Order: envelope → known key → signature (`verify_strict`) → payload
//! format → node id → expiry → version against what was applied → content.
//! Every refusal is a typed [`Rejection`] whose message names the problem.

use crate::envelope::{Envelope, EnvelopeError};
use crate::keys::{KeyId, TrustStore};
use crate::types::{Manifest, SpecError};
use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a node has applied: the highest version and the digest of its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Version.
    pub version: u64,
    /// sha256 of the payload bytes, hex.
    pub payload_sha256: String,
}

/// What to do with a manifest that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A newer version: apply it.
    Apply(Box<Manifest>),
    /// The version already applied, byte for byte: nothing to do.
    Unchanged,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The envelope or payload does not decode.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// Signed by a key that is not (or not selected as) trusted.
    #[error("signed by key {0}, which this node does not trust")]
    UnknownKey(KeyId),
    /// The signature does not verify.
    #[error("bad signature (key {0}): the manifest was altered or signed by another key")]
    BadSignature(KeyId),
    /// For another node.
    #[error("manifest is for node {got:?}, this node is {expected:?}")]
    WrongNode {
        /// This node.
        expected: String,
        /// The manifest's node.
        got: String,
    },
    /// Past its expiry.
    #[error("manifest version {version} expired at {expires_at} (now {now})")]
    Expired {
        /// Version.
        version: u64,
        /// Expiry, unix seconds.
        expires_at: u64,
        /// Node clock, unix seconds.
        now: u64,
    },
    /// Lower than the applied version.
    #[error(
        "manifest version {offered} is lower than the applied version {applied} (rollback refused)"
    )]
    Rollback {
        /// Applied.
        applied: u64,
        /// Offered.
        offered: u64,
    },
    /// Same version, different content.
    #[error(
        "manifest version {0} is already applied with different content (version reuse refused)"
    )]
    VersionReuse(u64),
    /// Signed correctly but its content is unusable.
    #[error("manifest version {version} is invalid: {error}")]
    Invalid {
        /// Version.
        version: u64,
        /// What is wrong.
        error: SpecError,
    },
}

impl Rejection {
    /// A short stable code for status reports and tests.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Envelope(_) => "malformed",
            Rejection::UnknownKey(_) => "unknown-key",
            Rejection::BadSignature(_) => "bad-signature",
            Rejection::WrongNode { .. } => "wrong-node",
            Rejection::Expired { .. } => "expired",
            Rejection::Rollback { .. } => "rollback",
            Rejection::VersionReuse(_) => "version-reuse",
            Rejection::Invalid { .. } => "invalid",
        }
    }
}

/// Verifies envelope bytes for `node` at time `now` (unix seconds), given
/// what was applied before. On success also returns the new [`Applied`].
pub fn verify(
    bytes: &[u8],
    trust: &TrustStore,
    node: &str,
    now: u64,
    applied: Option<&Applied>,
) -> Result<(Decision, Applied), Rejection> {
    let env = Envelope::from_bytes(bytes)?;
    let key = trust
        .get(&env.key_id)
        .ok_or_else(|| Rejection::UnknownKey(env.key_id.clone()))?;
    let sig_bytes: [u8; 64] = env
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| Rejection::BadSignature(env.key_id.clone()))?;
    key.verify_strict(&env.signed_bytes(), &Signature::from_bytes(&sig_bytes))
        .map_err(|_| Rejection::BadSignature(env.key_id.clone()))?;
    let manifest = env.decode_payload()?;
    if manifest.node != node {
        return Err(Rejection::WrongNode {
            expected: node.to_string(),
            got: manifest.node,
        });
    }
    if now > manifest.expires_at {
        return Err(Rejection::Expired {
            version: manifest.version,
            expires_at: manifest.expires_at,
            now,
        });
    }
    let this = Applied {
        version: manifest.version,
        payload_sha256: hex::encode(Sha256::digest(&env.payload)),
    };
    if let Some(prev) = applied {
        if manifest.version < prev.version {
            return Err(Rejection::Rollback {
                applied: prev.version,
                offered: manifest.version,
            });
        }
        if manifest.version == prev.version {
            return if this.payload_sha256 == prev.payload_sha256 {
                Ok((Decision::Unchanged, this))
            } else {
                Err(Rejection::VersionReuse(manifest.version))
            };
        }
    }
    manifest.validate().map_err(|error| Rejection::Invalid {
        version: manifest.version,
        error,
    })?;
    Ok((Decision::Apply(Box::new(manifest)), this))
}

/// Re-verifies the manifest a node stored after applying it (its last
/// known good): signature, node and validity as usual, and it must be
/// exactly the `applied` version (same payload hash). Expiry is not
/// checked: a node without its hub runs it and reports it stale.
pub fn verify_stored(
    bytes: &[u8],
    trust: &TrustStore,
    node: &str,
    applied: &Applied,
) -> Result<Manifest, Rejection> {
    let (decision, this) = verify(bytes, trust, node, 0, None)?;
    if this != *applied {
        return Err(Rejection::Rollback {
            applied: applied.version,
            offered: this.version,
        });
    }
    match decision {
        Decision::Apply(m) => Ok(*m),
        Decision::Unchanged => unreachable!("verify without an applied state never says unchanged"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use crate::types::*;

    const NOW: u64 = 1_800_000_000;

    fn manifest(node: &str, version: u64) -> Manifest {
        Manifest::from_toml(&format!(
            r#"
node = "{node}"
version = {version}
issued_at = {issued}
expires_at = {expires}

[[container]]
name = "web"
image = {{ registry = "10.0.2.2:5000", repository = "demo/hello", digest = "sha256:{d}", insecure = true }}
port = [{{ host = 8080, container = 80 }}]
"#,
            issued = NOW - 10,
            expires = NOW + 3600,
            d = "ab".repeat(32)
        ))
        .unwrap()
    }

    fn setup() -> (SigningKey, TrustStore) {
        let k = SigningKey::from_seed([7; 32]);
        let mut t = TrustStore::new();
        t.add(k.verifying_key());
        (k, t)
    }

    #[test]
    fn round_trip_applies() {
        let (k, t) = setup();
        let m = manifest("n1", 3);
        let bytes = Envelope::seal(&m, &k).to_bytes();
        let (d, applied) = verify(&bytes, &t, "n1", NOW, None).unwrap();
        assert_eq!(d, Decision::Apply(Box::new(m)));
        assert_eq!(applied.version, 3);
        // The same bytes again: a no-op.
        let (d2, _) = verify(&bytes, &t, "n1", NOW, Some(&applied)).unwrap();
        assert_eq!(d2, Decision::Unchanged);
        // A higher version: applied.
        let b4 = Envelope::seal(&manifest("n1", 4), &k).to_bytes();
        assert!(matches!(
            verify(&b4, &t, "n1", NOW, Some(&applied)).unwrap().0,
            Decision::Apply(_)
        ));
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let (k, t) = setup();
        let mut env = Envelope::seal(&manifest("n1", 1), &k);
        let last = env.payload.len() - 1;
        env.payload[last] ^= 1;
        let e = verify(&env.to_bytes(), &t, "n1", NOW, None).unwrap_err();
        assert_eq!(e.code(), "bad-signature");
        assert!(e.to_string().contains("bad signature"));
    }

    #[test]
    fn tampered_wire_bytes_never_verify() {
        let (k, t) = setup();
        let bytes = Envelope::seal(&manifest("n1", 1), &k).to_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                verify(&b, &t, "n1", NOW, None).is_err(),
                "flipping byte {i} was accepted"
            );
        }
    }

    #[test]
    fn unknown_key_is_refused() {
        let (_, t) = setup();
        let other = SigningKey::from_seed([9; 32]);
        let bytes = Envelope::seal(&manifest("n1", 1), &other).to_bytes();
        let e = verify(&bytes, &t, "n1", NOW, None).unwrap_err();
        assert_eq!(e, Rejection::UnknownKey(other.id()));
    }

    #[test]
    fn signature_by_other_key_under_trusted_id_is_refused() {
        let (k, t) = setup();
        let other = SigningKey::from_seed([9; 32]);
        let mut env = Envelope::seal(&manifest("n1", 1), &other);
        env.key_id = k.id();
        assert_eq!(
            verify(&env.to_bytes(), &t, "n1", NOW, None)
                .unwrap_err()
                .code(),
            "bad-signature"
        );
    }

    #[test]
    fn wrong_node_is_refused() {
        let (k, t) = setup();
        let bytes = Envelope::seal(&manifest("n2", 1), &k).to_bytes();
        let e = verify(&bytes, &t, "n1", NOW, None).unwrap_err();
        assert_eq!(
            e,
            Rejection::WrongNode {
                expected: "n1".into(),
                got: "n2".into()
            }
        );
    }

    #[test]
    fn expired_is_refused() {
        let (k, t) = setup();
        let bytes = Envelope::seal(&manifest("n1", 1), &k).to_bytes();
        let e = verify(&bytes, &t, "n1", NOW + 3601, None).unwrap_err();
        assert_eq!(e.code(), "expired");
    }

    #[test]
    fn rollback_and_reuse_are_refused() {
        let (k, t) = setup();
        let applied = Applied {
            version: 5,
            payload_sha256: "00".repeat(32),
        };
        let lower = Envelope::seal(&manifest("n1", 4), &k).to_bytes();
        assert_eq!(
            verify(&lower, &t, "n1", NOW, Some(&applied)).unwrap_err(),
            Rejection::Rollback {
                applied: 5,
                offered: 4
            }
        );
        let same = Envelope::seal(&manifest("n1", 5), &k).to_bytes();
        assert_eq!(
            verify(&same, &t, "n1", NOW, Some(&applied)).unwrap_err(),
            Rejection::VersionReuse(5)
        );
    }

    #[test]
    fn unknown_format_and_garbage_are_refused() {
        let (k, t) = setup();
        let env = Envelope::sign_payload(99, vec![1, 2, 3], &k);
        assert_eq!(
            verify(&env.to_bytes(), &t, "n1", NOW, None).unwrap_err(),
            Rejection::Envelope(EnvelopeError::UnknownFormat(99))
        );
        assert_eq!(
            verify(b"hello", &t, "n1", NOW, None).unwrap_err().code(),
            "malformed"
        );
        assert_eq!(
            verify(&[], &t, "n1", NOW, None).unwrap_err().code(),
            "malformed"
        );
    }

    #[test]
    fn invalid_content_is_refused_with_reason() {
        let (k, t) = setup();
        let mut m = manifest("n1", 1);
        m.containers[0].image.digest = "latest".into();
        let e = verify(&Envelope::seal(&m, &k).to_bytes(), &t, "n1", NOW, None).unwrap_err();
        assert_eq!(e.code(), "invalid");
        assert!(e.to_string().contains("latest"), "{e}");
        let mut m = manifest("n1", 1);
        m.issued_at = 1_800_000_000_000; // milliseconds by mistake
        m.expires_at = m.issued_at + 1;
        let e = verify(&Envelope::seal(&m, &k).to_bytes(), &t, "n1", NOW, None).unwrap_err();
        assert!(e.to_string().contains("issued_at"), "{e}");
        let mut m = manifest("n1", 1);
        m.containers.push(m.containers[0].clone());
        let e = verify(&Envelope::seal(&m, &k).to_bytes(), &t, "n1", NOW, None).unwrap_err();
        assert!(e.to_string().contains("duplicate workload name"), "{e}");
    }

    #[test]
    fn stored_manifest_must_be_the_applied_one_but_may_be_expired() {
        let k = SigningKey::from_seed([3; 32]);
        let mut t = TrustStore::new();
        t.add(k.verifying_key());
        let mut m = manifest("n1", 4);
        m.expires_at = 1000;
        m.issued_at = 10;
        let bytes = Envelope::seal(&m, &k).to_bytes();
        let (_, applied) = verify(&bytes, &t, "n1", 500, None).unwrap();
        assert_eq!(verify_stored(&bytes, &t, "n1", &applied).unwrap(), m);
        let newer = Applied {
            version: 5,
            payload_sha256: applied.payload_sha256.clone(),
        };
        assert_eq!(
            verify_stored(&bytes, &t, "n1", &newer).unwrap_err().code(),
            "rollback"
        );
        assert_eq!(
            verify_stored(&bytes, &t, "n2", &applied)
                .unwrap_err()
                .code(),
            "wrong-node"
        );
    }

    /// Format 1 wire bytes are frozen: this fixed envelope (postcard, signed
    /// before format 2 existed) must keep decoding in every future build.
    #[test]
    fn format_v1_bytes_stay_decodable() {
        let k = SigningKey::from_seed([1; 32]);
        let fixture = include_bytes!("../tests/fixtures/v1-envelope.bin");
        let mut t = TrustStore::new();
        t.add(k.verifying_key());
        let (d, _) = verify(fixture, &t, "n1", NOW, None).expect("format 1 fixture must verify");
        assert_eq!(d, Decision::Apply(Box::new(manifest("n1", 1))));
    }

    /// Format 2 likewise: today's encoding of the test manifest is frozen
    /// (`CAIRN_BLESS=1` rewrites it only for a deliberate, additive change).
    #[test]
    fn format_v2_bytes_stay_decodable() {
        let k = SigningKey::from_seed([1; 32]);
        let m = manifest("n1", 1);
        let bytes = Envelope::seal(&m, &k).to_bytes();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/v2-envelope.bin"
        );
        if std::env::var_os("CAIRN_BLESS").is_some() {
            std::fs::write(path, &bytes).unwrap();
        }
        let fixture = std::fs::read(path).expect("v2 fixture (CAIRN_BLESS=1 creates it)");
        let mut t = TrustStore::new();
        t.add(k.verifying_key());
        let (d, _) = verify(&fixture, &t, "n1", NOW, None).expect("format 2 fixture must verify");
        assert_eq!(d, Decision::Apply(Box::new(m)));
        assert_eq!(
            Envelope::from_bytes(&fixture).unwrap().format,
            crate::FORMAT_V2
        );
    }

    /// A format 2 payload from an older build (fewer fields) still decodes:
    /// added fields take their defaults.
    #[test]
    fn format_v2_accepts_payloads_without_newer_fields() {
        let k = SigningKey::from_seed([1; 32]);
        let payload = br#"{"node":"n1","version":3,"issued_at":1,"expires_at":2,"container":[]}"#;
        let env = Envelope::sign_payload(crate::FORMAT_V2, payload.to_vec(), &k);
        let m = env.decode_payload().unwrap();
        assert_eq!(m.network, crate::NetworkSpec::default());
        let bad = br#"{"node":"n1","version":3,"issued_at":1,"expires_at":2,"gpu":true}"#;
        let env = Envelope::sign_payload(crate::FORMAT_V2, bad.to_vec(), &k);
        let e = env.decode_payload().unwrap_err().to_string();
        assert!(e.contains("unknown field `gpu`"), "{e}");
    }
}

/// Parses and validates authoring TOML (tests).
#[cfg(test)]
fn parse_valid(toml: &str) -> Result<crate::types::Manifest, String> {
    crate::types::Manifest::from_toml(toml)
        .map_err(|e| e.to_string())
        .and_then(|m| m.validate().map(|()| m).map_err(|e| e.to_string()))
}

#[cfg(test)]
mod os_tests {
    use crate::types::*;

    fn with_os(version: &str, url: &str, digest: &str) -> Result<Manifest, String> {
        super::parse_valid(&format!(
            r#"
node = "n1"
version = 1
issued_at = 1
expires_at = 2

[os]
version = "{version}"
kernel = {{ url = "{url}", sha256 = "{digest}" }}
initramfs = {{ url = "http://h/i", sha256 = "sha256:{d}" }}
"#,
            d = "cd".repeat(32)
        ))
    }

    /// Versions become directory names on a FAT ESP: `.`, `..`, upper case
    /// (FAT ignores case) and boot-counting characters are refused.
    #[test]
    fn os_versions_urls_and_digests_are_checked() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert!(with_os("2026.12.1_b", "http://h/k", &good).is_ok());
        for bad in [
            "",
            ".",
            "..",
            ".x",
            "V2",
            "2+1",
            "2-1",
            "a/b",
            &"9".repeat(65),
        ] {
            let e = with_os(bad, "http://h/k", &good).unwrap_err();
            assert!(e.contains("os"), "{bad:?}: {e}");
        }
        assert!(with_os("2", "https://h/k", &good)
            .unwrap_err()
            .contains("http://"));
        assert!(with_os("2", "http://h/k", "sha256:xyz").is_err());
    }
}

#[cfg(test)]
mod stop_tests {
    use crate::types::*;

    fn with(extra: &str) -> Result<Manifest, String> {
        super::parse_valid(&format!(
            r#"
node = "n1"
version = 1
issued_at = 1
expires_at = 2

[[container]]
name = "web"
image = {{ registry = "r:5000", repository = "a/b", digest = "sha256:{d}", insecure = true }}
{extra}
"#,
            d = "ab".repeat(32)
        ))
    }

    #[test]
    fn stop_signals_and_timeouts() {
        let m = with("").unwrap();
        assert_eq!(
            (
                m.containers[0].stop_signal.as_str(),
                m.containers[0].stop_timeout_s
            ),
            ("TERM", 10)
        );
        assert_eq!(stop_signal_number("SIGINT"), Some(2));
        assert_eq!(stop_signal_number("QUIT"), Some(3));
        assert!(with("stop_signal = \"USR1\"\nstop_timeout_s = 30").is_ok());
        for bad in [
            "stop_signal = \"KILL\"",
            "stop_signal = \"9\"",
            "stop_timeout_s = 0",
            "stop_timeout_s = 301",
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains("web") && e.contains("stop_"), "{bad}: {e}");
        }
    }
}
