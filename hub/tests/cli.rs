//! The built binaries: `cairnctl` end to end (keys, signing, inspection,
//! publishing against a real hub) and the `cairn-hub` process lifecycle.

mod common;

use cairn_hub::HubClient;
use cairn_manifest::Envelope;
use common::*;
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cairnctl(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairnctl"));
    cmd.args(args).env_remove("CAIRN_HUB");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("cairnctl runs");
    let run = Run {
        code: status.code().expect("exited, not killed"),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    };
    eprintln!(
        "$ cairnctl {}\n{}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    run
}

fn ok(args: &[&str]) -> String {
    let r = cairnctl(args, &[]);
    assert_eq!(r.code, 0, "cairnctl {args:?} failed: {}", r.stderr);
    r.stdout
}

/// Asserts exit status 1 and a `cairnctl: ` message; returns stderr.
fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let r = cairnctl(args, env);
    assert_eq!(r.code, 1, "cairnctl {args:?} should fail: {}", r.stdout);
    assert!(r.stderr.starts_with("cairnctl: "), "{}", r.stderr);
    r.stderr
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn keygen(dir: &Path) -> String {
    let out = ok(&["keygen", "--out", p(dir)]);
    let id = out
        .lines()
        .next()
        .unwrap()
        .strip_prefix("key id ")
        .expect("prints the key id");
    assert_eq!(id.len(), 16, "{out}");
    id.to_string()
}

#[test]
fn keygen_sign_inspect_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let id = keygen(&keys);
    let mode = std::fs::metadata(keys.join("cairn.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "secret key is private");
    assert!(std::fs::read_to_string(keys.join("cairn.pub"))
        .unwrap()
        .contains(&id));
    let key_before = std::fs::read(keys.join("cairn.key")).unwrap();
    let err = fails(&["keygen", "--out", p(&keys)], &[]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(keys.join("cairn.key")).unwrap(),
        key_before,
        "not overwritten"
    );

    // node and version come from the command line only.
    let toml = dir.path().join("m.toml");
    std::fs::write(&toml, manifest_toml("")).unwrap();
    let key = keys.join("cairn.key");
    let before = cairn_hub::timefmt::now_unix();
    let out = ok(&[
        "sign",
        "--key",
        p(&key),
        "--node",
        "n7",
        "--version",
        "5",
        "--ttl",
        "2h",
        p(&toml),
    ]);
    let bin = dir.path().join("m.bin");
    assert!(
        out.starts_with(&format!("signed n7 version 5 with key {id} (expires "))
            && out.trim_end().ends_with(&format!("-> {}", bin.display())),
        "{out}"
    );
    let m = Envelope::from_bytes(&std::fs::read(&bin).unwrap())
        .unwrap()
        .decode_payload()
        .unwrap();
    assert_eq!((m.node.as_str(), m.version), ("n7", 5));
    assert!(
        m.issued_at >= before && m.expires_at == m.issued_at + 7200,
        "{m:?}"
    );

    let out = ok(&["inspect", p(&bin), "--trust", p(&keys)]);
    assert!(out.contains(&format!("key id:   {id}")), "{out}");
    assert!(out.contains("format:   2"), "{out}");
    assert!(
        out.contains("node = \"n7\"") && out.contains("version = 5") && out.contains(DIGEST),
        "{out}"
    );
    assert!(out.contains("verify:   OK"), "{out}");
    // Without --trust: decode only.
    assert!(!ok(&["inspect", p(&bin)]).contains("verify:"));

    // A key this "node" does not trust.
    let other = dir.path().join("other");
    keygen(&other);
    let err = fails(&["inspect", p(&bin), "--trust", p(&other)], &[]);
    assert!(
        err.contains(&format!(
            "signed by key {id}, which this node does not trust"
        )),
        "{err}"
    );

    // A flipped bit in the signature.
    let mut bytes = std::fs::read(&bin).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    let tampered = dir.path().join("tampered.bin");
    std::fs::write(&tampered, &bytes).unwrap();
    let err = fails(&["inspect", p(&tampered), "--trust", p(&keys)], &[]);
    assert!(err.contains("bad signature"), "{err}");

    let err = fails(&["inspect", p(&toml)], &[]);
    assert!(err.contains("not a cairn manifest envelope"), "{err}");
}

#[test]
fn sign_refuses_invalid_manifests() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let key = dir.path().join("cairn.key");
    let cases = [
        (
            "dup",
            format!(
                "{}{}",
                manifest_toml("node = \"n1\"\nversion = 1"),
                manifest_toml("")
            ),
            "duplicate workload name \"web\"",
        ),
        (
            "digest",
            manifest_toml("node = \"n1\"\nversion = 1").replace(DIGEST, "sha256:1234"),
            "digest \"sha256:1234\"",
        ),
        (
            "schema",
            manifest_toml("node = \"n1\"\nversion = 1\ncolour = \"red\""),
            "colour",
        ),
        ("nonode", manifest_toml("version = 1"), "node"),
        ("syntax", "node = ".to_string(), "not valid TOML"),
    ];
    for (name, text, expected) in cases {
        let toml = dir.path().join(format!("{name}.toml"));
        std::fs::write(&toml, text).unwrap();
        let err = fails(&["sign", "--key", p(&key), p(&toml)], &[]);
        assert!(
            err.contains(expected),
            "{name}: expected {expected:?} in {err}"
        );
        assert!(
            err.contains(&format!("{name}.toml")),
            "names the file: {err}"
        );
        assert!(
            !dir.path().join(format!("{name}.bin")).exists(),
            "{name}: nothing written"
        );
    }
    let toml = dir.path().join("ok.toml");
    std::fs::write(&toml, manifest_toml("node = \"n1\"\nversion = 1")).unwrap();
    let err = fails(&["sign", "--key", p(&key), "--ttl", "soon", p(&toml)], &[]);
    assert!(err.contains("invalid duration \"soon\""), "{err}");
    let err = fails(
        &[
            "sign",
            "--key",
            p(&dir.path().join("missing.key")),
            p(&toml),
        ],
        &[],
    );
    assert!(err.contains("missing.key"), "{err}");
    // Without times or --ttl: valid for 24 hours.
    let out_bin = dir.path().join("out.bin");
    ok(&["sign", "--key", p(&key), "-o", p(&out_bin), p(&toml)]);
    let m = Envelope::from_bytes(&std::fs::read(&out_bin).unwrap())
        .unwrap()
        .decode_payload()
        .unwrap();
    assert_eq!(m.expires_at - m.issued_at, 24 * 3600);
}

#[test]
fn publish_nodes_and_status_against_a_real_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(&dir.path().join("data"));
    keygen(dir.path());
    let toml = dir.path().join("n1.toml");
    std::fs::write(&toml, manifest_toml("node = \"n1\"\nversion = 2")).unwrap();
    ok(&["sign", "--key", p(&dir.path().join("cairn.key")), p(&toml)]);
    let bin = dir.path().join("n1.bin");

    let out = ok(&["publish", "--hub", &hub.url, "n1", p(&bin)]);
    assert_eq!(out.trim(), format!("published n1 version 2 to {}", hub.url));
    let served = HubClient::new(&hub.url).get_manifest("n1").unwrap();
    assert_eq!(served.body, std::fs::read(&bin).unwrap());

    let err = fails(&["publish", "--hub", &hub.url, "n2", p(&bin)], &[]);
    assert!(
        err.contains("manifest is for node \"n1\" but was published to node \"n2\""),
        "{err}"
    );
    let err = fails(&["publish", "--hub", &hub.url, "n1", p(&toml)], &[]);
    assert!(
        err.contains("(400)") && err.contains("not a cairn manifest envelope"),
        "{err}"
    );

    let client = HubClient::new(&hub.url);
    client
        .post_status(
            "n1",
            &serde_json::json!({"node": "n1", "manifest": {"applied_version": 1, "state": "rejected",
                "error": "manifest version 2 expired", "error_code": "expired"},
                "workloads": [{"name": "web", "kind": "container", "state": "running", "restarts": 2, "error": null}]}),
        )
        .unwrap();
    client
        .post_status("zz", &serde_json::json!({"uptime_ms": 5}))
        .unwrap();

    // --hub from the environment.
    let url = hub.url.clone();
    let env = [("CAIRN_HUB", url.as_str())];
    let r = cairnctl(&["nodes"], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    for col in ["NODE", "SEEN", "VERSION", "MANIFEST", "WORKLOADS", "ERROR"] {
        assert!(lines[0].contains(col), "{}", lines[0]);
    }
    let n1: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &n1[..7],
        ["n1", "0s", "ago", "1", "(hub", "2)", "rejected"],
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains("web=running(r2)") && lines[1].contains("manifest version 2 expired"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("zz "), "{}", lines[2]);

    let r = cairnctl(&["nodes", "--json"], &env);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    assert_eq!(v[0]["node"], "n1");

    let r = cairnctl(&["status", "--hub", &hub.url, "n1"], &[]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["status"]["manifest"]["error_code"], "expired");
    let err = fails(&["status", "--hub", &hub.url, "n9"], &[]);
    assert!(err.contains("unknown node \"n9\""), "{err}");
    let err = fails(&["status", "--hub", &hub.url, "N9"], &[]);
    assert!(err.contains("invalid node name \"N9\""), "{err}");
    hub.stop();

    // The hub is gone now.
    let err = fails(&["nodes"], &env);
    assert!(err.contains("cannot reach the hub"), "{err}");
}

#[test]
fn cairn_hub_binary_announces_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-hub"))
        .args([
            "--data",
            p(&dir.path().join("data")),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            p(&port_file),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .strip_prefix("cairn-hub listening on http://127.0.0.1:")
        .and_then(|r| r.strip_suffix('\n'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("unexpected first line {line:?}")
        });
    assert_eq!(
        std::fs::read_to_string(&port_file).unwrap().trim(),
        port.to_string()
    );
    let r = call("GET", &format!("http://127.0.0.1:{port}/healthz"), None);
    assert_eq!(r.status, 200);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cairn-hub did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "graceful exit: {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(
        !stderr.contains("unauthenticated"),
        "no exposure warning on loopback: {stderr}"
    );
}

#[test]
fn cairn_hub_binary_reports_a_bad_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    // Take a port, then ask the hub for the same one.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-hub"))
        .args(["--data", p(dir.path()), "--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no listening line on failure");
}
