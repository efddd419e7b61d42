//! Manifest schema (payload format 2).
//!
//! Format 2 payloads are these types as JSON (the same serde attributes as
//! the TOML authoring form). A field may be *added* with `#[serde(default)]`
//! (older payloads still decode); renaming, retyping or removing one means a
//! new format number, a frozen copy of these types for the old format and a
//! conversion, as `v1.rs` is for format 1 (postcard). Unknown fields are
//! refused, so a node never silently ignores configuration it cannot apply.

use serde::{Deserialize, Serialize};

/// Everything one node is told to run, at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The node this manifest is for (`cairn.node=` on the node's command line).
    pub node: String,
    /// Strictly increasing per node; a node refuses anything lower than it applied.
    pub version: u64,
    /// Unix seconds when it was signed; also a floor for the node's clock.
    pub issued_at: u64,
    /// Unix seconds after which a node refuses it when fetched from the hub.
    pub expires_at: u64,
    /// Node and workload networking.
    #[serde(default)]
    pub network: NetworkSpec,
    /// State volume selection.
    #[serde(default)]
    pub storage: StorageSpec,
    /// Containers to run.
    #[serde(default, rename = "container")]
    pub containers: Vec<ContainerSpec>,
    /// Virtual machines to run.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmSpec>,
    /// Functions (containers with pre-warmed instances).
    #[serde(default, rename = "function")]
    pub functions: Vec<FunctionSpec>,
    /// A one-off power action (clean reboot or power-off).
    #[serde(default)]
    pub power: Option<PowerRequest>,
    /// The OS the node should run: a node on another version installs it
    /// (disk-booted: the inactive boot slot, with fallback) or reboots into
    /// it (netbooted).
    #[serde(default)]
    pub os: Option<OsSpec>,
}

/// An OS version: kernel and initramfs by URL and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsSpec {
    /// Version name, `[0-9a-z._]`, starting with a letter or digit (it becomes a boot entry's file name).
    pub version: String,
    /// The kernel (bzImage).
    pub kernel: Artifact,
    /// The initramfs.
    pub initramfs: Artifact,
    /// Kernel command line; default: the running one.
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// Reboot or power off once: the node acts when `id` is higher than the
/// last request it carried out (remembered on its state volume, so the
/// same manifest after the reboot does nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerRequest {
    /// Increase it to ask again.
    pub id: u64,
    /// `reboot` or `poweroff`.
    pub action: String,
}

/// Networking of the node and of its workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// IPv4 subnet of the workload bridge in CIDR form; the node takes `.1`.
    #[serde(default = "default_workload_subnet")]
    pub workload_subnet: String,
    /// Extra resolvers for the node (in addition to DHCP's), as IPv4 literals.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Per-interface settings, matched by name or MAC.
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<InterfaceSpec>,
    /// NTP servers (IPv4 literals), tried before DHCP's option 42 servers.
    #[serde(default)]
    pub ntp: Vec<String>,
    /// 802.1Q VLAN links to create.
    #[serde(default, rename = "vlan")]
    pub vlans: Vec<VlanSpec>,
    /// Bonds to create.
    #[serde(default, rename = "bond")]
    pub bonds: Vec<BondSpec>,
    /// Whether workloads reach each other directly on the workload bridge.
    #[serde(default)]
    pub workload_reachability: Reachability,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            workload_subnet: default_workload_subnet(),
            dns: Vec::new(),
            interfaces: Vec::new(),
            ntp: Vec::new(),
            vlans: Vec::new(),
            bonds: Vec::new(),
            workload_reachability: Reachability::default(),
        }
    }
}

fn default_workload_subnet() -> String {
    "10.88.0.0/24".to_string()
}

/// Reachability between workloads on the workload bridge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reachability {
    /// Every workload reaches every other workload on every port.
    #[default]
    Open,
    /// Workloads reach the node (DNS, gateway), the outside and published
    /// ports on the node's addresses, but not each other directly.
    Isolated,
}

/// Settings of one node interface (a NIC, or a VLAN or bond declared here),
/// matched by name or MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSpec {
    /// Interface name (`eth0`, `bond0`, `vlan100`) or MAC (`52:54:00:12:34:56`).
    pub matches: String,
    /// `dhcp` (the default), `static`, or `none` (link up, no address: a
    /// VLAN parent that carries no address of its own).
    #[serde(default = "default_dhcp")]
    pub mode: String,
    /// Static addresses in CIDR form, IPv4 or IPv6 (also allowed beside DHCP).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// IPv4 default gateway.
    #[serde(default)]
    pub gateway: Option<String>,
    /// MTU; `None` keeps the link's.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// IPv6 default gateway.
    #[serde(default)]
    pub gateway6: Option<String>,
    /// Extra routes.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteSpec>,
    /// Resolvers learnt from this interface (IPv4 literals).
    #[serde(default)]
    pub dns: Vec<String>,
    /// Metric of this interface's routes (default 50: below DHCP's 100+).
    #[serde(default)]
    pub metric: Option<u32>,
}

