//! The PID-1 core: console, re-root off the initramfs, early mounts, then a
//! signal loop that reaps every child and never exits (catatonit's shape).
//!
//! All node logic runs in the agent thread (`supervisor::run`); this thread
//! only waits for signals. Child exits are forwarded to the agent as events.

use crate::supervisor::Event;
use crate::{cmdline, supervisor, sys, timeline};
use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// Set by the agent when workloads are stopped during shutdown.
pub static AGENT_STOPPED: AtomicBool = AtomicBool::new(false);
/// The longest stop timeout of any workload (seconds): a shutdown waits
/// that long (plus a margin) for the agent before halting anyway.
pub static MAX_STOP_S: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(10);

const SIGNALS: &[libc::c_int] = &[
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPWR,
    libc::SIGQUIT,
];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the local set we pass.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Gives PID 1 a console on fds 0-2 if the kernel could not.
fn ensure_console() {
    // SAFETY: F_GETFD on a possibly-closed fd only reports EBADF.
    if unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0 {
        return;
    }
    let path = c"/dev/console";
    // SAFETY: valid C string; the returned fd is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        // SAFETY: fd is open; dup2 onto 0..2 is what we want.
        unsafe { libc::dup2(fd, target) };
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer needed.
        unsafe { libc::close(fd) };
    }
}

/// pivot_root(2) is refused on the initramfs rootfs, and containers need it.
/// Like switch_root: copy our few files to a tmpfs, free the originals, move
/// the tmpfs over `/`, chroot, and exec ourselves again (still PID 1).
fn reroot() -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let s = sys::LinuxSys;
    use sys::Sys;
    // Only ever on the initramfs: a ramfs/tmpfs root. Anything else (a real
    // disk, a container's rootfs) is left alone.
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statfs(c"/".as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    const RAMFS_MAGIC: i64 = 0x858458f6;
    const TMPFS_MAGIC: i64 = 0x01021994;
    let fstype = st.f_type as i64;
    if fstype != RAMFS_MAGIC && fstype != TMPFS_MAGIC {
        return Err(io::Error::other(format!(
            "/ is not an initramfs (filesystem magic {fstype:#x}); not re-rooting"
        )));
    }
    let root_dev = std::fs::metadata("/")?.dev();
    s.mkdir_all("/newroot", 0o755)?;
    s.mount("rootfs", "/newroot", "tmpfs", 0, Some("mode=0755"))?;
    for entry in std::fs::read_dir("/")? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "newroot" {
            continue;
        }
        let from = entry.path();
        // Like switch_root: never cross into another filesystem.
        if std::fs::symlink_metadata(&from)?.dev() != root_dev {
            continue;
        }
        let to = std::path::Path::new("/newroot").join(&name);
        copy_tree(&from, &to)?;
        let _ = remove_tree(&from);
    }
    std::env::set_current_dir("/newroot")?;
    s.mount(".", "/", "", sys::flags::MOVE, None)?;
    // SAFETY: "." is a valid C string; chroot only changes our root.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;
    let init = c"/init";
    let argv: Vec<CString> = std::env::args()
        .filter_map(|a| CString::new(a).ok())
        .collect();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let env = [
        c"CAIRN_REROOTED=1".as_ptr(),
        c"PATH=/sbin:/bin".as_ptr(),
        std::ptr::null(),
    ];
    // SAFETY: argv and env are NUL-terminated arrays of valid C strings that
    // live until execve (which does not return on success).
    unsafe { libc::execve(init.as_ptr(), argv_ptrs.as_ptr(), env.as_ptr()) };
    Err(io::Error::last_os_error())
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(
            to,
            std::fs::Permissions::from_mode(meta.permissions().mode()),
        )?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if ft.is_file() {
        std::fs::copy(from, to)?;
    } else if ft.is_char_device() || ft.is_block_device() {
        // Device nodes come from devtmpfs after the move.
    }
    Ok(())
}

