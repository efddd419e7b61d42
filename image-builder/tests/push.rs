//! `cairn-image push` against a real registry: Debian's `docker-registry`
//! (distribution 2.8) on 127.0.0.1 with a port picked at run time.

mod common;

use common::{last_line, run_err, run_ok, s};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REGISTRY: &str = "/usr/bin/docker-registry";

/// A registry process that dies with the test, by its pid.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

/// Starts a registry; `storage_extra` is added to its `storage:` map.
fn start_registry(storage_extra: &str) -> Option<Registry> {
    if !Path::new(REGISTRY).is_file() {
        println!("SKIP: docker-registry not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\n\
             log: {{ level: warn }}\n\
             storage: {{ filesystem: {{ rootdirectory: {}/data }}, delete: {{ enabled: true }}{storage_extra} }}\n\
             http: {{ addr: {addr} }}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
    let child = Command::new(REGISTRY)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut reg = Registry {
        child,
        addr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("http://{}/v2/", reg.addr);
    loop {
        if let Ok(r) = agent().get(&url).call() {
            if r.status() == 200 {
                return Some(reg);
            }
        }
        if let Some(st) = reg.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(reg._dir.path().join("registry.log")).unwrap();
            panic!("docker-registry exited with {st}: {log}");
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry never answered {url}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Builds a layout of a fake binary; returns (dir, layout, manifest digest).
fn layout(epoch: &str) -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    let mut data = b"\x7fELF push test ".to_vec();
    data.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    std::fs::write(&bin, data).unwrap();
    let out = tmp.path().join("layout");
    let stdout = run_ok(&[
        "oci",
        "--binary",
        s(&bin),
        "--out",
        s(&out),
        "--epoch",
        epoch,
    ]);
    let digest = last_line(&stdout).to_string();
    (tmp, out, digest)
}

fn get(url: &str, accept: &str) -> (u16, Option<String>, Vec<u8>) {
    let mut r = agent().get(url).header("Accept", accept).call().unwrap();
    let digest = r
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_string());
    (
        r.status().as_u16(),
        digest,
        r.body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap(),
    )
}

#[test]
fn push_then_pull_back_and_push_again() {
    let Some(reg) = start_registry("") else {
        return;
    };
    let (_tmp, out, digest) = layout("1700000000");
    let to = format!("{}/demo/hello:latest", reg.addr);

    let stdout = run_ok(&["push", "--layout", s(&out), "--to", &to, "--insecure"]);
    assert_eq!(
        last_line(&stdout),
        format!("pushed {}/demo/hello@{digest}", reg.addr)
    );
    assert_eq!(stdout.matches(": uploaded").count(), 2, "{stdout}");

    // The registry serves our exact manifest bytes under the tag.
    let local = std::fs::read(
        out.join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap();
    let (status, served_digest, body) = get(
        &format!("http://{}/v2/demo/hello/manifests/latest", reg.addr),
        "application/vnd.oci.image.manifest.v1+json",
    );
    assert_eq!(status, 200);
    assert_eq!(served_digest.as_deref(), Some(digest.as_str()));
    assert_eq!(body, local);

    // And every blob, by digest.
    let manifest: serde_json::Value = serde_json::from_slice(&local).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    for d in [layer, config] {
        let (status, _, body) = get(
            &format!("http://{}/v2/demo/hello/blobs/{d}", reg.addr),
            "*/*",
        );
        assert_eq!(status, 200, "{d}");
        let hex = d.strip_prefix("sha256:").unwrap();
        assert_eq!(
            body,
            std::fs::read(out.join("blobs/sha256").join(hex)).unwrap()
        );
    }

    // Pushing again uploads nothing and lands on the same digest.
    let stdout = run_ok(&["push", "--layout", s(&out), "--to", &to, "--insecure"]);
    assert_eq!(stdout.matches(": exists").count(), 2, "{stdout}");
    assert_eq!(stdout.matches(": uploaded").count(), 0, "{stdout}");
    assert_eq!(
        last_line(&stdout),
        format!("pushed {}/demo/hello@{digest}", reg.addr)
    );

    // A second tag in another repository of the same registry.
    let to2 = format!("{}/other/app:v1.2", reg.addr);
    let stdout = run_ok(&["push", "--layout", s(&out), "--to", &to2, "--insecure"]);
    assert!(last_line(&stdout).ends_with(&digest));
    let (status, served, _) = get(
        &format!("http://{}/v2/other/app/manifests/v1.2", reg.addr),
        "application/vnd.oci.image.manifest.v1+json",
    );
    assert_eq!((status, served.as_deref()), (200, Some(digest.as_str())));
}

#[test]
fn refusals_name_the_cause() {
    let Some(reg) = start_registry("") else {
        return;
    };
    let (_tmp, out, _) = layout("1");
    let to = format!("{}/demo/hello:latest", reg.addr);

    let err = run_err(&["push", "--layout", s(&out), "--to", &to]);
    assert!(err.contains("HTTPS is not supported yet"), "{err}");

    // A corrupted blob is caught before it leaves.
    let blobs = out.join("blobs/sha256");
    let big = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&big).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&big, &bytes).unwrap();
    let err = run_err(&["push", "--layout", s(&out), "--to", &to, "--insecure"]);
    assert!(err.contains("content hashes to"), "{err}");
    let (status, _, _) = get(
        &format!("http://{}/v2/demo/hello/manifests/latest", reg.addr),
        "application/vnd.oci.image.manifest.v1+json",
    );
    assert_eq!(status, 404, "nothing was tagged");

    // Nobody listening: the step and the cause are named.
    let dead = format!("127.0.0.1:{}/demo/hello:latest", free_port());
    let (_tmp2, good, _) = layout("2");
    let err = run_err(&["push", "--layout", s(&good), "--to", &dead, "--insecure"]);
    assert!(err.contains("checking the registry API"), "{err}");
}

#[test]
fn registry_errors_quote_step_status_and_body() {
    let ro = ", maintenance: { readonly: { enabled: true } }";
    let Some(reg) = start_registry(ro) else {
        return;
    };
    let (_tmp, out, _) = layout("3");
    let to = format!("{}/demo/hello:latest", reg.addr);
    let err = run_err(&["push", "--layout", s(&out), "--to", &to, "--insecure"]);
    assert!(err.contains("starting the upload of sha256:"), "{err}");
    assert!(err.contains("HTTP 405"), "{err}");
    assert!(
        err.contains(": HTTP 405: Method not allowed"),
        "the body is quoted: {err}"
    );
}
