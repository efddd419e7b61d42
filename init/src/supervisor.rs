//! The agent: boots the node (network, trust), then runs the reconcile loop
//! that converges running workloads to the last applied manifest.
//!
//! Everything arrives as an [`Event`] on one channel — child exits from the
//! PID-1 reaper, manifests from the hub poller, finished image pulls from
//! worker threads — so the state lives in one thread with no locks. A panic
//! in the loop is caught, logged, and the loop restarts from the hub's
//! manifest; PID 1 itself never goes down with it.

use crate::cmdline::Config;
use crate::container::{self, Container};
use crate::net::{self, proxy::Proxies, NodeNet, WorkloadNet};
use crate::workload::Workload;
use crate::{hub, pid1, timeline};
use cairn_manifest::{verify, Applied, Decision, Manifest, RestartPolicy, TrustStore};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Everything the agent reacts to.
pub enum Event {
    /// A child of PID 1 ended (raw wait status).
    Exited {
        /// Pid.
        pid: i32,
        /// wait(2) status.
        status: i32,
    },
    /// Stop everything; PID 1 halts when we are done.
    Shutdown,
    /// The hub poller's latest result.
    Fetched(Result<Vec<u8>, String>),
    /// The signed manifest built into the boot image (`SEED_MANIFEST`),
    /// offered once at boot: a node booted from a full ISO runs it with no
    /// hub at all. It passes the same checks as the hub's.
    Seed(Vec<u8>),
    /// A workload's preparation finished.
    Prepared {
        /// Workload.
        name: String,
        /// Slot generation it was started for.
        gen: u64,
        /// Summary or error.
        result: Result<String, String>,
    },
    /// One health probe's result.
    Health {
        /// Workload.
        name: String,
        /// Slot generation.
        gen: u64,
        /// The process probed (a late result must not hit its successor).
        pid: u32,
        /// Healthy, or why not.
        result: Result<(), String>,
    },
    /// A workload accepted its first TCP connection on a published port.
    Answering {
        /// Workload.
        name: String,
        /// Slot generation.
        gen: u64,
    },
}

