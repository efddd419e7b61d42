//! The container workload: pull → overlay rootfs → a shim process in fresh
//! mount/pid/uts/ipc/net namespaces inside its own cgroup, on the bridge.

use crate::net::WorkloadNet;
use crate::oci::{ImageConfig, PulledImage, Store};
use crate::shim::{ShimNet, ShimSpec};
use crate::workload::{Started, Workload};
use cairn_manifest::{ContainerSpec, PortSpec, RestartPolicy};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Where container state lives (RAM until the storage work).
pub const STATE_ROOT: &str = "/var/lib/cairn";
/// cgroup v2 parent of every workload.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/cairn";

/// A container from the manifest.
pub struct Container {
    spec: ContainerSpec,
    image: Mutex<Option<PulledImage>>,
}

impl Container {
    /// The host directories of this container's volumes, created on first
    /// use under the state volume (or RAM).
    fn volume_binds(&self) -> Result<Vec<(String, String, bool)>, String> {
        self.spec
            .volumes
            .iter()
            .map(|v| {
                let dir = std::path::Path::new(STATE_ROOT)
                    .join("volumes")
                    .join(&v.name);
                std::fs::create_dir_all(&dir).map_err(|e| format!("volume {}: {e}", v.name))?;
                Ok((dir.display().to_string(), v.path.clone(), v.read_only))
            })
            .collect()
    }

    /// Wraps a spec.
    pub fn new(spec: ContainerSpec) -> Container {
        Container {
            spec,
            image: Mutex::new(None),
        }
    }

    fn dir(&self) -> PathBuf {
        PathBuf::from(STATE_ROOT)
            .join("containers")
            .join(&self.spec.name)
    }

    fn cgroup(&self) -> PathBuf {
        PathBuf::from(CGROUP_ROOT).join(&self.spec.name)
    }

    fn setup_cgroup(&self) -> Result<(), String> {
        let cg = self.cgroup();
        std::fs::create_dir_all(&cg)
            .map_err(|e| format!("creating cgroup {}: {e}", cg.display()))?;
        let write = |file: &str, value: String| {
            std::fs::write(cg.join(file), &value).map_err(|e| format!("cgroup {file}={value}: {e}"))
        };
        write(
            "memory.max",
            self.spec
                .memory_mib
                .map_or("max".into(), |m| (m << 20).to_string()),
        )?;
        write(
            "pids.max",
            self.spec.pids_max.map_or("max".into(), |p| p.to_string()),
        )?;
        write(
            "cpu.max",
            self.spec.cpu_millis.map_or("max 100000".into(), |m| {
                format!("{} 100000", u64::from(m) * 100)
            }),
        )?;
        Ok(())
    }
}

/// Enables the controllers workloads use, once at start.
pub fn init_cgroups() {
    let _ = std::fs::create_dir_all(CGROUP_ROOT);
    for dir in ["/sys/fs/cgroup", CGROUP_ROOT] {
        for c in ["cpu", "memory", "pids", "io"] {
            if let Err(e) = std::fs::write(format!("{dir}/cgroup.subtree_control"), format!("+{c}"))
            {
                tracing::warn!(dir, controller = c, error = %e, "cgroup controller not enabled");
            }
        }
    }
}

/// Kills and removes workload cgroups no longer wanted (after an agent restart).
pub fn kill_cgroup(name: &str) {
    let cg = PathBuf::from(CGROUP_ROOT).join(name);
    if cg.exists() {
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
    }
}

fn argv_for(spec: &ContainerSpec, cfg: &ImageConfig) -> Vec<String> {
    match &spec.command {
        Some(cmd) if !cmd.is_empty() => cmd.clone(),
        _ => cfg
            .entrypoint
            .iter()
            .chain(cfg.cmd.iter())
            .cloned()
            .collect(),
    }
}

fn env_for(spec: &ContainerSpec, cfg: &ImageConfig) -> Vec<String> {
    let mut env: Vec<String> = cfg.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    for v in &spec.env {
        env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(v.name.as_str()));
        env.push(format!("{}={}", v.name, v.value));
    }
    env.push(format!("HOSTNAME={}", spec.name));
    env
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these two fresh descriptors; we own them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Copies a container's output to its log file (rotated) and the
/// console, line by line. Lines are cut
/// at 16 KiB and bytes that are not UTF-8 are replaced, so no output can
/// stop the copy (which would give the container EPIPE) or grow PID 1.
fn forward_output(name: String, out: OwnedFd) {
    let _ = std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::new(std::fs::File::from(out));
            let mut file = crate::logs::LogFile::new(
                &crate::logs::dir(),
                &name,
                crate::logs::MAX_BYTES,
                crate::logs::KEEP,
            );
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut reader).take(16 * 1024).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']);
                        file.line(crate::logs::now_ms(), text);
                        tracing::info!(workload = %name, "| {}", text);
                    }
                }
            }
        });
}

