//! End to end: boot the real kernel + initramfs in QEMU on the closed test
//! network; the node fetches a signed manifest from the hub, pulls the demo
//! image from a real registry and serves HTTP on its published port. Then
//! NAT, the restart policy and the trust model's refusals, on the same boot.

use anyhow::{Context, Result};
use cairn_e2e::{inputs_or_skip, instance, run, workload, Scenario, NODE};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn boot_manifest_container_restart_and_refusals() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    let mut sc = Scenario::setup(&inp)?;
    let ntp = sc.net.start_ntp()?;
    let dir = sc.net.dir.path().to_path_buf();
    let v1 = sc.sign("v1", &sc.manifest(1, ""))?;
    sc.publish(NODE, &v1)?;

    // Boot, and wait until the container accepts connections.
    let t_boot = Instant::now();
    sc.boot()?;
    sc.net.wait_until(
        "the container to answer (status)",
        Duration::from_secs(180),
        || Ok(workload(&sc.status()?, "web").is_some_and(|w| w["answering"] == true)),
    )?;
    let st = sc.status()?;
    let node_ip = st["addresses"][0]
        .as_str()
        .context("no address in status")?
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    println!(
        "node booted and serving after {:.1}s of QEMU (wall), node address {node_ip}",
        t_boot.elapsed().as_secs_f64()
    );
    println!("boot timeline (ms since kernel start):\n  kernel-start 0");
    for p in st["timeline"].as_array().context("no timeline")? {
        println!("  {} {}", p["phase"].as_str().unwrap_or("?"), p["ms"]);
    }

    // Both NICs got a lease (DHCP runs on every link, in parallel).
    sc.net.wait_until(
        "both NICs to have an IPv4 lease",
        Duration::from_secs(30),
        || {
            let st = sc.status()?;
            let ifs = st["interfaces"].as_array().cloned().unwrap_or_default();
            let nics: Vec<&Value> = ifs.iter().filter(|i| i["kind"] == "nic").collect();
            let leased = nics
                .iter()
                .filter(|i| {
                    i["dhcp"] == true && i["lease"]["address"].to_string().contains("10.77.0.")
                })
                .count();
            Ok(nics.len() == 2 && leased == 2)
        },
    )?;
    println!("interfaces: {}", sc.status()?["interfaces"]);

    // Time: the node asked the NTP server DHCP named (option 42).
    if ntp {
        let t = &sc.status()?["time"];
        println!("SNTP at boot: {t}");
        assert_eq!(t["server"], "10.77.0.1", "{t}");
        assert_eq!(t["stratum"], 8, "{t}");
    } else {
        println!("SKIP: chronyd not installed, the node's SNTP is not checked end to end");
    }

    // No disk: the node runs from RAM and says what that costs.
    let storage = &st["storage"];
    assert_eq!(storage["mode"], "ram", "{storage}");
    assert!(
        storage["notes"].to_string().contains("no usable disk"),
        "{storage}"
    );
    assert!(
        st["node_key"]["public"].is_string(),
        "a node key even in RAM"
    );

    // A malformed command-line value is named in the status; boot went on.
    let errors = st["errors"].to_string();
    assert!(
        errors.contains("cairn.colour"),
        "status names the bad kernel argument: {errors}"
    );

    // The published port on the node's address, from the test network (DNAT).
    let url = format!("http://{node_ip}:8080/");
    let (code, body) = sc.net.http_get(&url)?;
    println!("GET {url} -> {code} {}", body.trim());
    assert_eq!(code, 200);
    assert!(body.contains("hello from cairn"), "{body}");
    assert!(
        body.contains("host=web"),
        "the container has its own hostname: {body}"
    );
    let first = instance(&body).context("no instance id")?;

    // NAT out: the container reaches the hub on the test network; the test
    // network has no route to the workload subnet, so only masquerade works.
    let hub_hostport = sc.hub.trim_start_matches("http://").to_string();
    let (code, body) = sc.net.http_get(&format!(
        "http://{node_ip}:8080/fetch?to={hub_hostport}/healthz"
    ))?;
    println!("container -> hub through NAT: {code} {}", body.trim());
    assert_eq!(
        (code, body.trim()),
        (200, "ok"),
        "outbound NAT from the container"
    );

    // Name discovery: web reaches peer by its name through the node's DNS
    // responder on the bridge (peer has no published port).
    // peer has no published port, so nothing above waited for it to listen:
    // retry until it does (a refused connection means it is still starting).
    let fetch_peer = format!("http://{node_ip}:8080/fetch?to=peer:80/");
    let mut got = (0, String::new());
    let _ = sc.net.wait_until(
        "peer to answer web by name",
        Duration::from_secs(60),
        || {
            got = sc.net.http_get(&fetch_peer)?;
            Ok(got.0 == 200)
        },
    );
    let (code, body) = got;
    println!("web -> peer by name: {code} {}", body.trim());
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("host=peer"), "{body}");

    // cairnctl nodes shows the node and its workload.
    let nodes = run(sc
        .net
        .cmd(sc.tools.join("cairnctl"))
        .args(["nodes", "--hub", &sc.hub]))?;
    println!("{nodes}");
    assert!(
        nodes.contains(NODE) && nodes.contains("web=running"),
        "{nodes}"
    );

    // Restart policy `always`: /exit makes the server exit; PID 1 restarts it.
    let _ = sc.net.http_get(&format!("http://{node_ip}:8080/exit"));
    let t0 = Instant::now();
    let mut second = None;
    sc.net.wait_until(
        "a new instance to answer after /exit",
        Duration::from_secs(60),
        || {
            let (c, b) = sc.net.http_get(&url)?;
            second = instance(&b).filter(|i| c == 200 && *i != first);
            Ok(second.is_some())
        },
    )?;
    println!(
        "restart latency (exit -> new instance answering, seen from the test network): {} ms",
        t0.elapsed().as_millis()
    );
    let st = sc.status()?;
    let w = workload(&st, "web").context("web missing")?;
    assert!(w["restarts"].as_u64() >= Some(1), "{w}");
    assert!(
        w["last_exit"].as_str().unwrap_or("").contains("status 3"),
        "{w}"
    );
    let second = second.unwrap_or_default();

    // Refusals: each is reported with its reason; the workload keeps running.
    let wait_rejected = |code: &str| -> Result<Value> {
        let mut last = Value::Null;
        sc.net.wait_until(
            &format!("rejection {code}"),
            Duration::from_secs(60),
            || {
                last = sc.status()?;
                Ok(last["manifest"]["error_code"] == code)
            },
        )?;
        Ok(last)
    };
    // 1. A tampered manifest (one signature byte flipped).
    let mut tampered = sc.sign(
        "v2",
        &sc.manifest(2, "env = [{ name = \"X\", value = \"1\" }]"),
    )?;
    let n = tampered.len();
    tampered[n - 1] ^= 0x01;
    sc.publish(NODE, &tampered)?;
    let st = wait_rejected("bad-signature")?;
    println!("tampered manifest refused: {}", st["manifest"]["error"]);
    assert_eq!(st["manifest"]["applied_version"], 1);
    assert!(
        sc.net.serial().contains("manifest rejected"),
        "the console says why"
    );
    // 2. Signed by a key the node does not trust.
    run(Command::new(sc.tools.join("cairnctl"))
        .args(["keygen", "--name", "rogue", "--out"])
        .arg(dir.join("rogue")))?;
    let rogue = sc.sign_with(&dir.join("rogue/rogue.key"), "rogue", &sc.manifest(5, ""))?;
    sc.publish(NODE, &rogue)?;
    println!(
        "untrusted key refused: {}",
        wait_rejected("unknown-key")?["manifest"]["error"]
    );
    // 3. An expired manifest.
    let expired = sc.manifest(6, "").replace(
        "version = 6",
        "version = 6\nissued_at = 1000\nexpires_at = 2000",
    );
    let expired = sc.sign("expired", &expired)?;
    sc.publish(NODE, &expired)?;
    println!(
        "expired manifest refused: {}",
        wait_rejected("expired")?["manifest"]["error"]
    );

    // A newer, correctly signed manifest is applied; it also adds a workload
    // whose image does not exist, which fails alone.
    let ghost = format!(
        "\n[[container]]\nname = \"ghost\"\nimage = {{ registry = \"{}\", repository = \"demo/missing\", digest = \"sha256:{}\", insecure = true }}\n",
        sc.registry,
        "0".repeat(64)
    );
    let v3 = sc.sign("v3", &sc.manifest(3, &ghost))?;
    sc.publish(NODE, &v3)?;
    sc.net.wait_until(
        "version 3 applied with ghost failing",
        Duration::from_secs(60),
        || {
            let st = sc.status()?;
            Ok(st["manifest"]["applied_version"] == 3
                && st["manifest"]["state"] == "applied"
                && workload(&st, "ghost")
                    .is_some_and(|g| g["error"].as_str().is_some_and(|e| e.contains("not found"))))
        },
    )?;
    let st = sc.status()?;
    println!(
        "v3 applied; ghost: {}",
        workload(&st, "ghost").map_or(Value::Null, |g| g["error"].clone())
    );
    // web's definition did not change: it was left running (same instance).
    let (_, b) = sc.net.http_get(&url)?;
    assert_eq!(
        instance(&b).as_deref(),
        Some(second.as_str()),
        "unchanged workload kept running: {b}"
    );

    // 4. A lower version is a rollback; 5. the same version with other bytes is reuse.
    let v2 = sc.sign("v2b", &sc.manifest(2, ""))?;
    sc.publish(NODE, &v2)?;
    println!(
        "rollback refused: {}",
        wait_rejected("rollback")?["manifest"]["error"]
    );
    let v3b = sc.sign("v3b", &sc.manifest(3, ""))?;
    sc.publish(NODE, &v3b)?;
    println!(
        "version reuse refused: {}",
        wait_rejected("version-reuse")?["manifest"]["error"]
    );
    // v4 changes web's definition and drops ghost: web is replaced (a new
    // instance), ghost is stopped and gone from the status.
    let v4 = sc.sign(
        "v4",
        &sc.manifest(4, "env = [{ name = \"GREETING\", value = \"v4\" }]"),
    )?;
    let peer_pid = workload(&sc.status()?, "peer").context("peer")?["pid"].clone();
    assert!(peer_pid.is_u64(), "peer runs: {peer_pid}");
    sc.publish(NODE, &v4)?;
    let mut third = None;
    let mut st = serde_json::Value::Null;
    sc.net.wait_until(
        "v4 applied: web replaced, ghost removed",
        Duration::from_secs(60),
        || {
            st = sc.status()?;
            let (c, b) = sc.net.http_get(&url)?;
            third = instance(&b).filter(|i| c == 200 && *i != second);
            Ok(st["manifest"]["applied_version"] == 4
                && workload(&st, "ghost").is_none()
                && third.is_some())
        },
    )?;
    // peer's definition did not change: the very same process runs on.
    assert_eq!(
        workload(&st, "peer").context("peer")?["pid"],
        peer_pid,
        "an unchanged workload keeps its pid across a manifest update"
    );
    println!("v4 applied: web replaced by a new instance, ghost removed, peer untouched (pid {peer_pid})");

    // 6. A compromised hub serves another node's (validly signed) manifest
    // under our name: the hub API refuses to file it, so it is written into
    // the hub's store directly. The node refuses it itself.
    let other = sc.sign("other", &sc.manifest(9, "").replace(NODE, "other-node"))?;
    std::fs::write(dir.join(format!("hub/manifests/{NODE}.bin")), &other)?;
    println!(
        "another node's manifest refused: {}",
        wait_rejected("wrong-node")?["manifest"]["error"]
    );
    assert_eq!(sc.status()?["manifest"]["applied_version"], 4);

    // The hub goes away: the node says so on its console and keeps serving;
    // when the hub is back, reports resume.
    let seen_before = sc.net.serial().matches("unreachable").count();
    sc.net.stop("hub");
    sc.net.wait_until(
        "the console to report the hub unreachable",
        Duration::from_secs(30),
        || Ok(sc.net.serial().matches("unreachable").count() > seen_before),
    )?;
    let (code, _) = sc.net.http_get(&url)?;
    assert_eq!(code, 200, "workloads keep running without the hub");
    let tools = sc.tools.clone();
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    sc.hub = sc.net.start_hub(&tools, 7400)?;
    let t_back = Instant::now();
    sc.net.wait_until(
        "a fresh status report after the hub returned",
        Duration::from_secs(60),
        || {
            let (_, body) = sc.net.http_get(&format!("{}/v1/nodes/{NODE}", sc.hub))?;
            let rec: Value = serde_json::from_str(&body)?;
            Ok(rec["received_at"]
                .as_u64()
                .is_some_and(|t| t >= restarted_at)
                && rec["status"]["manifest"]["hub_error"].is_null())
        },
    )?;
    println!(
        "hub back: node reported again after {} ms",
        t_back.elapsed().as_millis()
    );

    // The node is still serving through all of it.
    let (code, _) = sc.net.http_get(&url)?;
    assert_eq!(code, 200);
    sc.net.check_alive()?;
    Ok(())
}

