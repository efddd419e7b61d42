//! The hub's HTTP API (v1) on axum, over a [`Store`].
//!
//! The hub is not trusted for integrity: it does not verify signatures (the
//! nodes do). It only refuses input that is obviously wrong, so an operator's
//! mistake is caught at publish time rather than on a node. Its write API is
//! unauthenticated until the fleet work adds mTLS, so it must listen on
//! loopback or a closed test network only; [`Hub::bind`] warns otherwise.
//!
//! Every error is `{"error": "<message>"}` with a 4xx/5xx status.

use crate::names::{check_boot_file, check_node, NameError};
use crate::store::{StatusRecord, Store, StoreError};
use crate::timefmt::now_unix;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cairn_manifest::{Envelope, EnvelopeError, SUPPORTED_FORMATS};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Largest manifest envelope accepted.
pub const MANIFEST_LIMIT: usize = 1 << 20;
/// Largest status document accepted.
pub const STATUS_LIMIT: usize = 1 << 20;
/// Largest log chunk a node may ship in one request, and the most a read
/// returns.
pub const LOG_LIMIT: usize = 1 << 20;
/// Default largest boot file accepted (files are served from memory).
pub const DEFAULT_BOOT_LIMIT: u64 = 512 << 20;
/// Response header carrying the served manifest's version.
pub const MANIFEST_VERSION_HEADER: &str = "x-cairn-manifest-version";
/// Response header carrying the sha256 (hex) of the served bytes.
pub const SHA256_HEADER: &str = "x-sha256";

/// How to run a hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The data directory (created if missing).
    pub data: PathBuf,
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest boot file accepted, in bytes.
    pub boot_limit: u64,
}

impl HubConfig {
    /// A config with the default limits.
    pub fn new(data: impl Into<PathBuf>, listen: SocketAddr) -> HubConfig {
        HubConfig {
            data: data.into(),
            listen,
            boot_limit: DEFAULT_BOOT_LIMIT,
        }
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be opened.
    #[error("data directory: {0}")]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// The accept loop failed.
    #[error("serving HTTP: {0}")]
    Serve(io::Error),
}

/// A bound, not yet serving, hub.
pub struct Hub {
    listener: tokio::net::TcpListener,
    router: Router,
    addr: SocketAddr,
}

impl Hub {
    /// Opens the data directory and binds the listen address.
    pub async fn bind(config: &HubConfig) -> Result<Hub, ServerError> {
        let store = Arc::new(Store::open(&config.data)?);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        if !is_loopback(addr.ip()) {
            tracing::warn!(
                %addr,
                "listening on a non-loopback address: the write/admin API is unauthenticated \
                 and must only be exposed on loopback or a closed test network"
            );
        }
        tracing::info!(%addr, data = %config.data.display(), "hub bound");
        Ok(Hub {
            listener,
            router: router(store, config.boot_limit),
            addr,
        })
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn serve<F>(self, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServerError::Serve)
    }
}

/// Whether an address only reaches this host (IPv4-mapped loopback included).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM; only SIGINT will stop the hub");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

#[derive(Clone)]
struct AppState {
    store: Arc<Store>,
    boot_limit: u64,
}

/// The API routes over a store.
pub fn router(store: Arc<Store>, boot_limit: u64) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(get_node))
        .route(
            "/v1/nodes/{node}/manifest",
            get(get_manifest)
                .put(put_manifest)
                .layer(DefaultBodyLimit::max(MANIFEST_LIMIT)),
        )
        .route(
            "/v1/nodes/{node}/status",
            axum::routing::post(post_status).layer(DefaultBodyLimit::max(STATUS_LIMIT)),
        )
        .route(
            "/v1/nodes/{node}/logs/{name}",
            get(get_log)
                .post(post_log)
                .layer(DefaultBodyLimit::max(LOG_LIMIT)),
        )
        .route("/boot/{file}", get(get_boot).put(put_boot))
        .route("/ipxe", get(get_ipxe_chain))
        .route("/ipxe/{mac}", get(get_ipxe_script))
        .route(
            "/v1/ipxe/{key}",
            get(get_ipxe_profile).put(put_ipxe_profile),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { store, boot_limit })
}

