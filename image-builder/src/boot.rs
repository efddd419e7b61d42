//! Bootable media around cairn's kernel and initramfs: the full ISO (BIOS
//! through ISOLINUX, UEFI through systemd-boot, hybrid so `dd` to a USB
//! stick boots either way) and the cloud disk image (GPT: an EFI system
//! partition with systemd-boot, then a blank `cairn-state` partition the
//! node formats at first boot). Both can carry a *seed*: a signed manifest
//! and the blobs of its images, appended to the initramfs as a second cpio
//! archive, so the node runs with no hub and no registry.
//!
//! Host tools do the file-system work (`mkfs.vfat`, `mtools`, `xorriso`,
//! `sfdisk`, `qemu-img`); every one of them is given the build epoch, so
//! identical inputs give identical bytes (checked by the tests).

use crate::initramfs::{self, Compression, Node, Tree};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the seed manifest lands in the node's root (PID 1 reads it).
pub const SEED_MANIFEST: &str = "etc/cairn/seed/manifest";
/// Where seed blobs land (`blobs/sha256/<hex>` below it).
pub const SEED_DIR: &str = "etc/cairn/seed";
/// GPT type of an EFI system partition.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT type "Linux filesystem data".
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const MIB: u64 = 1 << 20;

/// What every boot medium carries.
pub struct Payload {
    /// The kernel (bzImage, EFI stub built in).
    pub kernel: Vec<u8>,
    /// The initramfs, with the seed appended when there is one.
    pub initrd: Vec<u8>,
    /// Kernel command line.
    pub cmdline: String,
    /// OS version named in the boot entry (`cairn.os=` on the command line).
    pub version: String,
    /// Every timestamp.
    pub epoch: u64,
}

/// Host files the media are built from (Debian packages).
pub struct Inputs {
    /// systemd-boot's EFI binary (systemd-boot-efi).
    pub systemd_boot: PathBuf,
    /// ISOLINUX pieces, as for the netboot ISO.
    pub bios: crate::iso::Inputs,
}

impl Inputs {
    /// Debian's paths; names the package when a file is missing.
    pub fn debian() -> Result<Inputs, String> {
        let sd = PathBuf::from("/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
        if !sd.exists() {
            return Err(format!(
                "{} not found: install the Debian package systemd-boot-efi",
                sd.display()
            ));
        }
        for (tool, package) in [
            ("mkfs.vfat", "dosfstools"),
            ("mcopy", "mtools"),
            ("xorriso", "xorriso"),
        ] {
            which(tool, package)?;
        }
        Ok(Inputs {
            systemd_boot: sd,
            bios: crate::iso::Inputs::debian()?,
        })
    }
}

fn which(tool: &str, package: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).exists()
        || Path::new("/sbin").join(tool).exists();
    if found {
        Ok(())
    } else {
        Err(format!(
            "{tool} not found: install the Debian package {package}"
        ))
    }
}

