//! `cairn-image oci` end to end: the layout is reproducible and internally
//! consistent (digests, sizes, diff_id), and the layer holds what it should.

mod common;

use common::{last_line, run_err, run_ok, s};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

fn fake_binary(dir: &Path) -> PathBuf {
    let bin = dir.join("hello-bin");
    let mut data = b"\x7fELF".to_vec();
    data.extend((0..50_000u32).map(|i| (i * 7 % 251) as u8));
    std::fs::write(&bin, data).unwrap();
    bin
}

fn build(bin: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["oci", "--binary", s(bin), "--out", s(out)];
    args.extend_from_slice(extra);
    last_line(&run_ok(&args)).to_string()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Every file of a directory tree, by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn rebuilds_are_identical_and_epoch_matters() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = fake_binary(tmp.path());
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let da = build(&bin, &a, &["--epoch", "1700000000"]);
    let db = build(&bin, &b, &["--epoch", "1700000000"]);
    let dc = build(&bin, &c, &["--epoch", "1700000001"]);
    assert!(da.starts_with("sha256:") && da.len() == 71, "{da}");
    assert_eq!(da, db);
    assert_ne!(da, dc);
    assert_eq!(tree(&a), tree(&b), "byte-identical layouts");

    // Rebuilding over an existing layout replaces it; no stale blobs remain.
    let again = build(&bin, &c, &["--epoch", "1700000000"]);
    assert_eq!(again, da);
    assert_eq!(tree(&c), tree(&a));

    // A directory that is not a layout is never clobbered.
    let precious = tmp.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("keep.txt"), b"mine").unwrap();
    let err = run_err(&["oci", "--binary", s(&bin), "--out", s(&precious)]);
    assert!(err.contains("refusing to replace"), "{err}");
    assert_eq!(std::fs::read(precious.join("keep.txt")).unwrap(), b"mine");
}

#[test]
fn layout_is_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = fake_binary(tmp.path());
    let out = tmp.path().join("layout");
    let digest = build(
        &bin,
        &out,
        &["--name", "web", "--port", "8080", "--epoch", "1700000000"],
    );

    assert_eq!(
        std::fs::read_to_string(out.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let index = json(&std::fs::read(out.join("index.json")).unwrap());
    assert_eq!(index["schemaVersion"], 2);
    let m = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["digest"], digest.as_str());
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );

    // Every blob is named by its sha256, and sizes match.
    let manifest_bytes = blob(&out, &digest);
    assert_eq!(sha256(&manifest_bytes), digest);
    assert_eq!(m["size"], manifest_bytes.len() as u64);
    for (name, bytes) in tree(&out.join("blobs/sha256")) {
        assert_eq!(sha256(&bytes), format!("sha256:{name}"));
    }
    assert_eq!(
        tree(&out.join("blobs/sha256")).len(),
        3,
        "layer, config, manifest only"
    );

    let manifest = json(&manifest_bytes);
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layer_desc = &manifest["layers"][0];
    assert_eq!(
        layer_desc["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    // The layer's sha256 is the manifest's digest; its gzip header has no time.
    let layer = blob(&out, layer_desc["digest"].as_str().unwrap());
    assert_eq!(sha256(&layer), layer_desc["digest"].as_str().unwrap());
    assert_eq!(layer_desc["size"], layer.len() as u64);
    assert_eq!(&layer[4..8], &[0, 0, 0, 0], "gzip mtime is zero");

    // diff_id is the sha256 of the uncompressed tar.
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&layer[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let config_bytes = blob(&out, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(manifest["config"]["size"], config_bytes.len() as u64);
    let config = json(&config_bytes);
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&tar_bytes).as_str());
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/web"]));
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PORT=8080"
        ])
    );
    assert_eq!(
        config["config"]["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}})
    );

    // The tar: the binary at /web, 0755, root-owned, mtime = epoch.
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let mut seen = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{path}");
        assert_eq!(h.mtime().unwrap(), 1_700_000_000, "{path}");
        if path == "web" {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            assert_eq!(data, std::fs::read(&bin).unwrap());
        }
        seen.push((path, h.entry_type().is_dir(), h.mode().unwrap()));
    }
    assert_eq!(
        seen,
        [
            ("etc/".to_string(), true, 0o755),
            ("tmp/".to_string(), true, 0o1777),
            ("web".to_string(), false, 0o755),
        ]
    );

    // GNU tar agrees, if present.
    if common::have("tar") {
        let tarfile = tmp.path().join("layer.tar");
        std::fs::write(&tarfile, &tar_bytes).unwrap();
        let out = std::process::Command::new("tar")
            .args(["-tvf", s(&tarfile)])
            .output()
            .unwrap();
        assert!(out.status.success());
        let list = String::from_utf8(out.stdout).unwrap();
        let web = list.lines().find(|l| l.ends_with(" web")).unwrap();
        assert!(web.starts_with("-rwxr-xr-x"), "{web}");
    }
}

#[test]
fn bad_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = fake_binary(tmp.path());
    let out = tmp.path().join("x");
    let err = run_err(&[
        "oci",
        "--binary",
        s(&bin),
        "--out",
        s(&out),
        "--name",
        "a/b",
    ]);
    assert!(err.contains("image name \"a/b\""), "{err}");
    let err = run_err(&["oci", "--binary", s(tmp.path()), "--out", s(&out)]);
    assert!(err.contains("not a regular non-empty file"), "{err}");
    assert!(!out.exists());
}
