//! Kernel modules, for an initramfs built for a modular kernel (Debian's):
//! PID 1 loads the drivers its hardware needs by modalias at boot
//! (coldplug: every `modalias` under /sys/devices, in passes, since a
//! loaded bus driver reveals new devices), and answers the kernel's own
//! requests (`request_module`: a filesystem, a netlink link kind, an
//! nftables expression) as `/proc/sys/kernel/modprobe`, which it points at
//! itself. Our own kernel has everything built in and no `/lib/modules`:
//! then none of this runs.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CStr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `modules.dep` and `modules.alias` of the running kernel.
pub struct Index {
    dir: PathBuf,
    /// Module name → (path, dependency paths in modules.dep order).
    deps: HashMap<String, (String, Vec<String>)>,
    /// (pattern, module name).
    aliases: Vec<(String, String)>,
}

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates the field.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".ko").replace('-', "_")
}

/// Shell-style glob (`*`, `?`, `[a-z]`) as modules.alias uses it.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && glob(rest, &text[1..]),
        Some((b'[', rest)) => {
            let Some(end) = rest.iter().position(|&c| c == b']') else {
                return text.first() == Some(&b'[') && glob(rest, &text[1..]);
            };
            let (set, after) = (&rest[..end], &rest[end + 1..]);
            let Some(&c) = text.first() else {
                return false;
            };
            let (negate, set) = match set.first() {
                Some(b'!') | Some(b'^') => (true, &set[1..]),
                _ => (false, set),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob(after, &text[1..])
        }
        Some((p, rest)) => text.first() == Some(p) && glob(rest, &text[1..]),
    }
}

impl Index {
    /// Reads the index under `dir` (`/lib/modules/RELEASE`); `None` when
    /// there is none (a kernel without modules).
    pub fn open(dir: &Path) -> Option<Index> {
        let dep = std::fs::read_to_string(dir.join("modules.dep")).ok()?;
        let deps = dep
            .lines()
            .filter_map(|l| {
                let (m, d) = l.split_once(':')?;
                let m = m.trim().to_string();
                Some((
                    name_of(&m),
                    (m, d.split_whitespace().map(str::to_string).collect()),
                ))
            })
            .collect();
        let aliases = std::fs::read_to_string(dir.join("modules.alias"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("alias"))
                    .then(|| Some((w.next()?.to_string(), w.next()?.replace('-', "_"))))
                    .flatten()
            })
            .collect();
        Some(Index {
            dir: dir.to_path_buf(),
            deps,
            aliases,
        })
    }

    /// The modules a name or alias stands for.
    pub fn resolve(&self, what: &str) -> Vec<String> {
        let n = what.replace('-', "_");
        if self.deps.contains_key(&n) {
            return vec![n];
        }
        let mut out: Vec<String> = self
            .aliases
            .iter()
            .filter(|(p, _)| glob(p.as_bytes(), what.as_bytes()))
            .map(|(_, m)| m.clone())
            .filter(|m| self.deps.contains_key(m))
            .collect();
        out.dedup();
        out
    }

    /// Loads `name` after its dependencies; true when something was loaded
    /// now (false: it was there already).
    pub fn load(&self, name: &str) -> Result<bool, String> {
        let (path, deps) = self
            .deps
            .get(name)
            .ok_or_else(|| format!("module {name}: not in modules.dep"))?;
        // modules.dep lists the whole closure, the most basic last.
        for d in deps.iter().rev() {
            insert(&self.dir.join(d))?;
        }
        insert(&self.dir.join(path))
    }
}

/// finit_module(2) of one file; EEXIST is success.
fn insert(path: &Path) -> Result<bool, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: an open descriptor, an empty NUL-terminated parameter string
    // and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            c"".as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        e => Err(format!("loading {}: {e}", path.display())),
    }
}

