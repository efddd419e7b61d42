//! The node's initramfs: a cpio "newc" archive holding PID 1 (`/init`), the
//! trusted public keys, the build epoch and the few directories PID 1 mounts
//! on, compressed with zstd (default) or gzip.
//!
//! Nothing is copied from the build host except the files named on the
//! command line, and the archive is reproducible: entries sorted by path,
//! one mtime (the epoch), uid/gid 0, inode numbers assigned in sorted order.

use cairn_manifest::keys::{self, KeyError};
use cairn_manifest::KeyId;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// zstd level used for the initramfs (single-threaded, so the output does
/// not depend on the number of cores).
pub const ZSTD_LEVEL: i32 = 19;

/// Above this compressed size `cairn-image` warns: the design budget for
/// the initramfs is about 4 MB.
pub const SIZE_BUDGET: u64 = 4 * 1024 * 1024;

/// Where the trusted keys live in the image.
pub const KEYS_DIR: &str = "etc/cairn/keys";

/// Where the build epoch lives in the image (PID 1's clock floor).
pub const EPOCH_FILE: &str = "etc/cairn/build-epoch";

/// Directories every initramfs has, with their permissions.
const BASE_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o755),
    ("sys", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("etc", 0o755),
    ("etc/cairn", 0o755),
    (KEYS_DIR, 0o755),
    ("var", 0o755),
    ("var/lib", 0o755),
    ("mnt", 0o755),
];

/// `S_IFDIR`, `S_IFREG`, `S_IFCHR` of the cpio mode field.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Errors building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A module name the kernel's modules.dep does not know.
    #[error("module {0:?}: not in this kernel's modules.dep (and not built in)")]
    UnknownModule(String),
    /// An input could not be read.
    #[error("reading {what} {path}")]
    Read {
        /// What the file is for (`init`, `--file`, ...).
        what: &'static str,
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// An input is a directory, device, ...
    #[error("{what} {0}: not a regular file", what = .1)]
    NotAFile(PathBuf, &'static str),
    /// A `*.pub` file is not a valid public key.
    #[error("invalid trusted key")]
    Key(#[from] KeyError),
    /// The keys directory holds no `*.pub` file.
    #[error(
        "no trusted keys (*.pub) in {0}: an initramfs with no trusted key could never accept a manifest"
    )]
    NoKeys(PathBuf),
    /// A destination path is not acceptable.
    #[error("invalid path {path:?} in the initramfs: {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Two entries want the same path.
    #[error("{0} is already in the initramfs")]
    Duplicate(String),
    /// A path's parent is not a directory.
    #[error("{path}: parent {parent} is not a directory")]
    ParentNotDir {
        /// The entry.
        path: String,
        /// Its parent.
        parent: String,
    },
    /// A `--file` argument is not `SRC:DEST`.
    #[error("--file {0:?}: expected SRC:DEST")]
    FileSpec(String),
    /// An unknown compression name.
    #[error("unknown compression {0:?} (expected zstd, gzip or none)")]
    Compression(String),
    /// newc sizes and mtimes are 32-bit.
    #[error("{0} does not fit the 32-bit cpio newc format")]
    TooLarge(String),
    /// The compressor failed.
    #[error("compressing")]
    Compress(#[source] std::io::Error),
}

/// How the archive is compressed. The kernel must be built with the matching
/// `CONFIG_RD_*` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd level 19 with a content checksum (`CONFIG_RD_ZSTD`).
    #[default]
    Zstd,
    /// gzip level 9, no name or timestamp in the header (`CONFIG_RD_GZIP`).
    Gzip,
    /// The bare cpio archive.
    None,
}

impl FromStr for Compression {
    type Err = InitramfsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "gzip" | "gz" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            other => Err(InitramfsError::Compression(other.to_string())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        })
    }
}

/// An extra file: `SRC:DEST` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    /// The file on the build host.
    pub src: PathBuf,
    /// Its path in the initramfs (a leading `/` is ignored).
    pub dest: String,
}

