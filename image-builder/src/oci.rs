//! OCI image layouts (image-spec v1.0 `image-layout.md`) for one static
//! binary, and reading such a layout back for `push`.
//!
//! The image has one gzip layer holding `/<name>` (0755), `/etc/` and
//! `/tmp/` (01777); its config runs `/<name>` with `PORT` set. Every byte is
//! a function of the binary, the name, the port and the epoch: tar entries
//! sorted with mtime = epoch and uid/gid 0, gzip without a timestamp, JSON
//! from structs with a fixed field order.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Media type of an OCI image manifest.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed layer.
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Annotation naming a manifest in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The `PATH` every image gets (the usual container default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The layout version we write and read.
pub const LAYOUT_VERSION: &str = "1.0.0";

/// Errors building or reading an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// An input could not be read.
    #[error("reading {what} {path}")]
    Read {
        /// What the file is.
        what: &'static str,
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The binary is not a regular, non-empty file.
    #[error("{0}: not a regular non-empty file")]
    NotAFile(PathBuf),
    /// `--name` is not a plain file name.
    #[error("image name {0:?}: {1}")]
    BadName(String, &'static str),
    /// An output could not be written.
    #[error("writing {path}")]
    Write {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The output directory exists and is not an OCI layout we may replace.
    #[error("refusing to replace {0}: it exists and is not an OCI image layout")]
    Refuse(PathBuf),
    /// A JSON document of the layout does not parse.
    #[error("parsing {path}")]
    Json {
        /// File.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// The layout is not one we understand.
    #[error("OCI layout {0}: {1}")]
    Layout(PathBuf, String),
    /// A digest is not `sha256:` + 64 lowercase hex digits.
    #[error("unsupported or malformed digest {0:?}")]
    BadDigest(String),
    /// A blob's bytes do not match its descriptor.
    #[error("blob {digest}: {reason}")]
    BlobMismatch {
        /// The descriptor's digest.
        digest: String,
        /// What differs.
        reason: String,
    },
    /// Building the layer failed.
    #[error("building the layer")]
    Layer(#[source] std::io::Error),
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// Size of the content in bytes.
    pub size: u64,
    /// Platform of a manifest (in an index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform an image manifest is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (GOARCH spelling: `amd64`).
    pub architecture: String,
    /// Operating system.
    pub os: String,
}

/// An image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`MEDIA_MANIFEST`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
}

/// An image index (`index.json` of a layout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// [`MEDIA_INDEX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutFile {
    image_layout_version: String,
}

#[derive(Serialize)]
struct ImageConfig {
    created: String,
    architecture: &'static str,
    os: &'static str,
    config: RunConfig,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    env: Vec<String>,
    entrypoint: Vec<String>,
    exposed_ports: BTreeMap<String, Empty>,
}

/// Serialises as `{}` (the value type of `ExposedPorts`).
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created: String,
    created_by: String,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The static binary.
    pub binary: PathBuf,
    /// Its file name in the image (`/<name>`), also the entrypoint.
    pub name: String,
    /// The port it listens on (`PORT`, `ExposedPorts`).
    pub port: u16,
    /// mtime of every layer entry and the config's `created`.
    pub epoch: u64,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Built {
    /// Descriptor of the manifest (as in `index.json`).
    pub manifest: Descriptor,
    /// Descriptor of the config.
    pub config: Descriptor,
    /// Descriptor of the layer.
    pub layer: Descriptor,
    /// `sha256:` of the uncompressed layer tar.
    pub diff_id: String,
    /// Size of the uncompressed layer tar.
    pub tar_size: u64,
}

fn check_name(name: &str) -> Result<(), OciError> {
    let bad = |why| Err(OciError::BadName(name.to_string(), why));
    if name.is_empty() || name == "." || name == ".." {
        return bad("must be a file name");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, `.`, `_` and `-` are allowed");
    }
    if name == "etc" || name == "tmp" {
        return bad("collides with a directory of the image");
    }
    Ok(())
}

/// The layer's tar: `etc/`, `/<name>` (0755) and `tmp/` (01777) in path
/// order, mtime = `epoch`, uid/gid 0, no user or group names.
pub fn layer_tar(binary: &[u8], name: &str, epoch: u64) -> Result<Vec<u8>, OciError> {
    check_name(name)?;
    let mut entries: Vec<(String, tar::EntryType, u32, &[u8])> = vec![
        ("etc/".into(), tar::EntryType::Directory, 0o755, &[]),
        (name.to_string(), tar::EntryType::Regular, 0o755, binary),
        ("tmp/".into(), tar::EntryType::Directory, 0o1777, &[]),
    ];
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, mode, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(epoch);
        h.set_device_major(0).map_err(OciError::Layer)?;
        h.set_device_minor(0).map_err(OciError::Layer)?;
        builder
            .append_data(&mut h, &path, data)
            .map_err(OciError::Layer)?;
    }
    builder.into_inner().map_err(OciError::Layer)
}

/// gzip (level 9) without a timestamp or file name, so equal input gives
/// equal output.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, OciError> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).map_err(OciError::Layer)?;
    enc.finish().map_err(OciError::Layer)
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: crate::sha256_digest(bytes),
        size: bytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain structs always serialise")
}

/// Builds the layout for `spec` into `out`. `out` is replaced as a whole
/// (built beside it, then renamed), so stale blobs never linger; an existing
/// `out` that is not an OCI layout (nor empty) is left alone and refused.
pub fn build(spec: &Spec, out: &Path) -> Result<Built, OciError> {
    check_name(&spec.name)?;
    let read_err = |source| OciError::Read {
        what: "binary",
        path: spec.binary.clone(),
        source,
    };
    let meta = std::fs::metadata(&spec.binary).map_err(read_err)?;
    if !meta.is_file() || meta.len() == 0 {
        return Err(OciError::NotAFile(spec.binary.clone()));
    }
    let binary = std::fs::read(&spec.binary).map_err(read_err)?;

    let tar = layer_tar(&binary, &spec.name, spec.epoch)?;
    let diff_id = crate::sha256_digest(&tar);
    let layer_bytes = gzip(&tar)?;
    let layer = descriptor(MEDIA_LAYER_GZIP, &layer_bytes);

    let created = crate::epoch::rfc3339(spec.epoch);
    let config_doc = ImageConfig {
        created: created.clone(),
        architecture: "amd64",
        os: "linux",
        config: RunConfig {
            env: vec![DEFAULT_PATH.to_string(), format!("PORT={}", spec.port)],
            entrypoint: vec![format!("/{}", spec.name)],
            exposed_ports: BTreeMap::from([(format!("{}/tcp", spec.port), Empty {})]),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: vec![diff_id.clone()],
        },
        history: vec![History {
            created,
            created_by: format!("cairn-image oci --name {} --port {}", spec.name, spec.port),
        }],
    };
    let config_bytes = to_json(&config_doc);
    let config = descriptor(MEDIA_CONFIG, &config_bytes);

    let manifest_doc = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_MANIFEST.to_string()),
        config: config.clone(),
        layers: vec![layer.clone()],
    };
    let manifest_bytes = to_json(&manifest_doc);
    let mut manifest = descriptor(MEDIA_MANIFEST, &manifest_bytes);
    manifest.platform = Some(Platform {
        architecture: "amd64".into(),
        os: "linux".into(),
    });
    manifest
        .annotations
        .insert(REF_NAME.to_string(), "latest".to_string());
    let index = Index {
        schema_version: 2,
        media_type: Some(MEDIA_INDEX.to_string()),
        manifests: vec![manifest.clone()],
    };

    let layout = to_json(&LayoutFile {
        image_layout_version: LAYOUT_VERSION.into(),
    });
    let files: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".into(), layout),
        ("index.json".into(), to_json(&index)),
        (blob_rel(&layer.digest), layer_bytes),
        (blob_rel(&config.digest), config_bytes),
        (blob_rel(&manifest.digest), manifest_bytes),
    ];
    write_layout(out, &files)?;
    Ok(Built {
        manifest,
        config,
        layer,
        diff_id,
        tar_size: tar.len() as u64,
    })
}

