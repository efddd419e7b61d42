//! Small time helpers for the CLI and the hub: the clock in unix seconds,
//! RFC 3339 rendering in UTC and "3s ago" ages (no date crate needed).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2024-05-01T12:00:00Z` for a unix time.
pub fn rfc3339_utc(secs: u64) -> String {
    cairn_manifest::time::rfc3339(secs)
}

/// A coarse age: `42s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(then: u64, now: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(ago(100, 103), "3s ago");
        assert_eq!(ago(0, 125), "2m ago");
        assert_eq!(ago(0, 7300), "2h ago");
        assert_eq!(ago(0, 3 * 86_400 + 5), "3d ago");
        assert_eq!(
            ago(200, 100),
            "0s ago",
            "a clock in the future is not negative"
        );
    }
}
