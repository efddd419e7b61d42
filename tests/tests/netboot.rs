//! End to end: a machine boots from the network through its NIC's iPXE ROM
//! (Debian's ipxe-qemu, as QEMU ships it). dnsmasq names the hub's chain
//! script as the boot file; the hub answers with this machine's script
//! (matched by MAC): kernel and initramfs from the hub, `cairn.hub` and
//! `cairn.node` on the command line. The node then runs its manifest. A
//! machine the hub does not know gets the default profile: it boots, reports
//! under its hardware-derived id and runs nothing addressed to another node.

use anyhow::{Context, Result};
use cairn_e2e::{inputs_or_skip, run, workload, Scenario, NODE};
use serde_json::Value;
use std::time::{Duration, Instant};

#[test]
fn netboot_through_ipxe_from_the_hub() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    let mut sc = Scenario::setup(&inp)?;
    let ctl = sc.tools.join("cairnctl");
    for (name, file) in [
        ("bzImage", sc.kernel.clone()),
        ("initramfs.cpio.zst", sc.initrd.clone()),
    ] {
        println!(
            "{}",
            run(sc
                .net
                .cmd(&ctl)
                .args(["boot-put", "--hub", &sc.hub, "--name", name])
                .arg(&file))?
            .trim()
        );
    }
    let mac = cairn_e2e::TestNet::mac(0);
    run(sc.net.cmd(&ctl).args([
        "ipxe",
        "--hub",
        &sc.hub,
        "--mac",
        &mac,
        "--node",
        NODE,
        "--cmdline",
        "console=ttyS0 panic=-1 cairn.poll=1",
    ]))?;
    run(sc.net.cmd(&ctl).args([
        "ipxe",
        "--hub",
        &sc.hub,
        "--cmdline",
        "console=ttyS0 panic=-1 cairn.poll=1",
    ]))?;
    // What iPXE will fetch, as it will see it.
    let (code, chain) = sc.net.http_get(&format!("{}/ipxe", sc.hub))?;
    assert_eq!(code, 200);
    assert!(chain.contains("/ipxe/${net0/mac:hexhyp}"), "{chain}");
    let (_, script) = sc
        .net
        .http_get(&format!("{}/ipxe/{}", sc.hub, mac.replace(':', "-")))?;
    println!("{script}");
    assert!(script.contains(&format!("cairn.node={NODE}")), "{script}");
    let v1 = sc.sign("v1", &sc.manifest(1, ""))?;
    sc.publish(NODE, &v1)?;
    sc.net.nics = 1;
    let hub = sc.hub.clone();
    sc.net.pxe_boot_url(&format!("{hub}/ipxe"))?;

    let t0 = Instant::now();
    sc.net.boot_pxe()?;
    sc.net.wait_until(
        "the netbooted node's web to answer",
        Duration::from_secs(300),
        || Ok(workload(&sc.status()?, "web").is_some_and(|w| w["answering"] == true)),
    )?;
    println!("netboot: QEMU start -> web answering in {:.1} s (iPXE DHCP + HTTP fetch of kernel and initramfs, TCG)", t0.elapsed().as_secs_f64());
    let hub_log = std::fs::read_to_string(sc.net.dir.path().join("hub.log"))?;
    assert!(
        hub_log.contains("iPXE script served") && hub_log.contains(&mac.replace(':', "-")),
        "the hub served this machine's script"
    );

    // An unknown machine: the default profile, its own id, nothing to run.
    sc.net.stop("qemu");
    sc.net.first_mac = Some("52:54:00:77:00:99".into());
    sc.net.boot_pxe()?;
    let id = "node-525400770099";
    let mut st = Value::Null;
    sc.net.wait_until(
        "the unknown machine to report under its own id",
        Duration::from_secs(300),
        || {
            let (code, body) = sc.net.http_get(&format!("{hub}/v1/nodes/{id}"))?;
            if code != 200 {
                return Ok(false);
            }
            st = serde_json::from_str::<Value>(&body)?["status"].clone();
            Ok(st["manifest"]["hub_error"].is_string())
        },
    )?;
    println!(
        "unknown MAC: node {} reports, manifest {}",
        st["node"], st["manifest"]
    );
    assert_eq!(st["node"], id);
    assert!(
        st["workloads"].as_array().context("workloads")?.is_empty(),
        "nothing runs: {st}"
    );
    assert!(st["manifest"]["applied_version"].is_null());

    // The netboot ISO (iPXE with the hub's URL built in) as a CD, on a
    // network whose DHCP names no boot file: it chains to the hub itself.
    sc.net.stop("qemu");
    let needed = [
        "/usr/bin/xorriso",
        "/usr/lib/ISOLINUX/isolinux.bin",
        "/usr/lib/syslinux/modules/bios/ldlinux.c32",
    ];
    let ipxe = ["/usr/lib/ipxe/ipxe.lkrn", "/boot/ipxe.lkrn"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if let Some(missing) = needed
        .iter()
        .find(|p| !std::path::Path::new(p).exists())
        .copied()
        .or((!ipxe).then_some("ipxe.lkrn"))
    {
        println!("SKIP: netboot ISO not built: {missing} missing (make deps installs xorriso, isolinux, syslinux-common, ipxe)");
        return Ok(());
    }
    sc.net.first_mac = None;
    sc.net.start_dhcp_plain()?;
    let iso = sc.net.dir.path().join("netboot.iso");
    let built = run(std::process::Command::new(sc.tools.join("cairn-image"))
        .args(["netboot-iso", "--hub", &hub, "--out"])
        .arg(&iso))?;
    println!("{}", built.trim());
    let size = std::fs::metadata(&iso)?.len();
    assert!(size <= 4 << 20, "netboot ISO is {size} bytes, over 4 MiB");
    let t0 = Instant::now();
    sc.net.boot_cdrom(&iso)?;
    let before = sc.status()?["boot_id"].clone();
    sc.net.wait_until(
        "the ISO-booted node's web to answer",
        Duration::from_secs(300),
        || {
            let st = sc.status()?;
            Ok(st["boot_id"] != before
                && workload(&st, "web").is_some_and(|w| w["answering"] == true))
        },
    )?;
    println!(
        "netboot ISO ({size} bytes): QEMU start -> web answering in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    sc.net.check_alive()?;
    Ok(())
}