fn blob_rel(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

fn write_layout(out: &Path, files: &[(String, Vec<u8>)]) -> Result<(), OciError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OciError::Write { path, source }
    };
    let name = out
        .file_name()
        .ok_or_else(|| OciError::Refuse(out.to_path_buf()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(werr(parent))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = parent.join(tmp_name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(werr(&tmp))?;
    }
    let result = (|| {
        for (rel, bytes) in files {
            let path = tmp.join(rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(werr(dir))?;
            }
            std::fs::write(&path, bytes).map_err(werr(&path))?;
        }
        if out.exists() || out.is_symlink() {
            let replaceable = out.is_dir()
                && !out.is_symlink()
                && (out.join("oci-layout").is_file()
                    || std::fs::read_dir(out).map_err(werr(out))?.next().is_none());
            if !replaceable {
                return Err(OciError::Refuse(out.to_path_buf()));
            }
            std::fs::remove_dir_all(out).map_err(werr(out))?;
        }
        std::fs::rename(&tmp, out).map_err(werr(out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Checks that a digest is `sha256:` + 64 lowercase hex digits (so it is
/// safe to use as a file name) and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, OciError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(OciError::BadDigest(digest.to_string())),
    }
}

/// An OCI image layout on disk.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
    /// Its `index.json`.
    pub index: Index,
}

/// One image of a layout: its manifest descriptor, bytes and parsed form.
#[derive(Debug, Clone)]
pub struct Image {
    /// The descriptor from `index.json`.
    pub descriptor: Descriptor,
    /// The manifest exactly as stored (what gets pushed).
    pub bytes: Vec<u8>,
    /// The parsed manifest.
    pub manifest: Manifest,
}

impl Layout {
    /// Opens a layout: checks `oci-layout` and parses `index.json`.
    pub fn open(dir: &Path) -> Result<Layout, OciError> {
        let read = |rel: &str| {
            let path = dir.join(rel);
            std::fs::read(&path).map_err(|source| OciError::Read {
                what: "OCI layout file",
                path,
                source,
            })
        };
        let parse_err = |rel: &str| {
            let path = dir.join(rel);
            move |source| OciError::Json { path, source }
        };
        let layout: LayoutFile =
            serde_json::from_slice(&read("oci-layout")?).map_err(parse_err("oci-layout"))?;
        if layout.image_layout_version != LAYOUT_VERSION {
            return Err(OciError::Layout(
                dir.to_path_buf(),
                format!(
                    "imageLayoutVersion {:?}, expected {LAYOUT_VERSION:?}",
                    layout.image_layout_version
                ),
            ));
        }
        let index: Index =
            serde_json::from_slice(&read("index.json")?).map_err(parse_err("index.json"))?;
        Ok(Layout {
            dir: dir.to_path_buf(),
            index,
        })
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads a blob and checks its size and digest against the descriptor.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, OciError> {
        let hex = digest_hex(&desc.digest)?;
        let path = self.dir.join("blobs/sha256").join(hex);
        let bytes = std::fs::read(&path).map_err(|source| OciError::Read {
            what: "blob",
            path,
            source,
        })?;
        if bytes.len() as u64 != desc.size {
            return Err(OciError::BlobMismatch {
                digest: desc.digest.clone(),
                reason: format!("size {} but the descriptor says {}", bytes.len(), desc.size),
            });
        }
        let actual = crate::sha256_digest(&bytes);
        if actual != desc.digest {
            return Err(OciError::BlobMismatch {
                digest: desc.digest.clone(),
                reason: format!("content hashes to {actual}"),
            });
        }
        Ok(bytes)
    }

    /// The image to use: the only image manifest of the index, else the one
    /// whose `org.opencontainers.image.ref.name` is `ref_name`.
    pub fn image(&self, ref_name: &str) -> Result<Image, OciError> {
        let manifests: Vec<&Descriptor> = self
            .index
            .manifests
            .iter()
            .filter(|d| d.media_type == MEDIA_MANIFEST)
            .collect();
        let chosen = match manifests.as_slice() {
            [] => {
                return Err(OciError::Layout(
                    self.dir.clone(),
                    format!("index.json lists no {MEDIA_MANIFEST}"),
                ))
            }
            [only] => *only,
            many => many
                .iter()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(ref_name))
                .copied()
                .ok_or_else(|| {
                    OciError::Layout(
                        self.dir.clone(),
                        format!(
                            "{} image manifests and none is named {ref_name:?}",
                            many.len()
                        ),
                    )
                })?,
        };
        let bytes = self.read_blob(chosen)?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
                path: self.dir.join(blob_rel(&chosen.digest)),
                source,
            })?;
        Ok(Image {
            descriptor: chosen.clone(),
            bytes,
            manifest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["hello", "a.b_c-1"] {
            assert!(check_name(good).is_ok());
        }
        for bad in ["", ".", "..", "a/b", "etc", "tmp", "sp ace"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digests_are_checked() {
        let d = crate::sha256_digest(b"x");
        assert_eq!(digest_hex(&d).unwrap().len(), 64);
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:00",
            &d.to_uppercase(),
            &d[..70],
        ] {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layer_is_sorted_and_deterministic() {
        let a = layer_tar(b"bin", "hello", 7).unwrap();
        assert_eq!(a, layer_tar(b"bin", "hello", 7).unwrap());
        assert_ne!(a, layer_tar(b"bin", "hello", 8).unwrap());
        let mut ar = tar::Archive::new(&a[..]);
        let got: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("etc/".to_string(), 0o755, 7),
                ("hello".to_string(), 0o755, 7),
                ("tmp/".to_string(), 0o1777, 7)
            ]
        );
    }
}
