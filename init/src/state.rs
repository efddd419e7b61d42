//! The state volume at boot: find the disk, partition and format it on
//! first use, mount it over `/var/lib/cairn` (layers, node state), or run
//! from RAM and say why. Then the node's persistent records on it: the
//! applied version and last known good manifest (anti-rollback across
//! reboots) and the node's own key pair.

use cairn_manifest::{Applied, SigningKey};
use cairn_storage::disks::{self, Content, Disk};
use cairn_storage::{ext4, files, gpt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the state volume is mounted (the OCI store's root).
pub const ROOT: &str = crate::container::STATE_ROOT;
const NODE_DIR: &str = "node";

/// What boot found and did.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Every disk seen, with what is on it (for the status).
    pub disks: Vec<(Disk, String)>,
    /// The partition mounted, or `None` when running from RAM.
    pub device: Option<String>,
    /// Formatted during this boot, and how long it took.
    pub formatted_ms: Option<u128>,
    /// Why the node runs from RAM (or why a disk was not used).
    pub notes: Vec<String>,
}

impl Volume {
    /// Status entry.
    pub fn status(&self) -> Value {
        let (total, free) = fs_space(Path::new(ROOT));
        json!({
            "mode": if self.device.is_some() { "disk" } else { "ram" },
            "device": self.device,
            "mounted_at": ROOT,
            "formatted_this_boot_ms": self.formatted_ms,
            "total_bytes": total,
            "free_bytes": free,
            "notes": self.notes,
            "disks": self.disks.iter().map(|(d, c)| json!({
                "name": d.name, "bytes": d.bytes, "bus": d.bus, "model": d.model,
                "serial": d.serial, "rotational": d.rotational, "removable": d.removable,
                "read_only": d.read_only, "partitions": d.partitions, "content": c,
            })).collect::<Vec<_>>(),
        })
    }
}

fn fs_space(p: &Path) -> (u64, u64) {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return (0, 0);
        }
        (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize)
    }
}

pub fn partition_path(d: &Disk, n: u32) -> PathBuf {
    let sep = if d.name.ends_with(|c: char| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    d.path.with_file_name(format!("{}{sep}{n}", d.name))
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Ok(f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut b);
    }
    b
}

/// Removable media and USB disks are never chosen without a rule: a stick
/// left in a port must neither be formatted nor trusted for its records.
fn auto_ok(d: &Disk) -> bool {
    !d.removable && d.bus != "usb"
}

/// The disks, once `/sys/block` has stopped changing (NVMe, USB and SCSI
/// disks may appear a moment after PID 1 starts); at most ~3 s.
fn settled_disks() -> Vec<Disk> {
    let names = |v: &[Disk]| {
        v.iter()
            .map(|d| (d.name.clone(), d.bytes))
            .collect::<Vec<_>>()
    };
    let mut last = disks::discover(Path::new("/sys"), Path::new("/dev"));
    for _ in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = disks::discover(Path::new("/sys"), Path::new("/dev"));
        if names(&now) == names(&last) {
            return now;
        }
        last = now;
    }
    last
}

