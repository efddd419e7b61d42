//! `cairn-init container-shim SPEC`: runs inside the namespaces PID 1
//! created for one container (mount, uts, ipc, net; its child is PID 1 of a
//! new pid namespace). It waits for PID 1 to finish the host side (cgroup,
//! veth), configures the container's network, builds the rootfs mounts,
//! forks the container process, forwards signals to it and exits with its
//! status, so PID 1's reaper sees the container's exit as the shim's.
//!
//! The shim is single-threaded when it forks (the netlink runtime is a
//! current-thread one and is dropped first).

use crate::net::link::Netlink;
use crate::sys::{flags, LinuxSys, Sys};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::FromRawFd;
use std::path::Path;

/// What PID 1 tells the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimSpec {
    /// Container name (also hostname).
    pub name: String,
    /// Overlay lower directories, top first.
    pub lowerdirs: Vec<String>,
    /// Overlay upper directory.
    pub upper: String,
    /// Overlay work directory.
    pub work: String,
    /// Mount point of the merged rootfs.
    pub rootfs: String,
    /// Command and arguments.
    pub argv: Vec<String>,
    /// Environment, `NAME=value`.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// `uid[:gid]`, a user name, or empty for root.
    pub user: String,
    /// Network attachment, if any.
    pub net: Option<ShimNet>,
    /// Resolvers for /etc/resolv.conf.
    pub dns: Vec<String>,
    /// Persistent volumes: (host directory, path in the container, read-only).
    #[serde(default)]
    pub binds: Vec<(String, String, bool)>,
}

/// The container's interface.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimNet {
    /// Name of the veth peer PID 1 moved into our netns.
    pub peer: String,
    /// Address.
    pub address: String,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: String,
}

fn os(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn c(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("NUL byte in {s:?}"))
}

/// Entry point; never returns.
pub fn main(spec_path: &str) -> ! {
    match run(spec_path) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cairn-shim: {e}");
            std::process::exit(125)
        }
    }
}

fn wait_for_go() -> Result<(), String> {
    // SAFETY: PID 1 put the read end of the sync pipe on fd 3 for us.
    let mut f = unsafe { std::fs::File::from_raw_fd(3) };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| format!("sync pipe: {e}"))?;
    if buf != b"go" {
        return Err("PID 1 did not finish setting up the container (sync pipe closed)".into());
    }
    Ok(())
}

fn setup_network(n: &ShimNet) -> Result<(), String> {
    let nl = Netlink::new().map_err(|e| format!("container network: {e}"))?;
    let lo = nl
        .index_of("lo")
        .map_err(|e| format!("container network ({}): {e}", n.peer))?;
    nl.set_up(lo)
        .map_err(|e| format!("container network ({}): {e}", n.peer))?;
    let idx = nl
        .index_of(&n.peer)
        .map_err(|e| format!("container network ({}): {e}", n.peer))?;
    nl.rename(idx, "eth0")
        .map_err(|e| format!("container network ({}): {e}", n.peer))?;
    let addr: Ipv4Addr = n
        .address
        .parse()
        .map_err(|_| format!("bad address {}", n.address))?;
    let gw: Ipv4Addr = n
        .gateway
        .parse()
        .map_err(|_| format!("bad gateway {}", n.gateway))?;
    nl.add_address(idx, IpAddr::V4(addr), n.prefix)
        .map_err(|e| format!("container network ({}): {e}", n.peer))?;
    nl.set_up(idx)
        .map_err(|e| format!("container network ({}): {e}", n.peer))?;
    nl.add_route(idx, Ipv4Addr::UNSPECIFIED, 0, gw, 0)
        .map_err(|e| format!("container network ({}): {e}", n.peer))?;
    Ok(())
}

