//! The hub's on-disk state: one data directory, plain files, no database.
//!
//! ```text
//! DATA/manifests/<node>.bin   signed envelope bytes, exactly as published
//! DATA/status/<node>.json     {"received_at": <unix s>, "status": {...}}
//! DATA/boot/<file>            kernels, initramfs images, iPXE scripts
//! ```
//!
//! Every write is atomic: a temporary file (named with a leading `.`, so
//! neither the listing nor the API ever sees it) is written and fsynced,
//! renamed over the target, and the directory is fsynced. A crash leaves
//! either the old or the new file, never a torn one; leftover temporary
//! files are removed when the store is opened.
//!
//! All methods do blocking I/O; the server calls them on tokio's blocking pool.

use crate::names::{check_boot_file, check_node, NameError};
use cairn_manifest::Envelope;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const MANIFESTS: &str = "manifests";
const STATUS: &str = "status";
const BOOT: &str = "boot";
const TMP_PREFIX: &str = ".tmp.";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A node or file name that is not allowed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A stored status file does not parse (edited by hand?).
    #[error("stored status {path} is corrupt: {source}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The latest status a node reported, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// When the hub received it (unix seconds, hub clock).
    pub received_at: u64,
    /// The JSON object the node sent.
    pub status: serde_json::Value,
}

/// What the hub holds for a node's published manifest (decoded from the
/// stored envelope; informational only, nodes verify for themselves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Manifest version.
    pub version: u64,
    /// Issue time, unix seconds.
    pub issued_at: u64,
    /// Expiry, unix seconds.
    pub expires_at: u64,
    /// The key id the envelope names.
    pub key_id: String,
    /// Envelope size in bytes.
    pub size: u64,
    /// sha256 of the envelope bytes, hex.
    pub sha256: String,
}

impl Published {
    /// Summarises envelope bytes; `None` when they do not decode.
    pub fn of(bytes: &[u8]) -> Option<Published> {
        let env = Envelope::from_bytes(bytes).ok()?;
        let m = env.decode_payload().ok()?;
        Some(Published {
            version: m.version,
            issued_at: m.issued_at,
            expires_at: m.expires_at,
            key_id: env.key_id.0,
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        })
    }
}

/// One node as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub node: String,
    /// When its latest status arrived; `None` if it never reported.
    pub received_at: Option<u64>,
    /// Its latest status; `None` if it never reported.
    pub status: Option<serde_json::Value>,
    /// The manifest the hub serves it; `None` if none is published.
    pub published: Option<Published>,
}

/// A file being written; it becomes visible under its name on [`Staged::commit`]
/// and is removed if dropped uncommitted.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staged {
    /// Where to write the content.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// fsyncs the temporary file, renames it over the destination and
    /// fsyncs the directory.
    pub fn commit(mut self) -> Result<(), StoreError> {
        let f = File::open(&self.tmp).map_err(io_err("opening", &self.tmp))?;
        f.sync_all().map_err(io_err("syncing", &self.tmp))?;
        drop(f);
        fs::rename(&self.tmp, &self.dest).map_err(io_err("renaming into place", &self.dest))?;
        self.committed = true;
        sync_parent(&self.dest)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let dir = parent_dir(path);
    let d = File::open(dir).map_err(io_err("opening directory", dir))?;
    d.sync_all().map_err(io_err("syncing directory", dir))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn stage(dest: &Path) -> Staged {
    let dir = parent_dir(dest);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Staged {
        tmp: dir.join(format!("{TMP_PREFIX}{name}.{}.{n}", std::process::id())),
        dest: dest.to_path_buf(),
        committed: false,
    }
}

/// Writes a file atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let staged = stage(dest);
    let mut f = File::create(staged.tmp_path()).map_err(io_err("creating", staged.tmp_path()))?;
    f.write_all(bytes)
        .map_err(io_err("writing", staged.tmp_path()))?;
    drop(f);
    staged.commit()
}

/// The data directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// Serialises log appends and rotations.
    logs: std::sync::Mutex<()>,
}

/// Where nodes' shipped logs live: `logs/<node>/<name>.log`, plus
/// `<name>.base` (bytes rotated away before the current file) and one
/// rotated generation `<name>.log.1`.
const LOGS: &str = "logs";
/// A node's log for one name is rotated beyond this.
pub const LOG_CAP: u64 = 8 << 20;

