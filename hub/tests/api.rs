//! The hub's HTTP API, exercised over real HTTP against a server on
//! 127.0.0.1:0 with a temporary data directory.

mod common;

use cairn_hub::server::HubConfig;
use cairn_manifest::{Envelope, FORMAT_V1};
use common::*;
use serde_json::json;
use sha2::{Digest, Sha256};

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[test]
fn health_unknown_routes_and_methods() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path());
    let r = call("GET", &format!("{}/healthz", hub.url), None);
    assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
    let msg = call("GET", &format!("{}/v2/nope", hub.url), None).error(404);
    assert!(msg.contains("/v2/nope"), "{msg}");
    let msg = call("DELETE", &format!("{}/v1/nodes/n1/manifest", hub.url), None).error(405);
    assert!(msg.contains("DELETE"), "{msg}");
    hub.stop();
}

#[test]
fn manifest_publish_and_fetch_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path());
    let url = format!("{}/v1/nodes/n1/manifest", hub.url);

    let msg = call("GET", &url, None).error(404);
    assert!(msg.contains("\"n1\""), "{msg}");

    let v3 = sealed("n1", 3);
    let r = call("PUT", &url, Some(&v3));
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let r = call("GET", &url, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v3, "served byte for byte");
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("x-cairn-manifest-version"), Some("3"));
    assert_eq!(r.header("x-sha256"), Some(sha_hex(&v3).as_str()));

    // The hub does not judge versions (nodes do): a lower one replaces it too.
    let v2 = sealed("n1", 2);
    assert_eq!(call("PUT", &url, Some(&v2)).status, 204);
    let r = call("GET", &url, None);
    assert_eq!(
        (r.body == v2, r.header("x-cairn-manifest-version")),
        (true, Some("2"))
    );

    assert_eq!(
        std::fs::read(dir.path().join("manifests/n1.bin")).unwrap(),
        v2
    );
    assert_eq!(
        listing(&dir.path().join("manifests")),
        ["n1.bin"],
        "no temporary files left"
    );
}

#[test]
fn manifest_put_refuses_obviously_wrong_input() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path());
    let url = |node: &str| format!("{}/v1/nodes/{node}/manifest", hub.url);
    let key = test_key();

    let msg = call("PUT", &url("n2"), Some(b"hello, not an envelope")).error(400);
    assert!(msg.contains("not a cairn manifest envelope"), "{msg}");
    let msg = call("PUT", &url("n2"), Some(b"")).error(400);
    assert!(msg.contains("not a cairn manifest envelope"), "{msg}");

    let undecodable = Envelope::sign_payload(FORMAT_V1, vec![0xff, 0xff, 0xff], &key).to_bytes();
    let msg = call("PUT", &url("n2"), Some(&undecodable)).error(400);
    assert!(msg.contains("does not decode"), "{msg}");

    let future = Envelope::sign_payload(99, vec![1, 2, 3], &key).to_bytes();
    let msg = call("PUT", &url("n2"), Some(&future)).error(400);
    assert!(msg.contains("format 99"), "{msg}");

    let msg = call("PUT", &url("n2"), Some(&sealed("n1", 1))).error(400);
    assert!(
        msg.contains("\"n1\"") && msg.contains("\"n2\""),
        "names both nodes: {msg}"
    );

    let mut trailing = sealed("n2", 1);
    trailing.push(0);
    let msg = call("PUT", &url("n2"), Some(&trailing)).error(400);
    assert!(msg.contains("trailing"), "{msg}");

    let huge = vec![0u8; (1 << 20) + 1];
    let msg = call("PUT", &url("n2"), Some(&huge)).error(413);
    assert!(msg.contains("limit"), "{msg}");

    for bad in ["Bad_Node", "-lead", "a%2Fb", "..", &"x".repeat(64)] {
        let msg = call("PUT", &url(bad), Some(&sealed("n2", 1))).error(400);
        let shown = bad.replace("%2F", "/");
        assert!(
            msg.contains(&format!("{shown:?}")),
            "names {shown:?}: {msg}"
        );
        assert!(msg.contains("node name"), "{msg}");
        call("GET", &url(bad), None).error(400);
    }

    // Nothing of the above was stored.
    call("GET", &url("n2"), None).error(404);
    assert!(listing(&dir.path().join("manifests")).is_empty());
    let r = call("GET", &format!("{}/v1/nodes", hub.url), None);
    assert_eq!(r.json(), json!([]));
}

fn demo_status(node: &str, state: &str) -> serde_json::Value {
    json!({
        "node": node, "boot_id": "1b2c", "uptime_ms": 1234, "addresses": ["10.0.2.15/24"],
        "manifest": {"applied_version": 3, "state": "applied", "error": null, "error_code": null},
        "timeline": [{"phase": "pid1", "ms": 812}],
        "workloads": [{"name": "web", "kind": "container", "state": state, "pid": 123,
            "restarts": 0, "last_exit": null, "error": null, "address": "10.88.0.2"}]
    })
}