/// An API error: a status code and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the client.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body too large (limit {limit} bytes)"),
        )
    }

    fn body(rejection: BytesRejection, limit: usize) -> ApiError {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit as u64)
        } else {
            ApiError::new(
                rejection.status(),
                format!("reading request body: {}", rejection.body_text()),
            )
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Name(n) => n.into(),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("hub storage: {other}"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "request failed");
        } else {
            tracing::info!(status = %self.status, error = %self.message, "request refused");
        }
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Runs store I/O on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("hub worker failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn get_manifest(
    State(st): State<AppState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    check_node(&node)?;
    let n = node.clone();
    let Some(bytes) = blocking(move || st.store.get_manifest(&n)).await? else {
        return Err(ApiError::not_found(format!(
            "no manifest published for node {node:?}"
        )));
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(SHA256_HEADER, hex_header(&Sha256::digest(&bytes)));
    // Checked at publish time; a file replaced by hand just lacks the header.
    if let Some(m) = Envelope::from_bytes(&bytes)
        .ok()
        .and_then(|e| e.decode_payload().ok())
    {
        headers.insert(MANIFEST_VERSION_HEADER, HeaderValue::from(m.version));
    }
    Ok((headers, bytes).into_response())
}

async fn put_manifest(
    State(st): State<AppState>,
    Path(node): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    check_node(&node)?;
    let bytes = body.map_err(|r| ApiError::body(r, MANIFEST_LIMIT))?;
    let env = Envelope::from_bytes(&bytes).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let manifest = env.decode_payload().map_err(|e| match e {
        EnvelopeError::UnknownFormat(f) => ApiError::bad_request(format!(
            "manifest format {f} is not supported by this hub (supported: {SUPPORTED_FORMATS:?})"
        )),
        other => ApiError::bad_request(other.to_string()),
    })?;
    if manifest.node != node {
        return Err(ApiError::bad_request(format!(
            "manifest is for node {:?} but was published to node {node:?}",
            manifest.node
        )));
    }
    let n = node.clone();
    blocking(move || st.store.put_manifest(&n, &bytes)).await?;
    tracing::info!(node = %node, version = manifest.version, key = %env.key_id, "manifest published");
    Ok(StatusCode::NO_CONTENT)
}

async fn post_status(
    State(st): State<AppState>,
    Path(node): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    check_node(&node)?;
    let bytes = body.map_err(|r| ApiError::body(r, STATUS_LIMIT))?;
    let status: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("status body is not JSON: {e}")))?;
    let Some(obj) = status.as_object() else {
        return Err(ApiError::bad_request(format!(
            "status must be a JSON object, got {}",
            json_kind(&status)
        )));
    };
    if let Some(said) = obj.get("node").and_then(|v| v.as_str()) {
        if said != node {
            return Err(ApiError::bad_request(format!(
                "status says it is from node {said:?} but was posted for node {node:?}"
            )));
        }
    }
    let record = StatusRecord {
        received_at: now_unix(),
        status,
    };
    let n = node.clone();
    blocking(move || st.store.put_status(&n, &record)).await?;
    tracing::debug!(node = %node, "status received");
    Ok(StatusCode::NO_CONTENT)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Log names are workload names (or `cairn-init`): the node-name syntax.
fn check_log_name(name: &str) -> Result<(), ApiError> {
    check_node(name)
        .map_err(|_| ApiError::bad_request(format!("log name {name:?} is not a workload name")))
}

/// A node ships new lines of one of its logs (a workload's, or
/// `cairn-init` for PID 1's own).
async fn post_log(
    State(st): State<AppState>,
    Path((node, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_node(&node)?;
    check_log_name(&name)?;
    let bytes = body.map_err(|r| ApiError::body(r, LOG_LIMIT))?;
    let end = blocking(move || st.store.append_log(&node, &name, &bytes)).await?;
    Ok(Json(serde_json::json!({ "end": end })).into_response())
}

/// `GET …/logs/NAME?from=N`: up to 1 MiB from offset N, with the offsets
/// in `x-log-start` / `x-log-end` (a follower asks again from the end).
async fn get_log(
    State(st): State<AppState>,
    Path((node, name)): Path<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    check_node(&node)?;
    check_log_name(&name)?;
    let from = match uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("from=")))
    {
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("from={v:?} is not an offset")))?,
        None => 0,
    };
    let (n, w) = (node.clone(), name.clone());
    match blocking(move || st.store.read_log(&n, &w, from, LOG_LIMIT as u64)).await? {
        Some((start, bytes, end)) => {
            let mut r = Response::new(Body::from(bytes));
            let h = r.headers_mut();
            h.insert("x-log-start", HeaderValue::from(start));
            h.insert("x-log-end", HeaderValue::from(end));
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(r)
        }
        None => Err(ApiError::not_found(format!(
            "node {node:?} has shipped no log named {name:?}"
        ))),
    }
}

async fn list_nodes(State(st): State<AppState>) -> Result<Response, ApiError> {
    let nodes = blocking(move || st.store.nodes()).await?;
    Ok(Json(nodes).into_response())
}

