//! OS updates. The manifest's `[os]` names a version with its kernel and
//! initramfs (URL + sha256). The running version is `cairn.os=` on the
//! command line, which every boot entry carries.
//!
//! A node booted from disk has an EFI system partition named `cairn-esp`
//! with systemd-boot and one Boot Loader Specification entry per version
//! (`loader/entries/cairn-V.conf`, files under `cairn/V/`): two slots, the
//! running version and one other. An update downloads the new version,
//! checks both digests, writes its files, then its entry as
//! `cairn-V+1.conf`: systemd-boot's boot counting gives it one try (it
//! renames the entry to `cairn-V+0-1.conf` before starting it). If the new
//! version comes up — its PID 1 applies a manifest and starts its workloads
//! — it renames its entry to `cairn-V.conf` (good). If it does not (a
//! kernel panic reboots, or the trial watchdog does), systemd-boot sorts
//! the entry with no tries left last and boots the previous version, which
//! sees the failed entry and does not try that version again.
//!
//! A netbooted node has no slots: the boot server decides what it boots.
//! It reboots once for a new version (remembered on the state volume) and
//! reports when the boot server still served the old one.

use cairn_manifest::{Artifact, OsSpec};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// GPT partition name of cairn's EFI system partition.
pub const ESP_LABEL: &str = "cairn-esp";
const ESP_AT: &str = "/run/cairn/esp";
/// Kernels and initramfs files are read into memory before their digest
/// is known: bounded.
const MAX_ARTIFACT: u64 = 128 << 20;

/// The running version (`cairn.os=`, the last one, as the boot entry
/// appends it), if the boot entry named one.
pub fn running_version(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("cairn.os="))
        .next_back()
        .map(str::to_string)
}