/// Finds, prepares and mounts the state volume; never fails (RAM instead).
pub fn bring_up() -> Volume {
    let mut v = Volume {
        disks: Vec::new(),
        device: None,
        formatted_ms: None,
        notes: Vec::new(),
    };
    let found = settled_disks();
    let mut volumes: Vec<(Disk, gpt::Partition)> = Vec::new();
    for d in found {
        let content = match std::fs::File::open(&d.path)
            .and_then(|f| disks::inspect(&f, d.bytes, d.sector))
        {
            Ok(Content::Empty) => "empty".to_string(),
            Ok(Content::Cairn(p)) => {
                if auto_ok(&d) {
                    volumes.push((d.clone(), p));
                }
                "cairn state volume".to_string()
            }
            Ok(Content::Foreign(what)) => format!("not ours, left alone: {what}"),
            Err(e) => format!("unreadable: {e}"),
        };
        v.disks.push((d, content));
    }
    // Two cairn volumes: which one holds the truth is not ours to guess (a
    // stale or forged one could lower the anti-rollback floor).
    if volumes.len() > 1 {
        let names: Vec<&str> = volumes.iter().map(|(d, _)| d.name.as_str()).collect();
        v.notes.push(format!(
            "several cairn volumes ({}): running from RAM; name one with [storage] state_disk_serial",
            names.join(", ")
        ));
        tracing::error!(disks = ?names, "several cairn volumes; none used");
        return v;
    }
    let mut chosen: Option<(Disk, gpt::Partition, bool)> =
        volumes.pop().map(|(d, p)| (d, p, false));
    if chosen.is_none() {
        for (d, c) in &v.disks {
            if c != "empty" {
                continue;
            }
            if d.read_only {
                v.notes.push(format!("{}: empty but read-only", d.name));
                continue;
            }
            if !auto_ok(d) {
                v.notes.push(format!(
                    "{}: empty but {} (never chosen automatically; name it by serial)",
                    d.name,
                    if d.removable { "removable" } else { "on USB" }
                ));
                continue;
            }
            if d.bytes < ext4::MIN_BYTES + (2 << 20) {
                v.notes.push(format!(
                    "{}: {} bytes is below the {} bytes minimum",
                    d.name,
                    d.bytes,
                    ext4::MIN_BYTES + (2 << 20)
                ));
                continue;
            }
            match prepare(d) {
                Ok((p, ms)) => {
                    v.formatted_ms = Some(ms);
                    chosen = Some((d.clone(), p, true));
                    break;
                }
                Err(e) => v
                    .notes
                    .push(format!("{}: preparing it failed: {e}", d.name)),
            }
        }
    }
    let Some((disk, part, _)) = chosen else {
        v.notes.push("no usable disk: running from RAM (layers, the applied version and the last known good manifest are lost at reboot)".into());
        tracing::warn!(notes = ?v.notes, "no state volume");
        return v;
    };
    let dev = partition_path(&disk, part.number);
    if !wait_for(&dev) {
        v.notes.push(format!("{} did not appear", dev.display()));
        return v;
    }
    // A disk image's state partition, left blank for this first boot.
    if is_blank(&dev) {
        let t = Instant::now();
        match format_partition(&dev, part.len) {
            Ok(()) => {
                v.formatted_ms = Some(t.elapsed().as_millis());
                v.notes.push(format!(
                    "{}: the image's blank state partition, formatted",
                    dev.display()
                ));
            }
            Err(e) => {
                v.notes.push(format!(
                    "{}: formatting the blank state partition failed: {e}; running from RAM",
                    dev.display()
                ));
                return v;
            }
        }
    }
    match mount_ext4(&dev, Path::new(ROOT)) {
        Ok(()) => {
            tracing::info!(device = %dev.display(), disk = %disk.name, formatted_ms = ?v.formatted_ms, "state volume mounted at {ROOT}");
            v.device = Some(dev.display().to_string());
            let _ = std::fs::create_dir_all(Path::new(ROOT).join(NODE_DIR));
            match grow(&disk, &part) {
                Ok(Some(bytes)) => v.notes.push(format!("grew to {bytes} bytes with the disk")),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "growing the state volume failed; it keeps its size");
                    v.notes.push(format!("not grown: {e}"));
                }
            }
        }
        Err(e) => {
            let why = match std::fs::File::open(&dev).map(|f| ext4::probe(&f)) {
                Ok(Ok(None)) => "no ext4 superblock: damaged or overwritten".to_string(),
                _ => "the kernel refused the filesystem; see the kernel log above".to_string(),
            };
            let msg = format!(
                "{}: not mounted ({e}: {why}); running from RAM",
                dev.display()
            );
            tracing::error!("{msg}");
            v.notes.push(msg);
        }
    }
    v
}

/// The applied version recorded on this machine's state volume, read
/// without writing anything (the volume is mounted read-only and unmounted
/// again): what the verified loader holds the hub's manifest against.
/// `None` without exactly one cairn volume, or when it cannot be read.
pub fn read_only_applied() -> Option<Applied> {
    let vols: Vec<(Disk, gpt::Partition)> = settled_disks()
        .into_iter()
        .filter(auto_ok)
        .filter_map(|d| {
            let c = std::fs::File::open(&d.path)
                .and_then(|f| disks::inspect(&f, d.bytes, d.sector))
                .ok()?;
            match c {
                Content::Cairn(p) => Some((d, p)),
                _ => None,
            }
        })
        .collect();
    let [(disk, part)] = vols.as_slice() else {
        return None;
    };
    let dev = partition_path(disk, part.number);
    if !wait_for(&dev) || is_blank(&dev) {
        return None;
    }
    let _ = std::fs::create_dir_all(ROOT);
    if let Err(e) = mount_dev(
        &dev,
        Path::new(ROOT),
        c"ext4",
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ) {
        tracing::warn!(device = %dev.display(), "state volume not readable: {e}");
        return None;
    }
    let applied = Records::new().applied();
    // SAFETY: unmounting what was mounted above; a NUL-terminated path.
    unsafe { libc::umount2(c"/var/lib/cairn".as_ptr(), 0) };
    applied
}

