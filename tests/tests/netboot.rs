//! End to end: a machine boots from the network through its NIC's iPXE ROM
//! (Debian's ipxe-qemu, as QEMU ships it). dnsmasq names the hub's chain
//! script as the boot file; the hub answers with this machine's script
//! (matched by MAC): kernel and initramfs from the hub, `cairn.hub` and
//! `cairn.node` on the command line. The node then runs its manifest. A
//! machine the hub does not know gets the default profile: it boots, reports
//! under its hardware-derived id and runs nothing addressed to another node.

use anyhow::{Context, Result};
use cairn_e2e::{answering, inputs_or_skip, run, sha256_file, Scenario, NODE};
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
    // A state disk (a netbooted node remembers that it rebooted for an OS
    // version) and reboots that restart the machine.
    let disk = sc.net.dir.path().join("state.img");
    std::fs::File::create(&disk)?.set_len(256 << 20)?;
    sc.net.disks = vec![cairn_e2e::DiskSpec::new(&disk, "NETBOOT-DISK-1")];
    sc.net.allow_reset = true;
    let hub = sc.hub.clone();
    sc.net.pxe_boot_url(&format!("{hub}/ipxe"))?;

    let t0 = Instant::now();
    sc.net.boot_pxe()?;
    sc.net.wait_until(
        "the netbooted node's web to answer",
        Duration::from_secs(300),
        || Ok(answering(&sc.status()?, "web")),
    )?;
    println!("netboot: QEMU start -> web answering in {:.1} s (iPXE DHCP + HTTP fetch of kernel and initramfs, TCG)", t0.elapsed().as_secs_f64());
    let hub_log = std::fs::read_to_string(sc.net.dir.path().join("hub.log"))?;
    assert!(
        hub_log.contains("iPXE script served") && hub_log.contains(&mac.replace(':', "-")),
        "the hub served this machine's script"
    );

    // An OS update on a netbooted node: the operator points the machine's
    // profile at version 2, the manifest names it, the node reboots into it.
    let os = |v: &str| -> Result<String> {
        Ok(format!(
            "\n[os]\nversion = \"{v}\"\nkernel = {{ url = \"{hub}/boot/bzImage\", sha256 = \"{k}\" }}\ninitramfs = {{ url = \"{hub}/boot/initramfs.cpio.zst\", sha256 = \"{i}\" }}\n",
            k = sha256_file(&sc.kernel)?,
            i = sha256_file(&sc.initrd)?,
        ))
    };
    run(sc.net.cmd(&ctl).args([
        "ipxe",
        "--hub",
        &sc.hub,
        "--mac",
        &mac,
        "--node",
        NODE,
        "--cmdline",
        "console=ttyS0 panic=-1 cairn.poll=1 cairn.os=2",
    ]))?;
    let boot1 = sc.status()?["boot_id"].clone();
    sc.publish(NODE, &sc.sign("v2", &sc.manifest(2, &os("2")?))?)?;
    let mut st = Value::Null;
    sc.net.wait_until(
        "the netbooted node to reboot into OS version 2",
        Duration::from_secs(300),
        || {
            st = sc.status()?;
            Ok(st["boot_id"] != boot1 && st["os"]["running"] == "2" && answering(&st, "web"))
        },
    )?;
    println!("netboot OS update: {}", st["os"]);
    // Version 3 named while the profile still serves 2: one reboot, then
    // the node says so instead of rebooting again.
    let boot2 = st["boot_id"].clone();
    sc.publish(NODE, &sc.sign("v3", &sc.manifest(3, &os("3")?))?)?;
    sc.net.wait_until(
        "the node to report that the boot server still serves 2",
        Duration::from_secs(300),
        || {
            st = sc.status()?;
            Ok(st["boot_id"] != boot2
                && st["os"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("still serves the old version")))
        },
    )?;
    println!("netboot, profile not updated: {}", st["os"]["error"]);
    let boot3 = st["boot_id"].clone();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(sc.status()?["boot_id"], boot3, "no second reboot");
    sc.net.disks.clear();
    sc.net.allow_reset = false;

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
            Ok(st["boot_id"] != before && answering(&st, "web"))
        },
    )?;
    println!(
        "netboot ISO ({size} bytes): QEMU start -> web answering in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    sc.net.check_alive()?;
    Ok(())
}