impl Default for InterfaceSpec {
    fn default() -> Self {
        InterfaceSpec {
            matches: String::new(),
            mode: default_dhcp(),
            addresses: Vec::new(),
            gateway: None,
            mtu: None,
            gateway6: None,
            routes: Vec::new(),
            dns: Vec::new(),
            metric: None,
        }
    }
}

fn default_dhcp() -> String {
    "dhcp".to_string()
}

/// A static route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Destination in CIDR form (IPv4 or IPv6).
    pub to: String,
    /// Next hop (same family); `None` = on-link.
    #[serde(default)]
    pub via: Option<String>,
}

/// An 802.1Q VLAN link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlanSpec {
    /// Name of the new link (at most 15 characters).
    pub name: String,
    /// Parent link: a NIC's name or MAC, or a bond declared here.
    pub parent: String,
    /// VLAN id, 1–4094.
    pub id: u16,
}

/// A bond (link aggregation) of NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BondSpec {
    /// Name of the new link (at most 15 characters).
    pub name: String,
    /// `active-backup` or `802.3ad` (LACP; the switch must speak it).
    pub mode: String,
    /// Member NICs by name or MAC; they carry no address of their own.
    pub members: Vec<String>,
    /// Link monitoring interval in milliseconds.
    #[serde(default = "default_miimon")]
    pub miimon_ms: u32,
}

fn default_miimon() -> u32 {
    100
}

/// Which disk holds the state volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSpec {
    /// Disk serial to use (and, with `wipe`, to format even if it has data).
    #[serde(default)]
    pub state_disk_serial: Option<String>,
    /// Allow formatting a disk that holds data we don't recognise (only
    /// together with `state_disk_serial`: never a disk chosen by size).
    #[serde(default)]
    pub wipe: bool,
    /// Disk device path (`/dev/vdb`, `/dev/disk/by-path/…`).
    #[serde(default)]
    pub state_disk_path: Option<String>,
    /// The first empty disk at least this large.
    #[serde(default)]
    pub state_disk_min_bytes: Option<u64>,
}

/// What to do when a workload's process ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whatever the exit status (with backoff).
    #[default]
    Always,
    /// Restart after a non-zero exit or a signal, up to `max_restarts`.
    OnFailure,
    /// Never restart.
    Never,
}

/// An OCI image pinned by digest: `registry/repository@sha256:…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Registry host and optional port, as the node reaches it (`10.0.2.2:5000`).
    pub registry: String,
    /// Repository path (`demo/hello`).
    pub repository: String,
    /// Manifest digest (`sha256:<64 hex>`): nothing is run without one.
    pub digest: String,
    /// Talk plain HTTP to this registry (only when the manifest says so).
    #[serde(default)]
    pub insecure: bool,
}

/// A port published on the node's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Port on the node.
    pub host: u16,
    /// Port inside the workload.
    pub container: u16,
    /// `tcp` or `udp`.
    #[serde(default = "default_tcp")]
    pub protocol: String,
}

fn default_tcp() -> String {
    "tcp".to_string()
}

/// An environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A container workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Unique among the node's workloads; also its hostname and DNS name.
    pub name: String,
    /// The image.
    pub image: ImageRef,
    /// Replaces the image's entrypoint + cmd when set.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Added to the image's environment (overriding same names).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Published ports.
    #[serde(default, rename = "port")]
    pub ports: Vec<PortSpec>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// With `on-failure`: restarts allowed before giving up (0 = unlimited).
    #[serde(default)]
    pub max_restarts: u32,
    /// Memory limit in MiB (cgroup `memory.max`); `None` = unlimited.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// CPU limit in millicores (cgroup `cpu.max`); `None` = unlimited.
    #[serde(default)]
    pub cpu_millis: Option<u32>,
    /// Maximum number of tasks (cgroup `pids.max`).
    #[serde(default)]
    pub pids_max: Option<u32>,
    /// Persistent volumes on the state volume, bind-mounted in.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeMount>,
    /// A health check; a workload that fails it `failures` times in a row
    /// is killed and restarted as its restart policy says.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// The signal a stop sends first (`TERM`, `INT`, `QUIT`, `HUP`,
    /// `USR1`, `USR2`); its whole cgroup is killed after `stop_timeout_s`.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// Seconds between the stop signal and SIGKILL (1..=300).
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u32,
}

