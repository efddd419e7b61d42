//! Disk discovery from sysfs and the rule for which disk may become the
//! state volume.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A whole disk as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name (`vda`, `nvme0n1`, `sda`).
    pub name: String,
    /// Device node.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Bus: `virtio`, `nvme`, `usb`, `ata`, `scsi` or `other`.
    pub bus: String,
    /// Model, when the driver reports one.
    pub model: Option<String>,
    /// Serial, when the driver reports one.
    pub serial: Option<String>,
    /// Spinning disk.
    pub rotational: bool,
    /// Removable medium.
    pub removable: bool,
    /// Read-only.
    pub read_only: bool,
    /// Logical sector size.
    pub sector: u64,
    /// Partitions the kernel sees (`vda1`, …).
    pub partitions: Vec<String>,
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn flag(p: &Path) -> bool {
    read_trim(p).as_deref() == Some("1")
}

/// Every whole disk under `sys/block` (loop, ram, zram and device-mapper
/// devices are not disks), sorted by name.
pub fn discover(sys: &Path, dev: &Path) -> Vec<Disk> {
    let Ok(rd) = std::fs::read_dir(sys.join("block")) else {
        return Vec::new();
    };
    let mut out: Vec<Disk> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if ["loop", "ram", "zram", "dm-", "md", "nbd"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                return None;
            }
            let b = e.path();
            let sectors: u64 = read_trim(&b.join("size"))?.parse().ok()?;
            let target = std::fs::read_link(&b)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bus = if target.contains("/virtio") {
                "virtio"
            } else if target.contains("/nvme") {
                "nvme"
            } else if target.contains("/usb") {
                "usb"
            } else if target.contains("/ata") {
                "ata"
            } else if target.contains("/host") {
                "scsi"
            } else {
                "other"
            };
            let mut partitions: Vec<String> = std::fs::read_dir(&b)
                .map(|rd| {
                    rd.flatten()
                        .filter(|p| p.path().join("partition").exists())
                        .map(|p| p.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            partitions.sort();
            Some(Disk {
                path: dev.join(&name),
                bytes: sectors * 512,
                bus: bus.to_string(),
                model: read_trim(&b.join("device/model")),
                serial: read_trim(&b.join("serial"))
                    .or_else(|| read_trim(&b.join("device/serial"))),
                rotational: flag(&b.join("queue/rotational")),
                removable: flag(&b.join("removable")),
                read_only: flag(&b.join("ro")),
                sector: read_trim(&b.join("queue/logical_block_size"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(512),
                partitions,
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// What is on a disk, as far as choosing a state volume goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// First and last MiB are all zeros: no partition table, filesystem,
    /// RAID, LVM or ZFS label (they all live there).
    Empty,
    /// Our GPT with a `cairn-state` partition.
    Cairn(crate::gpt::Partition),
    /// Anything else: never written without an explicit wipe.
    Foreign(String),
}

/// Looks at the first and last MiB of `dev` (`bytes` long).
pub fn inspect(dev: &File, bytes: u64, sector: u64) -> io::Result<Content> {
    const MIB: u64 = 1 << 20;
    if let Ok(Some(parts)) = crate::gpt::read(dev, sector) {
        if let Some(p) = parts.iter().find(|p| p.name == crate::gpt::STATE_LABEL) {
            return Ok(Content::Cairn(p.clone()));
        }
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        return Ok(Content::Foreign(format!("a GPT with partitions {names:?}")));
    }
    let mut buf = vec![0u8; MIB.min(bytes) as usize];
    for at in [0, bytes.saturating_sub(MIB)] {
        dev.read_exact_at(&mut buf, at)?;
        if let Some(i) = buf.iter().position(|b| *b != 0) {
            let what = if at == 0 && buf[510] == 0x55 && buf[511] == 0xAA {
                "an MBR partition table".to_string()
            } else {
                format!("non-zero data at byte {}", at + i as u64)
            };
            return Ok(Content::Foreign(what));
        }
    }
    Ok(Content::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_from_a_sysfs_tree() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let real = sys.join("devices/pci0000:00/0000:00:04.0/virtio2/block/vda");
        std::fs::create_dir_all(real.join("vda1")).unwrap();
        std::fs::create_dir_all(real.join("queue")).unwrap();
        std::fs::write(real.join("vda1/partition"), "1\n").unwrap();
        std::fs::write(real.join("size"), "8388608\n").unwrap();
        std::fs::write(real.join("serial"), "CAIRN-DISK-1\n").unwrap();
        std::fs::write(real.join("ro"), "0\n").unwrap();
        std::fs::write(real.join("removable"), "0\n").unwrap();
        std::fs::write(real.join("queue/rotational"), "1\n").unwrap();
        std::fs::create_dir_all(sys.join("block")).unwrap();
        std::os::unix::fs::symlink(
            "../devices/pci0000:00/0000:00:04.0/virtio2/block/vda",
            sys.join("block/vda"),
        )
        .unwrap();
        std::fs::create_dir_all(sys.join("block/loop0")).unwrap();
        std::fs::write(sys.join("block/loop0/size"), "0\n").unwrap();
        let d = discover(sys, Path::new("/dev"));
        assert_eq!(d.len(), 1, "{d:?}");
        let vda = &d[0];
        assert_eq!(
            (vda.name.as_str(), vda.bytes, vda.bus.as_str()),
            ("vda", 4 << 30, "virtio")
        );
        assert_eq!(vda.serial.as_deref(), Some("CAIRN-DISK-1"));
        assert!(vda.rotational && !vda.removable && !vda.read_only);
        assert_eq!(vda.partitions, vec!["vda1".to_string()]);
        assert_eq!(vda.path, Path::new("/dev/vda"));
    }

    #[test]
    fn only_zeroed_ends_count_as_empty() {
        let f = tempfile::tempfile().unwrap();
        let size = 16u64 << 20;
        f.set_len(size).unwrap();
        assert_eq!(inspect(&f, size, 512).unwrap(), Content::Empty);
        // A ZFS-style label near the end.
        f.write_all_at(b"label", size - 200 * 1024).unwrap();
        assert!(
            matches!(inspect(&f, size, 512).unwrap(), Content::Foreign(w) if w.contains("non-zero"))
        );
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&[0x55, 0xAA], 510).unwrap();
        assert_eq!(
            inspect(&f, size, 512).unwrap(),
            Content::Foreign("an MBR partition table".into())
        );
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        let p = crate::gpt::write_single(&f, size, 512, [1; 16], [2; 16], crate::gpt::STATE_LABEL)
            .unwrap();
        assert_eq!(inspect(&f, size, 512).unwrap(), Content::Cairn(p));
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        crate::gpt::write_single(&f, size, 512, [1; 16], [2; 16], "windows").unwrap();
        assert!(
            matches!(inspect(&f, size, 512).unwrap(), Content::Foreign(w) if w.contains("windows"))
        );
    }
}
