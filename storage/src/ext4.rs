//! A minimal ext4 formatter: no `mkfs` binary in the image and no GPL
//! library linked into PID 1.
//!
//! The layout is the classic one, kept simple enough to check by eye:
//! 4 KiB blocks, 32768 blocks per group, 256-byte inodes, one inode per
//! 16 KiB, sparse superblock backups, no flex_bg, no metadata checksums,
//! no reserved GDT blocks. Features: `has_journal`, `filetype`, `extent`,
//! `sparse_super`, `large_file`, `huge_file`, `dir_nlink`, `extra_isize`.
//! Each group is `[superblock + descriptors, if a backup group] block
//! bitmap, inode bitmap, inode table, data`. Group 0's first data blocks
//! hold the root directory, `lost+found` and the journal (inode 8, one
//! extent, jbd2 superblock v2, clean).
//!
//! Tests format loop devices and run `e2fsck -fn` on the result; the host
//! kernel and cairn's mount it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Block size.
pub const BLOCK: u64 = 4096;
const BLOCKS_PER_GROUP: u64 = 32768;
const INODE_SIZE: u64 = 256;
const BYTES_PER_INODE: u64 = 16384;
const FIRST_INO: u32 = 11;
const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const LOST_FOUND_INO: u32 = 11;
/// Smallest filesystem this formatter makes (the journal and group 0's
/// metadata must fit with room to spare).
pub const MIN_BYTES: u64 = 64 << 20;

/// Formatting errors.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The device is too small.
    #[error("{0} bytes is below the minimum of {MIN_BYTES} bytes for a state volume")]
    TooSmall(u64),
    /// The device is too large for this formatter (no 64bit feature).
    #[error("{0} bytes is beyond the 16 TiB this formatter supports")]
    TooLarge(u64),
    /// A write failed.
    #[error("writing the filesystem: {0}")]
    Io(#[from] io::Error),
}

/// Where everything goes, computed before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Filesystem size in blocks.
    pub blocks: u64,
    /// Number of block groups.
    pub groups: u64,
    /// Inodes per group.
    pub inodes_per_group: u64,
    /// Blocks of the inode table per group.
    pub itable_blocks: u64,
    /// Blocks of group descriptors.
    pub gdt_blocks: u64,
    /// Journal length in blocks.
    pub journal_blocks: u64,
}

/// The most blocks a filesystem from this formatter may have in `bytes`:
/// whole groups within the 2^32 - 1 blocks ext4 allows without `64bit`.
pub fn max_blocks(bytes: u64) -> u64 {
    (bytes / BLOCK).min(u64::from(u32::MAX) / BLOCKS_PER_GROUP * BLOCKS_PER_GROUP)
}

/// Groups 0, 1 and powers of 3, 5 and 7 carry superblock backups.
pub fn has_super(g: u64) -> bool {
    fn power_of(mut n: u64, b: u64) -> bool {
        while n > 1 && n.is_multiple_of(b) {
            n /= b;
        }
        n == 1
    }
    g == 0 || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
}

impl Layout {
    /// The layout for a device of `bytes`.
    pub fn for_size(bytes: u64) -> Result<Layout, Ext4Error> {
        if bytes < MIN_BYTES {
            return Err(Ext4Error::TooSmall(bytes));
        }
        // Larger devices get the largest filesystem this layout allows
        // (16 TiB); the rest stays unused rather than the node running
        // from RAM.
        let mut blocks = max_blocks(bytes);
        let inodes_per_group = BLOCKS_PER_GROUP * BLOCK / BYTES_PER_INODE;
        let itable_blocks = inodes_per_group * INODE_SIZE / BLOCK;
        let groups_for = |b: u64| b.div_ceil(BLOCKS_PER_GROUP);
        let gdt_for = |g: u64| (g * 32).div_ceil(BLOCK);
        // A last group too small for its own metadata plus some data is
        // dropped (the space stays unused), as mke2fs does.
        let last = blocks - (groups_for(blocks) - 1) * BLOCKS_PER_GROUP;
        let groups = groups_for(blocks);
        let overhead_last = if has_super(groups - 1) {
            1 + gdt_for(groups)
        } else {
            0
        } + 2
            + itable_blocks;
        if groups > 1 && last < overhead_last + 64 {
            blocks -= last;
        }
        let groups = groups_for(blocks);
        let journal_blocks = match blocks {
            b if b < 32768 => 1024,
            b if b < 262_144 => 4096,
            _ => 16384,
        };
        Ok(Layout {
            blocks,
            groups,
            inodes_per_group,
            itable_blocks,
            gdt_blocks: gdt_for(groups),
            journal_blocks,
        })
    }