fn default_stop_signal() -> String {
    "TERM".into()
}
fn default_stop_timeout() -> u32 {
    10
}

/// The signal number of a stop signal name, if it is one we allow.
pub fn stop_signal_number(name: &str) -> Option<i32> {
    // Linux x86-64 numbers (signal(7)); KILL is what follows the timeout.
    Some(match name.strip_prefix("SIG").unwrap_or(name) {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        _ => return None,
    })
}

/// How a workload's health is probed from the node, on its own address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `http` (a GET that must answer 2xx or 3xx) or `tcp` (a connection).
    pub kind: HealthKind,
    /// The workload's own port (not a published one).
    pub port: u16,
    /// Path for `http`.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Seconds between probes.
    #[serde(default = "default_health_interval")]
    pub interval_s: u32,
    /// Seconds a probe may take.
    #[serde(default = "default_health_timeout")]
    pub timeout_s: u32,
    /// Failed probes in a row that make it unhealthy.
    #[serde(default = "default_health_failures")]
    pub failures: u32,
    /// Seconds after a start in which failed probes do not count, until
    /// the first success (a slow start is not a failure).
    #[serde(default = "default_health_grace")]
    pub grace_s: u32,
}

/// Health probe kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    /// HTTP GET.
    Http,
    /// TCP connect.
    Tcp,
}

fn default_health_path() -> String {
    "/".into()
}
fn default_health_interval() -> u32 {
    5
}
fn default_health_timeout() -> u32 {
    2
}
fn default_health_failures() -> u32 {
    3
}
fn default_health_grace() -> u32 {
    10
}

/// A named persistent directory (on the state volume, in RAM without one)
/// mounted into a workload; it outlives restarts, redefinitions and reboots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// Volume name (a DNS label); the same name is the same data.
    pub name: String,
    /// Absolute path inside the container.
    pub path: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A file the node fetches by URL and checks against its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Where to fetch it.
    pub url: String,
    /// `sha256:<64 hex>`.
    pub sha256: String,
}

/// A disk attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The initial image.
    pub source: Artifact,
    /// `raw` or `qcow2`.
    #[serde(default = "default_raw")]
    pub format: String,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

fn default_raw() -> String {
    "raw".to_string()
}

/// A virtual machine workload (run by cairn's own VMM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique among the node's workloads.
    pub name: String,
    /// Virtual CPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel to boot; `None` = boot the kernel found in the first disk.
    #[serde(default)]
    pub kernel: Option<Artifact>,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<Artifact>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Disks, in order (`vda`, `vdb`, …).
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSpec>,
    /// Published ports.
    #[serde(default, rename = "port")]
    pub ports: Vec<PortSpec>,
    /// Restart policy (guest poweroff counts as an exit with status 0).
    #[serde(default)]
    pub restart: RestartPolicy,
}

fn one() -> u32 {
    1
}

/// How a function instance receives its request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FunctionProtocol {
    /// Request on stdin, response on stdout.
    #[default]
    Stdio,
    /// The instance serves HTTP on `port`.
    Http,
}

/// A function: a container image with a pool of pre-started instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Unique among the node's workloads; the route defaults to `/fn/<name>`.
    pub name: String,
    /// The image.
    pub image: ImageRef,
    /// Replaces the image's entrypoint + cmd when set.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Instances kept started and waiting.
    #[serde(default = "one")]
    pub hot_instances: u32,
    /// Invocations running at once; more queue, then get 429.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: u32,
    /// Per-invocation timeout in milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Protocol.
    #[serde(default)]
    pub protocol: FunctionProtocol,
    /// Port the instance listens on, for `http`.
    #[serde(default)]
    pub port: Option<u16>,
}

fn default_concurrency() -> u32 {
    4
}
fn default_timeout() -> u64 {
    30_000
}

