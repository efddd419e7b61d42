//! Settings from a cloud instance's config drive: a small ISO 9660 or FAT
//! file system labelled `cidata` (NoCloud) or `config-2` (OpenStack) that
//! the cloud attaches to the instance. Its user data, when it starts with a
//! `#cairn` line, holds kernel-command-line words (`cairn.hub=…`,
//! `cairn.node=…`, `ip=…`) that are read after `/proc/cmdline`, so they win:
//! one disk image serves every instance, each told its hub by its cloud.
//!
//! Trust: whoever controls the metadata can point the node at another hub,
//! but manifests are still checked against the keys baked into the image,
//! so a forged hub can withhold manifests, never substitute them.

use std::path::{Path, PathBuf};

/// Labels that mark a config drive (compared case-insensitively).
const LABELS: [&str; 2] = ["cidata", "config-2"];
/// User-data files, in the order looked for.
const USER_DATA: [&str; 2] = ["user-data", "openstack/latest/user_data"];
const MOUNT_AT: &str = "/run/cairn/config-drive";
/// A config drive's user data larger than this is not ours.
const MAX_USER_DATA: u64 = 64 * 1024;
/// What a config drive may set: where the hub is and who this node is.
/// Trust (`cairn.trust`), the mode and the OS version stay the image's.
const ALLOWED: [&str; 5] = ["cairn.hub", "cairn.node", "cairn.poll", "cairn.iface", "ip"];

/// Splits words into those a config drive may set and the rest.
pub fn allowed(words: Vec<String>) -> (Vec<String>, Vec<String>) {
    words
        .into_iter()
        .partition(|w| ALLOWED.contains(&w.split_once('=').map_or(w.as_str(), |(k, _)| k)))
}

/// The file-system label and type in the first 64 KiB of a device.
pub fn label(head: &[u8]) -> Option<(String, &'static std::ffi::CStr)> {
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_end_matches([' ', '\0'])
            .to_string()
    };
    // ISO 9660: the primary volume descriptor at 32 KiB, volume id at +40.
    if head.len() >= 0x8048 && &head[0x8001..0x8006] == b"CD001" {
        return Some((text(&head[0x8028..0x8048]), c"iso9660"));
    }
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA {
        if &head[82..87] == b"FAT32" {
            return Some((text(&head[71..82]), c"vfat"));
        }
        if &head[54..59] == b"FAT12" || &head[54..59] == b"FAT16" {
            return Some((text(&head[43..54]), c"vfat"));
        }
    }
    None
}

/// The words of a `#cairn` user-data file (comments and blank lines
/// skipped); `None` when the file is not for cairn (e.g. cloud-config).
pub fn words(user_data: &str) -> Option<Vec<String>> {
    let mut lines = user_data.lines();
    if lines.next()?.trim() != "#cairn" {
        return None;
    }
    Some(
        lines
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .flat_map(str::split_whitespace)
            .map(str::to_string)
            .collect(),
    )
}

/// Block devices (whole disks and partitions) by kernel name.
fn block_devices() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/sys/class/block")
        .map(|rd| {
            rd.flatten()
                .map(|e| Path::new("/dev").join(e.file_name()))
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    !n.starts_with("loop") && !n.starts_with("ram")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Looks for a config drive; returns where it was found and its words.
/// Never fails the boot: problems are returned as the error text.
pub fn read() -> Result<Option<(String, Vec<String>)>, String> {
    use std::io::Read;
    for dev in block_devices() {
        let mut head = vec![0u8; 0x8800];
        let n = match std::fs::File::open(&dev).and_then(|mut f| f.read(&mut head)) {
            Ok(n) => n,
            Err(_) => continue, // an empty CD drive, a vanished device
        };
        let Some((name, fstype)) = label(&head[..n]) else {
            continue;
        };
        if !LABELS.iter().any(|l| l.eq_ignore_ascii_case(&name)) {
            continue;
        }
        let at = Path::new(MOUNT_AT);
        std::fs::create_dir_all(at).map_err(|e| format!("{MOUNT_AT}: {e}"))?;
        crate::state::mount_dev(
            &dev,
            at,
            fstype,
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        )
        .map_err(|e| format!("config drive {} ({name}): mount: {e}", dev.display()))?;
        let found = USER_DATA.iter().find_map(|f| {
            let p = at.join(f);
            let len = std::fs::metadata(&p).ok()?.len();
            (len <= MAX_USER_DATA)
                .then(|| std::fs::read_to_string(&p).ok())
                .flatten()
                .map(|t| (f, t))
        });
        // SAFETY: unmounting what was mounted above; a NUL-terminated path.
        unsafe { libc::umount2(c"/run/cairn/config-drive".as_ptr(), libc::MNT_DETACH) };
        let where_ = format!("config drive {} ({name})", dev.display());
        return match found {
            Some((f, text)) => match words(&text).map(allowed) {
                Some((w, refused)) if refused.is_empty() => Ok(Some((format!("{where_} {f}"), w))),
                Some((_, refused)) => Err(format!(
                    "{where_}: {f} sets {refused:?}; a config drive may only set {ALLOWED:?}: ignored"
                )),
                None => Err(format!(
                    "{where_}: {f} does not start with a #cairn line; ignored"
                )),
            },
            None => Err(format!("{where_}: no user data; ignored")),
        };
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_of_iso_and_fat() {
        let mut iso = vec![0u8; 0x8800];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        iso[0x8028..0x8048].copy_from_slice(b"cidata                          ");
        assert_eq!(label(&iso), Some(("cidata".into(), c"iso9660")));
        let mut fat = vec![0u8; 512];
        fat[510] = 0x55;
        fat[511] = 0xAA;
        fat[54..59].copy_from_slice(b"FAT16");
        fat[43..54].copy_from_slice(b"CONFIG-2   ");
        assert_eq!(label(&fat), Some(("CONFIG-2".into(), c"vfat")));
        assert_eq!(label(&[0u8; 100]), None);
        assert_eq!(label(&vec![0u8; 0x8800]), None);
    }

    #[test]
    fn only_cairn_user_data_counts() {
        assert_eq!(
            words(
                "#cairn\n# the hub\ncairn.hub=http://10.0.0.1:7400\n\ncairn.node=a cairn.poll=2\n"
            ),
            Some(vec![
                "cairn.hub=http://10.0.0.1:7400".to_string(),
                "cairn.node=a".into(),
                "cairn.poll=2".into()
            ])
        );
        assert_eq!(words("#cloud-config\nhostname: x\n"), None);
        let (ok, refused) = allowed(vec![
            "cairn.hub=http://h:1".into(),
            "ip=dhcp".into(),
            "cairn.trust=0123456789abcdef".into(),
            "cairn.mode=loader".into(),
            "init=/bin/sh".into(),
        ]);
        assert_eq!(ok, vec!["cairn.hub=http://h:1", "ip=dhcp"]);
        assert_eq!(refused.len(), 3);
        assert_eq!(words(""), None);
    }
}
