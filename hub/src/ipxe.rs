//! iPXE netboot: the chain script DHCP points at, and per-machine scripts
//! built from profiles matched by MAC (with a default). Templates live in
//! `ipxe/` at the top of the repository.

use crate::names::{check_boot_file, check_node};
use serde::{Deserialize, Serialize};

const CHAIN: &str = include_str!("../../ipxe/chain.ipxe");
const NODE: &str = include_str!("../../ipxe/node.ipxe");

/// What one machine (or every unknown one) boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Node id (`cairn.node=`); `None` = the node's hardware-derived id.
    #[serde(default)]
    pub node: Option<String>,
    /// Boot file name of the kernel.
    #[serde(default = "default_kernel")]
    pub kernel: String,
    /// Boot file name of the initramfs.
    #[serde(default = "default_initrd")]
    pub initrd: String,
    /// Extra kernel arguments.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
}

fn default_kernel() -> String {
    "bzImage".into()
}
fn default_initrd() -> String {
    "initramfs.cpio.zst".into()
}
fn default_cmdline() -> String {
    "console=ttyS0".into()
}

impl Default for Profile {
    fn default() -> Profile {
        Profile {
            node: None,
            kernel: default_kernel(),
            initrd: default_initrd(),
            cmdline: default_cmdline(),
        }
    }
}

impl Profile {
    /// Refuses what could not boot or would be expanded by iPXE.
    pub fn check(&self) -> Result<(), String> {
        if let Some(n) = &self.node {
            check_node(n).map_err(|e| e.to_string())?;
        }
        check_boot_file(&self.kernel).map_err(|e| format!("kernel: {e}"))?;
        check_boot_file(&self.initrd).map_err(|e| format!("initrd: {e}"))?;
        let bad = self
            .cmdline
            .chars()
            .find(|c| !(c.is_ascii_graphic() || *c == ' ') || *c == '$');
        if let Some(c) = bad {
            return Err(format!(
                "cmdline: character {c:?} is not allowed (printable ASCII, no '$')"
            ));
        }
        if self.cmdline.len() > 1024 {
            return Err("cmdline: longer than 1024 bytes".into());
        }
        if self
            .cmdline
            .split_whitespace()
            .any(|w| w.starts_with("cairn.hub=") || w.starts_with("cairn.node="))
        {
            return Err("cmdline: cairn.hub and cairn.node are set by the hub".into());
        }
        Ok(())
    }
}

/// `52:54:00:AB:cd:01` or `52-54-00-ab-cd-01` → `52-54-00-ab-cd-01`.
pub fn normalize_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| parts.join("-").to_ascii_lowercase())
}

/// The chain script, pointing back at `hub` (`http://host:port`).
pub fn chain_script(hub: &str) -> String {
    CHAIN.replace("{{hub}}", hub)
}

/// The script for machine `mac` booting `profile` (`which` names the
/// profile: the MAC's own or `default`).
pub fn node_script(hub: &str, mac: &str, which: &str, p: &Profile) -> String {
    let node_arg = p
        .node
        .as_ref()
        .map(|n| format!(" cairn.node={n}"))
        .unwrap_or_default();
    let who = p
        .node
        .clone()
        .unwrap_or_else(|| "a node with its hardware-derived id".into());
    NODE.replace("{{hub}}", hub)
        .replace("{{profile}}", which)
        .replace("{{mac}}", mac)
        .replace("{{who}}", &who)
        .replace("{{node_arg}}", &node_arg)
        .replace("{{kernel}}", &p.kernel)
        .replace("{{initrd}}", &p.initrd)
        .replace("{{cmdline}}", &p.cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_name_the_hub_the_node_and_the_files() {
        let c = chain_script("http://10.0.0.1:7400");
        assert!(c.starts_with("#!ipxe\n"));
        assert!(c.contains("chain http://10.0.0.1:7400/ipxe/${net0/mac:hexhyp}"));
        let p = Profile {
            node: Some("rack1-n3".into()),
            cmdline: "console=ttyS0 cairn.poll=2".into(),
            ..Profile::default()
        };
        let s = node_script(
            "http://10.0.0.1:7400",
            "52-54-00-00-00-01",
            "52-54-00-00-00-01",
            &p,
        );
        assert!(s.contains("kernel http://10.0.0.1:7400/boot/bzImage cairn.hub=http://10.0.0.1:7400 cairn.node=rack1-n3 console=ttyS0 cairn.poll=2\n"), "{s}");
        assert!(s.contains("initrd http://10.0.0.1:7400/boot/initramfs.cpio.zst\n"));
        let d = node_script(
            "http://h:1",
            "52-54-00-00-00-02",
            "default",
            &Profile::default(),
        );
        assert!(!d.contains("cairn.node="), "{d}");
        assert!(!d.contains("{{"), "every placeholder filled: {d}");
    }

    #[test]
    fn bad_profiles_and_macs_are_refused() {
        let bad = |f: fn(&mut Profile)| {
            let mut p = Profile::default();
            f(&mut p);
            p.check().unwrap_err()
        };
        assert!(bad(|p| p.cmdline = "console=ttyS0\nshell".into()).contains("not allowed"));
        assert!(bad(|p| p.cmdline = "x=${ip}".into()).contains("'$'"));
        assert!(bad(|p| p.cmdline = "cairn.node=other".into()).contains("set by the hub"));
        assert!(bad(|p| p.kernel = "../etc/passwd".into()).starts_with("kernel"));
        assert!(bad(|p| p.node = Some("Bad_Name".into())).contains("Bad_Name"));
        assert_eq!(
            normalize_mac("52:54:00:AB:cd:01").as_deref(),
            Some("52-54-00-ab-cd-01")
        );
        assert_eq!(
            normalize_mac("52-54-00-ab-cd-01").as_deref(),
            Some("52-54-00-ab-cd-01")
        );
        for m in [
            "52:54:00:ab:cd",
            "zz:54:00:ab:cd:01",
            "525400abcd01",
            "../x",
        ] {
            assert_eq!(normalize_mac(m), None, "{m}");
        }
    }
}
