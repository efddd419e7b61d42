//! Boot timeline and console log format.
//!
//! Every phase is stamped with milliseconds since the kernel started
//! (`CLOCK_BOOTTIME`), logged on the console and kept for the status report.

use std::sync::Mutex;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Milliseconds since the kernel started.
pub fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// One stamped phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    /// Name, e.g. `address`.
    pub phase: String,
    /// Milliseconds since kernel start.
    pub ms: u64,
}

static PHASES: Mutex<Vec<Phase>> = Mutex::new(Vec::new());

/// Records a phase (first occurrence wins, so re-runs don't move it) and logs it.
pub fn mark(phase: &str, detail: &str) {
    let ms = boot_ms();
    let mut p = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    if !p.iter().any(|x| x.phase == phase) {
        p.push(Phase {
            phase: phase.to_string(),
            ms,
        });
    }
    drop(p);
    tracing::info!(phase, t_ms = ms, "boot phase: {detail}");
}

/// The phases so far.
pub fn phases() -> Vec<Phase> {
    PHASES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Console timestamps like the kernel's: seconds since boot.
pub struct BootTime;

impl FormatTime for BootTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let ms = boot_ms();
        write!(w, "[{:5}.{:03}]", ms / 1000, ms % 1000)
    }
}

/// Sets up `tracing` to the console (stderr).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_timer(BootTime)
        .with_target(false)
        .with_ansi(false)
        .with_writer(|| crate::logs::Tee)
        .try_init();
}