/// Why a manifest's content is unusable even though its signature is fine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Two workloads share a name.
    #[error("duplicate workload name {0:?}")]
    DuplicateName(String),
    /// A name is not a valid hostname label.
    #[error("workload name {0:?} is not a lowercase DNS label (a-z, 0-9, '-', 1-63 chars)")]
    BadName(String),
    /// A digest is not `sha256:<64 hex>`.
    #[error("{what}: digest {digest:?} is not sha256:<64 lowercase hex>")]
    BadDigest {
        /// Which field.
        what: String,
        /// The value.
        digest: String,
    },
    /// Two workloads publish the same node port.
    #[error("node port {0}/{1} is published twice")]
    DuplicatePort(u16, String),
    /// A protocol other than tcp/udp.
    #[error("port {0}: protocol {1:?} is not tcp or udp")]
    BadProtocol(u16, String),
    /// Issue/expiry times that cannot be right (expiry first, or values that
    /// look like milliseconds): applying them would move the node's clock
    /// floor years ahead and lock it out of every later manifest.
    #[error("issued_at {issued_at} / expires_at {expires_at}: need issued_at <= expires_at, both unix seconds before {MAX_UNIX_SECONDS} (year 2200)")]
    BadTimes {
        /// Issue time.
        issued_at: u64,
        /// Expiry.
        expires_at: u64,
    },
    /// The workload subnet is not an IPv4 CIDR with room for workloads.
    #[error("workload_subnet {0:?} is not an IPv4 CIDR between /16 and /29")]
    BadSubnet(String),
    /// A `[storage]` rule that cannot be applied safely.
    #[error("storage: {0}")]
    BadStorage(String),
    /// A stop signal or timeout that cannot be used.
    #[error("{workload}: {problem}")]
    BadStop {
        /// Workload.
        workload: String,
        /// What is wrong.
        problem: String,
    },
    /// A health check that cannot be run.
    #[error("{workload}: health: {problem}")]
    BadHealth {
        /// Workload.
        workload: String,
        /// What is wrong.
        problem: String,
    },
    /// An `[os]` section that cannot be installed.
    #[error("os: {0}")]
    BadOs(String),
    /// A power request with an unknown action.
    #[error("power.action {0:?} is not reboot or poweroff")]
    BadPower(String),
    /// A volume with a bad name or path.
    #[error("{workload}: volume {name:?} at {path:?}: the name must be a DNS label and the path absolute, without '.' or '..' parts, and not /")]
    BadVolume {
        /// Workload.
        workload: String,
        /// Volume name.
        name: String,
        /// Mount path.
        path: String,
    },
    /// Something in `[network]` that no node could apply.
    #[error("network.{field}: {problem}")]
    Network {
        /// Where (`interface[eth0].addresses`).
        field: String,
        /// What is wrong.
        problem: String,
    },
}

/// Upper bound for manifest times: 2200-01-01T00:00:00Z.
pub const MAX_UNIX_SECONDS: u64 = 7_258_118_400;

/// An OS version name: 1-64 of `[0-9a-z._]`, starting with a letter or
/// digit. It becomes file and directory names on a FAT ESP: no `+` or `-`
/// (boot counting), no `.`/`..`, no upper case (FAT ignores case, so `V2`
/// would overwrite `v2`).
pub fn is_os_version(v: &str) -> bool {
    v.len() <= 64
        && v.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_')
}

/// Checks a digest string of the form `sha256:<64 lowercase hex>`.
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Parses `a.b.c.d/len` into (network, prefix length).
pub fn parse_ipv4_cidr(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((addr, len))
}

