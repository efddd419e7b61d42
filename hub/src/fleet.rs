//! The `cairnctl nodes` table, built from the hub's node records.
//!
//! Records are read as loose JSON: a node may run an older or newer PID 1
//! than this CLI, so every field is optional and a missing one shows as `-`.

use crate::timefmt::ago;
use serde_json::Value;

/// Longest ERROR cell, in characters.
const ERROR_WIDTH: usize = 60;
/// Longest WORKLOADS cell, in characters.
const WORKLOADS_WIDTH: usize = 60;

/// Cuts `s` to `max` characters, marking the cut with `…`, on one line.
pub fn truncate(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// NODE.
    pub node: String,
    /// SEEN.
    pub seen: String,
    /// VERSION: applied, and what the hub serves when it differs.
    pub version: String,
    /// MANIFEST: the node's manifest state.
    pub manifest: String,
    /// WORKLOADS: `name=state(rN)`.
    pub workloads: String,
    /// ERROR: the manifest error, else the first workload error.
    pub error: String,
}

/// The row of one node record at time `now`.
pub fn row(rec: &Value, now: u64) -> Row {
    let status = rec.get("status").filter(|s| !s.is_null());
    let seen = rec
        .get("received_at")
        .and_then(Value::as_u64)
        .map_or_else(|| "never".to_string(), |t| ago(t, now));
    let applied = status.and_then(|s| u64_at(s, &["manifest", "applied_version"]));
    let published = u64_at(rec, &["published", "version"]);
    let version = match (applied, published) {
        (Some(a), Some(p)) if a != p => format!("{a} (hub {p})"),
        (Some(a), _) => a.to_string(),
        (None, Some(p)) => format!("- (hub {p})"),
        (None, None) => "-".to_string(),
    };
    let manifest = status
        .and_then(|s| str_at(s, &["manifest", "state"]))
        .unwrap_or("-")
        .to_string();
    let empty = Vec::new();
    let workloads = status
        .and_then(|s| s.get("workloads"))
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let wl: Vec<String> = workloads
        .iter()
        .map(|w| {
            let name = w.get("name").and_then(Value::as_str).unwrap_or("?");
            let state = w.get("state").and_then(Value::as_str).unwrap_or("?");
            match w.get("restarts").and_then(Value::as_u64) {
                Some(r) => format!("{name}={state}(r{r})"),
                None => format!("{name}={state}"),
            }
        })
        .collect();
    let workloads = if wl.is_empty() {
        "-".to_string()
    } else {
        truncate(&wl.join(","), WORKLOADS_WIDTH)
    };
    let manifest_error = status.and_then(|s| {
        str_at(s, &["manifest", "error"]).or_else(|| str_at(s, &["manifest", "error_code"]))
    });
    let workload_error = workloads_error(status);
    let error = match (manifest_error, workload_error) {
        (Some(e), _) => truncate(e, ERROR_WIDTH),
        (None, Some((name, e))) => truncate(&format!("{name}: {e}"), ERROR_WIDTH),
        (None, None) => "-".to_string(),
    };
    Row {
        node: rec
            .get("node")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
        seen,
        version,
        manifest,
        workloads,
        error,
    }
}

fn workloads_error(status: Option<&Value>) -> Option<(&str, &str)> {
    status?.get("workloads")?.as_array()?.iter().find_map(|w| {
        let e = w.get("error")?.as_str()?;
        Some((w.get("name").and_then(Value::as_str).unwrap_or("?"), e))
    })
}

/// The whole table, header included, one line per node, `\n`-terminated.
pub fn table(records: &[Value], now: u64) -> String {
    let header = ["NODE", "SEEN", "VERSION", "MANIFEST", "WORKLOADS", "ERROR"].map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(records.iter().map(|r| {
            let r = row(r, now);
            [r.node, r.seen, r.version, r.manifest, r.workloads, r.error]
        }))
        .collect();
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 2,
                ));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn demo() -> Value {
        json!({
            "node": "demo",
            "received_at": 1000,
            "status": {"node":"demo","boot_id":"b","uptime_ms":1234,"addresses":["10.0.2.15/24"],
                "manifest":{"applied_version":2,"state":"applied","error":null,"error_code":null},
                "timeline":[{"phase":"pid1","ms":812}],
                "workloads":[
                    {"name":"web","kind":"container","state":"running","pid":123,"restarts":0,"last_exit":null,"error":null,"address":"10.88.0.2"},
                    {"name":"db","kind":"vm","state":"failed","restarts":3,"error":"disk sha256 mismatch\nexpected ab got cd"}
                ]},
            "published": {"version": 3}
        })
    }

    #[test]
    fn full_record() {
        let r = row(&demo(), 1003);
        assert_eq!(r.seen, "3s ago");
        assert_eq!(r.version, "2 (hub 3)");
        assert_eq!(r.manifest, "applied");
        assert_eq!(r.workloads, "web=running(r0),db=failed(r3)");
        assert_eq!(r.error, "db: disk sha256 mismatch expected ab got cd");
    }

    #[test]
    fn manifest_error_wins_and_is_truncated() {
        let mut v = demo();
        v["status"]["manifest"]["error"] = json!("x".repeat(200));
        let r = row(&v, 1000);
        assert_eq!(r.error.chars().count(), ERROR_WIDTH);
        assert!(r.error.ends_with('…'));
    }

    #[test]
    fn missing_fields_are_dashes() {
        let r = row(
            &json!({"node": "n1", "received_at": null, "status": null}),
            5,
        );
        assert_eq!(
            (
                r.seen.as_str(),
                r.version.as_str(),
                r.manifest.as_str(),
                r.workloads.as_str(),
                r.error.as_str()
            ),
            ("never", "-", "-", "-", "-")
        );
        let r = row(
            &json!({"node": "n1", "received_at": 1, "status": {"weird": true}}),
            5,
        );
        assert_eq!((r.version.as_str(), r.workloads.as_str()), ("-", "-"));
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &[
                demo(),
                json!({"node": "n-long-name", "status": null, "published": {"version": 1}}),
            ],
            1003,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE         SEEN    VERSION"), "{t}");
        let col = lines[0].find("SEEN").unwrap();
        assert_eq!(&lines[1][col..col + 6], "3s ago");
        assert_eq!(&lines[2][col..col + 5], "never");
        assert!(lines[2].contains("- (hub 1)"));
    }
}
