//! End-to-end harness: a closed test network in a network namespace (bridge,
//! tap, dnsmasq as DHCP server), a real registry and a real hub inside it,
//! and QEMU booting the real kernel + initramfs on the tap.
//!
//! Every process is started by us and killed by its pid when the guard that
//! owns it drops (and QEMU also dies with the test via PR_SET_PDEATHSIG);
//! the namespace and temp directory are removed the same way.

pub mod vlan;

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Inputs from the Makefile (`make test` / `make e2e`).
pub struct Inputs {
    /// bzImage.
    pub kernel: PathBuf,
    /// Static PID 1.
    pub init: PathBuf,
    /// Static demo server.
    pub hello: PathBuf,
    /// Directory with cairn-hub, cairnctl, cairn-image.
    pub tools: PathBuf,
}

/// Returns the inputs, or the reason the end-to-end tests cannot run here
/// (the caller prints `SKIP: <reason>`).
pub fn inputs() -> Result<Inputs, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("end-to-end tests need root (network namespaces, taps)".into());
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .ok_or_else(|| format!("{k} not set or missing: run through `make test` or `make e2e`"))
    };
    for tool in ["qemu-system-x86_64", "dnsmasq", "docker-registry", "ip"] {
        if which(tool).is_none() {
            return Err(format!("{tool} not installed (make deps)"));
        }
    }
    Ok(Inputs {
        kernel: var("CAIRN_KERNEL")?,
        init: var("CAIRN_INIT")?,
        hello: var("CAIRN_HELLO")?,
        tools: var("CAIRN_TOOLS")?,
    })
}

/// The inputs, or `None` after printing `SKIP: <reason>` (counted by the
/// summary of `make test`).
pub fn inputs_or_skip() -> Option<Inputs> {
    match inputs() {
        Ok(i) => Some(i),
        Err(reason) => {
            println!("SKIP: {reason}");
            None
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// Runs a command to completion; fails with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process killed (SIGKILL, then reaped) when dropped.
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Spawns with PR_SET_PDEATHSIG so it dies with the test process too.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        // SAFETY: prctl is async-signal-safe and only affects the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if it already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early: {st}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The closed test network.
pub struct TestNet {
    /// Namespace name.
    pub ns: String,
    /// Gateway / server address on the bridge.
    pub host_ip: String,
    /// Temp dir for everything the test writes.
    pub dir: tempfile::TempDir,
    /// NICs the node gets (tap0.. on br0, MACs 52:54:00:77:00:10..); 2 by default.
    pub nics: usize,
    /// Raw disk images attached as virtio disks (`vda`, `vdb`, … in order).
    pub disks: Vec<DiskSpec>,
    /// Let a reset restart the machine instead of ending QEMU (for a hard
    /// reset through the monitor); by default a reboot ends QEMU.
    pub allow_reset: bool,
    /// Another MAC for the first NIC (a machine the hub does not know).
    pub first_mac: Option<String>,
    /// Firmware: UEFI (OVMF) instead of SeaBIOS.
    pub uefi: bool,
    /// An ISO attached as CD-ROM beside the boot medium (a config drive).
    pub cdrom: Option<PathBuf>,
    procs: Vec<Proc>,
}

/// A disk image for the node.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Raw image file.
    pub path: PathBuf,
    /// The serial the guest sees.
    pub serial: String,
    /// Attached read-only (the guest sees `/sys/block/*/ro` = 1).
    pub read_only: bool,
    /// Image format for QEMU (`raw` or `qcow2`).
    pub format: &'static str,
}

impl DiskSpec {
    /// A writable disk with this serial.
    pub fn new(path: impl Into<PathBuf>, serial: &str) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            serial: serial.into(),
            read_only: false,
            format: "raw",
        }
    }
}