impl FromStr for ExtraFile {
    type Err = InitramfsError;
    /// Splits at the last `:`, so a source path may contain colons.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.rsplit_once(':') {
            Some((src, dest)) if !src.is_empty() && !dest.is_empty() => Ok(ExtraFile {
                src: PathBuf::from(src),
                dest: dest.to_string(),
            }),
            _ => Err(InitramfsError::FileSpec(s.to_string())),
        }
    }
}

/// What to put in the initramfs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The PID 1 binary, stored as `/init`.
    pub init: PathBuf,
    /// Directory of `*.pub` trusted keys.
    pub keys_dir: PathBuf,
    /// Extra files.
    pub extra_files: Vec<ExtraFile>,
    /// Compression.
    pub compression: Compression,
    /// mtime of every entry and content of `etc/cairn/build-epoch`.
    pub epoch: u64,
    /// A modular kernel's `lib/modules/RELEASE` (depmod'ed) and the module
    /// names to carry from it (with their dependencies).
    pub modules: Option<(PathBuf, Vec<String>)>,
}

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file and its bytes.
    File(Vec<u8>),
    /// A character device node.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// An archive entry: what it is and its permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Type and content.
    pub node: Node,
    /// Permission bits (including sticky/setuid), without the file type.
    pub perm: u32,
}

/// The archive's contents, kept sorted by path.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