/// Verified netboot: the loader ISO (our kernel, PID 1 in loader mode)
/// fetches the node's signed manifest, refuses an initramfs that does not
/// match the manifest's digest, and kexecs into the one that does.
#[test]
fn verified_loader_refuses_a_tampered_initramfs_and_kexecs_the_signed_one() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    for (p, pkg) in [
        ("/usr/bin/xorriso", "xorriso"),
        ("/usr/lib/ISOLINUX/isolinux.bin", "isolinux"),
        (
            "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
            "systemd-boot-efi",
        ),
        ("/usr/bin/mcopy", "mtools"),
        ("/usr/sbin/mkfs.vfat", "dosfstools"),
    ] {
        if !std::path::Path::new(p).exists() {
            println!("SKIP: verified loader: {p} missing (make deps installs {pkg})");
            return Ok(());
        }
    }
    let mut sc = Scenario::setup(&inp)?;
    let dir = sc.net.dir.path().to_path_buf();
    let ctl = sc.tools.join("cairnctl");
    let tampered = dir.join("tampered.img");
    let mut bytes = std::fs::read(&sc.initrd)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&tampered, &bytes)?;
    for (name, file) in [
        ("bzImage", sc.kernel.clone()),
        ("initramfs.cpio.zst", sc.initrd.clone()),
        ("tampered.img", tampered),
    ] {
        run(sc
            .net
            .cmd(&ctl)
            .args(["boot-put", "--hub", &sc.hub, "--name", name])
            .arg(&file))?;
    }
    let os = |initrd: &str| -> Result<String> {
        Ok(format!(
            "\n[os]\nversion = \"7\"\nkernel = {{ url = \"{h}/boot/bzImage\", sha256 = \"{k}\" }}\ninitramfs = {{ url = \"{h}/boot/{initrd}\", sha256 = \"{i}\" }}\n",
            h = sc.hub,
            k = sha256_file(&sc.kernel)?,
            i = sha256_file(&sc.initrd)?,
        ))
    };
    // The hub serves a tampered initramfs under the signed digest.
    sc.publish(NODE, &sc.sign("v1", &sc.manifest(1, &os("tampered.img")?))?)?;
    let iso = dir.join("loader.iso");
    let built = run(std::process::Command::new(sc.tools.join("cairn-image"))
        .env("RUST_BACKTRACE", "0")
        .args(["iso", "--kernel"])
        .arg(&sc.kernel)
        .arg("--initramfs")
        .arg(&sc.initrd)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 panic=-1 cairn.mode=loader cairn.hub={} cairn.node={NODE} cairn.poll=1",
            sc.hub
        ))
        .arg("--out")
        .arg(&iso))?;
    println!("{}", built.trim());
    println!(
        "verified loader ISO: {} bytes (the iPXE netboot ISO: see the test above)",
        std::fs::metadata(&iso)?.len()
    );
    sc.net.nics = 1;
    // A state disk: the kexec'd node records what it applied, and the
    // loader holds the hub to it on the next boot.
    let disk = dir.join("state.img");
    std::fs::File::create(&disk)?.set_len(256 << 20)?;
    sc.net.disks = vec![cairn_e2e::DiskSpec::new(&disk, "LOADER-DISK-1")];
    sc.net.boot_cdrom(&iso)?;
    sc.net.wait_until(
        "the loader to refuse the tampered initramfs",
        Duration::from_secs(300),
        || Ok(sc.net.serial().contains("tampered.img has digest")),
    )?;
    let serial = sc.net.serial();
    let line = serial
        .lines()
        .find(|l| l.contains("tampered.img has digest"))
        .unwrap_or_default();
    println!("{line}");
    assert!(line.contains("refused"), "{line}");
    assert!(
        !serial.contains("kexec into"),
        "nothing unverified was loaded"
    );

    // Now the signed one: the loader kexecs into it and the node runs.
    sc.publish(
        NODE,
        &sc.sign("v2", &sc.manifest(2, &os("initramfs.cpio.zst")?))?,
    )?;
    let t0 = Instant::now();
    let mut st = Value::Null;
    sc.net.wait_until(
        "the kexec'd node's web to answer",
        Duration::from_secs(300),
        || {
            st = sc.status()?;
            Ok(st["os"]["running"] == "7" && answering(&st, "web"))
        },
    )?;
    println!(
        "verified loader: signed manifest published -> kexec'd node answering in {:.1} s (TCG)",
        t0.elapsed().as_secs_f64()
    );
    assert!(sc.net.serial().contains("kexec into the verified OS"));
    assert_eq!(st["manifest"]["applied_version"], 2);
    assert_eq!(st["storage"]["device"], "/dev/vda1", "{}", st["storage"]);

    // A replayed older manifest (validly signed, version 1) on the next
    // boot: the loader reads the applied version from the state volume and
    // refuses it; a newer one boots.
    sc.net.stop("qemu");
    sc.publish(
        NODE,
        &sc.sign("v1-replayed", &sc.manifest(1, &os("initramfs.cpio.zst")?))?,
    )?;
    sc.net.boot_cdrom(&iso)?;
    sc.net.wait_until(
        "the loader to refuse the replayed older manifest",
        Duration::from_secs(300),
        || Ok(sc.net.serial().contains("rollback refused")),
    )?;
    let serial = sc.net.serial();
    assert!(
        serial.contains("applied=Some(2)"),
        "the loader read the applied version from the disk"
    );
    assert!(
        !serial.contains("kexec into"),
        "the old manifest was not booted"
    );
    sc.publish(
        NODE,
        &sc.sign("v3", &sc.manifest(3, &os("initramfs.cpio.zst")?))?,
    )?;
    sc.net.wait_until(
        "the node to run manifest 3 after the loader",
        Duration::from_secs(300),
        || {
            st = sc.status()?;
            Ok(st["manifest"]["applied_version"] == 3 && answering(&st, "web"))
        },
    )?;
    println!("loader anti-rollback: version 1 refused after 2 was applied; version 3 booted");
    Ok(())
}