/// Every `modalias` under `/sys/devices` (symlinks not followed).
fn modaliases() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![PathBuf::from("/sys/devices")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if e.file_name() == "modalias" {
                if let Ok(a) = std::fs::read_to_string(e.path()) {
                    let a = a.trim();
                    if !a.is_empty() {
                        out.insert(a.to_string());
                    }
                }
            }
        }
    }
    out
}

/// At boot: when this kernel has modules, become its modprobe helper and
/// load every driver the hardware asks for. Returns what was loaded.
pub fn setup() -> Vec<String> {
    let Some(idx) = Index::open(&Path::new("/lib/modules").join(release())) else {
        return Vec::new();
    };
    if let Err(e) = std::fs::write("/proc/sys/kernel/modprobe", "/init") {
        tracing::error!("cannot set /proc/sys/kernel/modprobe: {e}");
    }
    let mut loaded = Vec::new();
    let mut seen = BTreeSet::new();
    // A loaded bus driver (virtio_pci, ahci, xhci) reveals new devices.
    for _pass in 0..6 {
        let fresh: Vec<String> = modaliases().difference(&seen).cloned().collect();
        if fresh.is_empty() {
            break;
        }
        for alias in fresh {
            for m in idx.resolve(&alias) {
                match idx.load(&m) {
                    Ok(true) => loaded.push(m),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(alias, "{e}"),
                }
            }
            seen.insert(alias);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    tracing::info!(count = loaded.len(), modules = ?loaded, "kernel modules loaded by modalias");
    loaded
}

/// `cairn-init -q -- NAME`: the kernel asking for a module (it runs
/// `/proc/sys/kernel/modprobe`, which `setup` pointed at us).
pub fn modprobe_main(args: &[String]) -> ! {
    let Some(idx) = Index::open(&Path::new("/lib/modules").join(release())) else {
        std::process::exit(1);
    };
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let mut ok = !names.is_empty();
    for n in names {
        let mods = idx.resolve(n);
        ok &= !mods.is_empty();
        for m in mods {
            ok &= idx.load(&m).is_ok();
        }
    }
    std::process::exit(if ok { 0 } else { 1 });
}

/// Modules loaded now (`/proc/modules` lines).
pub fn loaded_count() -> usize {
    std::fs::read_to_string("/proc/modules").map_or(0, |s| s.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_as_modules_alias_writes_them() {
        assert!(glob(
            b"pci:v00001AF4d00001000sv*sd*bc*sc*i*",
            b"pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        assert!(glob(b"virtio:d00000001v*", b"virtio:d00000001v00001AF4"));
        assert!(!glob(b"virtio:d00000002v*", b"virtio:d00000001v00001AF4"));
        assert!(glob(b"scsi:t-0x0[05]*", b"scsi:t-0x05"));
        assert!(!glob(b"scsi:t-0x0[!05]*", b"scsi:t-0x05"));
        assert!(glob(b"a?c", b"abc") && !glob(b"a?c", b"ac"));
        assert!(glob(b"fs-ext4", b"fs-ext4") && !glob(b"fs-ext4", b"fs-ext3"));
    }

    #[test]
    fn names_aliases_and_order() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko\nkernel/drivers/net/virtio_net.ko: kernel/net/core/failover.ko\n",
        )
        .unwrap();
        std::fs::write(
            t.path().join("modules.alias"),
            "# comment\nalias fs-ext4 ext4\nalias virtio:d00000001v* virtio_net\nalias fs-gone gone\n",
        )
        .unwrap();
        let idx = Index::open(t.path()).unwrap();
        assert_eq!(idx.resolve("ext4"), vec!["ext4"]);
        assert_eq!(idx.resolve("fs-ext4"), vec!["ext4"]);
        assert_eq!(idx.resolve("virtio:d00000001v00001AF4"), vec!["virtio_net"]);
        assert!(
            idx.resolve("fs-gone").is_empty(),
            "alias of a module not carried"
        );
        assert!(idx.load("nope").unwrap_err().contains("nope"));
        assert!(Index::open(&t.path().join("none")).is_none());
    }
}
