//! Log files on the state volume (RAM without one), rotated by size:
//! `logs/<name>.log`, then `.1` … `.N` (oldest dropped). Each line starts
//! with its wall-clock time (RFC 3339, milliseconds). PID 1's own log goes
//! to `logs/cairn-init.log` as well as the console.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Rotate when a file would grow beyond this.
pub const MAX_BYTES: u64 = 8 << 20;
/// Rotated files kept besides the current one.
pub const KEEP: u32 = 3;

/// One rotating log file.
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
    keep: u32,
}

impl LogFile {
    /// `dir/<name>.log` (created on first write).
    pub fn new(dir: &Path, name: &str, max: u64, keep: u32) -> LogFile {
        LogFile {
            path: dir.join(format!("{name}.log")),
            file: None,
            size: 0,
            max,
            keep,
        }
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) {
        self.file = None;
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
        }
        let _ = std::fs::rename(&self.path, self.rotated(1));
        self.size = 0;
    }

    /// Appends one line (a newline is added), stamped with `now`.
    pub fn line(&mut self, now_ms: u64, text: &str) {
        let stamped = format!(
            "{}.{:03}Z {}\n",
            cairn_manifest::time::rfc3339(now_ms / 1000).trim_end_matches('Z'),
            now_ms % 1000,
            text
        );
        if self.file.is_some() && self.size + stamped.len() as u64 > self.max {
            self.rotate();
        }
        if self.file.is_none() {
            if let Some(d) = self.path.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => {
                    self.size = f.metadata().map_or(0, |m| m.len());
                    self.file = Some(f);
                    if self.size + stamped.len() as u64 > self.max {
                        self.rotate();
                        return self.line(now_ms, text);
                    }
                }
                Err(_) => return, // no disk space or no directory: the console still has it
            }
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(stamped.as_bytes()).is_ok() {
                self.size += stamped.len() as u64;
            }
        }
    }
}

/// Wall clock in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The directory logs go to.
pub fn dir() -> PathBuf {
    Path::new(crate::container::STATE_ROOT).join("logs")
}

/// Where the shipper remembers how far each log reached the hub.
const SHIPPED: &str = ".shipped.json";
/// At most this much of one log per request.
const SHIP_CHUNK: u64 = 256 * 1024;

/// Ships every log in [`dir`] to the hub, every 2 s, from where the last
/// shipment ended. Offsets (inode, bytes) are kept beside the logs and
/// saved after every chunk, so a reboot neither repeats nor skips lines;
/// they are read again whenever the log directory moves to another
/// filesystem (a state volume adopted after boot). When a file was rotated
/// since the last shipment, the rest of the old one (`.1`) goes first.
pub fn spawn_shipper(hub: String, node: String) {
    use std::os::unix::fs::MetadataExt;
    let _ = std::thread::Builder::new()
        .name("log-ship".into())
        .spawn(move || {
            let mut shipped = Offsets::default();
            let mut dev = None;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(2));
                let Ok(d) = std::fs::metadata(dir()) else {
                    continue;
                };
                if dev != Some(d.dev()) {
                    dev = Some(d.dev());
                    shipped = Offsets::load();
                }
                let Ok(rd) = std::fs::read_dir(dir()) else {
                    continue;
                };
                let mut names: Vec<String> = rd
                    .flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".log")
                            .map(str::to_string)
                    })
                    .filter(|n| !n.starts_with('.'))
                    .collect();
                names.sort();
                for name in names {
                    if !ship_one(&hub, &node, &name, &mut shipped) {
                        break; // the hub is away: try again later
                    }
                }
            }
        });
}

/// (inode, offset) per log name, persisted in [`SHIPPED`].
#[derive(Default)]
struct Offsets(std::collections::BTreeMap<String, (u64, u64)>);

impl Offsets {
    fn load() -> Offsets {
        Offsets(
            std::fs::read(dir().join(SHIPPED))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default(),
        )
    }

    fn save(&self) {
        if SHIPPING_STOPPED.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Ok(b) = serde_json::to_vec(&self.0) {
            let _ = cairn_storage::files::write_atomic(&dir().join(SHIPPED), &b);
        }
    }
}

