//! End to end: the same PID 1 on Debian's modular kernel. The initramfs
//! carries the modules of `kernel-config/debian-modules.txt` (with their
//! dependencies); PID 1 loads the virtio drivers by modalias and the rest
//! (ext4, bridge, veth, overlay, nf_tables…) when the kernel asks for them.
//! The node must reach the same end state as on our own kernel: its state
//! volume formatted and mounted, the manifest applied, the workload
//! answering on its published port.

use anyhow::Result;
use cairn_e2e::{answering, inputs_or_skip, run, DiskSpec, Scenario, NODE};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[test]
fn debian_modular_kernel_loads_its_modules_and_runs_the_node() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    let Some(deb) = std::env::var_os("CAIRN_DEBIAN_KERNEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
    else {
        println!("SKIP: Debian kernel variant: CAIRN_DEBIAN_KERNEL not set or empty (make test sets it from kernel-config/debian-kernel.sh; its error is printed above)");
        return Ok(());
    };
    let release = std::fs::read_to_string(deb.join("RELEASE"))?
        .trim()
        .to_string();
    let mut sc = Scenario::setup(&inp)?;
    let dir = sc.net.dir.path().to_path_buf();
    let list =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kernel-config/debian-modules.txt");
    let initrd = dir.join("initramfs-debian.cpio.zst");
    let built = run(std::process::Command::new(sc.tools.join("cairn-image"))
        .env("RUST_BACKTRACE", "0")
        .args(["initramfs", "--init"])
        .arg(&inp.init)
        .arg("--keys")
        .arg(dir.join("keys"))
        .arg("--modules")
        .arg(deb.join("lib/modules").join(&release))
        .arg("--module-list")
        .arg(&list)
        .arg("--out")
        .arg(&initrd))?;
    println!("{}", built.trim());
    let size = std::fs::metadata(&initrd)?.len();
    println!(
        "Debian-kernel initramfs: {size} bytes ({:.2} MiB, target <= 4 MiB); kernel {} bytes",
        size as f64 / 1048576.0,
        std::fs::metadata(deb.join("vmlinuz"))?.len()
    );
    assert!(size <= 4 << 20, "the initramfs with modules is over 4 MiB");

    let disk = dir.join("state.img");
    std::fs::File::create(&disk)?.set_len(256 << 20)?;
    sc.net.disks = vec![DiskSpec::new(&disk, "DEB-DISK-1")];
    sc.kernel = deb.join("vmlinuz");
    sc.initrd = initrd;
    sc.publish(NODE, &sc.sign("v1", &sc.manifest(1, ""))?)?;
    let t0 = Instant::now();
    sc.boot()?;
    let mut st = Value::Null;
    sc.net.wait_until(
        "the node on Debian's kernel to answer",
        Duration::from_secs(400),
        || {
            st = sc.status()?;
            Ok(answering(&st, "web"))
        },
    )?;
    println!(
        "Debian kernel {release}: QEMU start -> web answering in {:.1} s (TCG); {} modules loaded",
        t0.elapsed().as_secs_f64(),
        st["kernel"]["modules_loaded"]
    );
    assert_eq!(st["kernel"]["release"], release.as_str());
    assert!(
        st["kernel"]["modules_loaded"].as_u64().unwrap_or(0) >= 10,
        "{}",
        st["kernel"]
    );
    assert_eq!(st["storage"]["device"], "/dev/vda1", "{}", st["storage"]);
    let serial = sc.net.serial();
    let line = serial
        .lines()
        .find(|l| l.contains("kernel modules loaded by modalias"))
        .unwrap_or_default();
    println!("{line}");
    assert!(
        line.contains("virtio_net") && line.contains("virtio_blk"),
        "{line}"
    );
    Ok(())
}
