//! The build epoch: the one timestamp every artifact carries (file mtimes,
//! the OCI `created` field), from `--epoch`, else `SOURCE_DATE_EPOCH`
//! (reproducible-builds.org), else 0.

/// Errors resolving the epoch.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// `SOURCE_DATE_EPOCH` is set but is not a decimal number of seconds.
    #[error("SOURCE_DATE_EPOCH={0:?} is not a decimal number of seconds")]
    Invalid(String),
}

/// The epoch to build with: the explicit value, else `SOURCE_DATE_EPOCH`,
/// else 0. An empty `SOURCE_DATE_EPOCH` counts as unset.
pub fn resolve(explicit: Option<u64>) -> Result<u64, EpochError> {
    if let Some(e) = explicit {
        return Ok(e);
    }
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().map_err(|_| EpochError::Invalid(v.clone()))
        }
        _ => Ok(0),
    }
}

/// Seconds since the Unix epoch as an RFC 3339 UTC timestamp
/// (`1970-01-01T00:00:00Z`).
pub fn rfc3339(epoch: u64) -> String {
    cairn_manifest::time::rfc3339(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_epoch_wins() {
        assert_eq!(resolve(Some(42)).unwrap(), 42);
    }
}
