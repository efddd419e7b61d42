//! Shared test helpers: a real hub on 127.0.0.1:0 in its own tokio runtime,
//! raw HTTP with ureq, and a correctly sealed manifest.
#![allow(dead_code)] // each test binary uses a different subset

use cairn_hub::server::{Hub, HubConfig};
use cairn_manifest::{Envelope, Manifest, SigningKey};
use std::net::SocketAddr;
use std::path::Path;
use std::thread::JoinHandle;

/// A hub serving from a data directory until stopped or dropped.
pub struct TestHub {
    pub addr: SocketAddr,
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestHub {
    pub fn start(data: &Path) -> TestHub {
        TestHub::start_with(HubConfig::new(data, "127.0.0.1:0".parse().unwrap()))
    }

    pub fn start_with(config: HubConfig) -> TestHub {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let hub = rt.block_on(Hub::bind(&config)).expect("hub binds");
        let addr = hub.local_addr();
        assert!(addr.port() != 0, "port 0 resolved to a real port");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(hub.serve(async {
                let _ = rx.await;
            }))
            .expect("hub serves until stopped");
        });
        TestHub {
            addr,
            url: format!("http://{addr}"),
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Graceful shutdown; returns once the server has stopped.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("hub thread ended cleanly");
            }
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An answer, whatever its status.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the status and the `{"error": ...}` shape; returns the message.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        let obj = v.as_object().expect("error body is an object");
        assert_eq!(obj.len(), 1, "only an error field: {v}");
        obj["error"]
            .as_str()
            .expect("error is a string")
            .to_string()
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into()
}

/// One request over real HTTP.
pub fn call(method: &str, url: &str, body: Option<&[u8]>) -> Resp {
    let agent = agent();
    let builder = ureq::http::Request::builder().method(method).uri(url);
    let res = match body {
        Some(b) => agent.run(builder.body(b.to_vec()).unwrap()),
        None => agent.run(builder.body(()).unwrap()),
    };
    let mut res = res.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    Resp {
        status,
        headers,
        body,
    }
}

pub const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

/// The example manifest in TOML; `extra` goes at the top.
pub fn manifest_toml(extra: &str) -> String {
    format!(
        r#"{extra}
[[container]]
name = "web"
image = {{ registry = "10.0.2.2:5000", repository = "demo/hello", digest = "{DIGEST}", insecure = true }}
port = [{{ host = 8080, container = 80 }}]
"#
    )
}

pub fn test_key() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

pub fn manifest(node: &str, version: u64) -> Manifest {
    let now = cairn_hub::timefmt::now_unix();
    Manifest::from_toml(&manifest_toml(&format!(
        "node = \"{node}\"\nversion = {version}\nissued_at = {now}\nexpires_at = {}",
        now + 3600
    )))
    .unwrap()
}

/// Envelope bytes of a correctly sealed manifest.
pub fn sealed(node: &str, version: u64) -> Vec<u8> {
    Envelope::seal(&manifest(node, version), &test_key()).to_bytes()
}

/// File names in a directory, sorted (hidden temporaries included).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
