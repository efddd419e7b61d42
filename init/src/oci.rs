//! Pulling an image by digest with the OCI distribution API, and unpacking
//! its layers for overlayfs.
//!
//! Every byte is checked: the manifest against the digest the signed
//! manifest names, each blob against the digest the image manifest names
//! (hashed while it streams to disk). Layers are stored content-addressed
//! under the store root and unpacked once; a layer already present is not
//! fetched again.

use cairn_manifest::ImageRef;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Largest blob we accept (a layer), 8 GiB.
const MAX_BLOB: u64 = 8 << 30;

/// Why a pull failed; each names the step and the object.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// No connection.
    #[error("registry {registry} unreachable: {reason}")]
    Unreachable {
        /// Registry.
        registry: String,
        /// Transport error.
        reason: String,
    },
    /// 404.
    #[error("{what} not found in registry ({url})")]
    NotFound {
        /// Object.
        what: String,
        /// URL.
        url: String,
    },
    /// Other HTTP status.
    #[error("registry answered HTTP {status} for {url}")]
    Http {
        /// Status.
        status: u16,
        /// URL.
        url: String,
    },
    /// Content does not match its digest.
    #[error("digest mismatch for {what}: expected {expected}, got {got}")]
    DigestMismatch {
        /// Object.
        what: String,
        /// Expected digest.
        expected: String,
        /// Computed digest.
        got: String,
    },
    /// A manifest or config we cannot use.
    #[error("unusable image: {0}")]
    BadImage(String),
    /// HTTPS is not in this build yet.
    #[error("registry {0} needs HTTPS, which this build does not speak yet; set insecure = true only for a registry on a trusted network")]
    NoTls(String),
    /// Local I/O.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// Cause.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PullError {
    let what = what.into();
    move |source| PullError::Io { what, source }
}

/// The parts of the image config a runtime needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Cmd.
    pub cmd: Vec<String>,
    /// `NAME=value` list.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: String,
    /// `uid[:gid]` or a name.
    pub user: String,
}