/// OVMF as Debian's ovmf package installs it (one image: code and
/// variables, which then live only as long as the QEMU process).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// How QEMU starts the node.
#[derive(Clone, Copy)]
enum BootFrom<'a> {
    /// `-kernel`, `-initrd`, `-append`.
    Direct(&'a Path, &'a Path, &'a str),
    /// The first NIC's iPXE ROM.
    Network,
    /// An ISO as CD-ROM.
    Cdrom(&'a Path),
    /// An image as a USB stick.
    Usb(&'a Path),
    /// The first disk of [`TestNet::disks`].
    Disk,
}

/// Taps created on the test bridge (the most NICs a test boots with).
const TAPS: usize = 4;

impl TestNet {
    /// Creates the namespace with a bridge, a tap for QEMU and dnsmasq.
    pub fn new() -> Result<TestNet> {
        let ns = format!("cairn-e2e-{}", std::process::id());
        let dir = tempfile::Builder::new().prefix("cairn-e2e.").tempdir()?;
        let net = TestNet {
            ns: ns.clone(),
            host_ip: "10.77.0.1".into(),
            dir,
            nics: 2,
            disks: Vec::new(),
            allow_reset: false,
            first_mac: None,
            uefi: false,
            cdrom: None,
            procs: Vec::new(),
        };
        run(Command::new("ip").args(["netns", "add", &ns]))?;
        let ipn = |args: &[&str]| run(Command::new("ip").arg("-n").arg(&ns).args(args));
        ipn(&["link", "set", "lo", "up"])?;
        ipn(&["link", "add", "br0", "type", "bridge"])?;
        ipn(&["addr", "add", "10.77.0.1/24", "dev", "br0"])?;
        ipn(&["link", "set", "br0", "up"])?;
        for n in 0..TAPS {
            let tap = format!("tap{n}");
            ipn(&["tuntap", "add", &tap, "mode", "tap"])?;
            ipn(&["link", "set", &tap, "master", "br0", "up"])?;
        }
        Ok(net)
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Starts a long-running process inside the namespace, output to a log file.
    pub fn start(&mut self, name: &str, mut cmd: Command) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.procs.push(Proc::spawn(name, &mut cmd)?);
        Ok(())
    }

    /// Starts dnsmasq as the DHCP server of the test network.
    pub fn start_dhcp(&mut self) -> Result<()> {
        self.start_dhcp_booting(None)
    }

    /// Restarts dnsmasq without a boot file.
    pub fn start_dhcp_plain(&mut self) -> Result<()> {
        self.stop("dnsmasq");
        self.start_dhcp_booting(None)
    }

    /// Restarts dnsmasq so that it hands out `url` as the boot file (what a
    /// NIC's iPXE ROM fetches and runs).
    pub fn pxe_boot_url(&mut self, url: &str) -> Result<()> {
        self.stop("dnsmasq");
        self.start_dhcp_booting(Some(url))
    }

    fn start_dhcp_booting(&mut self, boot_url: Option<&str>) -> Result<()> {
        let mut c = self.cmd("dnsmasq");
        if let Some(u) = boot_url {
            c.arg(format!("--dhcp-boot={u}"));
        }
        c.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--interface=br0",
            "--bind-interfaces",
            "--port=0",
            "--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,1h",
            "--dhcp-option=option:router,10.77.0.1",
            "--dhcp-option=option:ntp-server,10.77.0.1",
            "--log-dhcp",
        ])
        .arg(format!(
            "--dhcp-leasefile={}",
            self.dir.path().join("leases").display()
        ))
        .arg(format!(
            "--pid-file={}",
            self.dir.path().join("dnsmasq.pid").display()
        ));
        self.start("dnsmasq", c)
    }

    /// Starts chronyd as the test network's NTP server (its clock control
    /// off); false when chrony is not installed.
    pub fn start_ntp(&mut self) -> Result<bool> {
        let ip = self.host_ip.clone();
        self.start_ntp_on(&ip)
    }

    /// Starts chronyd serving time on `addr` only; false without chronyd.
    pub fn start_ntp_on(&mut self, addr: &str) -> Result<bool> {
        if which("chronyd").is_none() {
            return Ok(false);
        }
        let conf = self.dir.path().join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "allow all\nlocal stratum 8\nport 123\nbindaddress {}\ncmdport 0\npidfile {}\n",
                addr,
                self.dir.path().join("chronyd.pid").display()
            ),
        )?;
        let mut c = self.cmd("chronyd");
        c.args(["-x", "-d", "-f"]).arg(&conf);
        self.start("chronyd", c)?;
        Ok(true)
    }

    /// Starts Debian's docker-registry on the bridge address.
    pub fn start_registry(&mut self, port: u16) -> Result<String> {
        let cfg = self.dir.path().join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{ level: info }}\nstorage: {{ filesystem: {{ rootdirectory: {} }} }}\nhttp: {{ addr: {}:{port} }}\n",
                self.dir.path().join("registry").display(),
                self.host_ip
            ),
        )?;
        let mut c = self.cmd("docker-registry");
        c.arg("serve").arg(&cfg);
        self.start("registry", c)?;
        let addr = format!("{}:{port}", self.host_ip);
        let url = format!("http://{addr}/v2/");
        self.wait_until("registry answering", Duration::from_secs(20), || {
            Ok(self.http_get(&url).is_ok())
        })?;
        Ok(addr)
    }

    /// Starts the hub on the bridge address (again, after `stop("hub")`,
    /// on the same data directory).
    pub fn start_hub(&mut self, tools: &Path, port: u16) -> Result<String> {
        let mut c = self.cmd(tools.join("cairn-hub"));
        c.arg("--data")
            .arg(self.dir.path().join("hub"))
            .arg("--listen")
            .arg(format!("{}:{port}", self.host_ip));
        self.start("hub", c)?;
        let url = format!("http://{}:{port}", self.host_ip);
        let health = format!("{url}/healthz");
        self.wait_until("hub answering", Duration::from_secs(20), || {
            Ok(self.http_get(&health).is_ok())
        })?;
        Ok(url)
    }

    /// Boots QEMU on the tap; serial console to `serial.log`.
    pub fn boot(&mut self, kernel: &Path, initrd: &Path, append: &str) -> Result<()> {
        self.start_qemu(BootFrom::Direct(kernel, initrd, append))
    }

    /// Boots QEMU from the network: the first NIC's iPXE ROM does DHCP and
    /// runs what the boot file names (see [`TestNet::pxe_boot_url`]).
    pub fn boot_pxe(&mut self) -> Result<()> {
        self.start_qemu(BootFrom::Network)
    }

    /// Boots QEMU from an ISO image as its CD-ROM (SeaBIOS unless `uefi`).
    pub fn boot_cdrom(&mut self, iso: &Path) -> Result<()> {
        self.start_qemu(BootFrom::Cdrom(iso))
    }

    /// Boots QEMU from an image written to a USB stick (on xHCI).
    pub fn boot_usb(&mut self, image: &Path) -> Result<()> {
        self.start_qemu(BootFrom::Usb(image))
    }

    /// Boots QEMU from its first disk.
    pub fn boot_disk(&mut self) -> Result<()> {
        self.start_qemu(BootFrom::Disk)
    }

    fn start_qemu(&mut self, from: BootFrom<'_>) -> Result<()> {
        let mut c = self.cmd("qemu-system-x86_64");
        c.args([
            "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2", "-display", "none",
        ])
        .args(if self.allow_reset {
            &[][..]
        } else {
            &["-no-reboot"][..]
        })
        .arg("-serial")
        .arg(format!("file:{}", self.serial_path().display()))
        // The human monitor on a socket, for link up/down (`set_link`).
        .arg("-monitor")
        .arg(format!(
            "unix:{},server,nowait",
            self.monitor_path().display()
        ));
        match from {
            BootFrom::Direct(kernel, initrd, append) => {
                c.arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .arg("-append")
                    .arg(append);
            }
            BootFrom::Network => {
                c.args(["-boot", "n"]);
            }
            BootFrom::Cdrom(iso) => {
                c.arg("-cdrom").arg(iso).args(["-boot", "d"]);
            }
            BootFrom::Usb(image) => {
                c.args(["-device", "qemu-xhci,id=xhci"])
                    .arg("-drive")
                    .arg(format!(
                        "file={},if=none,id=usb0,format=raw,readonly=on",
                        image.display()
                    ))
                    .args(["-device", "usb-storage,bus=xhci.0,drive=usb0,bootindex=0"]);
            }
            BootFrom::Disk => {}
        }
        if self.uefi {
            c.arg("-bios").arg(OVMF);
        }
        if let Some(cd) = &self.cdrom {
            c.arg("-cdrom").arg(cd);
        }
        for (n, d) in self.disks.iter().enumerate() {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            let boot = if n == 0 && matches!(from, BootFrom::Disk) {
                ",bootindex=0"
            } else {
                ""
            };
            c.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=d{n},format={}{ro}",
                    d.path.display(),
                    d.format
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive=d{n},serial={}{boot}",
                    d.serial
                ));
        }
        // Every NIC on the same network: DHCP runs on all of them.
        for n in 0..self.nics.min(TAPS) {
            c.arg("-netdev")
                .arg(format!("tap,id=n{n},ifname=tap{n},script=no,downscript=no"))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n{n},mac={}{}",
                    self.mac_of(n),
                    // Under UEFI a NIC's option ROM would try PXE first.
                    if self.uefi && !matches!(from, BootFrom::Network) {
                        ",romfile="
                    } else {
                        ""
                    }
                ));
        }
        self.start("qemu", c)
    }

    /// The MAC QEMU gives NIC `n` in this test ([`TestNet::first_mac`]
    /// replaces the first one).
    pub fn mac_of(&self, n: usize) -> String {
        match (&self.first_mac, n) {
            (Some(m), 0) => m.clone(),
            _ => Self::mac(n),
        }
    }

    /// The MAC of the node's NIC number `n` (`eth{n}`).
    pub fn mac(n: usize) -> String {
        format!("52:54:00:77:00:{:02x}", 0x10 + n)
    }

    fn monitor_path(&self) -> PathBuf {
        self.dir.path().join("qemu-monitor.sock")
    }

    /// Sends one command to QEMU's human monitor (e.g. `set_link n2 off`:
    /// the guest's NIC loses carrier) and returns its answer.
    pub fn monitor(&self, command: &str) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.monitor_path())
            .context("QEMU monitor socket")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        writeln!(s, "{command}")?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Stops (kills and reaps) the named process, e.g. `qemu`.
    pub fn stop(&mut self, name: &str) {
        self.procs.retain(|p| p.name != name);
    }

    /// Path of the node's serial console log.
    pub fn serial_path(&self) -> PathBuf {
        self.dir.path().join("serial.log")
    }

    /// The node's console so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.serial_path()).unwrap_or_default()
    }

    /// Whether the process started as `name` still runs.
    pub fn running(&mut self, name: &str) -> bool {
        self.procs
            .iter_mut()
            .filter(|p| p.name == name)
            .any(|p| p.check_alive().is_ok())
    }

    /// Checks that every started process still runs.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.check_alive()?;
        }
        Ok(())
    }

    /// Runs `f` on a thread that has joined the test namespace.
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            use std::os::fd::AsRawFd;
            // SAFETY: a valid netns fd; setns only affects this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }

    /// GET from inside the namespace; returns (status, body).
    pub fn http_get(&self, url: &str) -> Result<(u16, String)> {
        let url = url.to_string();
        self.in_ns(move || -> Result<(u16, String)> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .http_status_as_error(false)
                .build()
                .into();
            let mut resp = agent.get(&url).call()?;
            let status = resp.status().as_u16();
            let mut body = String::new();
            resp.body_mut().as_reader().read_to_string(&mut body)?;
            Ok((status, body))
        })?
    }

    /// Polls `f` until it returns true, failing after `limit` with the
    /// node's console tail in the error.
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut() -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f().unwrap_or(false) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let serial = self.serial();
        let tail: Vec<&str> = serial
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "timed out after {limit:?} waiting for {what}; node console tail:\n{}",
            tail.join("\n")
        )
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Processes first (reverse start order), then the namespace.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        if std::env::var_os("CAIRN_KEEP_E2E").is_some() {
            let kept = self.dir.path().to_path_buf();
            eprintln!("keeping {}", kept.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("tempdir"),
            ));
        }
    }
}

