//! Talking to the hub: fetch this node's signed manifest, post status.
//! The hub is not trusted for integrity; only signatures are.

use std::time::Duration;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Fetches the envelope bytes. Errors are one-line, human messages.
pub fn fetch_manifest(hub: &str, node: &str) -> Result<Vec<u8>, String> {
    let url = format!("{hub}/v1/nodes/{node}/manifest");
    let mut resp = agent()
        .get(&url)
        .call()
        .map_err(|e| format!("hub {hub} unreachable: {e}"))?;
    match resp.status().as_u16() {
        200 => resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| format!("reading manifest from {url}: {e}")),
        404 => Err(format!("hub has no manifest for node {node:?} yet")),
        s => Err(format!("hub answered HTTP {s} for {url}")),
    }
}

/// Posts a status report.
pub fn post_status(hub: &str, node: &str, status: &serde_json::Value) -> Result<(), String> {
    let url = format!("{hub}/v1/nodes/{node}/status");
    let resp = agent()
        .post(&url)
        .send_json(status)
        .map_err(|e| format!("posting status to {url}: {e}"))?;
    match resp.status().as_u16() {
        200..=299 => Ok(()),
        s => Err(format!("hub answered HTTP {s} to a status report")),
    }
}

/// Ships new bytes of log `name` (a workload's, or `cairn-init`).
pub fn post_log(hub: &str, node: &str, name: &str, bytes: &[u8]) -> Result<(), String> {
    let url = format!("{hub}/v1/nodes/{node}/logs/{name}");
    let resp = agent()
        .post(&url)
        .content_type("text/plain")
        .send(bytes)
        .map_err(|e| format!("shipping log {name} to {url}: {e}"))?;
    match resp.status().as_u16() {
        200..=299 => Ok(()),
        s => Err(format!("hub answered HTTP {s} to log {name}")),
    }
}