/// Set once the node shuts down: the shipper touches no file on the
/// state volume any more (an open file would keep it from unmounting).
static SHIPPING_STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `len` bytes (at most) of `path` from `off`, with the file's inode and
/// size; the file is closed again before anything is sent anywhere.
fn read_chunk(path: &Path, off: u64, len: u64) -> Option<(Vec<u8>, u64, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    if SHIPPING_STOPPED.load(std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let meta = f.metadata().ok()?;
    let mut buf = Vec::new();
    if off < meta.len() {
        f.seek(SeekFrom::Start(off)).ok()?;
        (&mut f).take(len).read_to_end(&mut buf).ok()?;
    }
    Some((buf, meta.ino(), meta.len()))
}

/// Ships what is new in log `name`; false when the hub did not take it.
fn ship_one(hub: &str, node: &str, name: &str, shipped: &mut Offsets) -> bool {
    let path = dir().join(format!("{name}.log"));
    let Some((_, ino_now, len_now)) = read_chunk(&path, u64::MAX, 0) else {
        return true;
    };
    struct Meta {
        ino: u64,
        len: u64,
    }
    let meta = Meta {
        ino: ino_now,
        len: len_now,
    };
    let (ino, off) = shipped.0.get(name).copied().unwrap_or((meta.ino, 0));
    let mut off = off;
    if ino != meta.ino {
        // Rotated: finish the old file (now `.1`) if it is the one we were
        // reading, then start the new one from its beginning.
        let old = dir().join(format!("{name}.log.1"));
        if let Some((rest, old_ino, _)) = read_chunk(&old, off, SHIP_CHUNK * 4) {
            if old_ino == ino
                && !rest.is_empty()
                && crate::hub::post_log(hub, node, name, &rest).is_err()
            {
                return false;
            }
        }
        off = 0;
    } else if meta.len < off {
        off = 0; // truncated
    }
    while off < meta.len {
        let Some((buf, ino_read, _)) = read_chunk(&path, off, SHIP_CHUNK) else {
            return true;
        };
        if buf.is_empty() || ino_read != meta.ino {
            break;
        }
        if let Err(e) = crate::hub::post_log(hub, node, name, &buf) {
            tracing::debug!("{e}");
            return false;
        }
        off += buf.len() as u64;
        shipped.0.insert(name.to_string(), (meta.ino, off));
        shipped.save();
    }
    if shipped.0.get(name).map(|e| e.0) != Some(meta.ino) {
        shipped.0.insert(name.to_string(), (meta.ino, off));
        shipped.save();
    }
    true
}

/// PID 1's own log file, once the state volume is up.
static OWN: Mutex<Option<LogFile>> = Mutex::new(None);

/// Starts copying PID 1's log lines to `logs/cairn-init.log`.
pub fn start_own_log() {
    *OWN.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(LogFile::new(&dir(), "cairn-init", MAX_BYTES, KEEP));
}

/// Closes PID 1's log file and stops the shipper touching the volume
/// (before the state volume is unmounted).
pub fn stop_own_log() {
    SHIPPING_STOPPED.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Ok(mut own) = OWN.lock() {
        *own = None;
    }
}

/// A writer for tracing: the console, plus the file once started.
pub struct Tee;

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = std::io::stderr().write(buf)?;
        if let Ok(mut own) = OWN.try_lock() {
            if let Some(f) = own.as_mut() {
                let text = String::from_utf8_lossy(&buf[..n]);
                f.line(now_ms(), text.trim_end_matches('\n'));
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let t = tempfile::tempdir().unwrap();
        let mut l = LogFile::new(t.path(), "web", 200, 2);
        for i in 0..40 {
            l.line(1_796_000_000_123 + i, &format!("line {i:02}"));
        }
        let cur = std::fs::read_to_string(t.path().join("web.log")).unwrap();
        assert!(cur.ends_with("line 39\n"), "{cur}");
        assert!(cur.starts_with("2026-"), "timestamped: {cur}");
        assert!(cur.contains(".1"), "{cur}");
        assert!(std::fs::metadata(t.path().join("web.log")).unwrap().len() <= 200);
        assert!(t.path().join("web.log.1").exists() && t.path().join("web.log.2").exists());
        assert!(!t.path().join("web.log.3").exists(), "only 2 kept");
        let old = std::fs::read_to_string(t.path().join("web.log.2")).unwrap();
        let number = |line: Option<&str>| -> u32 {
            line.and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap()
        };
        let (n_old, n_cur) = (number(old.lines().last()), number(cur.lines().next()));
        assert!(n_old < n_cur);
        // A restart (new LogFile) appends to the same file.
        let mut again = LogFile::new(t.path(), "web", 200, 2);
        again.line(1_796_000_001_000, "after restart");
        let cur = std::fs::read_to_string(t.path().join("web.log")).unwrap();
        assert!(cur.contains("after restart"));
    }
}
