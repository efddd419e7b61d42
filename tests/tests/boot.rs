//! End to end: boot the real kernel + initramfs in QEMU on the closed test
//! network; the node fetches a signed manifest from the hub, pulls the demo
//! image from a real registry and serves HTTP on its published port. Then
//! the trust model's refusals and the restart policy, on the same boot.

use anyhow::{bail, Context, Result};
use cairn_e2e::{inputs, run, TestNet};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NODE: &str = "e2e-node";

fn status(net: &TestNet, hub: &str) -> Result<Value> {
    let (code, body) = net.http_get(&format!("{hub}/v1/nodes/{NODE}"))?;
    if code != 200 {
        bail!("hub answered {code}");
    }
    Ok(serde_json::from_str::<Value>(&body)?["status"].clone())
}

fn workload<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
}

fn sign(tools: &Path, key: &Path, dir: &Path, name: &str, toml: &str) -> Result<Vec<u8>> {
    let src = dir.join(format!("{name}.toml"));
    let out = dir.join(format!("{name}.bin"));
    std::fs::write(&src, toml)?;
    run(Command::new(tools.join("cairnctl"))
        .args(["sign", "--ttl", "1h", "--key"])
        .arg(key)
        .arg("-o")
        .arg(&out)
        .arg(&src))?;
    Ok(std::fs::read(&out)?)
}

fn publish(net: &TestNet, tools: &Path, hub: &str, node: &str, bytes: &[u8]) -> Result<()> {
    let f = net.dir.path().join("publish.bin");
    std::fs::write(&f, bytes)?;
    run(net
        .cmd(tools.join("cairnctl"))
        .args(["publish", "--hub", hub, node])
        .arg(&f))?;
    Ok(())
}

fn manifest(version: u64, registry: &str, digest: &str, extra: &str) -> String {
    format!(
        r#"node = "{NODE}"
version = {version}

[[container]]
name = "web"
image = {{ registry = "{registry}", repository = "demo/hello", digest = "{digest}", insecure = true }}
port = [{{ host = 8080, container = 80 }}]
restart = "always"
{extra}
"#
    )
}

fn instance(body: &str) -> Option<String> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("instance="))
        .map(str::to_string)
}