impl Workload for Container {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn kind(&self) -> &'static str {
        "container"
    }

    fn fingerprint(&self) -> String {
        format!("{:?}", self.spec)
    }

    fn restart_policy(&self) -> (RestartPolicy, u32) {
        (self.spec.restart, self.spec.max_restarts)
    }

    fn ports(&self) -> Vec<PortSpec> {
        self.spec.ports.clone()
    }

    fn health(&self) -> Option<cairn_manifest::HealthCheck> {
        self.spec.health.clone()
    }

    fn stop_signal(&self) -> (i32, std::time::Duration) {
        (
            cairn_manifest::stop_signal_number(&self.spec.stop_signal).unwrap_or(libc::SIGTERM),
            std::time::Duration::from_secs(u64::from(self.spec.stop_timeout_s)),
        )
    }

    fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.cgroup().join("memory.events"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn prepare(&self) -> Result<String, String> {
        let store = Store::new(STATE_ROOT).with_seed(crate::oci::SEED_BLOBS);
        let img = store.pull(&self.spec.image).map_err(|e| e.to_string())?;
        let msg = format!(
            "image {}@{} ready ({} layers, {} fetched)",
            self.spec.image.repository,
            self.spec.image.digest,
            img.layers.len(),
            img.fetched_layers
        );
        *self.image.lock().unwrap_or_else(|e| e.into_inner()) = Some(img);
        Ok(msg)
    }

    fn start(&self, net: &mut WorkloadNet) -> Result<Started, String> {
        let img = self
            .image
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or("image not prepared")?;
        let dir = self.dir();
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let argv = argv_for(&self.spec, &img.config);
        if argv.is_empty() {
            return Err(
                "no command: the image has no entrypoint/cmd and the manifest gives none".into(),
            );
        }
        let (address, slot) = net.address_of(&self.spec.name)?;
        let spec = ShimSpec {
            name: self.spec.name.clone(),
            lowerdirs: img
                .layers
                .iter()
                .rev()
                .map(|p| p.display().to_string())
                .collect(),
            upper: upper.display().to_string(),
            work: work.display().to_string(),
            rootfs: rootfs.display().to_string(),
            argv,
            env: env_for(&self.spec, &img.config),
            cwd: img.config.workdir.clone(),
            user: img.config.user.clone(),
            net: Some(ShimNet {
                peer: format!("vp{slot}"),
                address: address.to_string(),
                prefix: net.prefix(),
                gateway: net.gateway().to_string(),
            }),
            // The node's responder on the bridge: workload names, then the
            // node's own resolvers.
            dns: vec![net.gateway().to_string()],
            binds: self.volume_binds()?,
        };
        self.setup_cgroup()?;
        let spec_path = dir.join("spec.json");
        let (sync_r, sync_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let out_w2 = out_w
            .try_clone()
            .map_err(|e| format!("duplicating the log pipe: {e}"))?;
        std::fs::write(
            &spec_path,
            serde_json::to_vec(&spec).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("writing {}: {e}", spec_path.display()))?;
        let sync_fd = sync_r.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("cairn-shim")
            .arg("container-shim")
            .arg(&spec_path)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(out_w2));
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe syscalls. It never returns an error: if it did,
        // std would waitpid() the child itself and race PID 1's reaper
        // (which may reap it first and make std panic). On failure it says
        // so on the log pipe and _exits(126); the reaper reports the exit.
        unsafe {
            cmd.pre_exec(move || {
                fn die(msg: &[u8]) -> ! {
                    // SAFETY: write(2) and _exit(2) are async-signal-safe.
                    unsafe {
                        libc::write(2, msg.as_ptr().cast(), msg.len());
                        libc::_exit(126)
                    }
                }
                let fd = libc::dup(sync_fd);
                if fd < 0 || libc::dup2(fd, 3) < 0 {
                    die(b"cairn-init: container setup: dup of the sync pipe failed\n");
                }
                libc::setsid();
                let flags = libc::CLONE_NEWNS
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWNET
                    | libc::CLONE_NEWPID;
                if libc::unshare(flags) != 0 {
                    die(
                        b"cairn-init: container setup: unshare(mount, uts, ipc, net, pid) failed\n",
                    );
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting the container shim: {e}"))?;
        drop(sync_r);
        let pid = child.id();
        // The Child handle is dropped without waiting: PID 1's reaper owns exits.
        drop(child);
        drop(cmd); // closes our copies of the output pipe's write ends
        forward_output(self.spec.name.clone(), out_r);
        let fail = |msg: String| {
            // SAFETY: pid is our child; SIGKILL makes its exit show up in the reaper.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            msg
        };
        std::fs::write(self.cgroup().join("cgroup.procs"), pid.to_string())
            .map_err(|e| fail(format!("moving the shim into its cgroup: {e}")))?;
        net.attach(&self.spec.name, pid).map_err(fail)?;
        let mut w = std::fs::File::from(sync_w);
        w.write_all(b"go")
            .map_err(|e| fail(format!("releasing the shim: {e}")))?;
        Ok(Started { pid, address })
    }

    fn kill(&self) {
        kill_cgroup(&self.spec.name);
    }

    fn images(&self) -> Vec<String> {
        vec![self.spec.image.digest.clone()]
    }

    fn cleanup(&self) {
        kill_cgroup(&self.spec.name);
        // The cgroup can only go once its processes are gone; they were
        // just killed, so give the kernel a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(self.cgroup()).is_ok() || !self.cgroup().exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The writable layer belongs to this definition only. (The overlay
        // mount lived in the shim's mount namespace and died with it.)
        if let Err(e) = std::fs::remove_dir_all(self.dir()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(workload = %self.spec.name, error = %e, "could not remove container state");
            }
        }
    }
}