    fn group_start(&self, g: u64) -> u64 {
        g * BLOCKS_PER_GROUP
    }

    fn group_len(&self, g: u64) -> u64 {
        (self.blocks - self.group_start(g)).min(BLOCKS_PER_GROUP)
    }

    /// Metadata blocks at the start of group `g`.
    fn overhead(&self, g: u64) -> u64 {
        (if has_super(g) { 1 + self.gdt_blocks } else { 0 }) + 2 + self.itable_blocks
    }

    fn block_bitmap(&self, g: u64) -> u64 {
        self.group_start(g) + if has_super(g) { 1 + self.gdt_blocks } else { 0 }
    }

    fn first_data(&self, g: u64) -> u64 {
        self.group_start(g) + self.overhead(g)
    }

    /// Root directory, lost+found, then the journal: group 0's first data.
    fn root_block(&self) -> u64 {
        self.first_data(0)
    }

    fn journal_start(&self) -> u64 {
        self.first_data(0) + 2
    }

    /// Blocks used in group `g` (metadata, and group 0's directories and journal).
    fn used(&self, g: u64) -> u64 {
        self.overhead(g) + if g == 0 { 2 + self.journal_blocks } else { 0 }
    }

    /// Free blocks in the whole filesystem.
    pub fn free_blocks(&self) -> u64 {
        (0..self.groups)
            .map(|g| self.group_len(g) - self.used(g))
            .sum()
    }