/// A pulled, unpacked image.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Unpacked layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// Runtime config.
    pub config: ImageConfig,
    /// Layers fetched from the registry in this pull (0 when all were cached).
    pub fetched_layers: usize,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConfigDoc {
    config: Option<RuntimeConfigDoc>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RuntimeConfigDoc {
    #[serde(rename = "Entrypoint")]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd")]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env")]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir")]
    workdir: Option<String>,
    #[serde(rename = "User")]
    user: Option<String>,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

struct Registry<'a> {
    agent: ureq::Agent,
    base: String,
    image: &'a ImageRef,
}

impl Registry<'_> {
    fn get(
        &self,
        path: &str,
        accept: &str,
        what: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, PullError> {
        let url = format!("{}/v2/{}/{}", self.base, self.image.repository, path);
        let resp = self
            .agent
            .get(&url)
            .header("Accept", accept)
            .call()
            .map_err(|e| PullError::Unreachable {
                registry: self.image.registry.clone(),
                reason: e.to_string(),
            })?;
        match resp.status().as_u16() {
            200 => Ok(resp),
            404 => Err(PullError::NotFound {
                what: what.into(),
                url,
            }),
            status => Err(PullError::Http { status, url }),
        }
    }

    fn manifest_bytes(&self, digest: &str) -> Result<Vec<u8>, PullError> {
        let accept = [
            MT_OCI_MANIFEST,
            MT_DOCKER_MANIFEST,
            MT_OCI_INDEX,
            MT_DOCKER_LIST,
        ]
        .join(", ");
        let what = format!("manifest {}@{digest}", self.image.repository);
        let mut resp = self.get(&format!("manifests/{digest}"), &accept, &what)?;
        let body = resp
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_vec()
            .map_err(|e| PullError::BadImage(format!("reading {what}: {e}")))?;
        check_digest(&what, digest, &format!("sha256:{}", sha256_hex(&body)))?;
        Ok(body)
    }
}

fn parse_manifest(digest: &str, body: &[u8]) -> Result<ManifestDoc, PullError> {
    serde_json::from_slice(body)
        .map_err(|e| PullError::BadImage(format!("manifest {digest} is not JSON: {e}")))
}

fn check_digest(what: &str, expected: &str, got: &str) -> Result<(), PullError> {
    if expected == got {
        Ok(())
    } else {
        Err(PullError::DigestMismatch {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        })
    }
}

/// The content store.
pub struct Store {
    root: PathBuf,
    /// A read-only blob directory (`blobs/sha256/<hex>`) consulted before
    /// the registry: images built into the boot image (`SEED_BLOBS`).
    seed: Option<PathBuf>,
}

/// Where `cairn-image iso --seed-image` puts the blobs of its images.
pub const SEED_BLOBS: &str = "/etc/cairn/seed";

/// Digests being fetched or unpacked right now: two workloads sharing a
/// layer must not write the same files at once.
static BUSY: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static BUSY_CV: std::sync::Condvar = std::sync::Condvar::new();

/// Holds the exclusive right to fetch/unpack one digest.
struct DigestLock(String);

impl DigestLock {
    fn take(digest: &str) -> DigestLock {
        let mut busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
        while busy.iter().any(|d| d == digest) {
            busy = BUSY_CV.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.push(digest.to_string());
        DigestLock(digest.to_string())
    }
}

impl DigestLock {
    fn try_take(digest: &str) -> Option<DigestLock> {
        let mut busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
        if busy.iter().any(|d| d == digest) {
            return None;
        }
        busy.push(digest.to_string());
        Some(DigestLock(digest.to_string()))
    }
}

/// Pulls in flight (GC runs only when there are none).
pub fn pulls_in_flight() -> usize {
    PULLS.load(std::sync::atomic::Ordering::SeqCst)
}

static PULLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct PullGuard;

impl PullGuard {
    fn new() -> PullGuard {
        PULLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        PullGuard
    }
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        PULLS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for DigestLock {
    fn drop(&mut self) {
        let mut busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
        busy.retain(|d| *d != self.0);
        BUSY_CV.notify_all();
    }
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Store {
    /// A store rooted at `root` (created on demand).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            seed: None,
        }
    }

    /// The same store, taking blobs from `seed` (when it exists) before
    /// asking a registry. Seed blobs are checked against their digests like
    /// downloads are.
    pub fn with_seed(mut self, seed: impl Into<PathBuf>) -> Store {
        let seed = seed.into();
        self.seed = seed.join("blobs/sha256").is_dir().then_some(seed);
        self
    }

    /// The same store without its seed (registry only).
    fn without_seed(&self) -> Store {
        Store {
            root: self.root.clone(),
            seed: None,
        }
    }

    /// The seed's copy of `digest`, opened, if it has one.
    fn seed_blob(&self, digest: &str) -> Option<(std::fs::File, PathBuf)> {
        let p = self
            .seed
            .as_ref()?
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:")?);
        std::fs::File::open(&p).ok().map(|f| (f, p))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn layer_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("layers")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// An image manifest (or index) by digest: from the store when a
    /// previous pull kept it (checked against its digest again), else from
    /// the registry, then kept. A node whose registry is unreachable still
    /// starts images it has pulled before.
    fn manifest(&self, reg: &Registry, digest: &str) -> Result<ManifestDoc, PullError> {
        let path = self.blob_path(digest);
        if let Ok(body) = std::fs::read(&path) {
            if format!("sha256:{}", sha256_hex(&body)) == digest {
                return parse_manifest(digest, &body);
            }
            tracing::warn!(
                digest,
                "cached manifest does not match its digest; fetching it again"
            );
        }
        let seeded = self
            .seed_blob(digest)
            .and_then(|(_, p)| std::fs::read(p).ok())
            .filter(|b| format!("sha256:{}", sha256_hex(b)) == digest);
        let body = match seeded {
            Some(b) => b,
            None => reg.manifest_bytes(digest)?,
        };
        let _lock = DigestLock::take(digest);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let tmp = path.with_extension(format!("tmp-{}", unique_suffix()));
        // Durable before it is relied on: GC reads these to know what the
        // running images need.
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&body)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| {
                path.parent()
                    .map_or(Ok(()), |d| std::fs::File::open(d)?.sync_all())
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(format!("storing manifest {digest}"))(e));
        }
        parse_manifest(digest, &body)
    }

    /// Every digest that images `in_use` need (their manifests, the
    /// linux/amd64 manifest of an index, configs, layers), read from the
    /// store; an image whose manifest is not stored needs nothing stored.
    fn marked(&self, in_use: &[String]) -> Option<std::collections::BTreeSet<String>> {
        let mut keep = std::collections::BTreeSet::new();
        let mut queue: Vec<String> = in_use.to_vec();
        while let Some(d) = queue.pop() {
            let hex = d.trim_start_matches("sha256:").to_string();
            if !keep.insert(hex) {
                continue;
            }
            // Only manifests are read (never a layer blob). One that is
            // missing or unreadable means we cannot know what is needed.
            let doc = std::fs::read(self.blob_path(&d))
                .ok()
                .and_then(|b| serde_json::from_slice::<ManifestDoc>(&b).ok())?;
            queue.extend(doc.manifests.iter().map(|m| m.digest.clone()));
            for d in doc.config.iter().chain(doc.layers.iter()) {
                keep.insert(d.digest.trim_start_matches("sha256:").to_string());
            }
        }
        Some(keep)
    }

    /// Removes every blob and unpacked layer that no image in `in_use`
    /// needs. Call it while no pull runs. Returns (entries removed, bytes).
    pub fn gc(&self, in_use: &[String]) -> (usize, u64) {
        let Some(keep) = self.marked(in_use) else {
            tracing::warn!("an image in use has no stored manifest: garbage collection skipped");
            return (0, 0);
        };
        let mut removed = (0usize, 0u64);
        for dir in [self.root.join("blobs/sha256"), self.root.join("layers")] {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Temporary names (`.tmp-…`, `x.tmp-…`) belong to a pull or
                // unpack that died; digests are 64 hex characters.
                let stem = name.split('.').next().unwrap_or_default().to_string();
                let temporary = [".partial-", ".tmp-", ".unpacking-"]
                    .iter()
                    .any(|t| name.contains(t))
                    || name.starts_with('.');
                if keep.contains(&stem) && !temporary {
                    continue;
                }
                // Busy (a pull holds it): leave it for the next round.
                let Some(_lock) = DigestLock::try_take(&format!("sha256:{stem}")) else {
                    continue;
                };
                let bytes = du(&e.path());
                let r = if e.path().is_dir() {
                    std::fs::remove_dir_all(e.path())
                } else {
                    std::fs::remove_file(e.path())
                };
                match r {
                    Ok(()) => {
                        removed.0 += 1;
                        removed.1 += bytes;
                    }
                    Err(err) => {
                        tracing::warn!(path = %e.path().display(), error = %err, "GC could not remove")
                    }
                }
            }
        }
        removed
    }

    /// Pulls `image` (by digest) and unpacks its layers.
    pub fn pull(&self, image: &ImageRef) -> Result<PulledImage, PullError> {
        let _pulling = PullGuard::new();
        if !image.insecure {
            return Err(PullError::NoTls(image.registry.clone()));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(600)))
            .http_status_as_error(false)
            .build()
            .into();
        let reg = Registry {
            agent,
            base: format!("http://{}", image.registry),
            image,
        };
        let mut doc = self.manifest(&reg, &image.digest)?;
        if doc.media_type == MT_OCI_INDEX
            || doc.media_type == MT_DOCKER_LIST
            || !doc.manifests.is_empty()
        {
            let pick = doc
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .ok_or_else(|| {
                    PullError::BadImage("image index has no linux/amd64 manifest".into())
                })?;
            let digest = pick.digest.clone();
            doc = self.manifest(&reg, &digest)?;
        }
        let config_desc = doc
            .config
            .as_ref()
            .ok_or_else(|| PullError::BadImage("image manifest has no config".into()))?;
        // Digests become path names: check every one before any is used.
        for d in std::iter::once(config_desc).chain(doc.layers.iter()) {
            if !cairn_manifest::is_sha256_digest(&d.digest) {
                return Err(PullError::BadImage(format!(
                    "descriptor digest {:?} is not sha256:<64 hex>",
                    d.digest
                )));
            }
            if d.size == 0 || d.size > MAX_BLOB {
                return Err(PullError::BadImage(format!(
                    "descriptor {} has size {} (must be 1..={MAX_BLOB})",
                    d.digest, d.size
                )));
            }
        }
        let config_bytes = self.fetch_blob(&reg, config_desc, "image config")?;
        let config = parse_config(&config_bytes)?;
        let mut layers = Vec::new();
        let mut fetched = 0;
        for (i, l) in doc.layers.iter().enumerate() {
            let dir = self.layer_path(&l.digest);
            let _lock = DigestLock::take(&l.digest);
            if !dir.join(".cairn-done").exists() {
                let blob = self.blob_path(&l.digest);
                if !blob.exists()
                    && self.download(&reg, l, &format!("layer {i}"))? == BlobSource::Registry
                {
                    fetched += 1;
                }
                unpack_layer(&blob, &l.media_type, &dir)?;
            }
            layers.push(dir);
        }
        Ok(PulledImage {
            layers,
            config,
            fetched_layers: fetched,
        })
    }

    fn fetch_blob(&self, reg: &Registry, d: &Descriptor, what: &str) -> Result<Vec<u8>, PullError> {
        let _lock = DigestLock::take(&d.digest);
        let path = self.blob_path(&d.digest);
        if let Ok(body) = std::fs::read(&path) {
            // Small blobs are checked again on every use: what the disk
            // holds is not trusted more than what the registry sent.
            if format!("sha256:{}", sha256_hex(&body)) == d.digest {
                return Ok(body);
            }
            tracing::warn!(what, digest = %d.digest, "stored blob does not match its digest; fetching it again");
            let _ = std::fs::remove_file(&path);
        }
        self.download(reg, d, what)?;
        std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))
    }

    /// Streams a blob to disk while hashing it (from the seed when it has
    /// the blob, else from the registry); only a verified blob gets its
    /// final name.
    fn download(
        &self,
        reg: &Registry,
        d: &Descriptor,
        what: &str,
    ) -> Result<BlobSource, PullError> {
        if !cairn_manifest::is_sha256_digest(&d.digest) {
            return Err(PullError::BadImage(format!(
                "{what} has unsupported digest {:?}",
                d.digest
            )));
        }
        let path = self.blob_path(&d.digest);
        let dir = path.parent().expect("blob path has a parent");
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let tmp = path.with_extension(format!("partial-{}", unique_suffix()));
        let mut resp;
        // Never read more than the descriptor promised: a hostile or broken
        // registry must not fill the node's RAM.
        let (mut reader, from): (Box<dyn Read + '_>, BlobSource) = match self.seed_blob(&d.digest) {
            Some((f, _)) => (Box::new(f.take(d.size)), BlobSource::Seed),
            None => {
                resp = reg.get(&format!("blobs/{}", d.digest), "*/*", what)?;
                (
                    Box::new(resp.body_mut().with_config().limit(d.size).reader()),
                    BlobSource::Registry,
                )
            }
        };
        let mut file =
            std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        // A failed transfer (a full disk, a dropped connection) leaves no
        // partial file behind to eat the space.
        let copied = (|| -> Result<(), PullError> {
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(io_err(format!("downloading {what}")))?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])
                    .map_err(io_err(format!("writing {what} to {}", tmp.display())))?;
                total += n as u64;
            }
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            if from == BlobSource::Seed {
                tracing::warn!(what, "seed copy unreadable ({e}); trying the registry");
                drop(reader);
                return self.without_seed().download(reg, d, what);
            }
            return Err(e);
        }
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Err(e) = check_digest(what, &d.digest, &got) {
            let _ = std::fs::remove_file(&tmp);
            if from == BlobSource::Seed {
                // A damaged image seed is not the end: the registry may
                // still have the blob.
                tracing::warn!(what, "seed copy refused ({e}); trying the registry");
                drop(reader);
                return self.without_seed().download(reg, d, what);
            }
            return Err(e);
        }
        if d.size != total {
            let _ = std::fs::remove_file(&tmp);
            return Err(PullError::BadImage(format!(
                "{what}: size {total} but the manifest says {}",
                d.size
            )));
        }
        // Durable before it gets its final name: after a power cut a blob
        // is either complete or absent (a hard reset once left an empty
        // image config under its digest).
        let durable = file
            .sync_all()
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::File::open(dir)?.sync_all());
        if let Err(e) = durable {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(format!("storing {what} as {}", path.display()))(e));
        }
        tracing::info!(what, digest = %d.digest, bytes = total, ?from, "blob fetched and verified");
        Ok(from)
    }
}