async fn get_node(
    State(st): State<AppState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    check_node(&node)?;
    let n = node.clone();
    match blocking(move || st.store.node(&n)).await? {
        Some(rec) => Ok(Json(rec).into_response()),
        None => Err(ApiError::not_found(format!(
            "unknown node {node:?}: it has no manifest and never reported"
        ))),
    }
}

fn hex_header(digest: &[u8]) -> HeaderValue {
    HeaderValue::from_str(&hex::encode(digest)).expect("hex is a valid header value")
}

/// `http://<Host header>`: the address the machine reached us at, so the
/// scripts point back at the same place.
fn hub_url(headers: &HeaderMap) -> Result<String, ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".:-[]".contains(&b))
        })
        .ok_or_else(|| {
            ApiError::bad_request("a Host header (host:port) is needed to build boot scripts")
        })?;
    Ok(format!("http://{host}"))
}

fn ipxe_text(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

fn ipxe_key(key: &str) -> Result<String, ApiError> {
    if key == "default" {
        return Ok(key.into());
    }
    crate::ipxe::normalize_mac(key).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{key:?} is not a MAC (aa:bb:cc:dd:ee:ff or aa-bb-…) or \"default\""
        ))
    })
}

async fn get_ipxe_chain(headers: HeaderMap) -> Result<Response, ApiError> {
    Ok(ipxe_text(crate::ipxe::chain_script(&hub_url(&headers)?)))
}

/// The machine's own profile, else the default one, else the built-in
/// default (no node id: the node uses its hardware-derived id).
async fn get_ipxe_script(
    State(st): State<AppState>,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hub = hub_url(&headers)?;
    let mac = ipxe_key(&mac)?;
    let (which, profile) = match st.store.get_ipxe(&mac)? {
        Some(p) => (mac.clone(), p),
        None => (
            "default".to_string(),
            st.store.get_ipxe("default")?.unwrap_or_default(),
        ),
    };
    tracing::info!(mac = %mac, profile = %which, node = ?profile.node, "iPXE script served");
    Ok(ipxe_text(crate::ipxe::node_script(
        &hub, &mac, &which, &profile,
    )))
}

async fn get_ipxe_profile(
    State(st): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<crate::ipxe::Profile>, ApiError> {
    let key = ipxe_key(&key)?;
    st.store
        .get_ipxe(&key)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no iPXE profile {key:?}")))
}

async fn put_ipxe_profile(
    State(st): State<AppState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let key = ipxe_key(&key)?;
    let p: crate::ipxe::Profile = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("iPXE profile: {e}")))?;
    p.check()
        .map_err(|e| ApiError::bad_request(format!("iPXE profile: {e}")))?;
    st.store.put_ipxe(&key, &p)?;
    tracing::info!(key = %key, node = ?p.node, "iPXE profile stored");
    Ok(StatusCode::NO_CONTENT)
}

async fn get_boot(
    State(st): State<AppState>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    check_boot_file(&file)?;
    let path = st.store.boot_path(&file)?;
    // One read gives bytes and digest of the same version of the file, even
    // if an upload renames a new one into place meanwhile.
    let read = tokio::task::spawn_blocking(move || -> io::Result<Option<Vec<u8>>> {
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if !f.metadata()?.is_file() {
            return Ok(None);
        }
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(Some(buf))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("hub worker failed: {e}"),
        )
    })?;
    let bytes = read
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading boot file {file:?}: {e}"),
            )
        })?
        .ok_or_else(|| ApiError::not_found(format!("no boot file {file:?}")))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(SHA256_HEADER, hex_header(&Sha256::digest(&bytes)));
    Ok((headers, bytes).into_response())
}

async fn put_boot(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    check_boot_file(&file)?;
    let limit = st.boot_limit;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let staged = st.store.stage_boot(&file)?;
    let storage_err = |e: io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("hub storage: writing boot file {file:?}: {e}"),
        )
    };
    let mut out = tokio::fs::File::create(staged.tmp_path())
        .await
        .map_err(storage_err)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut body = body;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if size > limit {
            return Err(ApiError::too_large(limit));
        }
        hasher.update(&data);
        out.write_all(&data).await.map_err(storage_err)?;
    }
    out.flush().await.map_err(storage_err)?;
    drop(out);
    blocking(move || staged.commit()).await?;
    tracing::info!(file = %file, size, sha256 = %hex::encode(hasher.finalize()), "boot file uploaded");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for (ip, lo) in [
            ("127.0.0.1", true),
            ("127.3.4.5", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("0.0.0.0", false),
            ("::", false),
            ("10.0.2.2", false),
        ] {
            assert_eq!(is_loopback(ip.parse().unwrap()), lo, "{ip}");
        }
    }
}