impl Store {
    /// Opens (creating if needed) a data directory and removes temporary
    /// files left by a crash.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for sub in [MANIFESTS, STATUS, BOOT] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("creating directory", &dir))?;
            for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
                let entry = entry.map_err(io_err("listing", &dir))?;
                if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    let p = entry.path();
                    fs::remove_file(&p).map_err(io_err("removing stale temporary file", &p))?;
                }
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
            logs: std::sync::Mutex::new(()),
        })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn log_paths(&self, node: &str, name: &str) -> Result<(PathBuf, PathBuf), StoreError> {
        check_node(node)?;
        check_node(name)?;
        let dir = self.root.join(LOGS).join(node);
        Ok((
            dir.join(format!("{name}.log")),
            dir.join(format!("{name}.base")),
        ))
    }

    fn log_base(base: &Path) -> u64 {
        fs::read_to_string(base)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Appends bytes a node shipped for log `name`; returns the log's end
    /// offset (offsets count every byte ever shipped, across rotations).
    pub fn append_log(&self, node: &str, name: &str, bytes: &[u8]) -> Result<u64, StoreError> {
        use std::io::Write;
        let (path, base) = self.log_paths(node, name)?;
        let _guard = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let dir = path.parent().expect("log path has a directory");
        fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        let mut size = fs::metadata(&path).map_or(0, |m| m.len());
        let mut start = Self::log_base(&base);
        if size + bytes.len() as u64 > LOG_CAP && size > 0 {
            let old = path.with_extension("log.1");
            fs::rename(&path, &old).map_err(io_err("rotating", &path))?;
            start += size;
            size = 0;
            write_atomic(&base, start.to_string().as_bytes())?;
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        f.write_all(bytes).map_err(io_err("appending to", &path))?;
        Ok(start + size + bytes.len() as u64)
    }

    /// Up to `max` bytes of log `name` from offset `from` (older bytes
    /// that were rotated away start at the oldest kept); returns (the
    /// offset of the first byte returned, the bytes, the end offset), or
    /// `None` when the node never shipped that log.
    pub fn read_log(
        &self,
        node: &str,
        name: &str,
        from: u64,
        max: u64,
    ) -> Result<Option<(u64, Vec<u8>, u64)>, StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let (path, base) = self.log_paths(node, name)?;
        let _guard = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let start = Self::log_base(&base);
        let size = f.metadata().map_err(io_err("reading", &path))?.len();
        let at = from.clamp(start, start + size);
        f.seek(SeekFrom::Start(at - start))
            .map_err(io_err("reading", &path))?;
        let mut out = Vec::new();
        f.take(max)
            .read_to_end(&mut out)
            .map_err(io_err("reading", &path))?;
        Ok(Some((at, out, start + size)))
    }

    fn manifest_path(&self, node: &str) -> Result<PathBuf, StoreError> {
        check_node(node)?;
        Ok(self.root.join(MANIFESTS).join(format!("{node}.bin")))
    }

    fn status_path(&self, node: &str) -> Result<PathBuf, StoreError> {
        check_node(node)?;
        Ok(self.root.join(STATUS).join(format!("{node}.json")))
    }

    /// The path of a boot file (the name is checked).
    pub fn boot_path(&self, file: &str) -> Result<PathBuf, StoreError> {
        check_boot_file(file)?;
        Ok(self.root.join(BOOT).join(file))
    }

    /// The iPXE profile for `key` (a normalized MAC or `default`).
    pub fn get_ipxe(&self, key: &str) -> Result<Option<crate::ipxe::Profile>, StoreError> {
        let path = self.root.join("ipxe").join(format!("{key}.json"));
        match read_opt(&path)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
        }
    }

    /// Stores the iPXE profile for `key` (callers check key and profile).
    pub fn put_ipxe(&self, key: &str, p: &crate::ipxe::Profile) -> Result<(), StoreError> {
        let dir = self.root.join("ipxe");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let bytes = serde_json::to_vec_pretty(p).expect("a profile always encodes");
        write_atomic(&dir.join(format!("{key}.json")), &bytes)
    }

    /// Stores a node's envelope bytes (callers check them first).
    pub fn put_manifest(&self, node: &str, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.manifest_path(node)?, bytes)
    }

    /// A node's envelope bytes, if any.
    pub fn get_manifest(&self, node: &str) -> Result<Option<Vec<u8>>, StoreError> {
        read_opt(&self.manifest_path(node)?)
    }

    /// Stores a node's latest status.
    pub fn put_status(&self, node: &str, record: &StatusRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).expect("JSON values always serialize");
        write_atomic(&self.status_path(node)?, &bytes)
    }

    /// A node's latest status, if it ever reported.
    pub fn get_status(&self, node: &str) -> Result<Option<StatusRecord>, StoreError> {
        let path = self.status_path(node)?;
        match read_opt(&path)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
        }
    }

    /// Starts an atomic upload of a boot file.
    pub fn stage_boot(&self, file: &str) -> Result<Staged, StoreError> {
        Ok(stage(&self.boot_path(file)?))
    }

    /// Every node that has a manifest or a status, sorted.
    pub fn node_names(&self) -> Result<BTreeSet<String>, StoreError> {
        let mut names = BTreeSet::new();
        for (sub, ext) in [(MANIFESTS, ".bin"), (STATUS, ".json")] {
            let dir = self.root.join(sub);
            for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
                let entry = entry.map_err(io_err("listing", &dir))?;
                let file = entry.file_name();
                let Some(node) = file.to_str().and_then(|f| f.strip_suffix(ext)) else {
                    continue;
                };
                // Temporary files and anything put there by hand are skipped.
                if check_node(node).is_ok() {
                    names.insert(node.to_string());
                }
            }
        }
        Ok(names)
    }

    /// One node's record; `None` if the hub knows nothing about it.
    pub fn node(&self, node: &str) -> Result<Option<NodeRecord>, StoreError> {
        let manifest = self.get_manifest(node)?;
        let status = self.get_status(node)?;
        if manifest.is_none() && status.is_none() {
            return Ok(None);
        }
        Ok(Some(NodeRecord {
            node: node.to_string(),
            received_at: status.as_ref().map(|s| s.received_at),
            status: status.map(|s| s.status),
            published: manifest.as_deref().and_then(Published::of),
        }))
    }

    /// Every node's record, sorted by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        for name in self.node_names()? {
            // A file removed between listing and reading just drops out.
            if let Some(rec) = self.node(&name)? {
                out.push(rec);
            }
        }
        Ok(out)
    }
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_ignores_temporary_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rec = StatusRecord {
            received_at: 5,
            status: serde_json::json!({"a": 1}),
        };
        store.put_status("b", &rec).unwrap();
        store.put_manifest("a", b"not checked here").unwrap();
        fs::write(dir.path().join("status/.tmp.c.json.1.1"), "{}").unwrap();
        fs::write(dir.path().join("status/Bad.json"), "{}").unwrap();
        fs::write(dir.path().join("manifests/notes.txt"), "").unwrap();
        let names: Vec<_> = store.node_names().unwrap().into_iter().collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(store.get_status("b").unwrap(), Some(rec));
        let a = store.node("a").unwrap().unwrap();
        assert_eq!(
            (a.status, a.published),
            (None, None),
            "undecodable bytes: no summary"
        );
        assert_eq!(store.node("zz").unwrap(), None);
    }

    #[test]
    fn open_removes_stale_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        let stale = dir.path().join("boot/.tmp.vmlinuz.9.9");
        fs::write(&stale, "half").unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn uncommitted_stage_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staged = store.stage_boot("k").unwrap();
        fs::write(staged.tmp_path(), "x").unwrap();
        drop(staged);
        assert_eq!(fs::read_dir(dir.path().join("boot")).unwrap().count(), 0);
        let staged = store.stage_boot("k").unwrap();
        fs::write(staged.tmp_path(), "y").unwrap();
        staged.commit().unwrap();
        assert_eq!(fs::read(dir.path().join("boot/k")).unwrap(), b"y");
    }

    #[test]
    fn bare_file_names_live_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("port")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/port")), Path::new("a"));
        assert_eq!(parent_dir(Path::new("/port")), Path::new("/"));
    }

    #[test]
    fn names_are_checked_before_paths_are_built() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            store.put_manifest("../x", b""),
            Err(StoreError::Name(_))
        ));
        assert!(matches!(store.boot_path("../x"), Err(StoreError::Name(_))));
    }
}