/// The command line without what boot entries add per version.
pub fn base_cmdline(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .filter(|w| {
            !w.starts_with("cairn.os=")
                && !w.starts_with("initrd=")
                && !w.starts_with("BOOT_IMAGE=")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A boot entry's file name, parsed: `cairn-V[+LEFT[-DONE]].conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    /// Version.
    pub version: String,
    /// Tries left, when boot counting is on (None: a good entry).
    pub left: Option<u32>,
    /// Tries made (`-DONE`); none yet when the entry was never booted.
    pub done: Option<u32>,
}

/// Parses an entry file name; `None` for files that are not cairn entries.
pub fn parse_entry(file: &str) -> Option<EntryName> {
    let stem = file.strip_prefix("cairn-")?.strip_suffix(".conf")?;
    let (version, counter) = match stem.split_once('+') {
        Some((v, c)) => (v, Some(c)),
        None => (stem, None),
    };
    if !cairn_manifest::is_os_version(version) {
        return None;
    }
    let (left, done) = match counter {
        None => (None, None),
        Some(c) => match c.split_once('-') {
            Some((l, d)) => (Some(l.parse().ok()?), Some(d.parse().ok()?)),
            None => (Some(c.parse().ok()?), None),
        },
    };
    Some(EntryName {
        version: version.to_string(),
        left,
        done,
    })
}

/// Finds the `cairn-esp` partition on any disk.
pub fn find_esp() -> Option<PathBuf> {
    for d in cairn_storage::disks::discover(Path::new("/sys"), Path::new("/dev")) {
        let Ok(f) = std::fs::File::open(&d.path) else {
            continue;
        };
        if let Ok(Some(parts)) = cairn_storage::gpt::read(&f, d.sector) {
            if let Some(p) = parts.iter().find(|p| p.name == ESP_LABEL) {
                return Some(crate::state::partition_path(&d, p.number));
            }
        }
    }
    None
}

/// The ESP, mounted while this lives; synced and unmounted on drop (it is
/// FAT: the less time it spends mounted, the less a power cut can hurt).
pub struct Esp {
    root: PathBuf,
}

impl Esp {
    /// Mounts `dev` at the fixed mount point.
    pub fn mount(dev: &Path) -> Result<Esp, String> {
        let root = PathBuf::from(ESP_AT);
        std::fs::create_dir_all(&root).map_err(|e| format!("{ESP_AT}: {e}"))?;
        crate::state::mount_dev(
            dev,
            &root,
            c"vfat",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        )
        .map_err(|e| format!("mounting the ESP {}: {e}", dev.display()))?;
        Ok(Esp { root })
    }

    fn entries_dir(&self) -> PathBuf {
        self.root.join("loader/entries")
    }

    /// Every cairn entry: (file name, parsed).
    pub fn entries(&self) -> Vec<(String, EntryName)> {
        let mut v: Vec<(String, EntryName)> = std::fs::read_dir(self.entries_dir())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        parse_entry(&n).map(|p| (n, p))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Marks `version` good (drops its boot counter); true when it had one.
    pub fn mark_good(&self, version: &str) -> Result<bool, String> {
        let Some((file, _)) = self
            .entries()
            .into_iter()
            .find(|(_, e)| e.version == version && e.left.is_some())
        else {
            return Ok(false);
        };
        let dir = self.entries_dir();
        std::fs::rename(dir.join(&file), dir.join(format!("cairn-{version}.conf")))
            .and_then(|()| std::fs::File::open(&dir)?.sync_all())
            .map_err(|e| format!("marking {file} good: {e}"))?;
        Ok(true)
    }

    /// Installs `os` as the next boot's version (one try), keeping
    /// `running` as the fallback and removing every other version. `sort`
    /// is the entry's `version` for systemd-boot's ordering (newest first):
    /// the manifest version, which only grows, so the newest install boots
    /// next even when its OS version sorts lower (a rollback to "1.9").
    pub fn install(
        &self,
        os: &OsSpec,
        cmdline: &str,
        running: &str,
        sort: u64,
    ) -> Result<(), String> {
        let kernel = fetch(&os.kernel, "kernel")?;
        let initrd = fetch(&os.initramfs, "initramfs")?;
        // Room first: every version but the running one goes (entries, and
        // directories a failed install may have left without an entry).
        for (file, e) in self.entries() {
            if e.version != running {
                let _ = std::fs::remove_file(self.entries_dir().join(&file));
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.root.join("cairn")) {
            for d in rd.flatten() {
                if d.file_name().to_string_lossy() != running {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
        let dir = self.root.join("cairn").join(&os.version);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        write_synced(&dir.join("vmlinuz"), &kernel)?;
        write_synced(&dir.join("initrd.img"), &initrd)?;
        // The entry last: until it exists the new files are inert.
        let v = &os.version;
        let cmdline = base_cmdline(cmdline);
        let entry = format!(
            "title cairn {v}\nversion {sort}\nsort-key cairn\nlinux /cairn/{v}/vmlinuz\ninitrd /cairn/{v}/initrd.img\noptions {cmdline} cairn.os={v}\n"
        );
        std::fs::create_dir_all(self.entries_dir()).map_err(|e| e.to_string())?;
        write_synced(
            &self.entries_dir().join(format!("cairn-{v}+1.conf")),
            entry.as_bytes(),
        )?;
        Ok(())
    }
}

impl Drop for Esp {
    fn drop(&mut self) {
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        // SAFETY: a NUL-terminated path we mounted.
        unsafe { libc::umount2(c"/run/cairn/esp".as_ptr(), 0) };
    }
}

/// Writes `bytes` beside `path`, syncs, renames over it, syncs the directory.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("partial");
    let r = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| {
            path.parent()
                .map_or(Ok(()), |d| std::fs::File::open(d)?.sync_all())
        });
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("writing {}: {e}", path.display()));
    }
    Ok(())
}

/// Downloads an artifact and checks its digest and size.
pub fn fetch(a: &Artifact, what: &str) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(Some(Duration::from_secs(600)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(&a.url)
        .call()
        .map_err(|e| format!("fetching the {what} {}: {e}", a.url))?;
    if resp.status().as_u16() != 200 {
        return Err(format!(
            "fetching the {what} {}: HTTP {}",
            a.url,
            resp.status().as_u16()
        ));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_ARTIFACT)
        .read_to_vec()
        .map_err(|e| format!("reading the {what} {}: {e}", a.url))?;
    check(&body, a, what)?;
    Ok(body)
}

/// Checks bytes against an artifact's digest.
pub fn check(body: &[u8], a: &Artifact, what: &str) -> Result<(), String> {
    let got = format!("sha256:{}", hex::encode(Sha256::digest(body)));
    if got != a.sha256 {
        return Err(format!(
            "the {what} from {} has digest {got}, the manifest says {}: refused",
            a.url, a.sha256
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_and_command_lines() {
        assert_eq!(
            parse_entry("cairn-2.conf"),
            Some(EntryName {
                version: "2".into(),
                left: None,
                done: None
            })
        );
        let fresh = parse_entry("cairn-2+1.conf").unwrap();
        assert_eq!((fresh.left, fresh.done), (Some(1), None), "never booted");
        let tried = parse_entry("cairn-2.1_b+0-1.conf").unwrap();
        assert_eq!((tried.left, tried.done), (Some(0), Some(1)));
        assert_eq!(tried.version, "2.1_b");
        for bad in [
            "other.conf",
            "cairn-.conf",
            "cairn-2+x.conf",
            "cairn-2.txt",
            "cairn-...conf",
            "cairn-V2.conf",
        ] {
            assert_eq!(parse_entry(bad), None, "{bad}");
        }
        let c = "console=ttyS0 cairn.hub=http://h:1 cairn.os=1 initrd=\\cairn\\1\\initrd.img";
        assert_eq!(running_version(c).as_deref(), Some("1"));
        assert_eq!(base_cmdline(c), "console=ttyS0 cairn.hub=http://h:1");
        assert_eq!(running_version("console=ttyS0"), None);
        assert_eq!(
            running_version("cairn.os=1 x cairn.os=2").as_deref(),
            Some("2")
        );
    }

    #[test]
    fn digests_are_checked() {
        let a = Artifact {
            url: "http://h/k".into(),
            sha256: format!("sha256:{}", hex::encode(Sha256::digest(b"kernel"))),
        };
        assert!(check(b"kernel", &a, "kernel").is_ok());
        let e = check(b"tampered", &a, "kernel").unwrap_err();
        assert!(e.contains("refused") && e.contains("http://h/k"), "{e}");
    }
}
