//! The netboot ISO: Debian's iPXE (`ipxe.lkrn`) started by ISOLINUX with a
//! two-line script as its initrd: get an address, chain to the hub's
//! `/ipxe`. Hybrid (an MBR from isohdpfx.bin), so `dd` to a USB stick boots
//! too (BIOS). The hub URL is the only thing built in; everything else
//! comes from the hub (docs/netboot.md). xorriso writes the ISO with every
//! timestamp set to the build epoch.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Inputs from Debian packages (ipxe, isolinux, syslinux-common).
pub struct Inputs {
    /// `ipxe.lkrn`.
    pub ipxe: PathBuf,
    /// `isolinux.bin`.
    pub isolinux: PathBuf,
    /// `ldlinux.c32`.
    pub ldlinux: PathBuf,
    /// `isohdpfx.bin` (hybrid MBR).
    pub mbr: PathBuf,
}

impl Inputs {
    /// Debian's paths; names the package when a file is missing.
    pub fn debian() -> Result<Inputs, String> {
        let find = |candidates: &[&str], package: &str| -> Result<PathBuf, String> {
            candidates
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    format!(
                        "{} not found: install the Debian package {package}",
                        candidates[0]
                    )
                })
        };
        Ok(Inputs {
            ipxe: find(&["/usr/lib/ipxe/ipxe.lkrn", "/boot/ipxe.lkrn"], "ipxe")?,
            isolinux: find(&["/usr/lib/ISOLINUX/isolinux.bin"], "isolinux")?,
            ldlinux: find(
                &["/usr/lib/syslinux/modules/bios/ldlinux.c32"],
                "syslinux-common",
            )?,
            mbr: find(&["/usr/lib/ISOLINUX/isohdpfx.bin"], "isolinux")?,
        })
    }
}

/// The iPXE script built into the ISO.
pub fn script(hub: &str) -> String {
    format!(
        "#!ipxe\n# cairn netboot ISO: get an address, then let the hub say what to boot.\n:retry\ndhcp && chain {hub}/ipxe || goto wait\n:wait\necho cairn: {hub}/ipxe not reachable; retrying in 10 s\nsleep 10\ngoto retry\n"
    )
}

/// Checks `hub` is an `http://host[:port]` URL iPXE can use verbatim.
pub fn check_hub(hub: &str) -> Result<(), String> {
    let rest = hub.strip_prefix("http://").ok_or_else(|| {
        format!("{hub:?}: the netboot ISO needs an http:// hub URL (Debian's iPXE has no HTTPS)")
    })?;
    if rest.is_empty()
        || !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:-[]".contains(&b))
    {
        return Err(format!("{hub:?}: expected http://host[:port] with no path"));
    }
    Ok(())
}

/// Builds the ISO at `out`.
pub fn build(inputs: &Inputs, hub: &str, epoch: u64, out: &Path) -> Result<(), String> {
    check_hub(hub)?;
    let stage = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = stage.path();
    let iso_dir = root.join("isolinux");
    std::fs::create_dir_all(&iso_dir).map_err(|e| e.to_string())?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map(drop)
            .map_err(|e| format!("{}: {e}", from.display()))
    };
    copy(&inputs.isolinux, &iso_dir.join("isolinux.bin"))?;
    copy(&inputs.ldlinux, &iso_dir.join("ldlinux.c32"))?;
    copy(&inputs.ipxe, &root.join("ipxe.lkrn"))?;
    std::fs::write(root.join("cairn.ipxe"), script(hub)).map_err(|e| e.to_string())?;
    std::fs::write(
        iso_dir.join("isolinux.cfg"),
        "DEFAULT cairn\nPROMPT 0\nTIMEOUT 0\nLABEL cairn\n  KERNEL /ipxe.lkrn\n  INITRD /cairn.ipxe\n",
    )
    .map_err(|e| e.to_string())?;
    // Every staged file and directory carries the build epoch (xorriso
    // records mtimes): identical inputs give an identical ISO.
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let times = std::fs::FileTimes::new().set_modified(t).set_accessed(t);
    for p in [
        iso_dir.join("isolinux.bin"),
        iso_dir.join("ldlinux.c32"),
        iso_dir.join("isolinux.cfg"),
        root.join("ipxe.lkrn"),
        root.join("cairn.ipxe"),
        iso_dir.clone(),
        root.to_path_buf(),
    ] {
        std::fs::File::open(&p)
            .and_then(|f| f.set_times(times))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let o = Command::new("xorriso")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-R",
            "-J",
            "-V",
            "CAIRN_NETBOOT",
        ])
        .args(["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat"])
        .args(["-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"])
        .arg("-isohybrid-mbr")
        .arg(&inputs.mbr)
        .arg("-o")
        .arg(out)
        .arg(root)
        .output()
        .map_err(|e| format!("running xorriso (Debian package xorriso): {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "xorriso failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_chains_to_the_hub_and_retries() {
        let s = script("http://10.0.0.1:7400");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("dhcp && chain http://10.0.0.1:7400/ipxe || goto wait"));
        assert!(s.contains("goto retry"));
        assert!(check_hub("http://10.0.0.1:7400").is_ok());
        assert!(check_hub("https://hub").unwrap_err().contains("no HTTPS"));
        assert!(check_hub("http://hub/x").unwrap_err().contains("no path"));
        assert!(check_hub("http://hub;shell").is_err());
    }
}
