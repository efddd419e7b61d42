//! The formatter's output checked by e2fsprogs (`e2fsck -fn` must find
//! nothing to fix) and, with root, mounted by the kernel from a loop
//! device partitioned by our GPT writer.

use cairn_storage::{ext4, gpt};
use std::path::Path;
use std::process::Command;

fn params() -> ext4::Params {
    ext4::Params {
        label: "cairn-state".into(),
        uuid: *b"0123456789abcdef",
        hash_seed: *b"fedcba9876543210",
        now: 1_796_000_000,
    }
}

fn e2fsck(target: &Path) -> Option<(bool, String)> {
    let bin = ["/usr/sbin/e2fsck", "/sbin/e2fsck"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let o = Command::new(bin).arg("-fn").arg(target).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Some((o.status.success(), text))
}

#[test]
fn e2fsck_finds_nothing_to_fix() {
    for mib in [64u64, 300, 1100] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        f.set_len(mib << 20).unwrap();
        let l = ext4::format(&f, mib << 20, &params()).unwrap();
        assert_eq!(ext4::probe(&f).unwrap().as_deref(), Some("cairn-state"));
        let Some((ok, out)) = e2fsck(&img) else {
            println!("SKIP: e2fsck (Debian package e2fsprogs) not installed; the formatter is not checked");
            return;
        };
        let summary = out
            .lines()
            .find(|l| l.contains(" files ("))
            .unwrap_or_default();
        println!("{mib} MiB ({} groups): {summary}", l.groups);
        assert!(ok, "e2fsck -fn on {mib} MiB:\n{out}");
    }
}

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A loop device with partition scanning, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Partition an image with our GPT (util-linux's sfdisk must read it back
/// and find it valid), format the partition, let the host kernel mount it
/// from a loop device over the partition's byte range and write a file,
/// then check it with e2fsck. (This machine's host kernel parses no GPT
/// itself; cairn's kernel does, in the QEMU tests.)
#[test]
fn host_kernel_mounts_the_partition() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
        println!("SKIP: loop-device test needs root and /dev/loop-control");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let size = 512u64 << 20;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.set_len(size).unwrap();
    let part = gpt::write_single(&f, size, 512, [7; 16], [8; 16], gpt::STATE_LABEL).unwrap();
    if Path::new("/usr/sbin/sfdisk").exists() || Path::new("/sbin/sfdisk").exists() {
        let json = sh(Command::new("sfdisk").arg("--json").arg(&img));
        assert!(
            json.contains("\"label\": \"gpt\"") && json.contains("\"name\": \"cairn-state\""),
            "{json}"
        );
        assert!(
            json.contains(&format!("\"start\": {}", part.start / 512)),
            "{json}"
        );
        let verify = sh(Command::new("sfdisk").arg("--verify").arg(&img));
        println!("sfdisk --verify: {verify}");
    }
    let dev = Loop(sh(Command::new("losetup")
        .args([
            "-f",
            "--show",
            "-o",
            &part.start.to_string(),
            "--sizelimit",
            &part.len.to_string(),
        ])
        .arg(&img)));
    let pf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev.0)
        .unwrap();
    ext4::format(&pf, part.len, &params()).unwrap();
    drop(pf);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(Command::new("mount").args(["-t", "ext4", &dev.0]).arg(&mnt));
    std::fs::write(mnt.join("hello"), b"state").unwrap();
    std::fs::create_dir(mnt.join("layers")).unwrap();
    let df = sh(Command::new("df").args(["-k"]).arg(&mnt));
    sh(Command::new("umount").arg(&mnt));
    println!("{df}");
    if let Some((ok, out)) = e2fsck(Path::new(&dev.0)) {
        assert!(ok, "after a kernel mount and a write:\n{out}");
    }
}