/// The seed archive (zstd cpio): `manifest` as [`SEED_MANIFEST`] and every
/// blob of the OCI layouts `images` under [`SEED_DIR`]`/blobs/sha256`.
/// The manifest must be a signed envelope that decodes (the node checks
/// its signature, node id and expiry at boot).
pub fn seed(manifest: Option<&Path>, images: &[PathBuf], epoch: u64) -> Result<Vec<u8>, String> {
    let mut tree = Tree::new();
    if let Some(m) = manifest {
        let bytes = std::fs::read(m).map_err(|e| format!("{}: {e}", m.display()))?;
        let env = cairn_manifest::Envelope::from_bytes(&bytes).map_err(|e| {
            format!(
                "{}: not a signed manifest envelope ({e}; sign it with cairnctl sign)",
                m.display()
            )
        })?;
        env.decode_payload()
            .map_err(|e| format!("{}: the manifest inside does not decode: {e}", m.display()))?;
        tree.create_parents(SEED_MANIFEST)
            .map_err(|e| e.to_string())?;
        tree.insert(SEED_MANIFEST, Node::File(bytes), 0o644)
            .map_err(|e| e.to_string())?;
    }
    for layout in images {
        let blobs = layout.join("blobs/sha256");
        let mut names: Vec<_> = std::fs::read_dir(&blobs)
            .map_err(|e| format!("{}: {e} (not an OCI layout?)", blobs.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let data = std::fs::read(blobs.join(&n)).map_err(|e| format!("{n}: {e}"))?;
            if crate::sha256_hex(&data) != n {
                return Err(format!(
                    "{}: blob {n} does not match its digest",
                    layout.display()
                ));
            }
            let dest = format!("{SEED_DIR}/blobs/sha256/{n}");
            tree.create_parents(&dest).map_err(|e| e.to_string())?;
            tree.insert(&dest, Node::File(data), 0o644)
                .map_err(|e| e.to_string())?;
        }
    }
    let mtime = u32::try_from(epoch).map_err(|_| format!("epoch {epoch} too large"))?;
    initramfs::compress(&tree.to_newc(mtime), Compression::Zstd).map_err(|e| e.to_string())
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let o = cmd.output().map_err(|e| format!("running {what}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// One systemd-boot entry (Boot Loader Specification type #1); the node
/// adds boot counting to its file name (`cairn-V+N.conf`) when it installs
/// an update.
pub fn entry(version: &str, cmdline: &str) -> String {
    // `version 0`: every update the node installs sorts above it (the node
    // uses the manifest version there).
    format!(
        "title cairn {version}\nversion 0\nsort-key cairn\nlinux /cairn/{version}/vmlinuz\ninitrd /cairn/{version}/initrd.img\noptions {cmdline} cairn.os={version}\n"
    )
}

/// systemd-boot's own settings: no menu unless a key is held, no editing
/// of the command line at the console.
pub const LOADER_CONF: &str = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n";

/// The files of an ESP that boots `p` with systemd-boot.
pub fn esp_files(inp: &Inputs, p: &Payload) -> Result<Vec<(String, Vec<u8>)>, String> {
    check_version(&p.version)?;
    let sd = std::fs::read(&inp.systemd_boot)
        .map_err(|e| format!("{}: {e}", inp.systemd_boot.display()))?;
    Ok(vec![
        ("EFI/BOOT/BOOTX64.EFI".into(), sd),
        ("loader/loader.conf".into(), LOADER_CONF.as_bytes().to_vec()),
        (
            format!("loader/entries/cairn-{}.conf", p.version),
            entry(&p.version, &p.cmdline).into_bytes(),
        ),
        (format!("cairn/{}/vmlinuz", p.version), p.kernel.clone()),
        (format!("cairn/{}/initrd.img", p.version), p.initrd.clone()),
    ])
}

/// An OS version as it appears in file names: `[0-9a-z._]` (see `cairn_manifest::is_os_version`), no `+` or
/// `-` (systemd-boot's boot counting parses those).
pub fn check_version(v: &str) -> Result<(), String> {
    if !cairn_manifest::is_os_version(v) {
        return Err(format!(
            "OS version {v:?}: use 1-64 of [0-9a-z._], starting with a letter or digit (no '+' or '-')"
        ));
    }
    Ok(())
}

/// A FAT image of `size` bytes holding `files` (paths with `/`).
pub fn fat_image(
    files: &[(String, Vec<u8>)],
    size: u64,
    label: &str,
    epoch: u64,
) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let img = dir.path().join("fat.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(size))
        .map_err(|e| e.to_string())?;
    let epoch_s = epoch.to_string();
    // A volume id derived from the epoch: fixed for identical inputs.
    let volid = format!("{:08x}", (epoch as u32) ^ 0xca1e_5e0d);
    run(
        Command::new("mkfs.vfat")
            .env("SOURCE_DATE_EPOCH", &epoch_s)
            .args(["--invariant", "-i", &volid, "-n", label])
            .arg(&img),
        "mkfs.vfat (Debian package dosfstools)",
    )?;
    let mut dirs: Vec<String> = Vec::new();
    for (path, _) in files {
        let parts: Vec<&str> = path.split('/').collect();
        for i in 1..parts.len() {
            let d = parts[..i].join("/");
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs.sort();
    let mtools = |args: &[&std::ffi::OsStr], what: &str| {
        run(
            Command::new(args[0])
                .env("SOURCE_DATE_EPOCH", &epoch_s)
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(&args[1..]),
            what,
        )
    };
    for d in &dirs {
        let target = format!("::/{d}");
        mtools(
            &[
                "mmd".as_ref(),
                "-i".as_ref(),
                img.as_os_str(),
                target.as_ref(),
            ],
            "mmd (Debian package mtools)",
        )?;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    for (n, (path, bytes)) in files.iter().enumerate() {
        let src = dir.path().join(format!("f{n}"));
        std::fs::write(&src, bytes).map_err(|e| e.to_string())?;
        std::fs::File::options()
            .write(true)
            .open(&src)
            .and_then(|f| f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t)))
            .map_err(|e| e.to_string())?;
        let target = format!("::/{path}");
        mtools(
            &[
                "mcopy".as_ref(),
                "-m".as_ref(),
                "-i".as_ref(),
                img.as_os_str(),
                src.as_os_str(),
                target.as_ref(),
            ],
            "mcopy (Debian package mtools)",
        )?;
    }
    std::fs::read(&img).map_err(|e| e.to_string())
}

/// Bytes needed for `files` on FAT, with room for the FAT itself and a
/// second OS version during an update when `slots` is 2; whole MiB.
fn fat_size(files: &[(String, Vec<u8>)], slots: u64) -> u64 {
    let payload: u64 = files.iter().map(|(_, b)| b.len() as u64 + 4096).sum();
    (payload * slots + MIB).div_ceil(MIB) * MIB
}

/// Sets every staged file's and directory's times to the epoch.
fn stamp(root: &Path, epoch: u64) -> Result<(), String> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let times = std::fs::FileTimes::new().set_modified(t).set_accessed(t);
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).map_err(|e| e.to_string())?.flatten() {
                stack.push(e.path());
            }
        }
        std::fs::File::open(&p)
            .and_then(|f| f.set_times(times))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// Builds the full ISO at `out`: ISOLINUX (BIOS, CD or USB), an El Torito
/// EFI image with systemd-boot (UEFI, CD), and a hybrid MBR + GPT so the
/// same bytes boot from a USB stick under BIOS or UEFI.
pub fn iso(inp: &Inputs, p: &Payload, out: &Path) -> Result<(), String> {
    let files = esp_files(inp, p)?;
    let efi = fat_image(&files, fat_size(&files, 1), "CAIRN_EFI", p.epoch)?;
    let stage = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = stage.path();
    let w = |rel: &str, bytes: &[u8]| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("relative path"))
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    w("isolinux/isolinux.bin", &read(&inp.bios.isolinux)?)?;
    w("isolinux/ldlinux.c32", &read(&inp.bios.ldlinux)?)?;
    w(
        "isolinux/isolinux.cfg",
        format!(
            "DEFAULT cairn\nPROMPT 0\nTIMEOUT 0\nLABEL cairn\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND {} cairn.os={}\n",
            p.cmdline, p.version
        )
        .as_bytes(),
    )?;
    w("boot/vmlinuz", &p.kernel)?;
    w("boot/initrd.img", &p.initrd)?;
    w("boot/efi.img", &efi)?;
    stamp(root, p.epoch)?;
    run(
        Command::new("xorriso")
            .env("SOURCE_DATE_EPOCH", p.epoch.to_string())
            .args(["-as", "mkisofs", "-quiet", "-R", "-J", "-V", "CAIRN"])
            .args(["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat"])
            .args(["-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"])
            .arg("-isohybrid-mbr")
            .arg(&inp.bios.mbr)
            .args(["-eltorito-alt-boot", "-e", "boot/efi.img", "-no-emul-boot"])
            .arg("-isohybrid-gpt-basdat")
            .arg("-o")
            .arg(out)
            .arg(root),
        "xorriso (Debian package xorriso)",
    )?;
    Ok(())
}

/// A GUID for the disk image derived from the payload: fixed for fixed
/// inputs, different between images (cloned disks still get a fresh
/// identity from the node: its key pair is made at first boot).
fn guid(seed: &[u8], n: u8) -> String {
    let h = crate::sha256_hex(&[seed, &[n]].concat());
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Builds the cloud disk image (raw, `size` bytes, sparse) at `out`:
/// GPT; partition 1 `cairn-esp` (systemd-boot, room for two OS versions);
/// partition 2 `cairn-state` to the end, blank (the node formats it at
/// first boot and grows it when the disk grows).
pub fn disk(inp: &Inputs, p: &Payload, size: u64, out: &Path) -> Result<(), String> {
    let files = esp_files(inp, p)?;
    let esp_bytes = fat_size(&files, 2).max(64 * MIB);
    let esp = fat_image(&files, esp_bytes, "CAIRN_ESP", p.epoch)?;
    let state_start = MIB + esp_bytes;
    let min = state_start + cairn_storage::ext4::MIN_BYTES + 2 * MIB;
    if size < min || !size.is_multiple_of(MIB) {
        return Err(format!(
            "disk size {size}: must be a whole number of MiB and at least {min} bytes"
        ));
    }
    let tmp = out.with_extension("partial");
    let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.set_len(size).map_err(|e| e.to_string())?;
    let key = crate::sha256_hex(&[&p.kernel[..], &p.initrd, p.cmdline.as_bytes()].concat());
    let script = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n\
         start=2048, size={}, type={ESP_TYPE}, uuid={}, name=\"cairn-esp\"\n\
         start={}, type={LINUX_TYPE}, uuid={}, name=\"{}\"\n",
        guid(key.as_bytes(), 0),
        esp_bytes / 512,
        guid(key.as_bytes(), 1),
        state_start / 512,
        guid(key.as_bytes(), 2),
        cairn_storage::gpt::STATE_LABEL,
    );
    let mut child = Command::new("sfdisk")
        .args([
            "--quiet",
            "--no-reread",
            "--no-tell-kernel",
            "--wipe",
            "always",
        ])
        .arg(&tmp)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running sfdisk (Debian package fdisk): {e}"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "sfdisk failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    // Only the ESP's non-zero blocks: the raw image stays sparse.
    for (i, chunk) in esp.chunks(64 * 1024).enumerate() {
        if chunk.iter().any(|b| *b != 0) {
            f.write_all_at(chunk, MIB + (i * 64 * 1024) as u64)
                .map_err(|e| e.to_string())?;
        }
    }
    f.write_all_at(cairn_storage::gpt::BLANK_MARK, state_start)
        .map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(())
}

/// Converts a raw image to qcow2 (`qemu-img`, Debian package qemu-utils).
pub fn qcow2(raw: &Path, out: &Path) -> Result<(), String> {
    run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out),
        "qemu-img convert (Debian package qemu-utils)",
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_versions() {
        let e = entry("7", "console=ttyS0 cairn.hub=http://h:1");
        assert!(e.contains("linux /cairn/7/vmlinuz\n"));
        assert!(e.contains("options console=ttyS0 cairn.hub=http://h:1 cairn.os=7\n"));
        assert!(check_version("2026.12.1").is_ok());
        for bad in ["", "1+2", "a-b", "x/y", "a b"] {
            assert!(check_version(bad).is_err(), "{bad:?}");
        }
        assert_ne!(guid(b"a", 0), guid(b"a", 1));
        assert_eq!(guid(b"a", 0).len(), 36);
    }

    /// Identical inputs, identical bytes: the ISO, the raw disk and the
    /// qcow2, each built twice a second apart.
    #[test]
    fn media_are_reproducible() {
        let inp = match Inputs::debian() {
            Ok(i) => i,
            Err(e) => {
                println!("SKIP: boot media reproducibility: {e}");
                return;
            }
        };
        if which("sfdisk", "fdisk").is_err() || which("qemu-img", "qemu-utils").is_err() {
            println!("SKIP: boot media reproducibility: sfdisk or qemu-img missing (make deps)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let p = Payload {
            kernel: vec![0x4b; 300_000],
            initrd: vec![0x49; 100_000],
            cmdline: "console=ttyS0".into(),
            version: "1".into(),
            epoch: 1_700_000_000,
        };
        let mut sums = Vec::new();
        for n in 0..2 {
            let iso_path = t.path().join(format!("{n}.iso"));
            let raw = t.path().join(format!("{n}.raw"));
            let q = t.path().join(format!("{n}.qcow2"));
            iso(&inp, &p, &iso_path).unwrap();
            disk(&inp, &p, 160 << 20, &raw).unwrap();
            qcow2(&raw, &q).unwrap();
            sums.push([&iso_path, &raw, &q].map(|f| crate::sha256_hex(&std::fs::read(f).unwrap())));
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        assert_eq!(sums[0], sums[1]);
        // The raw image is sparse: the ESP's empty space is not written.
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(t.path().join("0.raw")).unwrap();
        assert!(
            m.blocks() * 512 < 16 << 20,
            "{} bytes allocated",
            m.blocks() * 512
        );
    }

    #[test]
    fn seed_refuses_what_is_not_an_envelope_or_a_layout() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("m.toml");
        std::fs::write(&m, "node = \"x\"\n").unwrap();
        assert!(seed(Some(&m), &[], 0)
            .unwrap_err()
            .contains("not a signed manifest"));
        assert!(seed(None, &[t.path().to_path_buf()], 0)
            .unwrap_err()
            .contains("not an OCI layout"));
        let layout = t.path().join("l");
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(layout.join("blobs/sha256").join("00"), b"x").unwrap();
        assert!(seed(None, &[layout], 0)
            .unwrap_err()
            .contains("does not match"));
    }
}