/// A ready test network with registry, hub, a signing key, an initramfs
/// that trusts it and the demo image pushed: everything a boot needs.
pub struct Scenario {
    /// The network and its services.
    pub net: TestNet,
    /// Hub base URL.
    pub hub: String,
    /// Registry `host:port`.
    pub registry: String,
    /// Demo image manifest digest.
    pub digest: String,
    /// Signing key file.
    pub key: PathBuf,
    /// Initramfs with the key baked in.
    pub initrd: PathBuf,
    /// Tool directory.
    pub tools: PathBuf,
    /// Kernel.
    pub kernel: PathBuf,
}

/// The node id the scenario uses.
pub const NODE: &str = "e2e-node";

impl Scenario {
    /// Builds everything; prints the initramfs size.
    pub fn setup(inp: &Inputs) -> Result<Scenario> {
        let mut net = TestNet::new()?;
        let dir = net.dir.path().to_path_buf();
        let tools = inp.tools.clone();
        run(Command::new(tools.join("cairnctl"))
            .args(["keygen", "--name", "e2e", "--out"])
            .arg(dir.join("keys")))?;
        let initrd = dir.join("initramfs.cpio.zst");
        let summary = run(Command::new(tools.join("cairn-image"))
            .arg("initramfs")
            .arg("--init")
            .arg(&inp.init)
            .arg("--keys")
            .arg(dir.join("keys"))
            .arg("--out")
            .arg(&initrd))?;
        println!("{}", summary.trim());
        let size = std::fs::metadata(&initrd)?.len();
        println!(
            "initramfs compressed size: {size} bytes ({:.2} MiB; target <= 4 MiB)",
            size as f64 / 1048576.0
        );
        net.start_dhcp()?;
        let registry = net.start_registry(5000)?;
        let hub = net.start_hub(&tools, 7400)?;
        let layout = dir.join("hello-oci");
        run(Command::new(tools.join("cairn-image"))
            .args(["oci", "--name", "hello", "--port", "80", "--binary"])
            .arg(&inp.hello)
            .arg("--out")
            .arg(&layout))?;
        let pushed = run(net
            .cmd(tools.join("cairn-image"))
            .args(["push", "--insecure", "--layout"])
            .arg(&layout)
            .arg("--to")
            .arg(format!("{registry}/demo/hello:latest")))?;
        let digest = pushed
            .trim()
            .rsplit('@')
            .next()
            .context("push printed no digest")?
            .to_string();
        println!("pushed demo image {digest}");
        Ok(Scenario {
            net,
            hub,
            registry,
            digest,
            key: dir.join("keys/e2e.key"),
            initrd,
            tools,
            kernel: inp.kernel.clone(),
        })
    }

