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
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn explicit_epoch_wins() {
        assert_eq!(resolve(Some(42)).unwrap(), 42);
    }
}
