//! A blocking client for the hub API (ureq, plain HTTP), used by `cairnctl`
//! and by tests.
//!
//! Hub errors come back as [`ClientError::Hub`] carrying the hub's own
//! `{"error": ...}` message, so the CLI can show exactly what was refused.

use crate::names::{check_boot_file, check_node, NameError};
use std::time::Duration;

/// Default hub URL when neither `--hub` nor `CAIRN_HUB` is given.
pub const DEFAULT_HUB: &str = "http://127.0.0.1:7400";
/// Largest response body read (boot files included).
const RESPONSE_LIMIT: u64 = 1 << 30;

/// Errors talking to the hub.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A node or file name the hub would refuse anyway.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No HTTP answer (connection refused, timeout, bad URL...).
    #[error("cannot reach the hub at {url}: {source}")]
    Transport {
        /// URL.
        url: String,
        /// Cause.
        source: Box<ureq::Error>,
    },
    /// The hub answered with an error status.
    #[error("hub refused {method} {url} ({status}): {message}")]
    Hub {
        /// Method.
        method: &'static str,
        /// URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The hub's message.
        message: String,
    },
    /// The hub's answer is not what the API promises.
    #[error("unexpected answer from the hub to {url}: {reason}")]
    Decode {
        /// URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// A hub at one base URL.
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    agent: ureq::Agent,
}

/// A successful response: headers of interest and the body.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The body.
    pub body: Vec<u8>,
    /// The `x-cairn-manifest-version` header, if any.
    pub manifest_version: Option<u64>,
    /// The `x-sha256` header, if any.
    pub sha256: Option<String>,
    /// The `x-log-start` and `x-log-end` headers (log reads), if any.
    pub log_start: Option<u64>,
    /// See `log_start`.
    pub log_end: Option<u64>,
}

impl HubClient {
    /// A client for `base` (e.g. `http://127.0.0.1:7400`).
    pub fn new(base: &str) -> HubClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(600)))
            .build();
        HubClient {
            base: base.trim_end_matches('/').to_string(),
            agent: config.into(),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn finish(
        &self,
        method: &'static str,
        url: String,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Fetched, ClientError> {
        let mut res = res.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source: Box::new(source),
        })?;
        let status = res.status();
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let manifest_version =
            header(crate::server::MANIFEST_VERSION_HEADER).and_then(|v| v.parse().ok());
        let sha256 = header(crate::server::SHA256_HEADER);
        let log_start = header("x-log-start").and_then(|v| v.parse().ok());
        let log_end = header("x-log-end").and_then(|v| v.parse().ok());
        let body = res
            .body_mut()
            .with_config()
            .limit(RESPONSE_LIMIT)
            .read_to_vec()
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source: Box::new(source),
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(ClientError::Hub {
                method,
                url,
                status: status.as_u16(),
                message,
            });
        }
        Ok(Fetched {
            body,
            manifest_version,
            sha256,
            log_start,
            log_end,
        })
    }

    fn get(&self, path: &str) -> Result<Fetched, ClientError> {
        let url = self.url(path);
        let res = self.agent.get(&url).call();
        self.finish("GET", url, res)
    }

    fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let url = self.url(path);
        let f = self.get(path)?;
        serde_json::from_slice(&f.body).map_err(|e| ClientError::Decode {
            url,
            reason: format!("not JSON: {e}"),
        })
    }

    fn put(&self, path: &str, content_type: &str, body: &[u8]) -> Result<(), ClientError> {
        let url = self.url(path);
        let res = self.agent.put(&url).content_type(content_type).send(body);
        self.finish("PUT", url, res).map(drop)
    }

    /// `PUT /v1/nodes/{node}/manifest`.
    pub fn put_manifest(&self, node: &str, envelope: &[u8]) -> Result<(), ClientError> {
        check_node(node)?;
        self.put(
            &format!("/v1/nodes/{node}/manifest"),
            "application/octet-stream",
            envelope,
        )
    }

    /// `GET /v1/nodes/{node}/manifest`.
    pub fn get_manifest(&self, node: &str) -> Result<Fetched, ClientError> {
        check_node(node)?;
        self.get(&format!("/v1/nodes/{node}/manifest"))
    }

    /// `POST /v1/nodes/{node}/status`.
    pub fn post_status(&self, node: &str, status: &serde_json::Value) -> Result<(), ClientError> {
        check_node(node)?;
        let url = self.url(&format!("/v1/nodes/{node}/status"));
        let res = self.agent.post(&url).send_json(status);
        self.finish("POST", url, res).map(drop)
    }

    /// `POST /v1/nodes/{node}/logs/{name}`: ship new log bytes.
    pub fn post_log(&self, node: &str, name: &str, bytes: &[u8]) -> Result<(), ClientError> {
        check_node(node)?;
        check_node(name)?;
        let url = self.url(&format!("/v1/nodes/{node}/logs/{name}"));
        let res = self.agent.post(&url).content_type("text/plain").send(bytes);
        self.finish("POST", url, res).map(drop)
    }

    /// `GET /v1/nodes/{node}/logs/{name}?from=N`: bytes from offset `from`
    /// (or from the oldest kept, when older ones were rotated away), the
    /// offset just after them, and the log's end offset.
    pub fn get_log(
        &self,
        node: &str,
        name: &str,
        from: u64,
    ) -> Result<(Vec<u8>, u64, u64), ClientError> {
        check_node(node)?;
        check_node(name)?;
        let f = self.get(&format!("/v1/nodes/{node}/logs/{name}?from={from}"))?;
        let next = f.log_start.unwrap_or(from) + f.body.len() as u64;
        let end = f.log_end.unwrap_or(next);
        Ok((f.body, next, end))
    }

    /// `GET /v1/nodes`: the records as loose JSON.
    pub fn nodes(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        match self.get_json("/v1/nodes")? {
            serde_json::Value::Array(a) => Ok(a),
            other => Err(ClientError::Decode {
                url: self.url("/v1/nodes"),
                reason: format!("expected a JSON array, got {other}"),
            }),
        }
    }

    /// `GET /v1/nodes/{node}`.
    pub fn node(&self, node: &str) -> Result<serde_json::Value, ClientError> {
        check_node(node)?;
        self.get_json(&format!("/v1/nodes/{node}"))
    }

    /// `PUT /boot/{file}`.
    pub fn put_boot(&self, file: &str, bytes: &[u8]) -> Result<(), ClientError> {
        check_boot_file(file)?;
        self.put(&format!("/boot/{file}"), "application/octet-stream", bytes)
    }

    /// `PUT /v1/ipxe/{key}`: the iPXE profile of a MAC or `default`.
    pub fn put_ipxe(&self, key: &str, profile: &crate::ipxe::Profile) -> Result<(), ClientError> {
        let body = serde_json::to_vec(profile).expect("a profile always encodes");
        self.put(&format!("/v1/ipxe/{key}"), "application/json", &body)
    }

    /// `GET /boot/{file}`.
    pub fn get_boot(&self, file: &str) -> Result<Fetched, ClientError> {
        check_boot_file(file)?;
        self.get(&format!("/boot/{file}"))
    }
}