    /// The demo manifest at `version`: `web` (published on 8080) and `peer`
    /// (not published), with extra TOML appended to `web`.
    pub fn manifest(&self, version: u64, extra: &str) -> String {
        format!(
            r#"node = "{NODE}"
version = {version}

[[container]]
name = "peer"
image = {{ registry = "{r}", repository = "demo/hello", digest = "{d}", insecure = true }}

[[container]]
name = "web"
image = {{ registry = "{r}", repository = "demo/hello", digest = "{d}", insecure = true }}
port = [{{ host = 8080, container = 80 }}]
restart = "always"
{extra}
"#,
            r = self.registry,
            d = self.digest
        )
    }

    /// Signs TOML with `key` (1 h ttl unless the TOML has times); returns the envelope.
    pub fn sign_with(&self, key: &Path, name: &str, toml: &str) -> Result<Vec<u8>> {
        let dir = self.net.dir.path();
        let src = dir.join(format!("{name}.toml"));
        let out = dir.join(format!("{name}.bin"));
        std::fs::write(&src, toml)?;
        let mut cmd = Command::new(self.tools.join("cairnctl"));
        cmd.arg("sign").arg("--key").arg(key).arg("-o").arg(&out);
        if !toml.contains("expires_at") {
            cmd.args(["--ttl", "1h"]);
        }
        run(cmd.arg(&src))?;
        Ok(std::fs::read(&out)?)
    }