/// Where a blob came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobSource {
    /// The boot image's seed directory.
    Seed,
    /// The image's registry.
    Registry,
}

fn parse_config(bytes: &[u8]) -> Result<ImageConfig, PullError> {
    let doc: ConfigDoc = serde_json::from_slice(bytes)
        .map_err(|e| PullError::BadImage(format!("image config is not JSON: {e}")))?;
    let c = doc.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        workdir: c
            .workdir
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: c.user.unwrap_or_default(),
    })
}

/// Unpacks a layer blob into `dest` (via a temporary directory, so a
/// half-unpacked layer is never used), translating OCI whiteouts into
/// overlayfs ones.
pub fn unpack_layer(blob: &Path, media_type: &str, dest: &Path) -> Result<(), PullError> {
    let file = std::fs::File::open(blob).map_err(io_err(format!("opening {}", blob.display())))?;
    let reader: Box<dyn Read> = if media_type.ends_with("gzip") {
        Box::new(flate2::read::GzDecoder::new(io::BufReader::new(file)))
    } else if media_type.ends_with("zstd") {
        // Every frame of the stream, as zstd:chunked layers have several.
        Box::new(
            zstd::stream::read::Decoder::new(file)
                .map_err(io_err(format!("opening zstd layer {}", blob.display())))?,
        )
    } else {
        Box::new(io::BufReader::new(file))
    };
    let tmp = dest.with_extension(format!("unpacking-{}", unique_suffix()));
    std::fs::create_dir_all(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let entries = archive.entries().map_err(io_err("reading layer"))?;
    for entry in entries {
        let mut entry = entry.map_err(io_err("reading layer entry"))?;
        let path = entry
            .path()
            .map_err(io_err("layer entry path"))?
            .into_owned();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let rel_parent = path.parent().unwrap_or(Path::new(""));
            let parent = safe_join(&tmp, rel_parent)?;
            refuse_symlinks(&tmp, rel_parent)?;
            std::fs::create_dir_all(&parent).map_err(io_err("creating whiteout parent"))?;
            if hidden == ".wh..opq" {
                set_opaque(&parent)?;
            } else {
                make_whiteout(&parent.join(hidden))?;
            }
            continue;
        }
        let ok = entry
            .unpack_in(&tmp)
            .map_err(io_err(format!("unpacking {}", path.display())))?;
        if !ok {
            return Err(PullError::BadImage(format!(
                "layer entry {} would land outside the layer root; refused",
                path.display()
            )));
        }
    }
    if dest.join(".cairn-done").exists() {
        // Someone finished it meanwhile; theirs is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dest); // a half-finished leftover
                                           // Every unpacked file reaches the disk before the layer is marked done:
                                           // a marker that survives a power cut must mean a complete layer.
    sync_fs(&tmp).map_err(io_err(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, dest).map_err(io_err(format!("renaming to {}", dest.display())))?;
    cairn_storage::files::write_atomic(&dest.join(".cairn-done"), b"")
        .and_then(|()| match dest.parent() {
            Some(p) => std::fs::File::open(p)?.sync_all(),
            None => Ok(()),
        })
        .map_err(io_err("marking layer"))?;
    Ok(())
}

/// `syncfs(2)` on the filesystem holding `path`: one call flushes a whole
/// unpacked layer instead of an fsync per file.
fn sync_fs(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(path)?;
    // SAFETY: syncfs takes any open fd on the filesystem; `dir` lives
    // across the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn safe_join(root: &Path, rel: &Path) -> Result<PathBuf, PullError> {
    use std::path::Component;
    let mut out = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(PullError::BadImage(format!(
                    "layer path {} would land outside the layer root; refused",
                    rel.display()
                )))
            }
        }
    }
    Ok(out)
}