fn write_etc(spec: &ShimSpec) -> Result<(), String> {
    // Runs after pivot_root: an image whose /etc (or /etc/hosts) is an
    // absolute symlink resolves inside the container, never on the host.
    let etc = Path::new("/etc");
    std::fs::create_dir_all(etc).map_err(|e| format!("creating /etc: {e}"))?;
    let addr = spec
        .net
        .as_ref()
        .map(|n| n.address.as_str())
        .unwrap_or("127.0.1.1");
    let files = [
        ("hostname", format!("{}\n", spec.name)),
        (
            "hosts",
            format!("127.0.0.1 localhost\n::1 localhost\n{addr} {}\n", spec.name),
        ),
        (
            "resolv.conf",
            spec.dns
                .iter()
                .map(|d| format!("nameserver {d}\n"))
                .collect::<String>(),
        ),
    ];
    for (name, text) in files {
        let p = etc.join(name);
        let _ = std::fs::remove_file(&p); // may be a symlink in the image
        std::fs::write(&p, text).map_err(|e| format!("writing {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Bind-mounts `host` at `path` inside `root`. The image may hold a
/// symlink on the way (we are still in the host's view of the filesystem):
/// the resolved target must stay inside the rootfs.
fn bind_volume(
    s: &LinuxSys,
    root: &Path,
    host: &str,
    path: &str,
    read_only: bool,
) -> Result<(), String> {
    let target = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(&target).map_err(|e| format!("volume mount point {path}: {e}"))?;
    let real =
        std::fs::canonicalize(&target).map_err(|e| format!("volume mount point {path}: {e}"))?;
    let real_root = std::fs::canonicalize(root).map_err(|e| e.to_string())?;
    if !real.starts_with(&real_root) {
        return Err(format!(
            "volume mount point {path} resolves outside the container ({})",
            real.display()
        ));
    }
    let t = real.display().to_string();
    s.mount(host, &t, "", flags::BIND, None)
        .map_err(|e| format!("binding volume at {path}: {e}"))?;
    if read_only {
        s.mount(
            "none",
            &t,
            "",
            flags::BIND | flags::REMOUNT | flags::RDONLY,
            None,
        )
        .map_err(|e| format!("making volume {path} read-only: {e}"))?;
    }
    Ok(())
}

fn setup_mounts(spec: &ShimSpec) -> Result<(), String> {
    let s = LinuxSys;
    // Nothing we mount may propagate back to the host.
    s.mount("none", "/", "", flags::REC | flags::PRIVATE, None)
        .map_err(|e| format!("making / private: {e}"))?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        spec.lowerdirs.join(":"),
        spec.upper,
        spec.work
    );
    s.mount("overlay", &spec.rootfs, "overlay", 0, Some(&opts))
        .map_err(|e| format!("mounting the overlay rootfs: {e}"))?;
    let root = Path::new(&spec.rootfs);
    for (host, path, read_only) in &spec.binds {
        bind_volume(&s, root, host, path, *read_only)?;
    }
    let dev = root.join("dev");
    let dev_s = dev.display().to_string();
    s.mkdir_all(&dev_s, 0o755)
        .map_err(|e| format!("mkdir /dev: {e}"))?;
    s.mount(
        "tmpfs",
        &dev_s,
        "tmpfs",
        flags::NOSUID,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| format!("mounting /dev: {e}"))?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        std::fs::write(&target, b"").map_err(|e| format!("creating /dev/{node}: {e}"))?;
        s.mount(
            &format!("/dev/{node}"),
            &target.display().to_string(),
            "",
            flags::BIND,
            None,
        )
        .map_err(|e| format!("binding /dev/{node}: {e}"))?;
    }
    let pts = format!("{dev_s}/pts");
    s.mkdir_all(&pts, 0o755).map_err(|e| e.to_string())?;
    s.mount(
        "devpts",
        &pts,
        "devpts",
        flags::NOSUID | flags::NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )
    .map_err(|e| format!("mounting /dev/pts: {e}"))?;
    let shm = format!("{dev_s}/shm");
    s.mkdir_all(&shm, 0o1777).map_err(|e| e.to_string())?;
    s.mount(
        "shm",
        &shm,
        "tmpfs",
        flags::NOSUID | flags::NODEV | flags::NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| format!("mounting /dev/shm: {e}"))?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link)).map_err(|e| format!("/dev/{link}: {e}"))?;
    }
    let sys = root.join("sys").display().to_string();
    s.mkdir_all(&sys, 0o555).map_err(|e| e.to_string())?;
    s.mount(
        "sysfs",
        &sys,
        "sysfs",
        flags::RDONLY | flags::NOSUID | flags::NODEV | flags::NOEXEC,
        None,
    )
    .map_err(|e| format!("mounting /sys: {e}"))?;
    s.mkdir_all(&root.join("proc").display().to_string(), 0o555)
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn sigset(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: only writes the local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

const FORWARDED: &[libc::c_int] = &[
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn run(spec_path: &str) -> Result<i32, String> {
    wait_for_go()?;
    let text = std::fs::read(spec_path).map_err(|e| format!("reading {spec_path}: {e}"))?;
    let spec: ShimSpec =
        serde_json::from_slice(&text).map_err(|e| format!("parsing {spec_path}: {e}"))?;
    if let Some(n) = &spec.net {
        setup_network(n)?;
    }
    let host = c(&spec.name)?;
    // SAFETY: valid buffer and length; we are in our own UTS namespace.
    if unsafe { libc::sethostname(host.as_ptr(), spec.name.len()) } != 0 {
        return Err(os("sethostname"));
    }
    setup_mounts(&spec)?;

    let set = sigset(FORWARDED);
    // SAFETY: valid set; blocks for this (only) thread before the fork.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: the shim is single-threaded here, so the child may run
    // ordinary Rust code until exec.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(os("fork"));
    }
    if child == 0 {
        let e = exec_container(&spec).unwrap_err();
        eprintln!("cairn-shim: {}: {e}", spec.name);
        // SAFETY: _exit is always safe; skip atexit handlers in the child.
        unsafe { libc::_exit(127) };
    }
    loop {
        let mut info: libc::siginfo_t = unsafe {
            // SAFETY: siginfo_t is plain data; zeroed is a valid value.
            std::mem::zeroed()
        };
        // SAFETY: valid set and out pointer.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig == libc::SIGCHLD {
            let mut status = 0;
            // SAFETY: waiting for our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
            if r == child {
                if libc::WIFEXITED(status) {
                    return Ok(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    return Ok(128 + libc::WTERMSIG(status));
                }
            }
        } else if sig > 0 {
            // The container is the init of its pid namespace: the kernel
            // drops signals it has no handler for. A stop request it would
            // ignore becomes SIGKILL now rather than after the timeout.
            let sig = if stop_signal(sig) && !catches(child, sig) {
                libc::SIGKILL
            } else {
                sig
            };
            // SAFETY: forwarding a signal to our child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

fn stop_signal(sig: libc::c_int) -> bool {
    sig == libc::SIGTERM || sig == libc::SIGINT || sig == libc::SIGQUIT
}

/// Whether `pid` has a handler for `sig` (the SigCgt mask in /proc).
fn catches(pid: libc::pid_t, sig: libc::c_int) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true; // unknown: forward as asked
    };
    sig_caught(&status, sig)
}

fn sig_caught(status: &str, sig: libc::c_int) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_none_or(|mask| mask & (1u64 << (sig - 1)) != 0)
}

fn exec_container(spec: &ShimSpec) -> Result<std::convert::Infallible, String> {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let s = LinuxSys;
    let proc_dir = format!("{}/proc", spec.rootfs);
    s.mount(
        "proc",
        &proc_dir,
        "proc",
        flags::NOSUID | flags::NODEV | flags::NOEXEC,
        None,
    )
    .map_err(|e| format!("mounting /proc: {e}"))?;
    std::env::set_current_dir(&spec.rootfs).map_err(|e| format!("chdir rootfs: {e}"))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; a lazy
    // unmount of "." then drops it.
    // SAFETY: both arguments are valid C strings.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } != 0 {
        return Err(os("pivot_root"));
    }
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(os("detaching the old root"));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    write_etc(spec)?;
    let (uid, gid) = resolve_user(&spec.user)?;
    // SAFETY: plain credential syscalls; failures are checked.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(os("dropping to the image user"));
        }
    }
    if std::env::set_current_dir(&spec.cwd).is_err() {
        let _ = std::env::set_current_dir("/");
    }
    let exe = resolve_exe(&spec.argv[0], &spec.env)?;
    let argv: Vec<CString> = spec.argv.iter().map(|a| c(a)).collect::<Result<_, _>>()?;
    let env: Vec<CString> = spec.env.iter().map(|a| c(a)).collect::<Result<_, _>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // Rust ignores SIGPIPE in its own processes; the container gets the default.
    // SAFETY: resetting a signal disposition before exec.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let empty = sigset(&[]);
    // SAFETY: restore an empty mask for the container; valid pointers.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
    let exe_c = c(&exe)?;
    // SAFETY: NUL-terminated arrays of valid C strings that outlive execve.
    unsafe { libc::execve(exe_c.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    Err(os(&format!("exec {exe}")))
}

fn resolve_exe(arg0: &str, env: &[String]) -> Result<String, String> {
    if arg0.contains('/') {
        return Ok(arg0.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|d| format!("{d}/{arg0}"))
        .find(|p| Path::new(p).is_file())
        .ok_or_else(|| format!("{arg0}: not found in PATH {path}"))
}

/// Resolves `user[:group]` (names via the image's /etc/passwd and /etc/group).
fn resolve_user(user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() || user == "root" {
        return Ok((0, 0));
    }
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == name)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    };
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => lookup("/etc/passwd", u)
            .ok_or_else(|| format!("user {u:?} not in the image's /etc/passwd"))?,
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("/etc/group", g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| format!("group {g:?} not in the image's /etc/group"))?,
        };
    }
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_users() {
        assert_eq!(resolve_user("").unwrap(), (0, 0));
        assert_eq!(resolve_user("1000").unwrap(), (1000, 1000));
        assert_eq!(resolve_user("1000:50").unwrap(), (1000, 50));
    }

    #[test]
    fn sigcgt_mask() {
        let st = "Name:\thello\nSigCgt:\t0000000000004000\n"; // bit 14 = SIGTERM (15)
        assert!(sig_caught(st, libc::SIGTERM));
        assert!(!sig_caught(st, libc::SIGINT));
        assert!(
            sig_caught("no mask here", libc::SIGTERM),
            "unknown: forward as asked"
        );
    }

    #[test]
    fn exe_with_slash_is_kept() {
        assert_eq!(resolve_exe("/hello", &[]).unwrap(), "/hello");
        assert!(resolve_exe("definitely-not-here", &["PATH=/nonexistent".into()]).is_err());
    }
}