impl Volume {
    /// The manifest's `[storage]` rule on a node that runs from RAM: use
    /// the disk with that serial or device path, or the first empty one of
    /// at least the given size. Foreign data (or a damaged cairn volume) is
    /// wiped only with `wipe`, which needs the serial. A node that already
    /// has a state volume keeps it (moving one is not done live).
    pub fn adopt(&mut self, rule: &cairn_manifest::StorageSpec) -> Result<bool, String> {
        let (serial, path, min) = (
            rule.state_disk_serial.as_deref(),
            rule.state_disk_path.as_deref(),
            rule.state_disk_min_bytes,
        );
        if serial.is_none() && path.is_none() && min.is_none() {
            return Ok(false);
        }
        let wanted = serial
            .map(|s| format!("serial {s}"))
            .or(path.map(|p| format!("path {p}")))
            .unwrap_or_else(|| format!("an empty disk of at least {} bytes", min.unwrap_or(0)));
        let by_path = path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p)));
        if let Some(dev) = &self.device {
            let dev_path = Path::new(dev);
            let current = self.disks.iter().find(|(d, _)| {
                partition_path(d, 1) == dev_path
                    || d.partitions
                        .iter()
                        .any(|p| Path::new("/dev").join(p) == dev_path)
            });
            let same = current.is_some_and(|(d, _)| {
                serial.is_none_or(|s| d.serial.as_deref() == Some(s))
                    && by_path.as_ref().is_none_or(|p| *p == d.path)
                    && min.is_none_or(|m| d.bytes >= m)
            });
            if same || (serial.is_none() && path.is_none()) {
                return Ok(false);
            }
            return Err(format!("state volume already on {dev}; the manifest's {wanted} is used only by a node without one"));
        }
        let found = disks::discover(Path::new("/sys"), Path::new("/dev"));
        let content = |d: &Disk| {
            std::fs::File::open(&d.path)
                .and_then(|f| disks::inspect(&f, d.bytes, d.sector))
                .unwrap_or_else(|e| Content::Foreign(e.to_string()))
        };
        let d = pick(&found, rule, by_path.as_deref(), content).ok_or_else(|| {
            format!(
                "no disk matches {wanted} (disks: {})",
                found
                    .iter()
                    .map(|d| format!(
                        "{} {} {} bytes",
                        d.name,
                        d.serial.as_deref().unwrap_or("-"),
                        d.bytes
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let serial = d.serial.clone().unwrap_or_else(|| "-".into());
        let wipe = rule.wipe && rule.state_disk_serial.is_some();
        if d.read_only {
            return Err(format!("{} (serial {serial}) is read-only", d.name));
        }
        if d.bytes < ext4::MIN_BYTES + (2 << 20) {
            return Err(format!(
                "{} (serial {serial}) has {} bytes, below the minimum",
                d.name, d.bytes
            ));
        }
        let f = std::fs::File::open(&d.path).map_err(|e| format!("{}: {e}", d.path.display()))?;
        let content = disks::inspect(&f, d.bytes, d.sector).map_err(|e| e.to_string())?;
        drop(f);
        match content {
            Content::Cairn(p) if mount_ext4(&partition_path(d, p.number), Path::new(ROOT)).is_ok() => {
                self.device = Some(partition_path(d, p.number).display().to_string());
                return Ok(true);
            }
            Content::Empty => {}
            other if wipe => {
                tracing::warn!(disk = %d.name, serial, found = ?other, "wiping the disk the manifest names");
            }
            Content::Cairn(_) => return Err(format!("{} (serial {serial}): its cairn volume does not mount; set wipe = true to reformat it", d.name)),
            Content::Foreign(what) => return Err(format!("{} (serial {serial}) holds {what}; set wipe = true to use it", d.name)),
        }
        // Wiping: clear both ends so nothing old is recognised any more.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d.path)
            .map_err(|e| e.to_string())?;
        let zero = vec![0u8; 1 << 20];
        use std::os::unix::fs::FileExt;
        f.write_all_at(&zero, 0)
            .and_then(|()| f.write_all_at(&zero, d.bytes - (1 << 20)))
            .map_err(|e| e.to_string())?;
        drop(f);
        let (p, ms) = prepare(d)?;
        let dev = partition_path(d, p.number);
        mount_ext4(&dev, Path::new(ROOT)).map_err(|e| format!("{}: {e}", dev.display()))?;
        self.device = Some(dev.display().to_string());
        self.formatted_ms = Some(ms);
        self.notes.push(format!(
            "{} (serial {serial}) prepared as the manifest asked",
            d.name
        ));
        let _ = std::fs::create_dir_all(Path::new(ROOT).join(NODE_DIR));
        Ok(true)
    }
}

/// The disk a `[storage]` rule names: by serial or device path exactly;
/// by size only among disks that are empty or hold our volume.
fn pick<'a>(
    found: &'a [Disk],
    rule: &cairn_manifest::StorageSpec,
    path: Option<&Path>,
    content: impl Fn(&Disk) -> Content,
) -> Option<&'a Disk> {
    let exact = rule.state_disk_serial.is_some() || path.is_some();
    found
        .iter()
        .filter(|d| {
            rule.state_disk_serial
                .as_deref()
                .is_none_or(|s| d.serial.as_deref() == Some(s))
        })
        .filter(|d| path.is_none_or(|p| p == d.path))
        .filter(|d| rule.state_disk_min_bytes.is_none_or(|m| d.bytes >= m))
        .find(|d| exact || matches!(content(d), Content::Empty | Content::Cairn(_)))
}

/// Writes our GPT and formats its partition; returns it and the time taken.
fn prepare(d: &Disk) -> Result<(gpt::Partition, u128), String> {
    let t = Instant::now();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&d.path)
        .map_err(|e| format!("open: {e}"))?;
    let p = gpt::write_single(&f, d.bytes, d.sector, random(), random(), gpt::STATE_LABEL)
        .map_err(|e| e.to_string())?;
    reread_partitions(&f)?;
    drop(f);
    let dev = partition_path(d, p.number);
    if !wait_for(&dev) {
        return Err(format!(
            "{} did not appear after re-reading the partition table",
            dev.display()
        ));
    }
    format_partition(&dev, p.len)?;
    let ms = t.elapsed().as_millis();
    tracing::info!(disk = %d.name, bytes = p.len, ms, "state volume partitioned and formatted");
    Ok((p, ms))
}