/// Checks a path for the archive and returns it without leading `/`.
fn clean_path(path: &str) -> Result<String, InitramfsError> {
    let bad = |reason| InitramfsError::BadPath {
        path: path.to_string(),
        reason,
    };
    let p = path.trim_start_matches('/');
    if p.is_empty() {
        return Err(bad("empty"));
    }
    if p.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    for c in p.split('/') {
        match c {
            "" => return Err(bad("empty component")),
            "." | ".." => return Err(bad("`.` and `..` are not allowed")),
            _ => {}
        }
    }
    Ok(p.to_string())
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Adds an entry; its parent directory must already be there.
    pub fn insert(&mut self, path: &str, node: Node, perm: u32) -> Result<(), InitramfsError> {
        let path = clean_path(path)?;
        if let Some((parent, _)) = path.rsplit_once('/') {
            match self.entries.get(parent) {
                Some(Entry {
                    node: Node::Dir, ..
                }) => {}
                _ => {
                    return Err(InitramfsError::ParentNotDir {
                        path: path.clone(),
                        parent: parent.to_string(),
                    })
                }
            }
        }
        if let Node::File(data) = &node {
            if u32::try_from(data.len()).is_err() {
                return Err(InitramfsError::TooLarge(path));
            }
        }
        if self.entries.contains_key(&path) {
            return Err(InitramfsError::Duplicate(path));
        }
        self.entries.insert(path, Entry { node, perm });
        Ok(())
    }

    /// Creates the missing directories (mode 0755) on the way to `path`'s
    /// parent.
    pub fn create_parents(&mut self, path: &str) -> Result<(), InitramfsError> {
        let path = clean_path(path)?;
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            match self.entries.get(&prefix) {
                Some(Entry {
                    node: Node::Dir, ..
                }) => {}
                Some(_) => {
                    return Err(InitramfsError::ParentNotDir {
                        path: path.clone(),
                        parent: prefix,
                    })
                }
                None => self.insert(&prefix, Node::Dir, 0o755)?,
            }
        }
        Ok(())
    }

    /// The entry at a path.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The uncompressed newc archive: entries in path order (byte order puts
    /// every directory before its contents), inode numbers 1.. in that
    /// order, every mtime = `mtime`, uid/gid 0, then `TRAILER!!!`.
    pub fn to_newc(&self, mtime: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for (index, (path, entry)) in self.entries.iter().enumerate() {
            let (kind, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &entry.node {
                Node::Dir => (S_IFDIR, 2, &[], (0, 0)),
                Node::File(data) => (S_IFREG, 1, data, (0, 0)),
                Node::CharDevice { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
            };
            let ino = u32::try_from(index + 1).expect("fewer than 2^32 entries");
            let header = cpio::NewcBuilder::new(path)
                .ino(ino)
                .mode(kind | (entry.perm & 0o7777))
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(mtime)
                .rdev_major(rdev.0)
                .rdev_minor(rdev.1);
            // `insert` bounded every file to u32, and writing to a Vec cannot fail.
            let mut w = header.write(out, data.len() as u32);
            w.write_all(data).expect("writing to memory");
            out = w.finish().expect("writing to memory");
        }
        cpio::newc::trailer(out).expect("writing to memory")
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<(Vec<u8>, u32), InitramfsError> {
    let err = |source| InitramfsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(InitramfsError::NotAFile(path.to_path_buf(), what));
    }
    let data = std::fs::read(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    Ok((data, meta.permissions().mode()))
}

/// Reads every `*.pub` of `dir` (in name order), validating each; the same
/// key under two names is stored once.
pub fn load_keys(dir: &Path) -> Result<BTreeMap<KeyId, String>, InitramfsError> {
    let err = |source| InitramfsError::Read {
        what: "keys directory",
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    paths.retain(|p| p.extension().is_some_and(|x| x == "pub"));
    paths.sort();
    let mut out = BTreeMap::new();
    for p in paths {
        let key = keys::read_public(&p)?;
        // The canonical text, not the file as found: comments in the source
        // file must not change the image.
        out.insert(KeyId::of(&key), keys::public_file_text(&key));
    }
    if out.is_empty() {
        return Err(InitramfsError::NoKeys(dir.to_path_buf()));
    }
    Ok(out)
}

/// Collects the archive's contents from the spec (reads every input).
pub fn collect(spec: &Spec) -> Result<(Tree, Vec<KeyId>), InitramfsError> {
    let mut tree = Tree::new();
    for (dir, perm) in BASE_DIRS {
        tree.insert(dir, Node::Dir, *perm)?;
    }
    // The kernel opens /dev/console for PID 1 before anything can mount
    // devtmpfs, so the node must be in the archive itself.
    tree.insert(
        "dev/console",
        Node::CharDevice { major: 5, minor: 1 },
        0o600,
    )?;

    let (init, _) = read_file(&spec.init, "init")?;
    if init.is_empty() {
        return Err(InitramfsError::NotAFile(spec.init.clone(), "init (empty)"));
    }
    tree.insert("init", Node::File(init), 0o755)?;

    let keys = load_keys(&spec.keys_dir)?;
    for (id, text) in &keys {
        tree.insert(
            &format!("{KEYS_DIR}/{id}.pub"),
            Node::File(text.clone().into_bytes()),
            0o644,
        )?;
    }

    tree.insert(
        EPOCH_FILE,
        Node::File(format!("{}\n", spec.epoch).into_bytes()),
        0o644,
    )?;

    for extra in &spec.extra_files {
        let dest = clean_path(&extra.dest)?;
        if dest == KEYS_DIR || dest.starts_with(&format!("{KEYS_DIR}/")) {
            return Err(InitramfsError::BadPath {
                path: extra.dest.clone(),
                reason: "trusted keys come from --keys, where they are validated",
            });
        }
        let (data, mode) = read_file(&extra.src, "--file")?;
        let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        tree.create_parents(&dest)?;
        tree.insert(&dest, Node::File(data), perm)?;
    }
    if let Some((root, names)) = &spec.modules {
        crate::modules::add(&mut tree, root, names)?;
    }
    Ok((tree, keys.into_keys().collect()))
}

/// Compresses an archive.
pub fn compress(data: &[u8], compression: Compression) -> Result<Vec<u8>, InitramfsError> {
    match compression {
        Compression::Zstd => {
            let mut c =
                zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(InitramfsError::Compress)?;
            c.set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))
                .map_err(InitramfsError::Compress)?;
            c.compress(data).map_err(InitramfsError::Compress)
        }
        Compression::Gzip => {
            // GzBuilder writes mtime 0, no file name and OS "unknown".
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::best());
            enc.write_all(data).map_err(InitramfsError::Compress)?;
            enc.finish().map_err(InitramfsError::Compress)
        }
        Compression::None => Ok(data.to_vec()),
    }
}

/// A built initramfs.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The compressed archive (what the boot loader loads).
    pub bytes: Vec<u8>,
    /// Size of the cpio archive before compression.
    pub uncompressed_len: u64,
    /// sha256 of `bytes`, hex.
    pub sha256: String,
    /// The trusted keys it carries.
    pub keys: Vec<KeyId>,
    /// Every path in archive order.
    pub paths: Vec<String>,
}

