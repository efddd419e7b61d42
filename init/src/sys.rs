//! The syscalls PID 1's boot logic makes, behind a small trait so the order
//! and arguments can be unit-tested without root (a recording double).

use std::ffi::CString;
use std::io;

/// Mount flags we use (values from <sys/mount.h>).
pub mod flags {
    /// Read-only.
    pub const RDONLY: u64 = libc::MS_RDONLY;
    /// MS_REMOUNT.
    pub const REMOUNT: u64 = libc::MS_REMOUNT;
    /// No setuid.
    pub const NOSUID: u64 = libc::MS_NOSUID;
    /// No devices.
    pub const NODEV: u64 = libc::MS_NODEV;
    /// No exec.
    pub const NOEXEC: u64 = libc::MS_NOEXEC;
    /// Move a mount.
    pub const MOVE: u64 = libc::MS_MOVE;
    /// Bind mount.
    pub const BIND: u64 = libc::MS_BIND;
    /// Recursive.
    pub const REC: u64 = libc::MS_REC;
    /// Private propagation.
    pub const PRIVATE: u64 = libc::MS_PRIVATE;
}

/// System calls used during boot and container setup.
pub trait Sys {
    /// mount(2).
    fn mount(
        &self,
        src: &str,
        target: &str,
        fstype: &str,
        flags: u64,
        data: Option<&str>,
    ) -> io::Result<()>;
    /// mkdir -p with a mode for the last component.
    fn mkdir_all(&self, path: &str, mode: u32) -> io::Result<()>;
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// The real thing.
pub struct LinuxSys;

impl Sys for LinuxSys {
    fn mount(
        &self,
        src: &str,
        target: &str,
        fstype: &str,
        flags: u64,
        data: Option<&str>,
    ) -> io::Result<()> {
        let (s, t, f) = (cstr(src)?, cstr(target)?, cstr(fstype)?);
        let d = data.map(cstr).transpose()?;
        let dptr = d.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast());
        // SAFETY: all pointers are valid NUL-terminated strings (or null for
        // `data`) that outlive the call.
        let rc = unsafe {
            libc::mount(
                s.as_ptr(),
                t.as_ptr(),
                f.as_ptr(),
                flags as libc::c_ulong,
                dptr,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn mkdir_all(&self, path: &str, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
    }
}

/// One early mount.
struct EarlyMount {
    src: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: u64,
    data: Option<&'static str>,
}

const EARLY: &[EarlyMount] = &[
    EarlyMount {
        src: "proc",
        target: "/proc",
        fstype: "proc",
        flags: flags::NOSUID | flags::NODEV | flags::NOEXEC,
        data: None,
    },
    EarlyMount {
        src: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: flags::NOSUID | flags::NODEV | flags::NOEXEC,
        data: None,
    },
    EarlyMount {
        src: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: flags::NOSUID,
        data: Some("mode=0755"),
    },
    EarlyMount {
        src: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: flags::NOSUID | flags::NOEXEC,
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    EarlyMount {
        src: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: flags::NOSUID | flags::NODEV,
        data: Some("mode=1777"),
    },
    EarlyMount {
        src: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: flags::NOSUID | flags::NODEV,
        data: Some("mode=0755"),
    },
    EarlyMount {
        src: "tmp",
        target: "/tmp",
        fstype: "tmpfs",
        flags: flags::NOSUID | flags::NODEV,
        data: Some("mode=1777"),
    },
    EarlyMount {
        src: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: flags::NOSUID | flags::NODEV | flags::NOEXEC,
        data: Some("nsdelegate"),
    },
    // Workload state (layers, rootfs upper dirs) lives in RAM until the
    // storage work gives the node a state volume.
    EarlyMount {
        src: "cairn-state",
        target: "/var/lib/cairn",
        fstype: "tmpfs",
        flags: flags::NOSUID | flags::NODEV,
        data: Some("mode=0700"),
    },
];

/// Mounts the early filesystems in order. An already-mounted target (EBUSY)
/// is fine; every other failure is returned so the caller can log it and go
/// on: a missing /dev/shm must not stop the node.
pub fn early_mounts(sys: &dyn Sys) -> Vec<(String, io::Error)> {
    let mut errors = Vec::new();
    for m in EARLY {
        if let Err(e) = sys.mkdir_all(m.target, 0o755) {
            errors.push((m.target.to_string(), e));
            continue;
        }
        match sys.mount(m.src, m.target, m.fstype, m.flags, m.data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => errors.push((m.target.to_string(), e)),
        }
    }
    errors
}

#[cfg(test)]
pub mod testing {
    //! A recording double.
    use super::*;
    use std::cell::RefCell;

    /// Records calls; fails mounts whose target is in `fail`.
    #[derive(Default)]
    pub struct Recorder {
        /// Calls, as text.
        pub calls: RefCell<Vec<String>>,
        /// Targets whose mount fails with the given errno.
        pub fail: Vec<(&'static str, i32)>,
    }

    impl Sys for Recorder {
        fn mount(
            &self,
            src: &str,
            target: &str,
            fstype: &str,
            _flags: u64,
            data: Option<&str>,
        ) -> io::Result<()> {
            self.calls.borrow_mut().push(format!(
                "mount {src} {target} {fstype} {}",
                data.unwrap_or("-")
            ));
            match self.fail.iter().find(|(t, _)| *t == target) {
                Some((_, errno)) => Err(io::Error::from_raw_os_error(*errno)),
                None => Ok(()),
            }
        }
        fn mkdir_all(&self, path: &str, _mode: u32) -> io::Result<()> {
            self.calls.borrow_mut().push(format!("mkdir {path}"));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Recorder;
    use super::*;

    #[test]
    fn early_mounts_in_order_and_tolerate_ebusy() {
        let r = Recorder {
            fail: vec![("/dev", libc::EBUSY), ("/dev/shm", libc::ENODEV)],
            ..Default::default()
        };
        let errs = early_mounts(&r);
        let calls = r.calls.borrow();
        let mounts: Vec<_> = calls.iter().filter(|c| c.starts_with("mount")).collect();
        assert!(mounts[0].starts_with("mount proc /proc"));
        assert!(mounts[1].starts_with("mount sysfs /sys"));
        assert!(mounts[2].starts_with("mount devtmpfs /dev "));
        // devpts comes after /dev, cgroup2 after /sys.
        let pos = |t: &str| mounts.iter().position(|m| m.contains(t)).unwrap();
        assert!(pos(" /dev/pts ") > pos(" /dev "));
        assert!(pos(" /sys/fs/cgroup ") > pos(" /sys "));
        // EBUSY on /dev is fine; ENODEV on /dev/shm is reported, and the rest still ran.
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, "/dev/shm");
        assert!(mounts.iter().any(|m| m.contains("/var/lib/cairn")));
    }
}