const TRUST_DIR: &str = "/etc/cairn/keys";
/// Where `cairn-image iso --seed-manifest` puts a signed manifest.
pub const SEED_MANIFEST: &str = "/etc/cairn/seed/manifest";
pub(crate) const BUILD_EPOCH: &str = "/etc/cairn/build-epoch";
/// A fresh status report at least this often, changed or not.
const STATUS_EVERY: Duration = Duration::from_secs(10);

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Never let the clock go below `floor` (unauthenticated time sources and
/// dead RTC batteries must not make expired manifests look fresh... or
/// fresh ones expired).
/// The highest floor so far (build time, applied manifests' issue times):
/// SNTP may never step the clock below it.
static FLOOR: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn clock_floor(floor: u64, why: &str) {
    FLOOR.fetch_max(floor, std::sync::atomic::Ordering::SeqCst);
    if now_unix() < floor {
        let tv = libc::timeval {
            tv_sec: floor.min(i64::MAX as u64) as _,
            tv_usec: 0,
        };
        // SAFETY: valid timeval pointer; null timezone is allowed.
        let rc = unsafe { libc::settimeofday(&tv, std::ptr::null()) };
        tracing::warn!(
            floor,
            why,
            ok = rc == 0,
            "clock was below its floor; raised"
        );
    }
}

/// Asks the NTP servers in turn; steps the clock when it is more than a
/// second off (never below `floor`). Returns the status entry.
pub(crate) fn sync_time(servers: &[Ipv4Addr]) -> Value {
    let floor = FLOOR.load(std::sync::atomic::Ordering::SeqCst);
    if servers.is_empty() {
        return Value::Null;
    }
    let mut errors = Vec::new();
    for server in servers {
        match net::sntp::query(*server) {
            Ok(s) => {
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let stepped = match net::sntp::step_target(now_ms, s.offset_ms, floor) {
                    Some(target) => {
                        let tv = libc::timeval {
                            tv_sec: (target / 1000) as _,
                            tv_usec: ((target % 1000) * 1000) as _,
                        };
                        // SAFETY: valid timeval pointer; null timezone is allowed.
                        let ok = unsafe { libc::settimeofday(&tv, std::ptr::null()) } == 0;
                        tracing::warn!(server = %server, offset_ms = s.offset_ms, ok, "clock stepped by SNTP");
                        ok
                    }
                    None => false,
                };
                tracing::info!(server = %server, offset_ms = s.offset_ms, delay_ms = s.delay_ms, stratum = s.stratum, "SNTP");
                return json!({
                    "server": server.to_string(),
                    "offset_ms": s.offset_ms,
                    "delay_ms": s.delay_ms,
                    "stratum": s.stratum,
                    "stepped": stepped,
                });
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    tracing::warn!(errors = ?errors, "no NTP server answered; keeping the clock");
    json!({ "error": errors.join("; ") })
}

pub(crate) fn load_trust(cfg: &Config) -> (TrustStore, Vec<String>) {
    let (all, errs) = TrustStore::load_dir(std::path::Path::new(TRUST_DIR));
    let mut errors: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let mut store = all.clone();
    if !cfg.trust.is_empty() {
        let (sel, unknown) = all.select(&cfg.trust);
        for u in &unknown {
            errors.push(format!(
                "cairn.trust={u}: not a baked-in key; ignored (the command line cannot add trust)"
            ));
        }
        if sel.is_empty() {
            // The operator meant to narrow trust: widening it back to every
            // baked-in key would defeat that, so trust nothing and say so.
            errors
                .push("cairn.trust selected no baked-in key: no manifest will be accepted".into());
        }
        store = sel;
    }
    for e in &errors {
        tracing::error!("{e}");
    }
    if store.is_empty() {
        tracing::error!("no trusted keys: every manifest will be refused");
    }
    let ids: Vec<String> = store.ids().iter().map(|k| k.0.clone()).collect();
    tracing::info!(keys = ?ids, "trusted manifest keys");
    (store, errors)
}

/// `cairn.node=`, else `node-<first NIC's MAC>`.
pub(crate) fn node_id(cfg: &Config, mac: &[u8]) -> String {
    cfg.node.clone().unwrap_or_else(|| {
        format!(
            "node-{}",
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    })
}

/// State that survives a restart of the reconcile loop.
struct Boot {
    node: String,
    hub: Option<String>,
    uplink: NodeNet,
    trust: TrustStore,
    trust_errors: Vec<String>,
    cmdline_errors: Vec<String>,
    status_tx: Sender<Value>,
    boot_id: String,
    net: Option<WorkloadNet>,
    net_error: Option<String>,
    /// The last SNTP result, for the status.
    time: Arc<std::sync::Mutex<Value>>,
    /// NTP servers in use (the manifest's, then DHCP's).
    ntp: Arc<std::sync::Mutex<Vec<Ipv4Addr>>>,
    /// Wakes the SNTP thread after the servers changed.
    ntp_kick: Sender<()>,
    /// For reading the uplink's addresses into the status.
    nl: net::link::Netlink,
    proxies: Proxies,
    /// Survives a restart of the reconcile loop: forgetting it would let an
    /// older (still valid) manifest be applied after a panic.
    applied: Option<Applied>,
    /// The manifest applied last, re-applied when the loop restarts.
    manifest: Option<Manifest>,
    /// The state volume (or RAM) and the node's records on it.
    volume: crate::state::Volume,
    records: crate::state::Records,
    /// The node's own key pair (public half in the status).
    node_key: Option<cairn_manifest::SigningKey>,
    /// The last known good manifest read at boot, until used or replaced.
    lkg: Option<Vec<u8>>,
    /// Where the running manifest came from: `hub` or `disk`.
    manifest_source: &'static str,
    /// Generations stay unique across loop restarts, so a late event from
    /// an old preparation thread never matches a new slot.
    next_gen: u64,
    /// OS version, boot slots and updates.
    os: OsBoot,
}

/// What this boot knows about its OS version and boot slots.
struct OsBoot {
    /// `cairn.os=` of this boot.
    running: Option<String>,
    /// The command line without per-version words (for new entries).
    cmdline: String,
    /// The `cairn-esp` partition (a disk-booted node).
    esp: Option<std::path::PathBuf>,
    /// This boot is a version's one try (its entry still counts boots).
    trial: bool,
    /// Versions whose try failed (entries with no tries left).
    failed: Vec<String>,
    /// Versions installed for a try that the boot loader did not boot
    /// (this boot chose another entry): not installed again, or the node
    /// would reboot forever.
    unbooted: Vec<String>,
    /// The trial boot was marked good.
    marked: Arc<std::sync::atomic::AtomicBool>,
    /// What the update machinery is doing, and its last error.
    state: Arc<std::sync::Mutex<(String, Option<String>)>>,
}

/// How long a trial boot may take to come up before it reboots (and the
/// boot loader falls back to the previous version).
const OS_TRIAL: Duration = Duration::from_secs(600);

impl OsBoot {
    fn discover() -> OsBoot {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let running = crate::osupdate::running_version(&cmdline);
        let esp = crate::osupdate::find_esp();
        let (mut trial, mut failed, mut unbooted) = (false, Vec::new(), Vec::new());
        if let Some(dev) = &esp {
            match crate::osupdate::Esp::mount(dev) {
                Ok(m) => {
                    for (_, e) in m.entries() {
                        if Some(&e.version) == running.as_ref() {
                            trial = e.left.is_some();
                        } else if e.left == Some(0) {
                            failed.push(e.version);
                        } else if e.left.is_some() && e.done.is_none() {
                            unbooted.push(e.version);
                        }
                    }
                }
                Err(e) => tracing::error!("{e}"),
            }
        }
        tracing::info!(running = ?running, esp = ?esp, trial, failed = ?failed, unbooted = ?unbooted, "OS version");
        let os = OsBoot {
            running,
            cmdline: crate::osupdate::base_cmdline(&cmdline),
            esp,
            trial,
            failed,
            unbooted,
            marked: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            state: Arc::new(std::sync::Mutex::new(("idle".into(), None))),
        };
        if trial {
            let marked = os.marked.clone();
            let _ = std::thread::Builder::new()
                .name("os-trial".into())
                .spawn(move || {
                    std::thread::sleep(OS_TRIAL);
                    if !marked.load(std::sync::atomic::Ordering::SeqCst) {
                        tracing::error!(
                            secs = OS_TRIAL.as_secs(),
                            "this OS version did not come up in time: rebooting to the previous one"
                        );
                        // SAFETY: signalling ourselves; PID 1 reboots cleanly.
                        unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
                    }
                });
        }
        os
    }

    fn set(&self, state: impl Into<String>, error: Option<String>) {
        let state = state.into();
        match &error {
            Some(e) => tracing::error!(state, "OS update: {e}"),
            None => tracing::info!(state, "OS update"),
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (state, error);
    }

    fn status(&self) -> Value {
        let (state, error) = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({
            "running": self.running,
            "boot": if self.esp.is_some() { "disk" } else { "network or RAM" },
            "trial": self.trial,
            "marked_good": self.marked.load(std::sync::atomic::Ordering::SeqCst),
            "failed": self.failed,
            "unbooted": self.unbooted,
            "state": state,
            "error": error,
        })
    }
}

/// The agent thread's body; never returns.
pub fn run_forever(
    cfg: Config,
    cmdline_errors: Vec<String>,
    rx: Receiver<Event>,
    tx: Sender<Event>,
) {
    let build_epoch = std::fs::read_to_string(BUILD_EPOCH)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    clock_floor(build_epoch, "image build time");
    let volume = crate::state::bring_up();
    timeline::mark(
        "state",
        &format!(
            "state volume: {}",
            volume.device.as_deref().unwrap_or("RAM")
        ),
    );
    crate::logs::start_own_log();
    let records = crate::state::Records::new();
    let node_key = records.node_key();
    let stored_applied = records.applied();
    let lkg = records.last_known_good();
    if let Some(a) = &stored_applied {
        tracing::info!(
            version = a.version,
            has_manifest = lkg.is_some(),
            "applied version from the state volume (anti-rollback)"
        );
    }
    let (trust, trust_errors) = load_trust(&cfg);
    let hostname = cfg.node.clone().unwrap_or_else(|| "cairn".into());
    let uplink = net::bring_up_uplink(cfg.iface.as_deref(), &hostname, cfg.static_ip.as_ref());
    let addr = format!("{}/{}", uplink.address, uplink.prefix);
    timeline::mark("address", &format!("{} has {addr}", uplink.iface));
    let node = node_id(&cfg, &uplink.mac);
    tracing::info!(node = %node, "node id");
    // The stored manifest's issue time is a floor for the clock, before
    // SNTP or the hub are asked (a dead RTC battery must not make the
    // last known good look like it is from the future).
    if let (Some(bytes), Some(applied)) = (&lkg, &stored_applied) {
        if let Ok(m) = cairn_manifest::verify_stored(bytes, &trust, &node, applied) {
            clock_floor(m.issued_at, "stored manifest issue time");
        }
    }
    // Time before the first manifest: its expiry is judged by this clock.
    let time = Arc::new(std::sync::Mutex::new(sync_time(&uplink.ntp)));
    let ntp = Arc::new(std::sync::Mutex::new(uplink.ntp.clone()));
    let (ntp_kick, kicked) = std::sync::mpsc::channel::<()>();
    {
        let (servers, time) = (ntp.clone(), time.clone());
        let _ = std::thread::Builder::new()
            .name("sntp".into())
            .spawn(move || {
                // Every 1024 s, or at once when the manifest names new servers.
                while !matches!(
                    kicked.recv_timeout(Duration::from_secs(1024)),
                    Err(RecvTimeoutError::Disconnected)
                ) {
                    let list = servers.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if !list.is_empty() {
                        *time.lock().unwrap_or_else(|e| e.into_inner()) = sync_time(&list);
                    }
                }
            });
    }
    let (status_tx, status_rx) = std::sync::mpsc::channel::<Value>();
    // Before the poller starts: a hub that answers at once with a newer
    // version then replaces the seed, never the other way round.
    let seeded = match std::fs::read(SEED_MANIFEST) {
        Ok(bytes) => {
            tracing::info!(
                bytes = bytes.len(),
                "a signed seed manifest is built into the boot image"
            );
            let _ = tx.send(Event::Seed(bytes));
            true
        }
        Err(_) => false,
    };
    match cfg.hub.clone() {
        Some(hub) => {
            spawn_poller(hub.clone(), node.clone(), cfg.poll, tx.clone());
            crate::logs::spawn_shipper(hub.clone(), node.clone());
            spawn_status_sender(hub, node.clone(), status_rx);
        }
        None if seeded => {
            tracing::info!("no cairn.hub= on the kernel command line: running the seed manifest only")
        }
        None => tracing::error!(
            "no cairn.hub= on the kernel command line and no seed manifest: this node cannot get a manifest"
        ),
    }
    container::init_cgroups();
    let mut boot = Boot {
        node,
        hub: cfg.hub.clone(),
        uplink,
        trust,
        trust_errors,
        cmdline_errors,
        status_tx,
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        net: None,
        net_error: None,
        time,
        ntp,
        ntp_kick,
        nl: loop {
            match net::link::Netlink::new() {
                Ok(nl) => break nl,
                Err(e) => {
                    tracing::error!(error = %e, "netlink unavailable; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        },
        proxies: Proxies::default(),
        applied: stored_applied,
        manifest: None,
        volume,
        records,
        node_key,
        lkg,
        manifest_source: "hub",
        next_gen: 1,
        os: OsBoot::discover(),
    };
    loop {
        let r = catch_unwind(AssertUnwindSafe(|| {
            Supervisor::new(&mut boot, tx.clone()).run(&rx)
        }));
        if let Err(p) = r {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            tracing::error!(panic = %msg, "reconcile loop panicked; restarting it (workloads will be restarted)");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn spawn_poller(hub: String, node: String, poll: Duration, tx: Sender<Event>) {
    let _ = std::thread::Builder::new()
        .name("hub-poll".into())
        .spawn(move || {
            let mut backoff = Duration::from_secs(1);
            loop {
                let r = hub::fetch_manifest(&hub, &node);
                let wait = match &r {
                    Ok(_) => {
                        backoff = Duration::from_secs(1);
                        poll
                    }
                    Err(e) => {
                        let w = backoff.min(Duration::from_secs(30));
                        tracing::warn!(retry_s = w.as_secs(), "{e}; retrying");
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        w
                    }
                };
                if tx.send(Event::Fetched(r)).is_err() {
                    return;
                }
                std::thread::sleep(wait);
            }
        });
}

fn spawn_status_sender(hub: String, node: String, rx: Receiver<Value>) {
    let _ = std::thread::Builder::new()
        .name("hub-status".into())
        .spawn(move || {
            let mut latest: Option<Value> = None;
            let mut sent = true;
            loop {
                // Retry an unsent report every 2 s; otherwise wait for news
                // (the supervisor sends a fresh snapshot at least every 10 s).
                let wait = if sent {
                    Duration::from_secs(60)
                } else {
                    Duration::from_secs(2)
                };
                match rx.recv_timeout(wait) {
                    Ok(v) => {
                        latest = Some(v);
                        sent = false;
                        // Coalesce a burst of updates into one report.
                        while let Ok(v) = rx.try_recv() {
                            latest = Some(v);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                if let (false, Some(v)) = (sent, &latest) {
                    match hub::post_status(&hub, &node, v) {
                        Ok(()) => sent = true,
                        Err(e) => tracing::debug!("{e}"),
                    }
                }
            }
        });
}

#[derive(Debug)]
enum State {
    Preparing,
    Running {
        pid: u32,
        since: Instant,
    },
    Backoff {
        until: Instant,
    },
    Stopping {
        pid: u32,
        deadline: Instant,
        killed: bool,
    },
    Exited,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Preparing => "preparing",
            State::Running { .. } => "running",
            State::Backoff { .. } => "backoff",
            State::Stopping { .. } => "stopping",
            State::Exited => "exited",
        }
    }
}

struct Slot {
    w: Arc<dyn Workload>,
    gen: u64,
    state: State,
    prepared: bool,
    restarts: u32,
    consecutive_failures: u32,
    last_exit: Option<String>,
    error: Option<String>,
    address: Option<Ipv4Addr>,
    remove: bool,
    replacement: Option<Arc<dyn Workload>>,
    answering: bool,
    /// Its process was started at least once (OS trial boots count it).
    started_once: bool,
    /// Cleared to end the running process's health prober.
    health_alive: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// `starting`, `healthy` or `unhealthy` (with a health check).
    health_state: &'static str,
    /// Failed probes in a row, and the last failure.
    health_failures: u32,
    health_error: Option<String>,
    /// Times it was killed for failing its health check.
    unhealthy_restarts: u32,
    /// OOM kills seen in its cgroup (the counter is the cgroup's).
    oom_kills: u64,
    /// The cgroup's OOM counter when the running process started.
    oom_baseline: u64,
    /// The running process was killed for failing its health check.
    killed_unhealthy: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // A dropped slot (removed, or a reconcile loop that restarted)
        // must not leave its prober running.
        if let Some(a) = self.health_alive.take() {
            a.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

struct Supervisor<'a> {
    boot: &'a mut Boot,
    tx: Sender<Event>,
    manifest_state: &'static str,
    manifest_error: Option<(String, String)>,
    hub_error: Option<String>,
    last_seen: Option<String>,
    slots: BTreeMap<String, Slot>,
    unsupported: Vec<(String, &'static str)>,
    shutting_down: bool,
    nat_error: Option<String>,
    /// Problems of the last node network reconcile.
    network_errors: Vec<String>,
    /// Unused layers may exist (a manifest changed, or space runs low).
    gc_due: bool,
    /// When free space was last looked at.
    space_checked: Instant,
    /// The last garbage collection, for the status.
    last_gc: Value,
    /// Why the manifest's storage rule is not in effect.
    storage_error: Option<String>,
    /// Why the applied version could not be recorded.
    records_error: Option<String>,
    /// The signed bytes of the manifest applied last (recorded again when
    /// a state volume appears).
    last_bytes: Option<Vec<u8>>,
}

fn describe_exit(status: i32) -> (String, bool) {
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        (format!("exited with status {code}"), code == 0)
    } else if libc::WIFSIGNALED(status) {
        (
            format!("killed by signal {}", libc::WTERMSIG(status)),
            false,
        )
    } else {
        (format!("ended (wait status {status:#x})"), false)
    }
}

fn restart_delay(consecutive: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << consecutive.saturating_sub(1).min(10));
    Duration::from_millis(ms.min(30_000))
}

impl<'a> Supervisor<'a> {
    fn new(boot: &'a mut Boot, tx: Sender<Event>) -> Supervisor<'a> {
        // A previous loop may have died with workloads running: start clean.
        if let Ok(entries) = std::fs::read_dir(container::CGROUP_ROOT) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    container::kill_cgroup(&e.file_name().to_string_lossy());
                }
            }
        }
        Supervisor {
            boot,
            tx,

            manifest_state: "none",
            manifest_error: None,
            hub_error: None,
            last_seen: None,
            slots: BTreeMap::new(),
            unsupported: Vec::new(),
            shutting_down: false,
            nat_error: None,
            network_errors: Vec::new(),
            gc_due: true,
            space_checked: Instant::now(),
            last_gc: Value::Null,
            storage_error: None,
            records_error: None,
            last_bytes: None,
        }
    }

    fn run(&mut self, rx: &Receiver<Event>) {
        if let Some(m) = self.boot.manifest.clone() {
            tracing::warn!(
                version = m.version,
                "re-applying the last applied manifest after a loop restart"
            );
            self.manifest_state = "applied";
            self.apply(m);
        }
        self.push_status();
        let mut last_push = Instant::now();
        loop {
            let heartbeat = STATUS_EVERY.saturating_sub(last_push.elapsed());
            let wait = self.next_deadline().map_or(heartbeat, |d| d.min(heartbeat));
            let changed = match rx.recv_timeout(wait) {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let ticked = self.tick();
            self.check_os_good();
            if changed || ticked || last_push.elapsed() >= STATUS_EVERY {
                self.push_status();
                last_push = Instant::now();
            }
        }
    }

    fn next_deadline(&self) -> Option<Duration> {
        let now = Instant::now();
        self.slots
            .values()
            .filter_map(|s| match s.state {
                State::Backoff { until } => Some(until),
                // Once killed, wait for the exit event; a process stuck in
                // D state must not make this loop spin.
                State::Stopping {
                    deadline,
                    killed: false,
                    ..
                } => Some(deadline),
                _ => None,
            })
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Fetched(Ok(bytes)) => {
                let hub_was_down = self.hub_error.take().is_some();
                self.consider_manifest(&bytes, "hub") || hub_was_down
            }
            Event::Seed(bytes) => self.consider_manifest(&bytes, "seed"),
            Event::Fetched(Err(e)) => {
                let changed = self.hub_error.as_deref() != Some(e.as_str());
                self.hub_error = Some(e);
                self.apply_last_known_good("the hub is unreachable") || changed
            }
            Event::Exited { pid, status } => self.on_exit(pid, status),
            Event::Prepared { name, gen, result } => self.on_prepared(&name, gen, result),
            Event::Health {
                name,
                gen,
                pid,
                result,
            } => self.on_health(&name, gen, pid, result),
            Event::Answering { name, gen } => {
                if let Some(s) = self.slots.get_mut(&name).filter(|s| s.gen == gen) {
                    s.answering = true;
                    timeline::mark("workload-answering", &format!("{name} accepts connections"));
                }
                true
            }
            Event::Shutdown => {
                self.shutting_down = true;
                let names: Vec<String> = self.slots.keys().cloned().collect();
                for n in names {
                    self.stop(&n, true, None);
                }
                true
            }
        }
    }

    /// A health probe's result: counted; `failures` in a row kill the
    /// process (its whole cgroup), and the restart policy takes it from
    /// there (the kill counts as a failure).
    fn on_health(&mut self, name: &str, gen: u64, pid: u32, result: Result<(), String>) -> bool {
        let Some(s) = self.slots.get_mut(name).filter(|s| {
            s.gen == gen && matches!(s.state, State::Running { pid: p, .. } if p == pid)
        }) else {
            return false;
        };
        let before = (s.health_state, s.health_failures);
        match result {
            Ok(()) => {
                s.health_state = "healthy";
                s.health_failures = 0;
            }
            Err(e) => {
                let h = s.w.health();
                let grace = Duration::from_secs(u64::from(h.as_ref().map_or(0, |h| h.grace_s)));
                let since = match s.state {
                    State::Running { since, .. } => since.elapsed(),
                    _ => Duration::ZERO,
                };
                // Still starting (no success yet) within its grace: not
                // a failure yet.
                if s.health_state == "starting" && since < grace {
                    s.health_error = Some(e);
                    return false;
                }
                s.health_failures += 1;
                let limit = h.map_or(u32::MAX, |h| h.failures);
                tracing::warn!(workload = %name, failures = s.health_failures, limit, "health check failed: {e}");
                s.health_error = Some(e);
                if s.health_failures >= limit {
                    s.health_state = "unhealthy";
                    s.unhealthy_restarts += 1;
                    tracing::error!(workload = %name, failures = s.health_failures, "unhealthy: killing it (the restart policy decides what follows)");
                    if let Some(a) = s.health_alive.take() {
                        a.store(false, std::sync::atomic::Ordering::SeqCst);
                    }
                    s.killed_unhealthy = true;
                    s.w.kill();
                }
            }
        }
        before != (s.health_state, s.health_failures)
    }

    /// Verifies and applies manifest bytes from `source` (`hub` or `seed`).
    fn consider_manifest(&mut self, bytes: &[u8], source: &'static str) -> bool {
        let sha = hex::encode(Sha256::digest(bytes));
        if self.last_seen.as_deref() == Some(sha.as_str()) {
            return false;
        }
        self.last_seen = Some(sha);
        match verify(
            bytes,
            &self.boot.trust,
            &self.boot.node,
            now_unix(),
            self.boot.applied.as_ref(),
        ) {
            Ok((Decision::Apply(m), _)) if self.network_plan(&m).is_err() => {
                let e = self.network_plan(&m).err().unwrap_or_default();
                tracing::error!(
                    version = m.version,
                    "manifest rejected: {e}; previous configuration kept"
                );
                self.apply_last_known_good("the hub's manifest does not fit this node");
                self.manifest_state = "rejected";
                self.manifest_error = Some(("invalid".to_string(), e));
            }
            Ok((Decision::Apply(m), applied)) => {
                timeline::mark(
                    "manifest-verified",
                    &format!("manifest version {} verified", m.version),
                );
                tracing::info!(version = m.version, "applying manifest");
                clock_floor(m.issued_at, "manifest issue time");
                self.record_applied(&applied, bytes);
                self.last_bytes = Some(bytes.to_vec());
                self.boot.lkg = None;
                self.boot.manifest_source = source;
                self.boot.applied = Some(applied);
                self.manifest_state = "applied";
                self.manifest_error = None;
                self.apply(*m);
            }
            // After a reboot the hub serves what we applied before it:
            // nothing new, but nothing runs yet either.
            Ok((Decision::Unchanged, _)) if self.boot.manifest.is_none() => {
                self.boot.lkg = Some(bytes.to_vec());
                self.apply_last_known_good(if source == "seed" {
                    "the seed is the applied version"
                } else {
                    "the hub serves the applied version"
                });
                self.boot.manifest_source = source;
            }
            Ok((Decision::Unchanged, _)) => {
                // The hub is back to serving what we run (e.g. after it served
                // a refused manifest): the refusal is no longer current.
                tracing::debug!("manifest unchanged");
                self.manifest_state = "applied";
                self.manifest_error = None;
            }
            // A state volume that has applied newer versions outranks the
            // image's seed: not an error, the seed is just old.
            Err(rej @ cairn_manifest::Rejection::Rollback { .. }) if source == "seed" => {
                tracing::info!("seed manifest not used: {rej}");
                self.apply_last_known_good("the seed manifest is older");
            }
            Err(rej) => {
                tracing::error!(
                    code = rej.code(),
                    source,
                    "manifest rejected: {rej}; running workloads untouched"
                );
                let error = Some((rej.code().to_string(), rej.to_string()));
                // Nothing runs yet this boot (the hub serves something we
                // refuse, e.g. an older version): run the last known good.
                self.apply_last_known_good(if source == "seed" {
                    "the seed manifest was refused"
                } else {
                    "the hub's manifest was refused"
                });
                self.manifest_state = "rejected";
                self.manifest_error = error;
            }
        }
        true
    }

    /// Creates the workload network if it is not up yet (retried on every
    /// apply and every start, with the cause kept for the status).
    fn ensure_net(&mut self, subnet: &str) {
        if let Some(net) = &self.boot.net {
            if net.subnet() != subnet {
                let msg = format!(
                    "workload_subnet changed to {subnet} but the bridge already uses {}; a reboot applies it",
                    net.subnet()
                );
                if self.boot.net_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!("{msg}");
                }
                self.boot.net_error = Some(msg);
            } else {
                self.boot.net_error = None;
            }
            return;
        }
        match WorkloadNet::new(subnet, self.boot.uplink.resolvers.clone()) {
            Ok(n) => {
                self.boot.net = Some(n);
                self.boot.net_error = None;
            }
            Err(e) => {
                let msg = format!("workload network {subnet} could not be created: {e}");
                tracing::error!("{msg}");
                self.boot.net_error = Some(msg);
            }
        }
    }

    /// Applies the stored last known good manifest when nothing runs yet;
    /// true when it did.
    fn apply_last_known_good(&mut self, why: &str) -> bool {
        if self.boot.manifest.is_some() {
            return false;
        }
        let (Some(bytes), Some(applied)) = (self.boot.lkg.take(), self.boot.applied.clone()) else {
            return false;
        };
        match cairn_manifest::verify_stored(&bytes, &self.boot.trust, &self.boot.node, &applied) {
            Ok(m) => {
                self.last_bytes = Some(bytes);
                tracing::warn!(
                    version = m.version,
                    stale = now_unix() > m.expires_at,
                    "{why}: applying the last known good manifest from the state volume"
                );
                timeline::mark(
                    "manifest-verified",
                    &format!("manifest version {} (last known good)", m.version),
                );
                clock_floor(m.issued_at, "manifest issue time");
                self.manifest_state = "applied";
                self.manifest_error = None;
                self.boot.manifest_source = "disk";
                self.apply(m);
                true
            }
            Err(rej) => {
                tracing::error!(
                    code = rej.code(),
                    "the stored manifest is not usable: {rej}"
                );
                self.manifest_error =
                    Some((rej.code().to_string(), format!("stored manifest: {rej}")));
                true
            }
        }
    }

    /// `[network]` resolved against this node's links (nothing touched).
    fn network_plan(&self, m: &Manifest) -> Result<net::node::Plan, String> {
        let links = self.boot.nl.links().map_err(|e| e.to_string())?;
        net::node::plan(&m.network, &links, &self.boot.uplink.config.created())
    }

    /// The node's links, resolvers and NTP servers as `[network]` says.
    fn apply_node_network(&mut self, m: &Manifest) {
        match self.network_plan(m) {
            Ok(plan) => {
                self.network_errors = self.boot.uplink.config.apply(&self.boot.nl, &plan);
            }
            Err(e) => self.network_errors = vec![e],
        }
        let mut ntp: Vec<Ipv4Addr> = m
            .network
            .ntp
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        for s in &self.boot.uplink.ntp {
            if !ntp.contains(s) {
                ntp.push(*s);
            }
        }
        let mut current = self.boot.ntp.lock().unwrap_or_else(|e| e.into_inner());
        if *current != ntp {
            tracing::info!(servers = ?ntp, "NTP servers changed: syncing");
            *current = ntp;
            let _ = self.boot.ntp_kick.send(());
        }
    }

    /// The manifest's `[storage]` rule: a RAM-only node takes the named
    /// disk. What the disk already records wins where it is stronger (a
    /// higher applied version, an existing node key); what this boot
    /// recorded in RAM moves there otherwise. Returns the disk's last known
    /// good manifest when it is newer than `m` (that is what runs then).
    fn apply_storage(&mut self, m: &Manifest) -> Option<Manifest> {
        match self.boot.volume.adopt(&m.storage) {
            Ok(true) => {
                tracing::info!(device = ?self.boot.volume.device, "state volume from the manifest's rule mounted");
                self.storage_error = None;
                crate::logs::start_own_log();
                match self.boot.records.stored_key() {
                    Some(k) => self.boot.node_key = Some(k),
                    None => {
                        if let Some(k) = &self.boot.node_key {
                            self.boot.records.save_key(k);
                        }
                    }
                }
                let ours = self.boot.applied.as_ref().map_or(0, |a| a.version);
                match (
                    self.boot.records.applied(),
                    self.boot.records.last_known_good(),
                ) {
                    (Some(disk), Some(bytes)) if disk.version > ours => {
                        tracing::warn!(disk = disk.version, running = ours, "the adopted volume records a newer applied version: it is the floor now");
                        self.boot.applied = Some(disk.clone());
                        match cairn_manifest::verify_stored(
                            &bytes,
                            &self.boot.trust,
                            &self.boot.node,
                            &disk,
                        ) {
                            Ok(newer) => {
                                self.boot.manifest_source = "disk";
                                return Some(newer);
                            }
                            Err(rej) => {
                                self.storage_error = Some(format!(
                                    "the adopted volume's manifest is not usable: {rej}"
                                ));
                            }
                        }
                    }
                    _ => {
                        if let (Some(a), Some(b)) =
                            (self.boot.applied.clone(), self.last_bytes.clone())
                        {
                            self.record_applied(&a, &b);
                        }
                    }
                }
            }
            Ok(false) => self.storage_error = None,
            Err(e) => {
                if self.storage_error.as_deref() != Some(e.as_str()) {
                    tracing::error!("storage rule not applied: {e}");
                }
                self.storage_error = Some(e);
            }
        }
        None
    }

    /// Records the applied version and manifest; a failure is reported
    /// (after a reboot an older manifest could be accepted again).
    fn record_applied(&mut self, applied: &Applied, bytes: &[u8]) {
        self.records_error = match self.boot.records.save_applied(applied, bytes) {
            Ok(()) => None,
            Err(e) => {
                let msg = format!("applied version {} not recorded ({e}): after a reboot an older manifest could be accepted again", applied.version);
                tracing::error!("{msg}");
                Some(msg)
            }
        };
    }

    /// The manifest's `[os]`: install another version into the inactive
    /// boot slot and reboot into it (disk), or reboot once (netboot).
    fn apply_os(&mut self, m: &Manifest) {
        let Some(os) = m.os.clone() else {
            return;
        };
        let b = &self.boot.os;
        // One install (and its reboot) at a time, whatever the manifest
        // says meanwhile.
        let busy = b.state.lock().unwrap_or_else(|e| e.into_inner()).0.clone();
        if busy.starts_with("installing") || busy.starts_with("rebooting") {
            return;
        }
        if b.running.as_deref() == Some(os.version.as_str()) {
            b.set(format!("running {}", os.version), None);
            return;
        }
        let Some(dev) = b.esp.clone() else {
            // Netbooted (or a full ISO): what boots is the boot server's choice.
            if self.boot.volume.device.is_none() {
                b.set("idle", Some(format!("version {} requested, but a node without a state volume cannot remember that it rebooted for it: not rebooting", os.version)));
                return;
            }
            if self.boot.records.os_reboot_for().as_deref() == Some(os.version.as_str()) {
                b.set("idle", Some(format!("rebooted for version {} but booted {} again: the boot server still serves the old version (or this medium has no boot slots, like the full ISO)", os.version, b.running.as_deref().unwrap_or("an unversioned image"))));
                return;
            }
            if let Err(e) = self.boot.records.save_os_reboot_for(&os.version) {
                b.set(
                    "idle",
                    Some(format!(
                        "not rebooting for version {}: recording it failed: {e}",
                        os.version
                    )),
                );
                return;
            }
            b.set(format!("rebooting for {}", os.version), None);
            // SAFETY: signalling ourselves; PID 1 reboots cleanly.
            unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
            return;
        };
        if b.failed.contains(&os.version) {
            b.set(
                "idle",
                Some(format!(
                    "version {} did not come up and the node fell back to {}; it is not tried again: publish another version",
                    os.version,
                    b.running.as_deref().unwrap_or("?")
                )),
            );
            return;
        }
        let Some(running) = b.running.clone() else {
            b.set(
                "idle",
                Some(
                    "this boot entry names no cairn.os= version: an update would leave no fallback"
                        .into(),
                ),
            );
            return;
        };
        if b.unbooted.contains(&os.version) {
            b.set(
                "idle",
                Some(format!(
                    "version {} was installed but the boot loader booted {running} again; not retried: publish another version",
                    os.version
                )),
            );
            return;
        }
        // The running version is on trial: replacing the other slot now
        // would delete the last version known to work.
        if b.trial && !b.marked.load(std::sync::atomic::Ordering::SeqCst) {
            b.set(
                format!(
                    "waiting for {running} to come up before installing {}",
                    os.version
                ),
                None,
            );
            return;
        }
        let cmdline = os.cmdline.clone().unwrap_or_else(|| b.cmdline.clone());
        let sort = m.version;
        b.set(format!("installing {}", os.version), None);
        let state = b.state.clone();
        let spawned = std::thread::Builder::new()
            .name("os-install".into())
            .spawn(move || {
                let r = crate::osupdate::Esp::mount(&dev)
                    .and_then(|esp| esp.install(&os, &cmdline, &running, sort));
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(()) => {
                        tracing::warn!(version = %os.version, fallback = %running, "OS version installed for one try: rebooting");
                        *st = (format!("rebooting into {}", os.version), None);
                        // SAFETY: signalling ourselves; PID 1 reboots cleanly.
                        unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
                    }
                    Err(e) => {
                        tracing::error!(version = %os.version, "OS update failed: {e}");
                        *st = ("idle".into(), Some(format!("installing {}: {e}", os.version)));
                    }
                }
            });
        if let Err(e) = spawned {
            b.set(
                "idle",
                Some(format!("cannot start the installer thread: {e}")),
            );
        }
    }

    /// A trial boot that came up (a manifest applied, every workload
    /// started) keeps its boot entry for good.
    fn check_os_good(&mut self) {
        let os = &self.boot.os;
        if !os.trial || os.marked.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // Up: a manifest applied and every workload's process started at
        // least once. A workload that then exits (a one-shot job) or
        // crash-loops is its own problem, not the OS's: it must not roll
        // every update back.
        let up = self.boot.manifest.is_some() && self.slots.values().all(|s| s.started_once);
        if !up {
            return;
        }
        let (Some(dev), Some(v)) = (os.esp.clone(), os.running.clone()) else {
            return;
        };
        match crate::osupdate::Esp::mount(&dev).and_then(|esp| esp.mark_good(&v)) {
            Ok(_) => {
                os.marked.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!(version = %v, "this OS version came up: its boot entry is kept");
                os.set(format!("running {v}"), None);
                // An update deferred during the trial can go ahead now.
                if let Some(m) = self.boot.manifest.clone() {
                    self.apply_os(&m);
                }
            }
            Err(e) => {
                // Not retried in a loop: the next manifest or boot tries again.
                os.marked.store(true, std::sync::atomic::Ordering::SeqCst);
                os.set("idle", Some(format!("{e}; this version stays on trial")));
            }
        }
    }

    /// A manifest's one-off reboot or power-off. Only with a state volume:
    /// a RAM-only node could not remember it already obeyed, and would
    /// reboot forever.
    fn apply_power(&mut self, m: &Manifest) {
        let Some(p) = &m.power else {
            return;
        };
        let done = self.boot.records.power_done();
        if p.id <= done {
            return;
        }
        if self.boot.volume.device.is_none() {
            self.storage_error = Some(format!(
                "power request {} ({}) not carried out: a node without a state volume cannot remember it did",
                p.id, p.action
            ));
            return;
        }
        if let Err(e) = self.boot.records.save_power_done(p.id) {
            self.storage_error = Some(format!(
                "power request {} not carried out: recording it failed: {e}",
                p.id
            ));
            return;
        }
        tracing::warn!(id = p.id, action = %p.action, "{} requested by the manifest", p.action);
        let sig = if p.action == "reboot" {
            libc::SIGINT
        } else {
            libc::SIGPWR
        };
        // SAFETY: signalling ourselves; PID 1's signal loop turns it into a
        // clean shutdown (workloads stopped, volume unmounted).
        unsafe { libc::kill(libc::getpid(), sig) };
    }

    fn apply(&mut self, m: Manifest) {
        self.gc_due = true;
        let m = self.apply_storage(&m).unwrap_or(m);
        self.apply_power(&m);
        self.apply_os(&m);
        self.apply_node_network(&m);
        self.ensure_net(&m.network.workload_subnet);
        if let Some(net) = self.boot.net.as_mut() {
            net.set_isolated(
                m.network.workload_reachability == cairn_manifest::Reachability::Isolated,
            );
        }
        self.unsupported = m
            .vms
            .iter()
            .map(|v| (v.name.clone(), "vm"))
            .chain(m.functions.iter().map(|f| (f.name.clone(), "function")))
            .collect();
        for (name, kind) in &self.unsupported {
            tracing::error!(workload = %name, kind, "{kind} workloads are not supported by this build yet");
        }
        let longest = m
            .containers
            .iter()
            .map(|c| u64::from(c.stop_timeout_s))
            .max()
            .unwrap_or(10);
        pid1::MAX_STOP_S.store(longest, std::sync::atomic::Ordering::SeqCst);
        let desired: Vec<Arc<dyn Workload>> = m
            .containers
            .iter()
            .map(|c| Arc::new(Container::new(c.clone())) as Arc<dyn Workload>)
            .collect();
        let gone: Vec<String> = self
            .slots
            .keys()
            .filter(|n| !desired.iter().any(|w| w.name() == n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            tracing::info!(workload = %n, "removed from the manifest: stopping");
            self.stop(&n, true, None);
        }
        for w in &desired {
            match self.slots.get_mut(w.name()) {
                // Already on its way out (removed or replaced by an earlier
                // version): whatever it was going to become, it now becomes
                // this definition once the old process is gone.
                Some(s) if matches!(s.state, State::Stopping { .. }) => {
                    s.remove = false;
                    s.replacement = Some(w.clone());
                }
                Some(s) if s.w.fingerprint() == w.fingerprint() => {}
                Some(_) => {
                    tracing::info!(workload = %w.name(), "definition changed: replacing");
                    self.stop(w.name(), false, Some(w.clone()));
                }
                None => self.add(w.clone()),
            }
        }
        self.publish_ports(&desired);
        if let Some(net) = self.boot.net.as_mut() {
            let names: Vec<&str> = desired.iter().map(|w| w.name()).collect();
            if let Err(e) = net.publish_names(&names) {
                tracing::error!(error = %e, "workload names not published");
            }
        }
        self.boot.manifest = Some(m);
    }

    /// Publishes ports with nftables DNAT (and masquerade for everything
    /// leaving the workload subnet). Without nf_tables in the kernel, TCP
    /// ports fall back to a userspace forwarder and outbound NAT is missing;
    /// both are said loudly.
    fn publish_ports(&mut self, desired: &[Arc<dyn Workload>]) {
        let Some(net) = self.boot.net.as_mut() else {
            return;
        };
        let mut dnat = Vec::new();
        for w in desired {
            let addr = match net.address_of(w.name()) {
                Ok((a, _)) => a,
                Err(e) => {
                    tracing::error!(workload = %w.name(), error = %e, "no address");
                    continue;
                }
            };
            for p in w.ports() {
                let proto = if p.protocol == "udp" { 17 } else { 6 };
                dnat.push(net::nft::Dnat {
                    proto,
                    port: p.host,
                    to: addr,
                    to_port: p.container,
                });
            }
        }
        match net.apply_nat(dnat.clone()) {
            Ok(()) => {
                self.nat_error = None;
                self.boot.proxies.retain(&[]);
                for d in &dnat {
                    tracing::info!(port = d.port, proto = d.proto, to = %SocketAddrV4::new(d.to, d.to_port), "published (nftables DNAT)");
                }
            }
            Err(e) => {
                let msg = format!("nftables NAT failed ({e}); tcp ports use a userspace forwarder, udp ports and outbound NAT are unavailable");
                tracing::error!("{msg}");
                self.nat_error = Some(msg);
                let mut keep = Vec::new();
                for d in dnat.iter().filter(|d| d.proto == 6) {
                    match self
                        .boot
                        .proxies
                        .ensure(d.port, SocketAddrV4::new(d.to, d.to_port))
                    {
                        Ok(()) => keep.push(d.port),
                        Err(e) => tracing::error!(port = d.port, error = %e, "cannot publish port"),
                    }
                }
                self.boot.proxies.retain(&keep);
            }
        }
    }

    fn add(&mut self, w: Arc<dyn Workload>) {
        let gen = self.boot.next_gen;
        self.boot.next_gen += 1;
        let name = w.name().to_string();
        self.slots.insert(
            name.clone(),
            Slot {
                w,
                gen,
                state: State::Preparing,
                prepared: false,
                restarts: 0,
                consecutive_failures: 0,
                last_exit: None,
                error: None,
                address: None,
                remove: false,
                replacement: None,
                answering: false,
                started_once: false,
                health_alive: None,
                health_state: "starting",
                health_failures: 0,
                health_error: None,
                unhealthy_restarts: 0,
                oom_kills: 0,
                oom_baseline: 0,
                killed_unhealthy: false,
            },
        );
        self.prepare(&name);
    }

    fn prepare(&mut self, name: &str) {
        let Some(s) = self.slots.get_mut(name) else {
            return;
        };
        s.state = State::Preparing;
        let (w, gen, tx) = (s.w.clone(), s.gen, self.tx.clone());
        let name = name.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("prep-{name}"))
            .spawn(move || {
                let result = catch_unwind(AssertUnwindSafe(|| w.prepare()))
                    .unwrap_or_else(|_| Err("preparation panicked (bug); will retry".to_string()));
                let _ = tx.send(Event::Prepared { name, gen, result });
            });
    }

    fn on_prepared(&mut self, name: &str, gen: u64, result: Result<String, String>) -> bool {
        // Only the preparation this slot is waiting for counts: a late
        // result for an older generation or a slot that moved on is dropped.
        let Some(s) = self
            .slots
            .get_mut(name)
            .filter(|s| s.gen == gen && matches!(s.state, State::Preparing))
        else {
            return false;
        };
        match result {
            Ok(msg) => {
                tracing::info!(workload = %name, "{msg}");
                s.prepared = true;
                s.error = None;
                s.consecutive_failures = 0;
                self.start(name);
            }
            Err(e) => {
                s.consecutive_failures += 1;
                let delay = Duration::from_secs(1 << s.consecutive_failures.min(6))
                    .min(Duration::from_secs(60));
                tracing::error!(workload = %name, retry_s = delay.as_secs(), "preparing failed: {e}");
                s.error = Some(e);
                s.state = State::Backoff {
                    until: Instant::now() + delay,
                };
            }
        }
        true
    }

    fn start(&mut self, name: &str) {
        if self.shutting_down {
            return;
        }
        if self.boot.net.is_none() {
            if let Some(subnet) = self
                .boot
                .manifest
                .as_ref()
                .map(|m| m.network.workload_subnet.clone())
            {
                self.ensure_net(&subnet);
            }
        }
        let net_error = self.boot.net_error.clone();
        let Some(s) = self.slots.get_mut(name) else {
            return;
        };
        let Some(net) = self.boot.net.as_mut() else {
            s.error = Some(net_error.unwrap_or_else(|| "the workload network is not up".into()));
            s.state = State::Backoff {
                until: Instant::now() + Duration::from_secs(5),
            };
            return;
        };
        match s.w.start(net) {
            Ok(st) => {
                tracing::info!(workload = %name, kind = s.w.kind(), pid = st.pid, address = %st.address, "started");
                timeline::mark(
                    "workload-started",
                    &format!("{name} started (pid {})", st.pid),
                );
                s.state = State::Running {
                    pid: st.pid,
                    since: Instant::now(),
                };
                s.address = Some(st.address);
                s.error = None;
                s.answering = false;
                s.started_once = true;
                s.oom_baseline = s.w.oom_kills();
                s.killed_unhealthy = false;
                s.health_error = None;
                if let Some(h) = s.w.health() {
                    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
                    let (tx, n, gen, pid) = (self.tx.clone(), name.to_string(), s.gen, st.pid);
                    crate::health::spawn(name, h, st.address, alive.clone(), move |result| {
                        tx.send(Event::Health {
                            name: n.clone(),
                            gen,
                            pid,
                            result,
                        })
                        .is_ok()
                    });
                    if let Some(old) = s.health_alive.replace(alive) {
                        old.store(false, std::sync::atomic::Ordering::SeqCst);
                    }
                    s.health_state = "starting";
                    s.health_failures = 0;
                }
                // Probed the way clients come: the published port on the
                // node's own address (DNAT from the node itself).
                if let Some(p) = s.w.ports().into_iter().find(|p| p.protocol == "tcp") {
                    spawn_answer_probe(
                        name.to_string(),
                        s.gen,
                        SocketAddrV4::new(self.boot.uplink.address, p.host),
                        self.tx.clone(),
                    );
                }
            }
            Err(e) => {
                s.consecutive_failures += 1;
                let delay = restart_delay(s.consecutive_failures);
                tracing::error!(workload = %name, retry_ms = delay.as_millis() as u64, "start failed: {e}");
                s.error = Some(e);
                s.state = State::Backoff {
                    until: Instant::now() + delay,
                };
            }
        }
    }

    /// Asks a workload to stop (SIGTERM, then the whole cgroup killed after
    /// a timeout). With `remove` the slot goes away; with a replacement the
    /// new definition starts once the old one is gone.
    fn stop(&mut self, name: &str, remove: bool, replacement: Option<Arc<dyn Workload>>) {
        let Some(s) = self.slots.get_mut(name) else {
            return;
        };
        s.remove = remove;
        s.replacement = replacement;
        if let Some(a) = s.health_alive.take() {
            a.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        match s.state {
            State::Running { pid, .. } => {
                let (sig, timeout) = s.w.stop_signal();
                // SAFETY: signalling a child we started.
                unsafe { libc::kill(pid as i32, sig) };
                s.state = State::Stopping {
                    pid,
                    deadline: Instant::now() + timeout,
                    killed: false,
                };
            }
            State::Stopping { .. } => {}
            _ => self.finish_stop(name),
        }
    }

    fn finish_stop(&mut self, name: &str) {
        let Some(s) = self.slots.get_mut(name) else {
            return;
        };
        if let Some(new) = s.replacement.take() {
            s.w.cleanup();
            self.slots.remove(name);
            self.add(new);
        } else if s.remove || self.shutting_down {
            s.w.cleanup();
            self.slots.remove(name);
        } else {
            s.w.kill();
            s.state = State::Exited;
        }
    }

    fn on_exit(&mut self, pid: i32, status: i32) -> bool {
        let pid = pid as u32;
        let found = self.slots.iter().find_map(|(n, s)| match s.state {
            State::Running { pid: p, .. } | State::Stopping { pid: p, .. } if p == pid => {
                Some(n.clone())
            }
            _ => None,
        });
        let Some(name) = found else {
            tracing::debug!(pid, "reaped an orphan");
            return false;
        };
        let (mut what, success) = describe_exit(status);
        let s = self.slots.get_mut(&name).expect("found above");
        // The kernel's OOM killer leaves a count in the cgroup, not in
        // the exit status: compare it with what was seen before.
        let ooms = s.w.oom_kills();
        if ooms > s.oom_baseline {
            what = format!("{what}; OOM-killed (its memory limit was reached)");
            s.oom_kills += ooms - s.oom_baseline;
            tracing::error!(workload = %name, oom_kills = s.oom_kills, "out of memory: the kernel killed it");
            s.oom_baseline = ooms;
        }
        let unhealthy = std::mem::take(&mut s.killed_unhealthy);
        if unhealthy {
            what = format!("{what}; killed by PID 1: its health check failed");
        }
        s.last_exit = Some(what.clone());
        if let Some(a) = s.health_alive.take() {
            a.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        if let State::Stopping { .. } = s.state {
            tracing::info!(workload = %name, pid, "stopped: {what}");
            self.finish_stop(&name);
            return true;
        }
        let ran = match s.state {
            State::Running { since, .. } => since.elapsed(),
            _ => Duration::ZERO,
        };
        // Clean up whatever the workload left behind in its cgroup.
        s.w.kill();
        let (policy, max) = s.w.restart_policy();
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success && (max == 0 || s.restarts < max),
            RestartPolicy::Never => false,
        };
        if !restart {
            tracing::warn!(workload = %name, pid, "{what}; not restarting (policy {policy:?})");
            s.state = State::Exited;
            return true;
        }
        // A long run resets the backoff, unless it ended because it never
        // became (or stopped being) healthy: that is a crash loop too.
        s.consecutive_failures = if ran > Duration::from_secs(10) && !unhealthy {
            1
        } else {
            s.consecutive_failures + 1
        };
        let delay = restart_delay(s.consecutive_failures);
        s.restarts += 1;
        tracing::warn!(workload = %name, pid, restarts = s.restarts, delay_ms = delay.as_millis() as u64, "{what}; restarting");
        s.state = State::Backoff {
            until: Instant::now() + delay,
        };
        true
    }

    fn tick(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for n in names {
            let Some(s) = self.slots.get_mut(&n) else {
                continue;
            };
            match s.state {
                State::Backoff { until } if until <= now => {
                    changed = true;
                    if s.prepared {
                        self.start(&n);
                    } else {
                        self.prepare(&n);
                    }
                }
                State::Stopping {
                    pid,
                    deadline,
                    killed: false,
                } if deadline <= now => {
                    tracing::warn!(workload = %n, pid, "did not stop in time: killing its cgroup");
                    s.w.kill();
                    s.state = State::Stopping {
                        pid,
                        deadline: now + Duration::from_secs(5),
                        killed: true,
                    };
                    changed = true;
                }
                _ => {}
            }
        }
        if now.duration_since(self.space_checked) > Duration::from_secs(30) {
            self.space_checked = now;
            let st = self.boot.volume.status();
            let (total, free) = (
                st["total_bytes"].as_u64().unwrap_or(0),
                st["free_bytes"].as_u64().unwrap_or(0),
            );
            if total > 0 && free < total / 10 {
                tracing::warn!(
                    free,
                    total,
                    "state volume below 10 % free: collecting unused layers"
                );
                self.gc_due = true;
            }
        }
        if self.gc_due && !self.shutting_down && self.boot.manifest.is_some() {
            changed |= self.collect_garbage();
        }
        if self.shutting_down
            && !self
                .slots
                .values()
                .any(|s| matches!(s.state, State::Running { .. } | State::Stopping { .. }))
        {
            pid1::AGENT_STOPPED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        changed
    }

    /// Removes layers and blobs no workload needs, once no pull or stop is
    /// in flight (a stopping container may still have its layers mounted).
    fn collect_garbage(&mut self) -> bool {
        let busy = self
            .slots
            .values()
            .any(|s| matches!(s.state, State::Preparing | State::Stopping { .. }));
        // Slots are not enough: a workload removed while preparing leaves
        // its pull thread running.
        if busy || crate::oci::pulls_in_flight() > 0 {
            return false;
        }
        self.gc_due = false;
        let in_use: Vec<String> = self.slots.values().flat_map(|s| s.w.images()).collect();
        let t = Instant::now();
        let (removed, bytes) = crate::oci::Store::new(crate::container::STATE_ROOT).gc(&in_use);
        if removed > 0 {
            tracing::info!(
                removed,
                bytes,
                ms = t.elapsed().as_millis() as u64,
                "unused layers and blobs removed"
            );
        }
        self.last_gc = json!({ "removed": removed, "bytes": bytes, "at": now_unix() });
        removed > 0
    }

    fn push_status(&self) {
        let _ = self.boot.status_tx.send(self.status());
    }

    fn status(&self) -> Value {
        let mut workloads: Vec<Value> = self
            .slots
            .iter()
            .map(|(n, s)| {
                json!({
                    "name": n,
                    "kind": s.w.kind(),
                    "state": s.state.name(),
                    "pid": match s.state { State::Running { pid, .. } | State::Stopping { pid, .. } => Some(pid), _ => None },
                    "restarts": s.restarts,
                    "oom_kills": s.oom_kills,
                    "last_exit": s.last_exit,
                    "error": s.error,
                    "address": s.address.map(|a| a.to_string()),
                    "answering": s.answering,
                    "health": s.w.health().map(|h| json!({
                        "kind": h.kind,
                        "state": s.health_state,
                        "failures": s.health_failures,
                        "last_error": s.health_error,
                        "unhealthy_restarts": s.unhealthy_restarts,
                    })),
                })
            })
            .collect();
        for (n, kind) in &self.unsupported {
            workloads.push(json!({
                "name": n, "kind": kind, "state": "unsupported",
                "error": format!("{kind} workloads are not supported by this build yet"),
            }));
        }
        let up = &self.boot.uplink;
        let interfaces = up.config.status(&self.boot.nl);
        // The primary IPv4 address first; then whatever else the uplinks
        // have (SLAAC IPv6 from the kernel, link-local, other leases).
        let primary = format!("{}/{}", up.address, up.prefix);
        let mut addresses = vec![primary.clone()];
        for i in &interfaces {
            for a in i["addresses"].as_array().into_iter().flatten() {
                if let Some(a) = a.as_str().filter(|a| *a != primary) {
                    addresses.push(a.to_string());
                }
            }
        }
        let mut storage = self.boot.volume.status();
        storage["last_gc"] = self.last_gc.clone();
        json!({
            "node": self.boot.node,
            "boot_id": self.boot.boot_id,
            "uptime_ms": timeline::boot_ms(),
            "clock": now_unix(),
            "hub": self.boot.hub,
            "addresses": addresses,
            "addressing": up.source,
            "time": *self.boot.time.lock().unwrap_or_else(|e| e.into_inner()),
            "interfaces": interfaces,
            "interface": self.boot.uplink.iface,
            "mac": net::fmt_mac(&self.boot.uplink.mac),
            "trusted_keys": self.boot.trust.ids().iter().map(|k| k.0.clone()).collect::<Vec<_>>(),
            "errors": self.boot.cmdline_errors.iter().chain(self.boot.trust_errors.iter()).chain(self.nat_error.iter())
                .chain(self.boot.net_error.iter()).chain(self.network_errors.iter()).chain(self.storage_error.iter()).chain(self.records_error.iter()).collect::<Vec<_>>(),
            "storage": storage,
            "node_key": self.boot.node_key.as_ref().map(|k| json!({
                "id": k.id().0,
                "public": hex::encode(k.verifying_key().as_bytes()),
            })),
            "manifest": {
                "source": self.boot.manifest_source,
                "applied_version": self.boot.applied.as_ref().map(|a| a.version),
                "state": self.manifest_state,
                "error": self.manifest_error.as_ref().map(|e| e.1.clone()),
                "error_code": self.manifest_error.as_ref().map(|e| e.0.clone()),
                "hub_error": self.hub_error,
                "expires_at": self.boot.manifest.as_ref().map(|m| m.expires_at),
                // Still running a manifest whose expiry has passed (the hub
                // has nothing newer for us): reported, never silently.
                "stale": self.boot.manifest.as_ref().map(|m| now_unix() > m.expires_at),
            },
            "timeline": timeline::phases(),
            "os": self.boot.os.status(),
            "kernel": {
                "release": crate::modules::release(),
                "modules_loaded": crate::modules::loaded_count(),
            },
            "workloads": workloads,
        })
    }
}

fn spawn_answer_probe(name: String, gen: u64, to: SocketAddrV4, tx: Sender<Event>) {
    let _ = std::thread::Builder::new()
        .name(format!("probe-{name}"))
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect_timeout(&to.into(), Duration::from_millis(200))
                    .is_ok()
                {
                    let _ = tx.send(Event::Answering { name, gen });
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_grows_and_caps() {
        assert_eq!(restart_delay(1), Duration::from_millis(100));
        assert_eq!(restart_delay(2), Duration::from_millis(200));
        assert_eq!(restart_delay(4), Duration::from_millis(800));
        assert_eq!(restart_delay(50), Duration::from_secs(30));
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(3 << 8),
            ("exited with status 3".to_string(), false)
        );
        assert_eq!(describe_exit(0), ("exited with status 0".to_string(), true));
        assert_eq!(describe_exit(9), ("killed by signal 9".to_string(), false));
    }
}
