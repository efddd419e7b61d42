//! End to end: the boot media `cairn-image` builds, booted by QEMU's own
//! firmware on the closed test network.
//!
//! - The full ISO with a seed (a signed manifest and its image built in):
//!   as a CD under SeaBIOS and as a USB stick under OVMF, with the hub and
//!   the registry stopped: the node runs the seed's workload anyway.
//! - The cloud disk image (qcow2) under OVMF with a NoCloud config drive
//!   naming the hub: the blank state partition is formatted at first boot;
//!   an OS update through the manifest's `[os]` installs the other boot
//!   slot and comes up; a tampered artifact is refused without a reboot; a
//!   broken version panics and systemd-boot's boot counting falls back.

use anyhow::Result;
use cairn_e2e::{answering, inputs_or_skip, run, sha256_file, DiskSpec, Scenario, NODE, OVMF};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What these tests need beyond the usual e2e inputs.
fn media_tools_or_skip() -> bool {
    for (p, pkg) in [
        (
            "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
            "systemd-boot-efi",
        ),
        (OVMF, "ovmf"),
        ("/usr/bin/mcopy", "mtools"),
        ("/usr/sbin/mkfs.vfat", "dosfstools"),
        ("/usr/bin/xorriso", "xorriso"),
        ("/usr/lib/ISOLINUX/isolinux.bin", "isolinux"),
        ("/usr/bin/qemu-img", "qemu-utils"),
        ("/usr/sbin/sfdisk", "fdisk"),
    ] {
        if !Path::new(p).exists() {
            println!("SKIP: boot media tests: {p} missing (make deps installs {pkg})");
            return false;
        }
    }
    true
}

/// Builds with `cairn-image`, printing its report.
fn build(tools: &Path, args: &[&str]) -> Result<String> {
    let out = run(Command::new(tools.join("cairn-image"))
        .env("RUST_BACKTRACE", "0")
        .args(args))?;
    print!("{out}");
    Ok(out)
}

fn serial_has(sc: &Scenario, text: &str) -> bool {
    sc.net.serial().contains(text)
}

#[test]
fn full_iso_bios_cd_and_uefi_usb_with_no_hub_or_registry() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    if !media_tools_or_skip() {
        return Ok(());
    }
    let mut sc = Scenario::setup(&inp)?;
    let dir = sc.net.dir.path().to_path_buf();
    let seed = dir.join("seed.bin");
    std::fs::write(&seed, sc.sign("seed", &sc.manifest(1, ""))?)?;
    let cmdline = format!(
        "console=ttyS0 panic=-1 cairn.hub={} cairn.node={NODE} cairn.poll=1",
        sc.hub
    );
    let iso = |out: &Path| -> Result<String> {
        build(
            &sc.tools,
            &[
                "iso",
                "--kernel",
                &sc.kernel.display().to_string(),
                "--initramfs",
                &sc.initrd.display().to_string(),
                "--cmdline",
                &cmdline,
                "--seed-manifest",
                &seed.display().to_string(),
                "--seed-image",
                &dir.join("hello-oci").display().to_string(),
                "--epoch",
                "1700000000",
                "--out",
                &out.display().to_string(),
            ],
        )
    };
    let image = dir.join("cairn.iso");
    iso(&image)?;
    iso(&dir.join("again.iso"))?;
    assert_eq!(
        sha256_file(&image)?,
        sha256_file(&dir.join("again.iso"))?,
        "the same inputs must give the same ISO"
    );
    println!("full ISO size: {} bytes", std::fs::metadata(&image)?.len());

    // No hub, no registry: only what the ISO carries.
    sc.net.stop("hub");
    sc.net.stop("registry");
    sc.net.nics = 1;
    for (firmware, uefi) in [("SeaBIOS, CD", false), ("OVMF, USB stick", true)] {
        sc.net.stop("qemu");
        let _ = std::fs::remove_file(sc.net.serial_path());
        sc.net.uefi = uefi;
        let t0 = Instant::now();
        if uefi {
            sc.net.boot_usb(&image)?;
        } else {
            sc.net.boot_cdrom(&image)?;
        }
        sc.net.wait_until(
            &format!("the ISO-booted node ({firmware}) to answer"),
            Duration::from_secs(300),
            || Ok(serial_has(&sc, "web accepts connections")),
        )?;
        println!(
            "full ISO ({firmware}): QEMU start -> web answering in {:.1} s, hub and registry down (TCG)",
            t0.elapsed().as_secs_f64()
        );
        let serial = sc.net.serial();
        assert!(
            serial.contains("a signed seed manifest is built into the boot image"),
            "{serial}"
        );
        assert!(serial.contains("from=Seed"), "layers came from the seed");
        if uefi {
            assert!(
                serial.contains("cairn.os=1"),
                "systemd-boot's entry booted (its options carry cairn.os=1)"
            );
        }
    }
    // The hub returns: the node reports what it runs and where it came from.
    sc.hub = sc.net.start_hub(&sc.tools, 7400)?;
    let mut st = Value::Null;
    sc.net.wait_until(
        "the ISO-booted node to report to the returning hub",
        Duration::from_secs(120),
        || {
            st = sc.status()?;
            Ok(answering(&st, "web"))
        },
    )?;
    assert_eq!(st["manifest"]["source"], "seed", "{}", st["manifest"]);
    assert_eq!(st["manifest"]["applied_version"], 1);
    assert_eq!(st["os"]["running"], "1");
    assert_eq!(st["storage"]["device"], Value::Null, "runs from RAM");
    Ok(())
}

