//! From the TOML authoring form to a [`Manifest`] ready to sign, with the
//! command-line overrides of `cairnctl sign` (`--node`, `--version`, `--ttl`).
//!
//! Overrides are applied to the parsed TOML table before it is deserialized,
//! so a file may leave out `node`, `version` or the times and get them from
//! the command line.

use cairn_manifest::{Manifest, SpecError};

/// Validity given to a manifest whose TOML has no times and no `--ttl`.
pub const DEFAULT_TTL: u64 = 24 * 3600;

/// Errors turning TOML into a signable manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthoringError {
    /// Not TOML.
    #[error("manifest is not valid TOML: {0}")]
    Toml(String),
    /// TOML, but not a manifest.
    #[error("manifest does not match the schema: {0}")]
    Schema(String),
    /// The manifest's content is unusable.
    #[error("manifest is invalid: {0}")]
    Invalid(#[from] SpecError),
    /// A duration that does not parse.
    #[error("invalid duration {0:?}: expected seconds or a number with s, m, h or d (e.g. 90s, 30m, 24h, 7d)")]
    Duration(String),
    /// A number too large for a TOML integer or for the clock.
    #[error("{0} is out of range")]
    OutOfRange(&'static str),
}

/// Parses `3600`, `90s`, `30m`, `24h`, `7d` into seconds.
pub fn parse_ttl(s: &str) -> Result<u64, AuthoringError> {
    let bad = || AuthoringError::Duration(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.as_bytes().last() {
        Some(b's') => (&t[..t.len() - 1], 1),
        Some(b'm') => (&t[..t.len() - 1], 60),
        Some(b'h') => (&t[..t.len() - 1], 3600),
        Some(b'd') => (&t[..t.len() - 1], 86_400),
        _ => (t, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Command-line overrides of `cairnctl sign`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Sets `node`.
    pub node: Option<String>,
    /// Sets `version`.
    pub version: Option<u64>,
    /// Sets `issued_at = now` and `expires_at = now + ttl` (seconds).
    pub ttl: Option<u64>,
}

fn toml_int(v: u64, what: &'static str) -> Result<toml::Value, AuthoringError> {
    i64::try_from(v)
        .map(toml::Value::Integer)
        .map_err(|_| AuthoringError::OutOfRange(what))
}

/// Parses the TOML, applies the overrides, deserializes and validates.
///
/// Without `--ttl`, a missing `issued_at` becomes `now` and a missing
/// `expires_at` becomes `now + 24h`; times present in the file are kept.
pub fn build_manifest(text: &str, ov: &Overrides, now: u64) -> Result<Manifest, AuthoringError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| AuthoringError::Toml(e.to_string()))?;
    if let Some(node) = &ov.node {
        table.insert("node".into(), toml::Value::String(node.clone()));
    }
    if let Some(v) = ov.version {
        table.insert("version".into(), toml_int(v, "--version")?);
    }
    match ov.ttl {
        Some(ttl) => {
            let expires = now
                .checked_add(ttl)
                .ok_or(AuthoringError::OutOfRange("--ttl"))?;
            table.insert("issued_at".into(), toml_int(now, "issued_at")?);
            table.insert("expires_at".into(), toml_int(expires, "expires_at")?);
        }
        None => {
            if !table.contains_key("issued_at") {
                table.insert("issued_at".into(), toml_int(now, "issued_at")?);
            }
            if !table.contains_key("expires_at") {
                table.insert(
                    "expires_at".into(),
                    toml_int(now + DEFAULT_TTL, "expires_at")?,
                );
            }
        }
    }
    let manifest: Manifest = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| AuthoringError::Schema(e.to_string().trim().to_string()))?;
    manifest.validate()?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn toml_text(extra: &str) -> String {
        format!(
            r#"{extra}
[[container]]
name = "web"
image = {{ registry = "10.0.2.2:5000", repository = "demo/hello", digest = "sha256:{}", insecure = true }}
port = [{{ host = 8080, container = 80 }}]
"#,
            "ab".repeat(32)
        )
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("24h"), Ok(86_400));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        for bad in ["", "h", "-5", "1.5h", "5w", "99999999999999999999d", " 3 h"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_fill_missing_times() {
        let m = build_manifest(
            &toml_text("node = \"n1\"\nversion = 1"),
            &Overrides::default(),
            NOW,
        )
        .unwrap();
        assert_eq!((m.issued_at, m.expires_at), (NOW, NOW + DEFAULT_TTL));
        let m = build_manifest(
            &toml_text("node = \"n1\"\nversion = 1\nissued_at = 5\nexpires_at = 10"),
            &Overrides::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(
            (m.issued_at, m.expires_at),
            (5, 10),
            "times in the file are kept"
        );
    }

    #[test]
    fn overrides_win() {
        let ov = Overrides {
            node: Some("n2".into()),
            version: Some(7),
            ttl: Some(60),
        };
        let m = build_manifest(
            &toml_text("node = \"n1\"\nversion = 1\nissued_at = 5\nexpires_at = 10"),
            &ov,
            NOW,
        )
        .unwrap();
        assert_eq!(
            (m.node.as_str(), m.version, m.issued_at, m.expires_at),
            ("n2", 7, NOW, NOW + 60)
        );
        // node and version may come from the command line only.
        let m = build_manifest(&toml_text(""), &ov, NOW).unwrap();
        assert_eq!(m.node, "n2");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = build_manifest("node = ", &Overrides::default(), NOW).unwrap_err();
        assert!(matches!(e, AuthoringError::Toml(_)), "{e}");
        let e = build_manifest(&toml_text("version = 1"), &Overrides::default(), NOW).unwrap_err();
        assert!(e.to_string().contains("node"), "{e}");
        let dup = format!(
            "{}{}",
            toml_text("node = \"n1\"\nversion = 1"),
            toml_text("")
        );
        let e = build_manifest(&dup, &Overrides::default(), NOW).unwrap_err();
        assert_eq!(
            e,
            AuthoringError::Invalid(SpecError::DuplicateName("web".into()))
        );
        let ov = Overrides {
            version: Some(u64::MAX),
            ..Overrides::default()
        };
        let e = build_manifest(&toml_text("node = \"n1\""), &ov, NOW).unwrap_err();
        assert_eq!(e, AuthoringError::OutOfRange("--version"));
    }
}
