//! Names that reach the file system: node names and boot file names.
//!
//! Both end up as file names under the data directory, so they are checked
//! against a strict allow-list before any path is built from them: no `/`,
//! no leading `.`, nothing that could climb out of its directory.

/// A name that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a node name.
    #[error("invalid node name {0:?}: expected [a-z0-9][a-z0-9.-]{{0,62}}")]
    Node(String),
    /// Not a boot file name.
    #[error("invalid boot file name {0:?}: expected [A-Za-z0-9._-]+ (at most 255 bytes) not starting with '.'")]
    BootFile(String),
}

/// Checks a node name: `[a-z0-9][a-z0-9.-]{0,62}`.
pub fn check_node(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Node(name.to_string()))
    }
}

/// Checks a boot file name: `[A-Za-z0-9._-]+`, not starting with `.`.
///
/// The leading-dot rule also keeps the hub's own temporary files (which
/// start with `.`) out of reach of the API.
pub fn check_boot_file(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 255
        && b[0] != b'.'
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BootFile(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for good in ["n1", "0", "demo.rack-1", &"a".repeat(63)] {
            assert_eq!(check_node(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "N1",
            "-a",
            ".a",
            "a/b",
            "a_b",
            "..",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            let err = check_node(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn boot_file_names() {
        for good in ["vmlinuz", "initramfs.cpio.zst", "boot.ipxe", "A_b-1.2"] {
            assert_eq!(check_boot_file(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "../etc/passwd",
            "a/b",
            "a\\b",
            "a b",
            "a\0b",
            &"a".repeat(256),
        ] {
            assert!(check_boot_file(bad).is_err(), "{bad:?}");
        }
    }
}