    /// Inodes in the filesystem.
    pub fn inodes(&self) -> u64 {
        self.groups * self.inodes_per_group
    }
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Identity of a new filesystem.
#[derive(Debug, Clone)]
pub struct Params {
    /// Volume label (at most 16 bytes).
    pub label: String,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Seed for directory hashing.
    pub hash_seed: [u8; 16],
    /// Creation time (unix seconds).
    pub now: u32,
}

/// Formats `dev` (a partition or whole device of `bytes`) as ext4.
pub fn format(dev: &File, bytes: u64, p: &Params) -> Result<Layout, Ext4Error> {
    let l = Layout::for_size(bytes)?;
    let zero_range = |start: u64, count: u64| zero_blocks(dev, start * BLOCK, count * BLOCK);
    // Group descriptors.
    let mut gdt = vec![0u8; (l.gdt_blocks * BLOCK) as usize];
    for g in 0..l.groups {
        let d = &mut gdt[(g * 32) as usize..(g * 32 + 32) as usize];
        let bb = l.block_bitmap(g);
        put32(d, 0x00, bb as u32);
        put32(d, 0x04, (bb + 1) as u32);
        put32(d, 0x08, (bb + 2) as u32);
        put16(d, 0x0C, (l.group_len(g) - l.used(g)) as u16);
        let used_inodes = if g == 0 { u64::from(FIRST_INO) } else { 0 };
        put16(d, 0x0E, (l.inodes_per_group - used_inodes) as u16);
        put16(d, 0x10, if g == 0 { 2 } else { 0 });
    }
    // Per group: bitmaps and a zeroed inode table; superblock backups.
    for g in 0..l.groups {
        let mut bitmap = vec![0u8; BLOCK as usize];
        let used = l.used(g);
        for i in (0..used).chain(l.group_len(g)..BLOCKS_PER_GROUP) {
            bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        dev.write_all_at(&bitmap, l.block_bitmap(g) * BLOCK)?;
        let mut ibitmap = vec![0u8; BLOCK as usize];
        let used_inodes = if g == 0 { u64::from(FIRST_INO) } else { 0 };
        for i in (0..used_inodes).chain(l.inodes_per_group..BLOCK * 8) {
            ibitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        dev.write_all_at(&ibitmap, (l.block_bitmap(g) + 1) * BLOCK)?;
        zero_range(l.block_bitmap(g) + 2, l.itable_blocks)?;
        if has_super(g) {
            let sb = superblock(&l, p, g);
            let at = if g == 0 {
                1024
            } else {
                l.group_start(g) * BLOCK
            };
            dev.write_all_at(&sb, at)?;
            dev.write_all_at(&gdt, (l.group_start(g) + 1) * BLOCK)?;
        }
    }
    // Inodes: root, journal, lost+found.
    let itable = l.block_bitmap(0) + 2;
    let inode_at = |ino: u32| itable * BLOCK + u64::from(ino - 1) * INODE_SIZE;
    let root = l.root_block();
    dev.write_all_at(
        &inode(0o040755, BLOCK, 3, root, 1, p.now),
        inode_at(ROOT_INO),
    )?;
    dev.write_all_at(
        &inode(0o040700, BLOCK, 2, root + 1, 1, p.now),
        inode_at(LOST_FOUND_INO),
    )?;
    let journal = inode(
        0o100600,
        l.journal_blocks * BLOCK,
        1,
        l.journal_start(),
        l.journal_blocks,
        p.now,
    );
    dev.write_all_at(&journal, inode_at(JOURNAL_INO))?;
    // Directories.
    let mut dir = vec![0u8; BLOCK as usize];
    dirent(&mut dir, 0, ROOT_INO, 12, ".");
    dirent(&mut dir, 12, ROOT_INO, 12, "..");
    dirent(
        &mut dir,
        24,
        LOST_FOUND_INO,
        (BLOCK - 24) as u16,
        "lost+found",
    );
    dev.write_all_at(&dir, root * BLOCK)?;
    let mut lf = vec![0u8; BLOCK as usize];
    dirent(&mut lf, 0, LOST_FOUND_INO, 12, ".");
    dirent(&mut lf, 12, ROOT_INO, (BLOCK - 12) as u16, "..");
    dev.write_all_at(&lf, (root + 1) * BLOCK)?;
    // The journal: zeroed, then its superblock.
    zero_range(l.journal_start(), l.journal_blocks)?;
    dev.write_all_at(&journal_superblock(&l, p), l.journal_start() * BLOCK)?;
    dev.sync_all()?;
    // The first 1 KiB (old boot sectors, or a disk image's "format me"
    // mark) goes last, once everything else is on the disk: a format cut
    // short by a power loss still carries the mark and is done again.
    dev.write_all_at(&[0u8; 1024], 0)?;
    dev.sync_all()?;
    Ok(l)
}

/// Zeroes `len` bytes at `off`: the kernel's fastest way first (a block
/// device's BLKZEROOUT, which uses the device's write-zeroes or discard;
/// a file's FALLOC_FL_ZERO_RANGE), plain writes of zeros otherwise.
fn zero_blocks(dev: &File, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let fd = dev.as_raw_fd();
    let is_block = dev
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let fast = if is_block {
        const BLKZEROOUT: libc::c_ulong = 0x127F;
        let range: [u64; 2] = [off, len];
        // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer.
        unsafe { libc::ioctl(fd, BLKZEROOUT as _, range.as_ptr()) == 0 }
    } else {
        // SAFETY: fallocate on our own fd with a valid range.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            ) == 0
        }
    };
    if fast {
        return Ok(());
    }
    let zero = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zero.len() as u64) as usize;
        dev.write_all_at(&zero[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

fn inode(mode: u16, size: u64, links: u16, start: u64, len: u64, now: u32) -> Vec<u8> {
    let mut i = vec![0u8; INODE_SIZE as usize];
    put16(&mut i, 0x00, mode);
    put32(&mut i, 0x04, size as u32);
    for off in [0x08, 0x0C, 0x10] {
        put32(&mut i, off, now);
    }
    put16(&mut i, 0x1A, links);
    put32(&mut i, 0x1C, (len * BLOCK / 512) as u32);
    put32(&mut i, 0x20, 0x0008_0000); // EXT4_EXTENTS_FL
    put32(&mut i, 0x6C, (size >> 32) as u32);
    put16(&mut i, 0x80, 32); // i_extra_isize
    extent_root(&mut i[0x28..0x64], start, len);
    i
}

/// An in-inode extent tree with one extent covering `len` blocks.
fn extent_root(b: &mut [u8], start: u64, len: u64) {
    put16(b, 0, 0xF30A);
    put16(b, 2, 1);
    put16(b, 4, 4);
    put16(b, 6, 0);
    put32(b, 12, 0);
    put16(b, 16, len as u16);
    put16(b, 18, (start >> 32) as u16);
    put32(b, 20, start as u32);
}

fn dirent(b: &mut [u8], off: usize, ino: u32, rec_len: u16, name: &str) {
    put32(b, off, ino);
    put16(b, off + 4, rec_len);
    b[off + 6] = name.len() as u8;
    b[off + 7] = 2; // EXT4_FT_DIR
    b[off + 8..off + 8 + name.len()].copy_from_slice(name.as_bytes());
}

fn superblock(l: &Layout, p: &Params, group: u64) -> Vec<u8> {
    let mut s = vec![0u8; 1024];
    put32(&mut s, 0x00, l.inodes() as u32);
    put32(&mut s, 0x04, l.blocks as u32);
    put32(&mut s, 0x0C, l.free_blocks() as u32);
    put32(&mut s, 0x10, (l.inodes() - u64::from(FIRST_INO)) as u32);
    put32(&mut s, 0x18, 2); // log2(4096) - 10
    put32(&mut s, 0x1C, 2);
    put32(&mut s, 0x20, BLOCKS_PER_GROUP as u32);
    put32(&mut s, 0x24, BLOCKS_PER_GROUP as u32);
    put32(&mut s, 0x28, l.inodes_per_group as u32);
    put32(&mut s, 0x30, p.now);
    put16(&mut s, 0x36, 0xFFFF); // max mount count: -1
    put16(&mut s, 0x38, 0xEF53);
    put16(&mut s, 0x3A, 1); // clean
    put16(&mut s, 0x3C, 1); // errors: continue
    put32(&mut s, 0x40, p.now);
    put32(&mut s, 0x4C, 1); // dynamic revision
    put32(&mut s, 0x54, FIRST_INO);
    put16(&mut s, 0x58, INODE_SIZE as u16);
    put16(&mut s, 0x5A, group as u16);
    put32(&mut s, 0x5C, 0x0004); // compat: has_journal
    put32(&mut s, 0x60, 0x0002 | 0x0040); // incompat: filetype, extent
    put32(&mut s, 0x64, 0x01 | 0x02 | 0x08 | 0x20 | 0x40); // ro: sparse, large, huge, dir_nlink, extra_isize
    s[0x68..0x78].copy_from_slice(&p.uuid);
    let label = p.label.as_bytes();
    let n = label.len().min(16);
    s[0x78..0x78 + n].copy_from_slice(&label[..n]);
    put32(&mut s, 0xE0, JOURNAL_INO);
    s[0xEC..0xFC].copy_from_slice(&p.hash_seed);
    s[0xFC] = 1; // half_md4
    s[0xFD] = 1; // journal inode blocks backed up in s_jnl_blocks
    put32(&mut s, 0x108, p.now);
    let mut jblocks = [0u8; 60];
    extent_root(&mut jblocks, l.journal_start(), l.journal_blocks);
    s[0x10C..0x10C + 60].copy_from_slice(&jblocks);
    put32(&mut s, 0x10C + 60, 0); // i_size_high
    put32(&mut s, 0x10C + 64, (l.journal_blocks * BLOCK) as u32);
    put16(&mut s, 0x15C, 32);
    put16(&mut s, 0x15E, 32);
    put32(&mut s, 0x160, 0x2); // unsigned directory hash
    s
}

fn journal_superblock(l: &Layout, p: &Params) -> Vec<u8> {
    let mut j = vec![0u8; 1024];
    let be = |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    be(&mut j, 0x00, 0xC03B_3998);
    be(&mut j, 0x04, 4); // superblock v2
    be(&mut j, 0x0C, BLOCK as u32);
    be(&mut j, 0x10, l.journal_blocks as u32);
    be(&mut j, 0x14, 1); // first log block
    be(&mut j, 0x18, 1); // first expected commit id
    be(&mut j, 0x1C, 0); // s_start = 0: clean
    j[0x30..0x40].copy_from_slice(&p.uuid);
    be(&mut j, 0x40, 1); // one user
    j[0x100..0x110].copy_from_slice(&p.uuid);
    j
}

/// Reads the volume label of an ext4 filesystem at the start of `dev`, if
/// it is one.
pub fn probe(dev: &File) -> io::Result<Option<String>> {
    let mut s = [0u8; 1024];
    dev.read_exact_at(&mut s, 1024)?;
    if u16::from_le_bytes([s[0x38], s[0x39]]) != 0xEF53 {
        return Ok(None);
    }
    let label: Vec<u8> = s[0x78..0x88]
        .iter()
        .copied()
        .take_while(|b| *b != 0)
        .collect();
    Ok(Some(String::from_utf8_lossy(&label).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_groups() {
        let g: Vec<u64> = (0..60).filter(|g| has_super(*g)).collect();
        assert_eq!(g, vec![0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn layouts_account_for_every_block() {
        for bytes in [
            MIN_BYTES,
            200 << 20,
            1 << 30,
            4 << 30,
            (4 << 30) + 4096 * 100,
            100 << 30,
        ] {
            let l = Layout::for_size(bytes).unwrap();
            assert!(l.blocks * BLOCK <= bytes);
            assert_eq!(l.groups, l.blocks.div_ceil(BLOCKS_PER_GROUP));
            for g in 0..l.groups {
                assert!(l.used(g) < l.group_len(g), "{bytes}: group {g}");
            }
            assert!(l.journal_start() + l.journal_blocks <= l.group_len(0));
        }
        // 4 GiB + 100 blocks: the 100-block tail cannot hold a group.
        let l = Layout::for_size((4 << 30) + 4096 * 100).unwrap();
        assert_eq!(l.blocks, (4 << 30) / 4096);
        assert!(matches!(
            Layout::for_size(1 << 20),
            Err(Ext4Error::TooSmall(_))
        ));
    }
}