#[test]
fn status_reports_and_node_listing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path());
    let status_url = |node: &str| format!("{}/v1/nodes/{node}/status", hub.url);

    assert_eq!(
        call(
            "PUT",
            &format!("{}/v1/nodes/a-node/manifest", hub.url),
            Some(&sealed("a-node", 3))
        )
        .status,
        204
    );

    let msg = call("POST", &status_url("b"), Some(b"{not json")).error(400);
    assert!(msg.contains("not JSON"), "{msg}");
    let msg = call("POST", &status_url("b"), Some(b"[1, 2]")).error(400);
    assert!(
        msg.contains("JSON object") && msg.contains("array"),
        "{msg}"
    );
    let msg = call(
        "POST",
        &status_url("b"),
        Some(demo_status("c", "running").to_string().as_bytes()),
    )
    .error(400);
    assert!(msg.contains("\"c\"") && msg.contains("\"b\""), "{msg}");
    let msg = call("POST", &status_url("B"), Some(b"{}")).error(400);
    assert!(msg.contains("\"B\""), "{msg}");
    let msg = call("POST", &status_url("b"), Some(&vec![b' '; (1 << 20) + 1])).error(413);
    assert!(msg.contains("limit"), "{msg}");
    assert_eq!(
        call("GET", &format!("{}/v1/nodes/b", hub.url), None).status,
        404,
        "refused posts store nothing"
    );

    let before = cairn_hub::timefmt::now_unix();
    let st = demo_status("b", "starting");
    assert_eq!(
        call("POST", &status_url("b"), Some(st.to_string().as_bytes())).status,
        204
    );
    let st = demo_status("b", "running");
    assert_eq!(
        call("POST", &status_url("b"), Some(st.to_string().as_bytes())).status,
        204
    );
    let after = cairn_hub::timefmt::now_unix();

    let r = call("GET", &format!("{}/v1/nodes", hub.url), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let list = r.json();
    let list = list.as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["a-node", "b"],
        "sorted, manifest-only nodes included"
    );
    assert_eq!(list[0]["status"], json!(null));
    assert_eq!(list[0]["received_at"], json!(null));
    assert_eq!(list[0]["published"]["version"], json!(3));
    assert_eq!(list[1]["status"], st, "the latest status, as sent");
    assert_eq!(list[1]["published"], json!(null));
    let t = list[1]["received_at"].as_u64().unwrap();
    assert!((before..=after).contains(&t), "{before} <= {t} <= {after}");

    let one = call("GET", &format!("{}/v1/nodes/b", hub.url), None);
    assert_eq!(one.json(), list[1]);
    let msg = call("GET", &format!("{}/v1/nodes/zzz", hub.url), None).error(404);
    assert!(msg.contains("\"zzz\""), "{msg}");
}

#[test]
fn boot_files_upload_download_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path());
    let url = |f: &str| format!("{}/boot/{f}", hub.url);

    let kernel: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(call("PUT", &url("vmlinuz"), Some(&kernel)).status, 204);
    let r = call("GET", &url("vmlinuz"), None);
    assert_eq!(r.status, 200);
    assert!(r.body == kernel, "same bytes back");
    assert_eq!(r.header("x-sha256"), Some(sha_hex(&kernel).as_str()));

    let script = b"#!ipxe\nchain http://10.0.2.2/boot/vmlinuz\n";
    assert_eq!(call("PUT", &url("boot.ipxe"), Some(script)).status, 204);
    assert_eq!(
        call("PUT", &url("boot.ipxe"), Some(b"#!ipxe\nexit\n")).status,
        204
    );
    assert_eq!(
        call("GET", &url("boot.ipxe"), None).body,
        b"#!ipxe\nexit\n",
        "replaced"
    );

    let msg = call("GET", &url("initramfs.cpio.zst"), None).error(404);
    assert!(msg.contains("initramfs.cpio.zst"), "{msg}");

    for bad in [
        ".hidden",
        "..",
        "%2e%2e",
        "..%2F..%2Fetc%2Fpasswd",
        "a%2Fb",
        "a%20b",
        ".tmp.vmlinuz.1.1",
    ] {
        for method in ["GET", "PUT"] {
            let body = (method == "PUT").then_some(b"x".as_slice());
            let msg = call(method, &url(bad), body).error(400);
            assert!(
                msg.contains("invalid boot file name"),
                "{method} {bad}: {msg}"
            );
        }
    }
    assert_eq!(listing(&dir.path().join("boot")), ["boot.ipxe", "vmlinuz"]);
    assert!(!dir.path().join("etc").exists());
}

