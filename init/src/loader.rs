//! Loader mode (`cairn.mode=loader`): verified netboot. The same kernel and
//! PID 1, booted from a small ISO or USB stick, get an address, fetch this
//! node's signed manifest from the hub, check it against the keys baked
//! into the image, fetch the kernel and initramfs its `[os]` names, check
//! both against the manifest's sha256, and `kexec_file_load` into them.
//! Nothing unverified runs: a tampered artifact (or a manifest that fails
//! its checks) is refused with the reason, and the loader asks again.
//!
//! Unlike iPXE over plain HTTP, this path does not trust the boot network:
//! the trust root is the image's baked-in keys.

use crate::cmdline::Config;
use crate::supervisor::{clock_floor, load_trust, node_id, now_unix, sync_time, BUILD_EPOCH};
use cairn_manifest::{verify, verify_stored, Applied, Decision, OsSpec};
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How long to wait before asking the hub again after a refusal.
const RETRY: Duration = Duration::from_secs(5);

/// The kernel command line for the loaded OS: the manifest's, else the
/// loader's own without `cairn.mode=loader`; `cairn.os=` names the version.
pub fn next_cmdline(loader_cmdline: &str, os: &OsSpec) -> String {
    let base = os.cmdline.clone().unwrap_or_else(|| {
        crate::osupdate::base_cmdline(loader_cmdline)
            .split_whitespace()
            .filter(|w| *w != "cairn.mode=loader")
            .collect::<Vec<_>>()
            .join(" ")
    });
    format!("{base} cairn.os={}", os.version)
}

/// One attempt: the verified OS, ready to load, or why not. `applied` is
/// the version this machine's state volume has applied: an older manifest
/// (a replayed one naming an old, perhaps vulnerable OS) is refused.
fn fetch_verified(
    cfg: &Config,
    node: &str,
    applied: Option<&Applied>,
) -> Result<(OsSpec, Vec<u8>, Vec<u8>), String> {
    let (trust, _) = load_trust(cfg);
    let hub = cfg
        .hub
        .as_deref()
        .ok_or("loader mode needs cairn.hub= on the command line")?;
    let bytes = crate::hub::fetch_manifest(hub, node)?;
    let m = match (verify(&bytes, &trust, node, now_unix(), applied), applied) {
        (Ok((Decision::Apply(m), _)), _) => *m,
        // The manifest the node applied last: boot what it names.
        (Ok((Decision::Unchanged, _)), Some(a)) => verify_stored(&bytes, &trust, node, a)
            .map_err(|rej| format!("manifest refused: {rej}"))?,
        (Ok((Decision::Unchanged, _)), None) => return Err("manifest unchanged".into()),
        (Err(rej), _) => return Err(format!("manifest refused: {rej}")),
    };
    let os = m.os.clone().ok_or(format!(
        "manifest version {} has no [os] section: nothing to boot",
        m.version
    ))?;
    let kernel = crate::osupdate::fetch(&os.kernel, "kernel")?;
    let initrd = crate::osupdate::fetch(&os.initramfs, "initramfs")?;
    tracing::info!(
        manifest = m.version,
        os = %os.version,
        kernel_bytes = kernel.len(),
        initrd_bytes = initrd.len(),
        "kernel and initramfs match the signed manifest"
    );
    Ok((os, kernel, initrd))
}

/// An anonymous in-memory file holding `bytes`.
fn memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let n = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name; the flags are valid.
    let fd = unsafe { libc::memfd_create(n.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(owned);
    f.write_all(bytes)?;
    Ok(f.into())
}

/// Loads the kernel and initramfs for kexec, then reboots into them.
fn kexec(kernel: &[u8], initrd: &[u8], cmdline: &str) -> std::io::Error {
    let (k, i) = match (memfd("kernel", kernel), memfd("initrd", initrd)) {
        (Ok(k), Ok(i)) => (k, i),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let c = match CString::new(cmdline) {
        Ok(c) => c,
        Err(e) => return std::io::Error::other(e),
    };
    let len = c.as_bytes_with_nul().len();
    // SAFETY: two open descriptors, a NUL-terminated command line and its
    // length including the NUL, as kexec_file_load(2) requires.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            k.as_raw_fd(),
            i.as_raw_fd(),
            len as libc::c_ulong,
            c.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return std::io::Error::last_os_error();
    }
    tracing::warn!(cmdline, "kexec into the verified OS");
    // SAFETY: sync has no preconditions; reboot(KEXEC) starts the loaded
    // kernel and only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    }
    std::io::Error::last_os_error()
}

/// The loader's whole life: never returns (it kexecs or keeps retrying).
pub fn run_forever(cfg: Config) {
    let epoch = std::fs::read_to_string(BUILD_EPOCH)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    clock_floor(epoch, "image build time");
    let hostname = cfg.node.clone().unwrap_or_else(|| "cairn-loader".into());
    let uplink =
        crate::net::bring_up_uplink(cfg.iface.as_deref(), &hostname, cfg.static_ip.as_ref());
    let node = node_id(&cfg, &uplink.mac);
    tracing::info!(node = %node, address = %uplink.address, "loader: address up");
    sync_time(&uplink.ntp);
    let own = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    // The machine's own anti-rollback floor, if it has a state volume.
    let applied = crate::state::read_only_applied();
    tracing::info!(applied = ?applied.as_ref().map(|a| a.version), "loader: applied version on this machine's state volume");
    loop {
        match fetch_verified(&cfg, &node, applied.as_ref()) {
            Ok((os, kernel, initrd)) => {
                let e = kexec(&kernel, &initrd, &next_cmdline(&own, &os));
                tracing::error!("loader: kexec failed: {e}");
            }
            Err(e) => tracing::error!("loader: {e}; asking again in {} s", RETRY.as_secs()),
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_manifest::Artifact;

    #[test]
    fn the_loaded_os_gets_the_loaders_command_line_and_its_version() {
        let a = Artifact {
            url: "http://h/k".into(),
            sha256: String::new(),
        };
        let mut os = OsSpec {
            version: "7".into(),
            kernel: a.clone(),
            initramfs: a,
            cmdline: None,
        };
        let own =
            "initrd=\\boot\\x console=ttyS0 cairn.mode=loader cairn.hub=http://h:1 cairn.node=n1";
        assert_eq!(
            next_cmdline(own, &os),
            "console=ttyS0 cairn.hub=http://h:1 cairn.node=n1 cairn.os=7"
        );
        os.cmdline = Some("console=ttyS1".into());
        assert_eq!(next_cmdline(own, &os), "console=ttyS1 cairn.os=7");
    }
}