/// Refuses a path whose existing components include a symlink: whiteouts
/// are created with path-following syscalls, so `etc -> /` followed by
/// `etc/.wh.x` must not reach outside the layer.
fn refuse_symlinks(root: &Path, rel: &Path) -> Result<(), PullError> {
    let mut p = root.to_path_buf();
    for c in rel.components() {
        p.push(c);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(PullError::BadImage(format!(
                "layer whiteout under {} goes through a symlink; refused",
                rel.display()
            )));
        }
    }
    Ok(())
}

fn make_whiteout(path: &Path) -> Result<(), PullError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| PullError::BadImage("NUL in whiteout path".into()))?;
    // SAFETY: valid C string; mknod of a 0:0 char device is overlayfs's whiteout.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) };
    if rc != 0 {
        return Err(PullError::Io {
            what: format!("whiteout {}", path.display()),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_opaque(dir: &Path) -> Result<(), PullError> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| PullError::BadImage("NUL in opaque dir path".into()))?;
    // SAFETY: valid C strings and a 1-byte value buffer.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if rc != 0 {
        return Err(PullError::Io {
            what: format!("marking {} opaque", dir.display()),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Bytes used under `p` (files only; symlinks not followed).
fn du(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An uncompressed tar with one regular file.
    fn one_file_tar(path: &str, data: &[u8], mode: u32) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path, data).unwrap();
        tar.into_inner().unwrap()
    }

    /// An OCI image manifest for one config and one uncompressed layer.
    fn one_layer_manifest(config: &[u8], layer: &[u8]) -> Vec<u8> {
        let d = |b: &[u8]| format!("sha256:{}", sha256_hex(b));
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{MT_OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
            d(config), config.len(), d(layer), layer.len()
        )
        .into_bytes()
    }

    /// A tiny registry: serves `blobs` (digest → bytes) under any repository.
    fn serve(blobs: Vec<(String, Vec<u8>)>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                use std::io::{BufRead, BufReader};
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut first = String::new();
                let _ = r.read_line(&mut first);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) <= 2 {
                        break;
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                let body = blobs
                    .iter()
                    .find(|(d, _)| path.ends_with(d.as_str()))
                    .map(|(_, b)| b.clone());
                let mut c = c;
                let _ = match body {
                    Some(b) => c
                        .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len()).as_bytes())
                        .and_then(|()| c.write_all(&b)),
                    None => c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                };
            }
        });
        addr
    }

    /// Interop with a real registry (Debian's docker-registry on loopback):
    /// an OCI image, a Docker v2 schema 2 image, and multi-arch indexes in
    /// both formats (OCI index, Docker manifest list) whose linux/amd64
    /// entry must be the one pulled.
    #[test]
    fn pulls_oci_docker_and_multi_arch_images_from_docker_registry() {
        let Some(bin) = ["/usr/bin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            println!("SKIP: registry interop: /usr/bin/docker-registry missing (make deps installs docker-registry)");
            return;
        };
        let t = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = t.path().join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{ level: warn }}\nstorage: {{ filesystem: {{ rootdirectory: {} }} }}\nhttp: {{ addr: 127.0.0.1:{port} }}\n",
                t.path().join("data").display()
            ),
        )
        .unwrap();
        /// Stops the registry by its pid when the test ends, pass or fail.
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _registry = Kill(
            std::process::Command::new(bin)
                .arg("serve")
                .arg(&cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let base = format!("http://127.0.0.1:{port}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        for _ in 0..100 {
            if agent.get(&format!("{base}/v2/")).call().is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let d = |b: &[u8]| format!("sha256:{}", sha256_hex(b));
        let push_blob = |repo: &str, b: &[u8]| {
            let r = agent
                .post(&format!("{base}/v2/{repo}/blobs/uploads/"))
                .send_empty()
                .unwrap();
            assert_eq!(r.status().as_u16(), 202, "upload start");
            let loc = r.headers()["location"].to_str().unwrap().to_string();
            let loc = if loc.starts_with("http") {
                loc
            } else {
                format!("{base}{loc}")
            };
            let sep = if loc.contains('?') { '&' } else { '?' };
            let r = agent
                .put(&format!("{loc}{sep}digest={}", d(b)))
                .content_type("application/octet-stream")
                .send(b)
                .unwrap();
            assert_eq!(r.status().as_u16(), 201, "blob upload");
        };
        let push_manifest = |repo: &str, mt: &str, b: &[u8]| {
            let r = agent
                .put(&format!("{base}/v2/{repo}/manifests/{}", d(b)))
                .content_type(mt)
                .send(b)
                .unwrap();
            assert_eq!(r.status().as_u16(), 201, "manifest {mt}");
            d(b)
        };
        let layer_with = |file: &str, text: &[u8], gzip: bool| {
            let raw = one_file_tar(file, text, 0o644);
            if !gzip {
                return raw;
            }
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&raw).unwrap();
            gz.finish().unwrap()
        };
        let image = |repo: &str, docker: bool, text: &[u8]| -> (String, &'static str) {
            let layer = layer_with("which", text, true);
            let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/which"]},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
            push_blob(repo, &layer);
            push_blob(repo, &config);
            let (mt, cmt, lmt) = if docker {
                (
                    MT_DOCKER_MANIFEST,
                    "application/vnd.docker.container.image.v1+json",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip",
                )
            } else {
                (
                    MT_OCI_MANIFEST,
                    "application/vnd.oci.image.config.v1+json",
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            };
            let m = format!(
                r#"{{"schemaVersion":2,"mediaType":"{mt}","config":{{"mediaType":"{cmt}","digest":"{}","size":{}}},"layers":[{{"mediaType":"{lmt}","digest":"{}","size":{}}}]}}"#,
                d(&config),
                config.len(),
                d(&layer),
                layer.len()
            );
            (push_manifest(repo, mt, m.as_bytes()), mt)
        };
        let index = |repo: &str, mt: &str, entries: &[(&str, &str, &str)]| {
            let list: Vec<String> = entries
                .iter()
                .map(|(digest, emt, arch)| {
                    let size = agent
                        .get(&format!("{base}/v2/{repo}/manifests/{digest}"))
                        .header("Accept", *emt)
                        .call()
                        .unwrap()
                        .body_mut()
                        .read_to_vec()
                        .unwrap()
                        .len();
                    format!(
                        r#"{{"mediaType":"{emt}","digest":"{digest}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
                    )
                })
                .collect();
            let body = format!(
                r#"{{"schemaVersion":2,"mediaType":"{mt}","manifests":[{}]}}"#,
                list.join(",")
            );
            push_manifest(repo, mt, body.as_bytes())
        };
        let store = Store::new(t.path().join("store"));
        let pull = |repo: &str, digest: &str| -> String {
            let img = ImageRef {
                registry: format!("127.0.0.1:{port}"),
                repository: repo.into(),
                digest: digest.into(),
                insecure: true,
            };
            let p = store
                .pull(&img)
                .unwrap_or_else(|e| panic!("{repo}@{digest}: {e}"));
            std::fs::read_to_string(p.layers[0].join("which")).unwrap()
        };
        let (oci, _) = image("demo/oci", false, b"oci");
        assert_eq!(pull("demo/oci", &oci), "oci");
        let (docker, _) = image("demo/docker", true, b"docker");
        assert_eq!(pull("demo/docker", &docker), "docker");
        // Multi-arch: arm64 first, amd64 second; amd64 must win.
        let (arm, arm_mt) = image("demo/multi", false, b"arm64");
        let (amd, amd_mt) = image("demo/multi", true, b"amd64");
        let oci_index = index(
            "demo/multi",
            MT_OCI_INDEX,
            &[(&arm, arm_mt, "arm64"), (&amd, amd_mt, "amd64")],
        );
        assert_eq!(pull("demo/multi", &oci_index), "amd64");
        let list = index(
            "demo/multi",
            MT_DOCKER_LIST,
            &[(&arm, arm_mt, "arm64"), (&amd, amd_mt, "amd64")],
        );
        assert_eq!(pull("demo/multi", &list), "amd64");
        // An index without linux/amd64 is refused by name.
        let only_arm = index("demo/multi", MT_OCI_INDEX, &[(&arm, arm_mt, "arm64")]);
        let e = store
            .pull(&ImageRef {
                registry: format!("127.0.0.1:{port}"),
                repository: "demo/multi".into(),
                digest: only_arm,
                insecure: true,
            })
            .expect_err("no amd64")
            .to_string();
        assert!(e.contains("linux/amd64"), "{e}");
    }

    /// gzip, zstd (several frames, as zstd:chunked writes them) and plain
    /// tar layers unpack alike.
    #[test]
    fn gzip_zstd_and_plain_layers_unpack() {
        let raw = one_file_tar("f", b"hello", 0o644);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let gz = gz.finish().unwrap();
        let (a, b) = raw.split_at(raw.len() / 2);
        let mut zst = zstd::encode_all(a, 3).unwrap();
        zst.extend(zstd::encode_all(b, 3).unwrap());
        let t = tempfile::tempdir().unwrap();
        for (n, (bytes, mt)) in [
            (raw.clone(), "application/vnd.oci.image.layer.v1.tar"),
            (gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
        ]
        .into_iter()
        .enumerate()
        {
            let blob = t.path().join(format!("blob{n}"));
            std::fs::write(&blob, bytes).unwrap();
            let dest = t.path().join(format!("layer{n}"));
            unpack_layer(&blob, mt, &dest).unwrap_or_else(|e| panic!("{mt}: {e}"));
            assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"hello", "{mt}");
        }
    }

    /// An image built into the boot image: pulled with no registry at all
    /// (nothing listens on its address); a seed blob that does not match
    /// its digest is not used.
    #[test]
    fn seeded_images_need_no_registry_and_are_checked() {
        let layer = one_file_tar("hello", b"hi\n", 0o755);
        let config = br#"{"config":{"Cmd":["/hello"]}}"#.to_vec();
        let d = |b: &[u8]| format!("sha256:{}", sha256_hex(b));
        let manifest = one_layer_manifest(&config, &layer);
        let t = tempfile::tempdir().unwrap();
        let seed = t.path().join("seed");
        let blobs = seed.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in [&manifest, &config, &layer] {
            std::fs::write(blobs.join(sha256_hex(b)), b).unwrap();
        }
        // A closed port: any registry request fails.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = dead.local_addr().unwrap().to_string();
        drop(dead);
        let image = ImageRef {
            registry,
            repository: "demo/seeded".into(),
            digest: d(&manifest),
            insecure: true,
        };
        let store = Store::new(t.path().join("store")).with_seed(&seed);
        let pulled = store.pull(&image).unwrap();
        assert_eq!(pulled.fetched_layers, 0);
        assert_eq!(
            std::fs::read(pulled.layers[0].join("hello")).unwrap(),
            b"hi\n"
        );
        assert_eq!(pulled.config.cmd, vec!["/hello".to_string()]);
        // A tampered seed layer is refused: with the registry gone the pull
        // fails naming it; with a registry the layer comes from there.
        std::fs::write(blobs.join(sha256_hex(&layer)), b"not the layer").unwrap();
        let other = Store::new(t.path().join("store2")).with_seed(&seed);
        let e = other
            .pull(&image)
            .expect_err("a tampered seed must not be used")
            .to_string();
        assert!(e.contains("unreachable"), "{e}");
        let served = ImageRef {
            registry: serve(vec![(d(&layer), layer.clone())]),
            ..image.clone()
        };
        let third = Store::new(t.path().join("store3")).with_seed(&seed);
        let pulled = third.pull(&served).unwrap();
        assert_eq!(pulled.fetched_layers, 1, "the layer came from the registry");
        assert_eq!(
            std::fs::read(pulled.layers[0].join("hello")).unwrap(),
            b"hi\n"
        );
        // A missing seed directory is no seed.
        assert!(Store::new(t.path())
            .with_seed(t.path().join("none"))
            .seed
            .is_none());
    }

    /// A full state volume: the pull fails naming the cause, and no partial
    /// blob is left to eat the space. (A 512 KiB tmpfs stands in for it.)
    #[test]
    fn a_full_disk_fails_the_pull_clearly_and_leaves_nothing_behind() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP: full-disk pull test needs root to mount a small tmpfs");
            return;
        }
        let layer = vec![7u8; 2 << 20];
        let config = br#"{"config":{"Cmd":["/hello"]}}"#.to_vec();
        let d = |b: &[u8]| format!("sha256:{}", sha256_hex(b));
        let manifest = one_layer_manifest(&config, &layer);
        let image = ImageRef {
            registry: serve(vec![
                (d(&manifest), manifest.clone()),
                (d(&config), config.clone()),
                (d(&layer), layer.clone()),
            ]),
            repository: "demo/big".into(),
            digest: d(&manifest),
            insecure: true,
        };
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("store");
        std::fs::create_dir(&root).unwrap();
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mounting a small tmpfs on our own temp dir; unmounted below.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c(&root).as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=512k".as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        let r = Store::new(&root).pull(&image);
        let leftovers: Vec<String> = std::fs::read_dir(root.join("blobs/sha256"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        // SAFETY: unmounting what we mounted.
        unsafe { libc::umount2(c(&root).as_ptr(), libc::MNT_DETACH) };
        let e = match r {
            Ok(_) => panic!("the pull must fail on a full disk"),
            Err(e) => e.to_string(),
        };
        println!("{e}");
        assert!(
            e.contains("No space left on device") && e.contains("layer 0"),
            "{e}"
        );
        assert!(
            leftovers.iter().all(|n| !n.contains("partial")),
            "partial blob left: {leftovers:?}"
        );
    }

    #[test]
    fn gc_keeps_what_images_in_use_need_and_removes_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::new(t.path());
        let put = |body: &[u8]| -> String {
            let d = format!("sha256:{}", sha256_hex(body));
            let p = store.blob_path(&d);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
            d
        };
        let layer_a = put(b"layer a");
        let layer_b = put(b"layer b");
        let config = put(b"{\"config\":{}}");
        for l in [&layer_a, &layer_b] {
            std::fs::create_dir_all(store.layer_path(l).join("etc")).unwrap();
            std::fs::write(store.layer_path(l).join("etc/f"), b"12345").unwrap();
        }
        let manifest = |layers: &[&String]| {
            let ls: Vec<String> = layers
                .iter()
                .map(|l| format!("{{\"digest\":\"{l}\",\"size\":7}}"))
                .collect();
            format!(
                "{{\"config\":{{\"digest\":\"{config}\",\"size\":13}},\"layers\":[{}]}}",
                ls.join(",")
            )
        };
        let m1 = put(manifest(&[&layer_a]).as_bytes());
        let m2 = put(manifest(&[&layer_a, &layer_b]).as_bytes());
        let index =
            put(format!("{{\"manifests\":[{{\"digest\":\"{m1}\",\"size\":1}}]}}").as_bytes());
        // Only the index (→ m1 → layer a) is in use: m2 and layer b go.
        let (n, bytes) = store.gc(std::slice::from_ref(&index));
        assert_eq!(n, 3, "m2's blob, layer b's blob and its unpacked dir");
        assert!(bytes >= 7 + 5);
        for kept in [&index, &m1, &config, &layer_a] {
            assert!(store.blob_path(kept).exists(), "{kept}");
        }
        assert!(store.layer_path(&layer_a).join("etc/f").exists());
        assert!(!store.blob_path(&m2).exists() && !store.blob_path(&layer_b).exists());
        assert!(!store.layer_path(&layer_b).exists());
        // An image in use whose manifest is not stored: nothing is touched.
        assert_eq!(store.gc(&[format!("sha256:{}", "e".repeat(64))]), (0, 0));
        assert!(store.layer_path(&layer_a).exists());
        // Nothing in use: everything goes.
        store.gc(&[]);
        assert_eq!(
            std::fs::read_dir(t.path().join("layers")).unwrap().count(),
            0
        );
    }

    #[test]
    fn config_defaults() {
        let c = parse_config(br#"{"config":{"Entrypoint":["/hello"],"Env":["A=1"]}}"#).unwrap();
        assert_eq!(c.entrypoint, vec!["/hello"]);
        assert_eq!(c.workdir, "/");
        assert!(parse_config(b"nope").is_err());
    }

    #[test]
    fn unpack_refuses_escapes_and_applies_whiteouts() {
        let dir = std::env::temp_dir().join(format!("cairn-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mk = |entries: &[(&str, &[u8])]| {
            let mut b = tar::Builder::new(Vec::new());
            for (name, data) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                h.set_entry_type(tar::EntryType::Regular);
                // Write the raw name so `..` is not rejected by the builder.
                let bytes = name.as_bytes();
                h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            b.into_inner().unwrap()
        };
        let good = dir.join("good.tar");
        std::fs::write(&good, mk(&[("etc/motd", b"hi"), ("etc/.wh.gone", b"")])).unwrap();
        let out = dir.join("layer-good");
        unpack_layer(&good, "application/vnd.oci.image.layer.v1.tar", &out).unwrap();
        assert_eq!(std::fs::read(out.join("etc/motd")).unwrap(), b"hi");
        assert!(out.join(".cairn-done").exists());
        use std::os::unix::fs::FileTypeExt;
        let wh = std::fs::symlink_metadata(out.join("etc/gone")).unwrap();
        assert!(
            wh.file_type().is_char_device(),
            "an OCI whiteout becomes an overlayfs whiteout"
        );
        assert!(!out.join("etc/.wh.gone").exists());
        let bad = dir.join("bad.tar");
        std::fs::write(&bad, mk(&[("../escape", b"x")])).unwrap();
        let out = dir.join("layer-bad");
        // Either refused outright or skipped by tar: never written outside.
        let r = unpack_layer(&bad, "application/vnd.oci.image.layer.v1.tar", &out);
        assert!(r.is_err(), "a path with .. must be refused");
        assert!(!dir.join("escape").exists());

        // A symlink to outside, then a whiteout "through" it: refused, and
        // nothing is created outside.
        let outside = dir.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_link(&mut h, "etc", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "etc/.wh.victim", &b""[..]).unwrap();
        let evil = dir.join("evil.tar");
        std::fs::write(&evil, b.into_inner().unwrap()).unwrap();
        let r = unpack_layer(
            &evil,
            "application/vnd.oci.image.layer.v1.tar",
            &dir.join("layer-evil"),
        );
        assert!(
            r.as_ref().is_err_and(|e| e.to_string().contains("symlink")),
            "{r:?}"
        );
        assert!(
            !outside.join("victim").exists(),
            "nothing written outside the layer"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two workloads sharing a layer unpack it at the same time (the bug:
    /// fixed temp names made one wipe the other's half-done tree, leaving a
    /// layer with missing files marked done). Now each gets a complete layer.
    #[test]
    fn concurrent_unpacks_of_one_layer_both_complete() {
        let dir = std::env::temp_dir().join(format!("cairn-unpack-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..400 {
            let mut h = tar::Header::new_gnu();
            let data = format!("file {i}");
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, format!("d/f{i}"), data.as_bytes())
                .unwrap();
        }
        let blob = dir.join("layer.tar");
        std::fs::write(&blob, b.into_inner().unwrap()).unwrap();
        let dest = dir.join("layer");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (blob, dest) = (blob.clone(), dest.clone());
                std::thread::spawn(move || {
                    let _lock = DigestLock::take("sha256:test");
                    if !dest.join(".cairn-done").exists() {
                        unpack_layer(&blob, "application/vnd.oci.image.layer.v1.tar", &dest)
                    } else {
                        Ok(())
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(std::fs::read_dir(dest.join("d")).unwrap().count(), 400);
        // No temp directories left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("unpacking"))
            .collect();
        assert!(leftovers.is_empty());
        // Without the lock, unpack_layer itself still never replaces a
        // finished layer with another copy.
        unpack_layer(&blob, "application/vnd.oci.image.layer.v1.tar", &dest).unwrap();
        assert_eq!(std::fs::read_dir(dest.join("d")).unwrap().count(), 400);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