fn remove_tree(p: &std::path::Path) -> io::Result<()> {
    if std::fs::symlink_metadata(p)?.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// PID 1's entry point. Never returns.
pub fn main() -> ! {
    ensure_console();
    if std::env::var_os("CAIRN_REROOTED").is_none() {
        if let Err(e) = reroot() {
            eprintln!(
                "cairn-init: re-root failed ({e}); containers will not be able to pivot_root"
            );
        }
    }
    timeline::init_logging();
    for (target, e) in sys::early_mounts(&sys::LinuxSys) {
        tracing::error!(target, error = %e, "early mount failed");
    }
    timeline::mark("pid1", "cairn-init running as PID 1");
    // A modular kernel: drivers first, before disks and NICs are looked at.
    crate::modules::setup();

    // Block the signals we handle before any thread exists, so every thread
    // inherits the mask and only this loop sees them. std's Command resets
    // the mask in children before exec.
    let set = signal_set();
    // SAFETY: `set` is a valid sigset; we only change this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // Ctrl-Alt-Del becomes SIGINT to us instead of an instant reboot.
    // SAFETY: reboot(RB_DISABLE_CAD) only flips a kernel flag.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };

    let mut text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut drive_error = None;
    // A cloud config drive's words come last, so they win (one image,
    // many instances).
    match crate::configdrive::read() {
        Ok(Some((from, words))) => {
            tracing::info!(from, words = ?words, "settings from the config drive");
            text.push(' ');
            text.push_str(&words.join(" "));
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!("{e}");
            drive_error = Some(e);
        }
    }
    let (cfg, errors) = cmdline::parse(&text);
    for e in &errors {
        tracing::error!("{e}");
    }
    let cmdline_errors: Vec<String> = errors
        .iter()
        .map(|e| e.to_string())
        .chain(drive_error)
        .collect();

    let (tx, rx) = std::sync::mpsc::channel::<Event>();
    let agent_tx = tx.clone();
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || {
            if cfg.loader {
                crate::loader::run_forever(cfg)
            } else {
                supervisor::run_forever(cfg, cmdline_errors, rx, agent_tx)
            }
        })
        .expect("spawning the agent thread");

    watch_power_button();
    signal_loop(&set, &tx)
}

/// ACPI power button presses become SIGPWR to us (a clean power-off, as
/// from the hypervisor's "shut down" or a short press on real hardware).
/// The button is an input device named "Power Button" (evdev).
fn watch_power_button() {
    let Ok(rd) = std::fs::read_dir("/sys/class/input") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let dev_name = std::fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
        if dev_name.trim() != "Power Button" {
            continue;
        }
        let path = format!("/dev/input/{name}");
        tracing::info!(device = %path, "watching the ACPI power button");
        let _ = std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || {
                use std::io::Read;
                let Ok(mut f) = std::fs::File::open(&path) else {
                    tracing::error!(device = %path, "power button not readable");
                    return;
                };
                // struct input_event on 64-bit: timeval (16), type, code (u16), value (i32).
                let mut ev = [0u8; 24];
                while f.read_exact(&mut ev).is_ok() {
                    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
                    let code = u16::from_ne_bytes([ev[18], ev[19]]);
                    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                    const EV_KEY: u16 = 1;
                    const KEY_POWER: u16 = 116;
                    if ty == EV_KEY && code == KEY_POWER && value == 1 {
                        tracing::warn!("power button pressed: powering off");
                        // SAFETY: signalling ourselves; the signal loop handles SIGPWR.
                        unsafe { libc::kill(libc::getpid(), libc::SIGPWR) };
                    }
                }
            });
    }
}

fn reap(tx: &Sender<Event>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let _ = tx.send(Event::Exited { pid, status });
    }
}

fn signal_loop(set: &libc::sigset_t, tx: &Sender<Event>) -> ! {
    let mut shutdown: Option<(bool, Instant)> = None;
    loop {
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: `set` is valid; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
        match sig {
            libc::SIGCHLD => reap(tx),
            libc::SIGTERM | libc::SIGPWR | libc::SIGUSR2 | libc::SIGINT if shutdown.is_none() => {
                let poweroff = sig != libc::SIGINT;
                tracing::warn!(
                    signal = sig,
                    poweroff,
                    "shutdown requested: stopping workloads"
                );
                shutdown = Some((poweroff, Instant::now()));
                let _ = tx.send(Event::Shutdown);
            }
            _ => reap(tx), // also catches exits whose SIGCHLD coalesced
        }
        if let Some((poweroff, since)) = shutdown {
            let patience = Duration::from_secs(MAX_STOP_S.load(Ordering::SeqCst) + 5);
            if AGENT_STOPPED.load(Ordering::SeqCst) || since.elapsed() > patience {
                final_halt(poweroff);
            }
        }
    }
}

fn final_halt(poweroff: bool) -> ! {
    // SAFETY: kill(-1) signals every process but us; that is the intent.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    crate::logs::stop_own_log();
    unmount_state();
    tracing::warn!(poweroff, "halting");
    let cmd = if poweroff {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: reboot(2) with a valid command; we are PID 1 with CAP_SYS_BOOT.
    unsafe { libc::reboot(cmd) };
    // Only reached if reboot failed: PID 1 must never exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Unmounts the state volume so its filesystem is clean at power-off; if
/// something still holds it, remounts it read-only (which also flushes
/// the journal).
fn unmount_state() {
    let target = c"/var/lib/cairn";
    // A thread of ours may hold a file open for a moment (a log read):
    // a few tries before settling for read-only.
    let mut busy = std::io::Error::other("not tried");
    for _ in 0..10 {
        // SAFETY: umount2 on a NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
            tracing::info!("state volume unmounted");
            return;
        }
        busy = std::io::Error::last_os_error();
        if busy.raw_os_error() != Some(libc::EBUSY) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: a remount with null source/type and a NUL-terminated target.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    tracing::warn!(error = %busy, read_only = rc == 0, "state volume not unmounted; remounted read-only");
}
