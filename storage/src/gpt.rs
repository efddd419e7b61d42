//! A GPT with one partition (the state volume), and reading it back.
//!
//! Protective MBR at LBA 0, primary header at LBA 1 and 128 entries after
//! it, backup entries and header at the end of the disk; CRC32 over the
//! header and the entry array as UEFI specifies. The partition starts at
//! 1 MiB and ends on a MiB boundary.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The partition name cairn gives its state volume.
pub const STATE_LABEL: &str = "cairn-state";
/// The first bytes of a `cairn-state` partition that an image builder
/// left for the node to format at first boot (a cloud disk image ships
/// one). Only a partition starting with exactly these bytes is formatted
/// in place: a damaged volume is never mistaken for a blank one.
pub const BLANK_MARK: &[u8] = b"CAIRN-STATE-BLANK: formatted by the node at first boot\n";
/// "Linux filesystem data" type GUID, in on-disk (mixed-endian) order.
pub const LINUX_FS: [u8; 16] = [
    0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4,
];
const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;
const ALIGN: u64 = 1 << 20;

/// One partition as read from a GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based index (the `N` in `/dev/vdaN`).
    pub number: u32,
    /// Name.
    pub name: String,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// GPT errors.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// The disk cannot hold a 1 MiB-aligned partition.
    #[error("disk of {0} bytes is too small for a partition table and a partition")]
    TooSmall(u64),
    /// A header's checksum or fields are wrong.
    #[error("GPT header damaged: {0}")]
    Damaged(&'static str),
    /// I/O.
    #[error("GPT I/O: {0}")]
    Io(#[from] io::Error),
}

/// Writes a fresh GPT holding one partition named `name` that spans the
/// disk (aligned to 1 MiB at both ends); returns it.
pub fn write_single(
    dev: &File,
    disk_bytes: u64,
    sector: u64,
    disk_guid: [u8; 16],
    part_guid: [u8; 16],
    name: &str,
) -> Result<Partition, GptError> {
    let lbas = disk_bytes / sector;
    let entry_lbas = (ENTRIES * ENTRY_SIZE).div_ceil(sector);
    let last = lbas - 1;
    let first_usable = 2 + entry_lbas;
    let last_usable = last - 1 - entry_lbas;
    let start = ALIGN / sector;
    let end = ((last_usable + 1) * sector / ALIGN * ALIGN) / sector - 1;
    if lbas < 3 * ALIGN / sector || end <= start {
        return Err(GptError::TooSmall(disk_bytes));
    }
    // Entries.
    let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    entries[0..16].copy_from_slice(&LINUX_FS);
    entries[16..32].copy_from_slice(&part_guid);
    entries[32..40].copy_from_slice(&start.to_le_bytes());
    entries[40..48].copy_from_slice(&end.to_le_bytes());
    for (i, u) in name.encode_utf16().take(36).enumerate() {
        entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let entries_crc = crc32fast::hash(&entries);
    let header = |current: u64, backup: u64, entries_at: u64| {
        let mut h = vec![0u8; sector as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&first_usable.to_le_bytes());
        h[48..56].copy_from_slice(&last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&disk_guid);
        h[72..80].copy_from_slice(&entries_at.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    // Protective MBR.
    let mut mbr = vec![0u8; sector as usize];
    let p = &mut mbr[446..462];
    p[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    p[4] = 0xEE;
    p[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    p[8..12].copy_from_slice(&1u32.to_le_bytes());
    p[12..16].copy_from_slice(&(u32::try_from(lbas - 1).unwrap_or(u32::MAX)).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    // Backup first, primary last: a torn write leaves no valid primary
    // pointing at a missing backup.
    dev.write_all_at(&entries, (last - entry_lbas) * sector)?;
    dev.write_all_at(&header(last, 1, last - entry_lbas), last * sector)?;
    dev.write_all_at(&entries, 2 * sector)?;
    dev.write_all_at(&header(1, last, 2), sector)?;
    dev.write_all_at(&mbr, 0)?;
    dev.sync_all()?;
    Ok(Partition {
        number: 1,
        name: name.to_string(),
        start: start * sector,
        len: (end - start + 1) * sector,
    })
}

/// Extends the last partition, named `name`, to the end of a disk that
/// grew (aligned down to 1 MiB) and moves the backup GPT there. Returns the
/// grown partition, or `None` when there is less than `min_growth` to gain.
pub fn grow_last(
    dev: &File,
    disk_bytes: u64,
    sector: u64,
    name: &str,
    min_growth: u64,
) -> Result<Option<Partition>, GptError> {
    let parts = read(dev, sector)?.ok_or(GptError::Damaged("no GPT"))?;
    let Some(p) = parts.iter().find(|p| p.name == name) else {
        return Ok(None);
    };
    if parts.iter().any(|q| q.start > p.start) {
        return Ok(None); // not the last partition: nothing to grow into
    }
    let mut h = vec![0u8; sector as usize];
    dev.read_exact_at(&mut h, sector)?;
    let entries_at = u64::from_le_bytes(h[72..80].try_into().unwrap_or_default());
    let n = u64::from(u32::from_le_bytes([h[80], h[81], h[82], h[83]]));
    let esize = u64::from(u32::from_le_bytes([h[84], h[85], h[86], h[87]]));
    let mut entries = vec![0u8; (n * esize) as usize];
    dev.read_exact_at(&mut entries, entries_at * sector)?;
    let lbas = disk_bytes / sector;
    let entry_lbas = (n * esize).div_ceil(sector);
    let last = lbas - 1;
    let last_usable = last - 1 - entry_lbas;
    let end = ((last_usable + 1) * sector / ALIGN * ALIGN) / sector - 1;
    let old_end = (p.start + p.len) / sector - 1;
    if end <= old_end || (end - old_end) * sector < min_growth {
        return Ok(None);
    }
    let e =
        &mut entries[((p.number - 1) as u64 * esize) as usize..(p.number as u64 * esize) as usize];
    e[40..48].copy_from_slice(&end.to_le_bytes());
    let entries_crc = crc32fast::hash(&entries);
    let header = |current: u64, backup: u64, at: u64| {
        let mut x = h.clone();
        x[16..20].fill(0);
        x[24..32].copy_from_slice(&current.to_le_bytes());
        x[32..40].copy_from_slice(&backup.to_le_bytes());
        x[48..56].copy_from_slice(&last_usable.to_le_bytes());
        x[72..80].copy_from_slice(&at.to_le_bytes());
        x[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let size = u32::from_le_bytes([x[12], x[13], x[14], x[15]]) as usize;
        let crc = crc32fast::hash(&x[..size.min(x.len())]);
        x[16..20].copy_from_slice(&crc.to_le_bytes());
        x
    };
    dev.write_all_at(&entries, (last - entry_lbas) * sector)?;
    dev.write_all_at(&header(last, 1, last - entry_lbas), last * sector)?;
    dev.write_all_at(&entries, entries_at * sector)?;
    dev.write_all_at(&header(1, last, entries_at), sector)?;
    // The protective MBR covers the whole (grown) disk.
    let size = u32::try_from(lbas - 1).unwrap_or(u32::MAX);
    dev.write_all_at(&size.to_le_bytes(), 446 + 12)?;
    dev.sync_all()?;
    Ok(Some(Partition {
        len: (end + 1) * sector - p.start,
        ..p.clone()
    }))
}

/// Reads the primary GPT; `Ok(None)` when there is none.
pub fn read(dev: &File, sector: u64) -> Result<Option<Vec<Partition>>, GptError> {
    let mut h = vec![0u8; sector as usize];
    dev.read_exact_at(&mut h, sector)?;
    if &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let size = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize;
    if !(92..=sector as usize).contains(&size) {
        return Err(GptError::Damaged("header size"));
    }
    let want = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    let mut c = h[..size].to_vec();
    c[16..20].fill(0);
    if crc32fast::hash(&c) != want {
        return Err(GptError::Damaged("header CRC"));
    }
    let at = u64::from_le_bytes(h[72..80].try_into().unwrap_or_default());
    let n = u32::from_le_bytes([h[80], h[81], h[82], h[83]]) as u64;
    let esize = u32::from_le_bytes([h[84], h[85], h[86], h[87]]) as u64;
    if !(128..=4096).contains(&esize) || n > 1024 {
        return Err(GptError::Damaged("entry geometry"));
    }
    let mut entries = vec![0u8; (n * esize) as usize];
    dev.read_exact_at(&mut entries, at * sector)?;
    if crc32fast::hash(&entries) != u32::from_le_bytes([h[88], h[89], h[90], h[91]]) {
        return Err(GptError::Damaged("entries CRC"));
    }
    let mut out = Vec::new();
    for (i, e) in entries.chunks(esize as usize).enumerate() {
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = u64::from_le_bytes(e[32..40].try_into().unwrap_or_default());
        let last = u64::from_le_bytes(e[40..48].try_into().unwrap_or_default());
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        let (Some(start), Some(len)) = (
            first.checked_mul(sector),
            last.checked_sub(first)
                .and_then(|n| n.checked_add(1))
                .and_then(|n| n.checked_mul(sector)),
        ) else {
            return Err(GptError::Damaged("partition entry out of range"));
        };
        out.push(Partition {
            number: i as u32 + 1,
            name: String::from_utf16_lossy(&units),
            start,
            len,
        });
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_on_a_file() {
        let f = tempfile::tempfile().unwrap();
        let size = 100u64 << 20;
        f.set_len(size).unwrap();
        let p = write_single(&f, size, 512, [1; 16], [2; 16], STATE_LABEL).unwrap();
        assert_eq!(p.start, 1 << 20);
        assert_eq!((p.start + p.len) % (1 << 20), 0);
        assert!(p.start + p.len <= size - 33 * 512);
        let back = read(&f, 512).unwrap().unwrap();
        assert_eq!(back, vec![p]);
        // A flipped byte in the entries is caught.
        f.write_all_at(&[0x55], 2 * 512 + 60).unwrap();
        assert!(matches!(
            read(&f, 512),
            Err(GptError::Damaged("entries CRC"))
        ));
        f.write_all_at(&[0x00], 2 * 512 + 60).unwrap();
        // The disk grows to 300 MiB: the partition follows, the backup moves.
        write_single(&f, size, 512, [1; 16], [2; 16], STATE_LABEL).unwrap();
        let big = 300u64 << 20;
        f.set_len(big).unwrap();
        assert_eq!(
            grow_last(&f, size, 512, STATE_LABEL, 1 << 20).unwrap(),
            None,
            "nothing to gain"
        );
        let g = grow_last(&f, big, 512, STATE_LABEL, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(g.start, 1 << 20);
        assert_eq!(
            g.start + g.len,
            big - (1 << 20),
            "ends at the last whole MiB before the backup"
        );
        assert_eq!(read(&f, 512).unwrap().unwrap(), vec![g.clone()]);
        let mut backup = vec![0u8; 512];
        f.read_exact_at(&mut backup, big - 512).unwrap();
        assert_eq!(&backup[..8], b"EFI PART");
        let mut mbr_size = [0u8; 4];
        f.read_exact_at(&mut mbr_size, 446 + 12).unwrap();
        assert_eq!(u64::from(u32::from_le_bytes(mbr_size)), big / 512 - 1);
        let blank = tempfile::tempfile().unwrap();
        blank.set_len(size).unwrap();
        assert_eq!(read(&blank, 512).unwrap(), None);
    }
}