impl Manifest {
    /// Parses the TOML authoring form.
    pub fn from_toml(text: &str) -> Result<Manifest, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks what the signature cannot: names, digests, ports, subnet.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.issued_at > self.expires_at || self.expires_at > MAX_UNIX_SECONDS {
            return Err(SpecError::BadTimes {
                issued_at: self.issued_at,
                expires_at: self.expires_at,
            });
        }
        let mut names = std::collections::BTreeSet::new();
        let mut ports = std::collections::BTreeSet::new();
        let all_names = self
            .containers
            .iter()
            .map(|c| &c.name)
            .chain(self.vms.iter().map(|v| &v.name))
            .chain(self.functions.iter().map(|f| &f.name));
        for n in all_names {
            if !is_dns_label(n) {
                return Err(SpecError::BadName(n.clone()));
            }
            if !names.insert(n.clone()) {
                return Err(SpecError::DuplicateName(n.clone()));
            }
        }
        let check_image = |name: &str, img: &ImageRef| {
            if is_sha256_digest(&img.digest) {
                Ok(())
            } else {
                Err(SpecError::BadDigest {
                    what: format!("{name}.image"),
                    digest: img.digest.clone(),
                })
            }
        };
        for c in &self.containers {
            check_image(&c.name, &c.image)?;
            if stop_signal_number(&c.stop_signal).is_none() {
                return Err(SpecError::BadStop {
                    workload: c.name.clone(),
                    problem: format!(
                        "stop_signal {:?} is not one of TERM, INT, QUIT, HUP, USR1, USR2",
                        c.stop_signal
                    ),
                });
            }
            if !(1..=300).contains(&c.stop_timeout_s) {
                return Err(SpecError::BadStop {
                    workload: c.name.clone(),
                    problem: format!("stop_timeout_s {} must be 1..=300", c.stop_timeout_s),
                });
            }
            if let Some(h) = &c.health {
                let problem = if h.port == 0 {
                    Some("port 0")
                } else if !h.path.starts_with('/')
                    || h.path.len() > 256
                    || h.path.bytes().any(|b| !(0x21..0x7f).contains(&b))
                {
                    Some("path must start with / and be printable ASCII without spaces")
                } else if !(1..=3600).contains(&h.interval_s) {
                    Some("interval_s must be 1..=3600")
                } else if !(1..=60).contains(&h.timeout_s) {
                    Some("timeout_s must be 1..=60")
                } else if !(1..=100).contains(&h.failures) {
                    Some("failures must be 1..=100")
                } else {
                    None
                };
                if let Some(p) = problem {
                    return Err(SpecError::BadHealth {
                        workload: c.name.clone(),
                        problem: p.into(),
                    });
                }
            }
            for v in &c.volumes {
                let bad_path = !v.path.starts_with('/')
                    || v.path == "/"
                    || v.path.split('/').any(|p| p == ".." || p == ".")
                    || v.path.contains('\0');
                if !is_dns_label(&v.name) || bad_path {
                    return Err(SpecError::BadVolume {
                        workload: c.name.clone(),
                        name: v.name.clone(),
                        path: v.path.clone(),
                    });
                }
            }
        }
        for f in &self.functions {
            check_image(&f.name, &f.image)?;
        }
        for v in &self.vms {
            let arts = v
                .kernel
                .iter()
                .chain(v.initrd.iter())
                .chain(v.disks.iter().map(|d| &d.source));
            for a in arts {
                if !is_sha256_digest(&a.sha256) {
                    return Err(SpecError::BadDigest {
                        what: format!("{}: {}", v.name, a.url),
                        digest: a.sha256.clone(),
                    });
                }
            }
        }
        let all_ports = self
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .chain(self.vms.iter().flat_map(|v| v.ports.iter()));
        for p in all_ports {
            if p.protocol != "tcp" && p.protocol != "udp" {
                return Err(SpecError::BadProtocol(p.host, p.protocol.clone()));
            }
            if !ports.insert((p.host, p.protocol.clone())) {
                return Err(SpecError::DuplicatePort(p.host, p.protocol.clone()));
            }
        }
        match parse_ipv4_cidr(&self.network.workload_subnet) {
            Some((_, len)) if (16..=29).contains(&len) => {}
            _ => return Err(SpecError::BadSubnet(self.network.workload_subnet.clone())),
        }
        if self.storage.wipe && self.storage.state_disk_serial.is_none() {
            return Err(SpecError::BadStorage(
                "wipe = true needs state_disk_serial: a disk chosen by path or size is never wiped"
                    .into(),
            ));
        }
        if let Some(p) = &self.storage.state_disk_path {
            if !p.starts_with("/dev/") || p.split('/').any(|c| c == "..") {
                return Err(SpecError::BadStorage(format!(
                    "state_disk_path {p:?} is not a path under /dev"
                )));
            }
        }
        if let Some(p) = &self.power {
            if p.action != "reboot" && p.action != "poweroff" {
                return Err(SpecError::BadPower(p.action.clone()));
            }
        }
        if let Some(os) = &self.os {
            let v = &os.version;
            if !is_os_version(v) {
                return Err(SpecError::BadOs(format!(
                    "version {v:?}: use 1-64 of [0-9a-z._], starting with a letter or digit"
                )));
            }
            for (what, a) in [("kernel", &os.kernel), ("initramfs", &os.initramfs)] {
                if !is_sha256_digest(&a.sha256) {
                    return Err(SpecError::BadDigest {
                        what: format!("os.{what}: {}", a.url),
                        digest: a.sha256.clone(),
                    });
                }
                // Plain HTTP: integrity comes from the signed digest.
                if !a.url.starts_with("http://") {
                    return Err(SpecError::BadOs(format!(
                        "{what} url {:?} is not http:// (the node checks the signed sha256, it has no TLS client)",
                        a.url
                    )));
                }
            }
            if let Some(c) = &os.cmdline {
                if c.contains('\n') || c.len() > 2048 {
                    return Err(SpecError::BadOs(
                        "cmdline must be one line of at most 2048 bytes".into(),
                    ));
                }
            }
        }
        crate::netcheck::validate(&self.network)
    }
}