#[test]
fn boot_upload_over_the_limit_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HubConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    config.boot_limit = 1000;
    let hub = TestHub::start_with(config);
    let url = format!("{}/boot/big", hub.url);
    let msg = call("PUT", &url, Some(&[1u8; 1001])).error(413);
    assert!(msg.contains("1000"), "{msg}");
    assert!(listing(&dir.path().join("boot")).is_empty());
    assert_eq!(call("PUT", &url, Some(&[1u8; 1000])).status, 204);
}

#[test]
fn concurrent_publishes_leave_one_whole_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path());
    let url = format!("{}/v1/nodes/n1/manifest", hub.url);
    let versions: Vec<Vec<u8>> = (1..=8).map(|v| sealed("n1", v)).collect();
    std::thread::scope(|s| {
        for bytes in &versions {
            let url = &url;
            s.spawn(move || {
                for _ in 0..5 {
                    assert_eq!(call("PUT", url, Some(bytes)).status, 204);
                }
            });
        }
    });
    let got = call("GET", &url, None).body;
    assert!(
        versions.contains(&got),
        "one of the published envelopes, not a mix"
    );
    assert_eq!(listing(&dir.path().join("manifests")), ["n1.bin"]);
}

#[test]
fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let env = sealed("n1", 5);
    let st = demo_status("n1", "running");
    let listed = {
        let hub = TestHub::start(dir.path());
        assert_eq!(
            call(
                "PUT",
                &format!("{}/v1/nodes/n1/manifest", hub.url),
                Some(&env)
            )
            .status,
            204
        );
        assert_eq!(
            call(
                "POST",
                &format!("{}/v1/nodes/n1/status", hub.url),
                Some(st.to_string().as_bytes())
            )
            .status,
            204
        );
        assert_eq!(
            call("PUT", &format!("{}/boot/vmlinuz", hub.url), Some(b"kernel")).status,
            204
        );
        let listed = call("GET", &format!("{}/v1/nodes", hub.url), None).json();
        hub.stop();
        listed
    };
    // A crash mid-write leaves a temporary file; the next start removes it.
    std::fs::write(dir.path().join("manifests/.tmp.n1.bin.1.1"), b"torn").unwrap();

    let hub = TestHub::start(dir.path());
    let r = call("GET", &format!("{}/v1/nodes/n1/manifest", hub.url), None);
    assert_eq!((r.status, r.body == env), (200, true));
    assert_eq!(
        call("GET", &format!("{}/v1/nodes", hub.url), None).json(),
        listed
    );
    assert_eq!(listed[0]["status"], st);
    assert_eq!(
        call("GET", &format!("{}/boot/vmlinuz", hub.url), None).body,
        b"kernel"
    );
    assert_eq!(listing(&dir.path().join("manifests")), ["n1.bin"]);
}

#[test]
fn logs_are_appended_read_from_offsets_and_survive_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path());
    let url = |q: &str| format!("{}/v1/nodes/n1/logs/web{q}", hub.url);
    assert_eq!(call("GET", &url(""), None).status, 404);
    assert_eq!(call("POST", &url(""), Some(b"line 1\n")).status, 200);
    assert_eq!(call("POST", &url(""), Some(b"line 2\n")).status, 200);
    let all = call("GET", &url(""), None);
    assert_eq!(all.status, 200);
    assert_eq!(all.body, b"line 1\nline 2\n");
    let tail = call("GET", &url("?from=7"), None);
    assert_eq!(tail.body, b"line 2\n");
    let past = call("GET", &url("?from=999"), None);
    assert!(past.body.is_empty());
    let msg = call("GET", &url("?from=x"), None).error(400);
    assert!(msg.contains("offset"), "{msg}");
    let msg = call(
        "POST",
        &format!("{}/v1/nodes/n1/logs/..", hub.url),
        Some(b"x"),
    )
    .error(400);
    assert!(msg.contains("log name"), "{msg}");

    // Rotation: offsets keep counting; reads before the kept data start at
    // the oldest kept byte.
    let store = cairn_hub::store::Store::open(&dir.path().join("direct")).unwrap();
    let big = vec![b'a'; (cairn_hub::store::LOG_CAP - 10) as usize];
    assert_eq!(
        store.append_log("n2", "web", &big).unwrap(),
        big.len() as u64
    );
    let end = store
        .append_log("n2", "web", b"after the rotation\n")
        .unwrap();
    assert_eq!(end, big.len() as u64 + 19);
    let (start, bytes, e) = store.read_log("n2", "web", 0, 1 << 20).unwrap().unwrap();
    assert_eq!(
        (start, bytes.as_slice(), e),
        (big.len() as u64, &b"after the rotation\n"[..], end)
    );
}