/// Builds the initramfs described by `spec`.
pub fn build(spec: &Spec) -> Result<Initramfs, InitramfsError> {
    let mtime = u32::try_from(spec.epoch)
        .map_err(|_| InitramfsError::TooLarge(format!("epoch {}", spec.epoch)))?;
    let (tree, keys) = collect(spec)?;
    let archive = tree.to_newc(mtime);
    let bytes = compress(&archive, spec.compression)?;
    Ok(Initramfs {
        sha256: crate::sha256_hex(&bytes),
        uncompressed_len: archive.len() as u64,
        bytes,
        keys,
        paths: tree.paths().map(str::to_string).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(clean_path("/usr/bin/x").unwrap(), "usr/bin/x");
        for bad in ["", "/", "a//b", "a/../b", "./a", "a/."] {
            assert!(clean_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parents_must_be_directories() {
        let mut t = Tree::new();
        assert!(matches!(
            t.insert("a/b", Node::Dir, 0o755),
            Err(InitramfsError::ParentNotDir { .. })
        ));
        t.insert("a", Node::File(vec![1]), 0o644).unwrap();
        assert!(t.create_parents("a/b/c").is_err());
        t.create_parents("x/y/z").unwrap();
        assert_eq!(t.paths().collect::<Vec<_>>(), ["a", "x", "x/y"]);
        assert!(matches!(
            t.insert("x", Node::Dir, 0o755),
            Err(InitramfsError::Duplicate(_))
        ));
    }

    #[test]
    fn newc_headers_are_exact() {
        let mut t = Tree::new();
        t.insert("dev", Node::Dir, 0o755).unwrap();
        t.insert(
            "dev/console",
            Node::CharDevice { major: 5, minor: 1 },
            0o600,
        )
        .unwrap();
        t.insert("init", Node::File(b"abc".to_vec()), 0o755)
            .unwrap();
        let a = t.to_newc(0x1234);
        // The 13 fields: ino mode uid gid nlink mtime filesize devmajor
        // devminor rdevmajor rdevminor namesize check.
        let hdr = |f: [u32; 13], name: &str| {
            let mut s = String::from("070701");
            for v in f {
                s.push_str(&format!("{v:08x}"));
            }
            s + name + "\0"
        };
        let text = String::from_utf8_lossy(&a);
        let dev = hdr([1, 0o40755, 0, 0, 2, 0x1234, 0, 0, 0, 0, 0, 4, 0], "dev");
        assert!(text.starts_with(&format!("{dev}\0\0")), "{text}");
        let console = hdr(
            [2, 0o20600, 0, 0, 1, 0x1234, 0, 0, 0, 5, 1, 12, 0],
            "dev/console",
        );
        assert!(text.contains(&console), "{text}");
        let init = hdr([3, 0o100755, 0, 0, 1, 0x1234, 3, 0, 0, 0, 0, 5, 0], "init");
        assert!(text.contains(&format!("{init}\0abc\0")), "{text}");
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(a.len() % 4, 0);
        // Each entry parses back with the crate's reader.
        let mut rest = &a[..];
        let mut names = Vec::new();
        loop {
            let r = cpio::NewcReader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            names.push(r.entry().name().to_string());
            rest = r.finish().unwrap();
        }
        assert_eq!(names, ["dev", "dev/console", "init"]);
    }

    #[test]
    fn extra_file_spec() {
        assert_eq!(
            "a:b:/etc/x".parse::<ExtraFile>().unwrap(),
            ExtraFile {
                src: "a:b".into(),
                dest: "/etc/x".into()
            }
        );
        assert!("nodest".parse::<ExtraFile>().is_err());
        assert!(":x".parse::<ExtraFile>().is_err());
    }
}