    /// Signs with the scenario's key.
    pub fn sign(&self, name: &str, toml: &str) -> Result<Vec<u8>> {
        self.sign_with(&self.key.clone(), name, toml)
    }

    /// Publishes envelope bytes for `node` with `cairnctl publish`.
    pub fn publish(&self, node: &str, bytes: &[u8]) -> Result<()> {
        let f = self.net.dir.path().join("publish.bin");
        std::fs::write(&f, bytes)?;
        run(self
            .net
            .cmd(self.tools.join("cairnctl"))
            .args(["publish", "--hub", &self.hub, node])
            .arg(&f))?;
        Ok(())
    }

    /// Boots the node (DHCP).
    pub fn boot(&mut self) -> Result<()> {
        self.boot_with("")
    }

    /// Boots the node with extra kernel arguments.
    pub fn boot_with(&mut self, extra: &str) -> Result<()> {
        // `cairn.colour` is a deliberate typo: the node must name it and go on.
        let append = format!(
            "console=ttyS0 panic=-1 cairn.hub={} cairn.node={NODE} cairn.poll=1 cairn.colour=blue {extra}",
            self.hub
        );
        let (kernel, initrd) = (self.kernel.clone(), self.initrd.clone());
        self.net.boot(&kernel, &initrd, &append)
    }

    /// The node's latest status from the hub (`Null` before its first report).
    pub fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = self
            .net
            .http_get(&format!("{}/v1/nodes/{NODE}", self.hub))?;
        if code != 200 {
            bail!("hub answered {code}");
        }
        Ok(serde_json::from_str::<serde_json::Value>(&body)?["status"].clone())
    }
}

/// The `instance=` id in a demo server's answer.
pub fn instance(body: &str) -> Option<String> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("instance="))
        .map(str::to_string)
}

/// True when the status shows workload `name` answering on its port.
pub fn answering(st: &serde_json::Value, name: &str) -> bool {
    workload(st, name).is_some_and(|w| w["answering"] == true)
}

/// `sha256:<hex>` of a file.
pub fn sha256_file(p: &Path) -> Result<String> {
    use sha2::Digest;
    Ok(format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(std::fs::read(p)?))
    ))
}

/// A workload's entry in a status report.
pub fn workload<'a>(st: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    st["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
}