/// A node on a network without DHCP: the kernel's `ip=` syntax gives it a
/// static address, and everything else works as with DHCP.
#[test]
fn static_ip_from_the_kernel_command_line() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    let mut sc = Scenario::setup(&inp)?;
    let v1 = sc.sign("v1", &sc.manifest(1, ""))?;
    sc.publish(NODE, &v1)?;
    sc.boot_with("ip=10.77.0.20::10.77.0.1:255.255.255.0:static-node:eth0:off")?;
    sc.net.wait_until(
        "the container to answer (status)",
        Duration::from_secs(180),
        || Ok(workload(&sc.status()?, "web").is_some_and(|w| w["answering"] == true)),
    )?;
    let st = sc.status()?;
    println!("addresses: {} ({})", st["addresses"], st["addressing"]);
    assert_eq!(st["addresses"][0], "10.77.0.20/24");
    assert_eq!(st["addressing"], "static");
    let all = st["addresses"].to_string();
    assert!(
        all.contains("fe80::"),
        "IPv6 (link-local) is on and reported: {all}"
    );
    let (code, body) = sc.net.http_get("http://10.77.0.20:8080/")?;
    assert_eq!(code, 200, "{body}");
    // No DHCP traffic came from this node.
    let dhcp_log = std::fs::read_to_string(sc.net.dir.path().join("dnsmasq.log"))?;
    assert!(!dhcp_log.contains("52:54:00:77:00:10"), "{dhcp_log}");
    Ok(())
}