/// A NoCloud config drive (ISO 9660 labelled `cidata`) with `user_data`.
fn config_drive(dir: &Path, user_data: &str) -> Result<PathBuf> {
    let src = dir.join("cidata");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("user-data"), user_data)?;
    std::fs::write(src.join("meta-data"), "instance-id: e2e-1\n")?;
    let iso = dir.join("cidata.iso");
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-R", "-o"])
        .arg(&iso)
        .arg(&src))?;
    Ok(iso)
}

#[test]
fn cloud_image_under_uefi_config_drive_and_os_updates() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    if !media_tools_or_skip() {
        return Ok(());
    }
    let mut sc = Scenario::setup(&inp)?;
    let dir = sc.net.dir.path().to_path_buf();
    let ctl = sc.tools.join("cairnctl");
    // What the update fetches from the hub: our kernel and initramfs, and
    // an initramfs that is not one (the broken version).
    let broken = dir.join("broken.img");
    std::fs::write(&broken, vec![0x5a; 256 * 1024])?;
    for (name, file) in [
        ("bzImage", sc.kernel.clone()),
        ("initramfs.cpio.zst", sc.initrd.clone()),
        ("broken.img", broken.clone()),
    ] {
        run(sc
            .net
            .cmd(&ctl)
            .args(["boot-put", "--hub", &sc.hub, "--name", name])
            .arg(&file))?;
    }
    let raw = dir.join("cloud.raw");
    let qcow2 = dir.join("cloud.qcow2");
    build(
        &sc.tools,
        &[
            "disk",
            "--kernel",
            &sc.kernel.display().to_string(),
            "--initramfs",
            &sc.initrd.display().to_string(),
            "--cmdline",
            "console=ttyS0 panic=5",
            "--os-version",
            "1",
            "--size-mib",
            "512",
            "--epoch",
            "1700000000",
            "--out",
            &raw.display().to_string(),
            "--qcow2",
            &qcow2.display().to_string(),
        ],
    )?;
    println!(
        "cloud image sizes: raw {} bytes (sparse), qcow2 {} bytes",
        std::fs::metadata(&raw)?.len(),
        std::fs::metadata(&qcow2)?.len()
    );
    std::fs::remove_file(&raw)?;
    let drive = config_drive(
        &dir,
        &format!(
            "#cairn\n# this instance's hub and name\ncairn.hub={} cairn.node={NODE}\ncairn.poll=1\n",
            sc.hub
        ),
    )?;
    sc.publish(NODE, &sc.sign("v1", &sc.manifest(1, ""))?)?;
    sc.net.nics = 1;
    sc.net.uefi = true;
    sc.net.allow_reset = true;
    sc.net.cdrom = Some(drive);
    sc.net.disks = vec![DiskSpec {
        format: "qcow2",
        ..DiskSpec::new(&qcow2, "CLOUD-DISK-1")
    }];
    let t0 = Instant::now();
    sc.net.boot_disk()?;
    let mut st = Value::Null;
    sc.net.wait_until(
        "the cloud image's web to answer",
        Duration::from_secs(300),
        || {
            st = sc.status()?;
            Ok(answering(&st, "web"))
        },
    )?;
    println!(
        "cloud image (OVMF, qcow2): QEMU start -> web answering in {:.1} s (TCG)",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(st["storage"]["device"], "/dev/vda2", "{}", st["storage"]);
    assert!(
        st["storage"]
            .to_string()
            .contains("blank state partition, formatted"),
        "{}",
        st["storage"]
    );
    assert_eq!(st["os"]["running"], "1");
    assert_eq!(st["os"]["boot"], "disk");
    assert!(sc.net.serial().contains("settings from the config drive"));
    let boot1 = st["boot_id"].clone();

    let os = |version: &str, initrd: &str, digest: &str| -> Result<String> {
        Ok(format!(
            "\n[os]\nversion = \"{version}\"\nkernel = {{ url = \"{h}/boot/bzImage\", sha256 = \"{k}\" }}\ninitramfs = {{ url = \"{h}/boot/{initrd}\", sha256 = \"{digest}\" }}\n",
            h = sc.hub,
            k = sha256_file(&sc.kernel)?,
        ))
    };
    // A good update: slot 2 installed, booted once on trial, kept.
    let initrd_digest = sha256_file(&sc.initrd)?;
    let v2 = sc.manifest(2, &os("2", "initramfs.cpio.zst", &initrd_digest)?);
    sc.publish(NODE, &sc.sign("v2", &v2)?)?;
    let t0 = Instant::now();
    sc.net.wait_until(
        "the node to come up on OS version 2",
        Duration::from_secs(400),
        || {
            st = sc.status()?;
            Ok(st["boot_id"] != boot1
                && st["os"]["running"] == "2"
                && st["os"]["marked_good"] == true
                && answering(&st, "web"))
        },
    )?;
    println!(
        "OS update 1 -> 2: manifest published -> running 2 and marked good in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(st["os"]["trial"], true, "{}", st["os"]);
    let boot2 = st["boot_id"].clone();

    // A tampered artifact: refused, no reboot.
    let v3 = sc.manifest(3, &os("3", "broken.img", &initrd_digest)?);
    sc.publish(NODE, &sc.sign("v3", &v3)?)?;
    sc.net.wait_until(
        "the tampered initramfs to be refused",
        Duration::from_secs(120),
        || {
            st = sc.status()?;
            Ok(st["os"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("refused")))
        },
    )?;
    println!("tampered: {}", st["os"]["error"]);
    assert_eq!(st["boot_id"], boot2, "no reboot for a refused update");
    assert_eq!(st["os"]["running"], "2");

    // A broken version (its initramfs is not one: the kernel panics, and
    // panic=5 reboots): the boot loader falls back to 2, which does not
    // try 4 again.
    let v4 = sc.manifest(4, &os("4", "broken.img", &sha256_file(&broken)?)?);
    sc.publish(NODE, &sc.sign("v4", &v4)?)?;
    let t0 = Instant::now();
    sc.net.wait_until(
        "the node to fall back to version 2",
        Duration::from_secs(400),
        || {
            st = sc.status()?;
            Ok(st["boot_id"] != boot2
                && st["os"]["running"] == "2"
                && st["os"]["failed"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|v| v == "4"))
                && st["os"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("version 4 did not come up")))
        },
    )?;
    println!(
        "broken OS version 4: published -> back on 2 in {:.1} s; {}",
        t0.elapsed().as_secs_f64(),
        st["os"]
    );
    let serial = sc.net.serial();
    assert!(
        serial.contains("Kernel panic"),
        "version 4 was booted and panicked"
    );
    sc.net.wait_until(
        "web to answer again on version 2",
        Duration::from_secs(120),
        || Ok(answering(&sc.status()?, "web")),
    )?;

    // Back to an OS version that sorts lower ("1.9" < "2"): the newest
    // install still boots next (its entry sorts by manifest version).
    let boot3 = st["boot_id"].clone();
    let v5 = sc.manifest(5, &os("1.9", "initramfs.cpio.zst", &initrd_digest)?);
    sc.publish(NODE, &sc.sign("v5", &v5)?)?;
    sc.net.wait_until(
        "the node to come up on OS version 1.9",
        Duration::from_secs(400),
        || {
            st = sc.status()?;
            Ok(st["boot_id"] != boot3
                && st["os"]["running"] == "1.9"
                && st["os"]["marked_good"] == true)
        },
    )?;
    println!("rollback to an older-sorting version: {}", st["os"]);
    Ok(())
}