/// True when the partition at `dev` starts with [`gpt::BLANK_MARK`].
fn is_blank(dev: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; gpt::BLANK_MARK.len()];
    std::fs::File::open(dev)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .is_ok()
        && head == gpt::BLANK_MARK
}

/// Formats the partition `dev` (`len` bytes) as the state volume.
fn format_partition(dev: &Path, len: u64) -> Result<(), String> {
    let pf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("open {}: {e}", dev.display()))?;
    let params = ext4::Params {
        label: "cairn-state".into(),
        uuid: random(),
        hash_seed: random(),
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32),
    };
    let l = ext4::format(&pf, len, &params).map_err(|e| e.to_string())?;
    tracing::info!(device = %dev.display(), bytes = len, groups = l.groups, "formatted");
    Ok(())
}

/// Follows a grown disk: the partition to the new end (GPT, then the
/// kernel's view with BLKPG), then the mounted filesystem (online resize).
fn grow(disk: &Disk, part: &gpt::Partition) -> Result<Option<u64>, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk.path)
        .map_err(|e| format!("open {}: {e}", disk.path.display()))?;
    // 1. The partition, when the disk grew (GPT first, then the kernel's view).
    if let Some(grown) = gpt::grow_last(&f, disk.bytes, disk.sector, gpt::STATE_LABEL, 64 << 20)
        .map_err(|e| e.to_string())?
    {
        resize_partition(&f, disk, part, &grown)?;
    }
    // 2. The filesystem, whenever it is smaller than its partition: also
    //    after a boot that grew the partition but lost power before this.
    let dev = partition_path(disk, part.number);
    let part_bytes = std::fs::read_to_string(format!(
        "/sys/class/block/{}/size",
        dev.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
    .ok()
    .and_then(|s| s.trim().parse::<u64>().ok())
    .map(|sectors| sectors * 512)
    .ok_or_else(|| format!("size of {} unknown", dev.display()))?;
    let mut sb = [0u8; 8];
    std::fs::File::open(&dev)
        .and_then(|d| d.read_exact_at(&mut sb, 1024))
        .map_err(|e| format!("reading the superblock of {}: {e}", dev.display()))?;
    let fs_blocks = u64::from(u32::from_le_bytes([sb[4], sb[5], sb[6], sb[7]]));
    let target = ext4::max_blocks(part_bytes);
    if target <= fs_blocks + (64 << 20) / ext4::BLOCK {
        return Ok(None);
    }
    let root = std::fs::File::open(ROOT).map_err(|e| e.to_string())?;
    const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
    // SAFETY: the ioctl reads one u64 (the new block count) from the pointer.
    if unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS as _, &target) } != 0 {
        return Err(format!(
            "online resize from {fs_blocks} to {target} blocks: {}",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!(
        from_blocks = fs_blocks,
        to_blocks = target,
        "state volume grown online"
    );
    Ok(Some(target * ext4::BLOCK))
}

/// Tells the kernel partition `grown.number` of `disk` changed size.
fn resize_partition(
    f: &std::fs::File,
    disk: &Disk,
    part: &gpt::Partition,
    grown: &gpt::Partition,
) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    tracing::info!(disk = %disk.name, from = part.len, to = grown.len, "disk grew: growing the state volume");
    #[repr(C)]
    struct BlkpgPartition {
        start: i64,
        length: i64,
        pno: i32,
        devname: [u8; 64],
        volname: [u8; 64],
    }
    #[repr(C)]
    struct BlkpgIoctlArg {
        op: i32,
        flags: i32,
        datalen: i32,
        data: *mut BlkpgPartition,
    }
    let mut bp = BlkpgPartition {
        start: grown.start as i64,
        length: grown.len as i64,
        pno: grown.number as i32,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: 3, // BLKPG_RESIZE_PARTITION
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut bp,
    };
    const BLKPG: libc::c_ulong = 0x1269;
    // SAFETY: `arg` points at a live, correctly laid out blkpg request.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKPG as _, &mut arg) } != 0 {
        return Err(format!(
            "resizing partition {} in the kernel: {}",
            grown.number,
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn reread_partitions(f: &std::fs::File) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const BLKRRPART: libc::c_ulong = 0x125F;
    // SAFETY: BLKRRPART takes no argument; the fd is an open block device.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART as _, 0) };
    if rc != 0 {
        return Err(format!(
            "re-reading the partition table: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn wait_for(p: &Path) -> bool {
    for _ in 0..50 {
        if p.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

fn mount_ext4(dev: &Path, target: &Path) -> std::io::Result<()> {
    // The kernel replays the journal.
    mount_dev(
        dev,
        target,
        c"ext4",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME,
    )
}

/// Mounts the block device `dev` (a `fstype` filesystem) on `target`.
pub fn mount_dev(
    dev: &Path,
    target: &Path,
    fstype: &std::ffi::CStr,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
    };
    let (src, dst) = (c(dev)?, c(target)?);
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The node's records on the state volume (or in RAM).
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// Records under `ROOT/node`.
    pub fn new() -> Records {
        Records {
            dir: Path::new(ROOT).join(NODE_DIR),
        }
    }

    /// The applied version and its manifest, kept in one file so that a
    /// crash can never leave one without the other.
    fn last(&self) -> Option<(Applied, Vec<u8>)> {
        let b = files::read_optional(&self.dir.join("last.json")).ok()??;
        let v: Value = match serde_json::from_slice(&b) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "node/last.json unreadable; anti-rollback starts over");
                return None;
            }
        };
        let applied: Applied = serde_json::from_value(v["applied"].clone()).ok()?;
        let manifest = hex::decode(v["manifest"].as_str()?).ok()?;
        Some((applied, manifest))
    }

    /// The highest applied version and its payload hash.
    pub fn applied(&self) -> Option<Applied> {
        self.last().map(|(a, _)| a)
    }

    /// The last manifest applied, as signed bytes.
    pub fn last_known_good(&self) -> Option<Vec<u8>> {
        self.last().map(|(_, m)| m)
    }

    /// Records a newly applied manifest and its version (one atomic write).
    pub fn save_applied(&self, applied: &Applied, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let v = json!({ "applied": applied, "manifest": hex::encode(bytes) });
        files::write_atomic(&self.dir.join("last.json"), v.to_string().as_bytes())
    }

    /// The highest power request id carried out.
    pub fn power_done(&self) -> u64 {
        files::read_optional(&self.dir.join("power-done"))
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records power request `id` as carried out (before acting on it).
    pub fn save_power_done(&self, id: u64) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        files::write_atomic(&self.dir.join("power-done"), id.to_string().as_bytes())
    }

    /// The OS version this node last rebooted for (a netbooted node).
    pub fn os_reboot_for(&self) -> Option<String> {
        files::read_optional(&self.dir.join("os-reboot-for"))
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
    }

    /// Records that the node reboots for OS `version` (before rebooting).
    pub fn save_os_reboot_for(&self, version: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        files::write_atomic(&self.dir.join("os-reboot-for"), version.as_bytes())
    }

    /// Stores `k` as the node key (a RAM-only node that gains a volume).
    pub fn save_key(&self, k: &SigningKey) {
        let _ = std::fs::create_dir_all(&self.dir);
        if let Err(e) = files::write_atomic(&self.dir.join("node.key"), k.to_file_text().as_bytes())
        {
            tracing::error!(error = %e, "node key not stored");
        }
    }

    /// The stored node key, if there is one.
    pub fn stored_key(&self) -> Option<SigningKey> {
        SigningKey::read(&self.dir.join("node.key")).ok()
    }

    /// The node's key pair, created on first use. A key file that exists
    /// but cannot be read is left alone (the node runs with a key in RAM).
    pub fn node_key(&self) -> Option<SigningKey> {
        let path = self.dir.join("node.key");
        match SigningKey::read(&path) {
            Ok(k) => return Some(k),
            Err(e) if path.exists() => {
                tracing::error!(error = %e, "node key unreadable; using a temporary one and keeping the file");
                return SigningKey::generate().ok();
            }
            Err(_) => {}
        }
        let k = SigningKey::generate().ok()?;
        let _ = std::fs::create_dir_all(&self.dir);
        if let Err(e) = files::write_atomic(&path, k.to_file_text().as_bytes()) {
            tracing::error!(error = %e, "node key not stored");
        }
        Some(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, serial: &str, gib: u64) -> Disk {
        Disk {
            name: name.into(),
            path: Path::new("/dev").join(name),
            bytes: gib << 30,
            bus: "virtio".into(),
            model: None,
            serial: Some(serial.into()),
            rotational: false,
            removable: false,
            read_only: false,
            sector: 512,
            partitions: Vec::new(),
        }
    }

    #[test]
    fn storage_rules_pick_by_serial_path_or_size() {
        let found = vec![
            disk("vda", "OS", 8),
            disk("vdb", "DATA-1", 2),
            disk("vdc", "DATA-2", 100),
        ];
        // vda holds something foreign, the others are empty.
        let content = |d: &Disk| {
            if d.name == "vda" {
                Content::Foreign("ext4".into())
            } else {
                Content::Empty
            }
        };
        let rule = |serial: Option<&str>, min: Option<u64>| cairn_manifest::StorageSpec {
            state_disk_serial: serial.map(str::to_string),
            state_disk_min_bytes: min,
            ..Default::default()
        };
        let name = |d: Option<&Disk>| d.map(|d| d.name.clone());
        assert_eq!(
            name(pick(&found, &rule(Some("DATA-2"), None), None, content)),
            Some("vdc".into())
        );
        assert_eq!(
            name(pick(&found, &rule(Some("OS"), None), None, content)),
            Some("vda".into()),
            "exact: content is judged later (wipe)"
        );
        assert_eq!(
            name(pick(&found, &rule(Some("NOPE"), None), None, content)),
            None
        );
        assert_eq!(
            name(pick(
                &found,
                &rule(None, None),
                Some(Path::new("/dev/vdb")),
                content
            )),
            Some("vdb".into())
        );
        // By size: never the foreign disk, even though it is large enough.
        assert_eq!(
            name(pick(&found, &rule(None, Some(4 << 30)), None, content)),
            Some("vdc".into())
        );
        assert_eq!(
            name(pick(&found, &rule(None, Some(1 << 30)), None, content)),
            Some("vdb".into())
        );
        assert_eq!(
            name(pick(&found, &rule(None, Some(200 << 30)), None, content)),
            None
        );
    }

    #[test]
    fn partition_names() {
        let d = |n: &str| Disk {
            name: n.into(),
            path: Path::new("/dev").join(n),
            bytes: 0,
            bus: "virtio".into(),
            model: None,
            serial: None,
            rotational: false,
            removable: false,
            read_only: false,
            sector: 512,
            partitions: Vec::new(),
        };
        assert_eq!(partition_path(&d("vda"), 1), Path::new("/dev/vda1"));
        assert_eq!(
            partition_path(&d("nvme0n1"), 1),
            Path::new("/dev/nvme0n1p1")
        );
    }
}