#[test]
fn boot_manifest_container_restart_and_refusals() -> Result<()> {
    let inp = match inputs() {
        Ok(i) => i,
        Err(reason) => {
            println!("SKIP: {reason}");
            return Ok(());
        }
    };
    let mut net = TestNet::new()?;
    let dir = net.dir.path().to_path_buf();
    let tools = inp.tools.clone();

    // Keys and the node image with the test key baked in.
    run(Command::new(tools.join("cairnctl"))
        .args(["keygen", "--name", "e2e", "--out"])
        .arg(dir.join("keys")))?;
    let key = dir.join("keys/e2e.key");
    let initrd = dir.join("initramfs.cpio.zst");
    let summary = run(Command::new(tools.join("cairn-image"))
        .arg("initramfs")
        .arg("--init")
        .arg(&inp.init)
        .arg("--keys")
        .arg(dir.join("keys"))
        .arg("--out")
        .arg(&initrd))?;
    println!("{}", summary.trim());
    println!(
        "initramfs compressed size: {} bytes ({:.2} MiB)",
        std::fs::metadata(&initrd)?.len(),
        std::fs::metadata(&initrd)?.len() as f64 / 1048576.0
    );

    // The closed network's peers.
    net.start_dhcp()?;
    let registry = net.start_registry(5000)?;
    let hub = net.start_hub(&tools, 7400)?;
    let layout = dir.join("hello-oci");
    run(Command::new(tools.join("cairn-image"))
        .args(["oci", "--name", "hello", "--port", "80", "--binary"])
        .arg(&inp.hello)
        .arg("--out")
        .arg(&layout))?;
    let pushed = run(net
        .cmd(tools.join("cairn-image"))
        .args(["push", "--insecure", "--layout"])
        .arg(&layout)
        .arg("--to")
        .arg(format!("{registry}/demo/hello:latest")))?;
    let digest = pushed
        .trim()
        .rsplit('@')
        .next()
        .context("push printed no digest")?
        .to_string();
    println!("pushed demo image {digest}");

    let v1 = sign(
        &tools,
        &key,
        &dir,
        "v1",
        &manifest(1, &registry, &digest, ""),
    )?;
    publish(&net, &tools, &hub, NODE, &v1)?;

    // Boot.
    let t_boot = Instant::now();
    net.boot(
        &inp.kernel,
        &initrd,
        &format!("console=ttyS0 panic=-1 cairn.hub={hub} cairn.node={NODE} cairn.poll=1"),
    )?;
    net.wait_until(
        "the container to answer (status)",
        Duration::from_secs(180),
        || {
            let st = status(&net, &hub)?;
            Ok(workload(&st, "web").is_some_and(|w| w["answering"] == true))
        },
    )?;
    let st = status(&net, &hub)?;
    let node_ip = st["addresses"][0]
        .as_str()
        .context("no address in status")?
        .split('/')
        .next()
        .unwrap()
        .to_string();
    println!(
        "node booted and serving after {:.1}s of QEMU (wall), node address {node_ip}",
        t_boot.elapsed().as_secs_f64()
    );
    println!("boot timeline (ms since kernel start):");
    println!("  kernel-start 0");
    for p in st["timeline"].as_array().context("no timeline")? {
        println!("  {} {}", p["phase"].as_str().unwrap_or("?"), p["ms"]);
    }

    // The published port on the node's address, from the test network.
    let url = format!("http://{node_ip}:8080/");
    let (code, body) = net.http_get(&url)?;
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
    let hub_hostport = hub.trim_start_matches("http://");
    let (code, body) = net.http_get(&format!(
        "http://{node_ip}:8080/fetch?to={hub_hostport}/healthz"
    ))?;
    println!("container -> hub through NAT: {code} {}", body.trim());
    assert_eq!(
        (code, body.trim()),
        (200, "ok"),
        "outbound NAT from the container"
    );

    // cairnctl nodes shows the node and its workload.
    let nodes = run(net
        .cmd(tools.join("cairnctl"))
        .args(["nodes", "--hub", &hub]))?;
    println!("{nodes}");
    assert!(
        nodes.contains(NODE) && nodes.contains("web=running"),
        "{nodes}"
    );

    // Restart policy `always`: /exit makes the server exit; PID 1 restarts it.
    let _ = net.http_get(&format!("http://{node_ip}:8080/exit"));
    let t0 = Instant::now();
    let mut second = None;
    net.wait_until(
        "a new instance to answer after /exit",
        Duration::from_secs(60),
        || {
            let (c, b) = net.http_get(&url)?;
            second = instance(&b).filter(|i| c == 200 && *i != first);
            Ok(second.is_some())
        },
    )?;
    println!(
        "restart latency (exit -> new instance answering, measured from the test network): {} ms",
        t0.elapsed().as_millis()
    );
    let st = status(&net, &hub)?;
    let w = workload(&st, "web").context("web missing")?;
    assert!(w["restarts"].as_u64() >= Some(1), "{w}");
    assert!(
        w["last_exit"].as_str().unwrap_or("").contains("status 3"),
        "{w}"
    );
    let second = second.unwrap();

    // Refusals: each is reported with its reason; the workload keeps running.
    let wait_rejected = |code: &str| -> Result<Value> {
        let mut last = Value::Null;
        net.wait_until(
            &format!("rejection {code}"),
            Duration::from_secs(60),
            || {
                last = status(&net, &hub)?;
                Ok(last["manifest"]["error_code"] == code)
            },
        )?;
        Ok(last)
    };
    // 1. A tampered manifest (one signature byte flipped).
    let mut tampered = sign(
        &tools,
        &key,
        &dir,
        "v2",
        &manifest(
            2,
            &registry,
            &digest,
            "env = [{ name = \"X\", value = \"1\" }]",
        ),
    )?;
    let n = tampered.len();
    tampered[n - 1] ^= 0x01;
    publish(&net, &tools, &hub, NODE, &tampered)?;
    let st = wait_rejected("bad-signature")?;
    println!("tampered manifest refused: {}", st["manifest"]["error"]);
    assert_eq!(st["manifest"]["applied_version"], 1);
    assert!(
        net.serial().contains("manifest rejected"),
        "the console says why"
    );
    // 2. Signed by a key the node does not trust.
    run(Command::new(tools.join("cairnctl"))
        .args(["keygen", "--name", "rogue", "--out"])
        .arg(dir.join("rogue")))?;
    let rogue = sign(
        &tools,
        &dir.join("rogue/rogue.key"),
        &dir,
        "rogue",
        &manifest(5, &registry, &digest, ""),
    )?;
    publish(&net, &tools, &hub, NODE, &rogue)?;
    println!(
        "untrusted key refused: {}",
        wait_rejected("unknown-key")?["manifest"]["error"]
    );
    // 3. An expired manifest.
    let expired_src = dir.join("expired.toml");
    std::fs::write(
        &expired_src,
        manifest(6, &registry, &digest, "").replace(
            "version = 6",
            "version = 6\nissued_at = 1000\nexpires_at = 2000",
        ),
    )?;
    run(Command::new(tools.join("cairnctl"))
        .arg("sign")
        .arg("--key")
        .arg(&key)
        .arg("-o")
        .arg(dir.join("expired.bin"))
        .arg(&expired_src))?;
    publish(
        &net,
        &tools,
        &hub,
        NODE,
        &std::fs::read(dir.join("expired.bin"))?,
    )?;
    println!(
        "expired manifest refused: {}",
        wait_rejected("expired")?["manifest"]["error"]
    );

    // A newer, correctly signed manifest is applied; it also adds a workload
    // whose image does not exist, which fails alone.
    let ghost = format!(
        "\n[[container]]\nname = \"ghost\"\nimage = {{ registry = \"{registry}\", repository = \"demo/missing\", digest = \"sha256:{}\", insecure = true }}\n",
        "0".repeat(64)
    );
    let v3 = sign(
        &tools,
        &key,
        &dir,
        "v3",
        &manifest(3, &registry, &digest, &ghost),
    )?;
    publish(&net, &tools, &hub, NODE, &v3)?;
    net.wait_until(
        "version 3 applied with ghost failing",
        Duration::from_secs(60),
        || {
            let st = status(&net, &hub)?;
            Ok(st["manifest"]["applied_version"] == 3
                && st["manifest"]["state"] == "applied"
                && workload(&st, "ghost")
                    .is_some_and(|g| g["error"].as_str().is_some_and(|e| e.contains("not found"))))
        },
    )?;
    let st = status(&net, &hub)?;
    println!(
        "v3 applied; ghost: {}",
        workload(&st, "ghost").unwrap()["error"]
    );
    // web's definition did not change: it was left running (same instance).
    let (_, b) = net.http_get(&url)?;
    assert_eq!(
        instance(&b).as_deref(),
        Some(second.as_str()),
        "unchanged workload kept running: {b}"
    );

    // 4. A lower version is a rollback; 5. the same version with other bytes is reuse;
    // 6. another node's manifest is refused.
    let v2 = sign(
        &tools,
        &key,
        &dir,
        "v2b",
        &manifest(2, &registry, &digest, ""),
    )?;
    publish(&net, &tools, &hub, NODE, &v2)?;
    println!(
        "rollback refused: {}",
        wait_rejected("rollback")?["manifest"]["error"]
    );
    let v3b = sign(
        &tools,
        &key,
        &dir,
        "v3b",
        &manifest(3, &registry, &digest, ""),
    )?;
    publish(&net, &tools, &hub, NODE, &v3b)?;
    println!(
        "version reuse refused: {}",
        wait_rejected("version-reuse")?["manifest"]["error"]
    );
    // The hub refuses to store another node's manifest under this node, so
    // serve it through the node's own path with the other node's name: the
    // hub rejects that (it checks), hence publish to the other node and
    // check that our node never applies it.
    let other = sign(
        &tools,
        &key,
        &dir,
        "other",
        &manifest(9, &registry, &digest, "").replace(NODE, "other-node"),
    )?;
    publish(&net, &tools, &hub, "other-node", &other)?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(status(&net, &hub)?["manifest"]["applied_version"], 3);

    // The node is still serving through all of it.
    let (code, _) = net.http_get(&url)?;
    assert_eq!(code, 200);
    net.check_alive()?;
    Ok(())
}
