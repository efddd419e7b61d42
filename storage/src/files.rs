//! Crash-safe small files: write a temporary file, fsync it, rename it over
//! the target, fsync the directory. After a power cut the target holds the
//! old bytes or the new ones, never a mix; a leftover temporary file is
//! ignored (and replaced by the next write).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    // Never follow a link someone left at the temporary name.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?
    };
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Reads `path`; a missing file is `None`.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join(".state.tmp")).unwrap();
        write_atomic(&t.path().join("state"), b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(t.path().join("state")).unwrap(), b"new");
    }

    #[test]
    fn replaces_and_reads() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("applied.json");
        assert_eq!(read_optional(&p).unwrap(), None);
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(read_optional(&p).unwrap().as_deref(), Some(&b"two"[..]));
    }

    /// A writer killed at random moments: the file is always one of the
    /// complete versions, never torn or empty.
    #[test]
    fn a_killed_writer_never_leaves_a_torn_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state");
        let version = |n: u32| format!("{n:08}").repeat(4096).into_bytes();
        write_atomic(&p, &version(0)).unwrap();
        for round in 0..20u64 {
            // SAFETY: the child only calls async-signal-safe-enough code
            // (our writer, then _exit) and never returns into the test harness.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let mut n = 1;
                loop {
                    let _ = write_atomic(&p, &version(n));
                    n += 1;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5 + round * 3));
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            let got = read_optional(&p).unwrap().unwrap();
            assert_eq!(got.len(), 8 * 4096, "round {round}: torn length");
            let first = &got[..8];
            assert!(
                got.chunks(8).all(|c| c == first),
                "round {round}: mixed versions"
            );
        }
    }
}
