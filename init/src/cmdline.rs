//! Kernel command line: the `cairn.*` keys PID 1 understands.
//!
//! Malformed values are named in an error and the default is used instead:
//! a typo on an iPXE line must not leave a node unbootable.

use std::net::Ipv4Addr;
use std::time::Duration;

/// Static uplink configuration from the kernel's `ip=` syntax:
/// `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    /// Our address.
    pub address: Ipv4Addr,
    /// Prefix length (from the netmask; /24 when empty).
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Interface (empty = the first NIC).
    pub device: Option<String>,
    /// Resolvers.
    pub dns: Vec<Ipv4Addr>,
}

/// What `ip=` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IpArg {
    /// DHCP, on this device only when one is named.
    Dhcp(Option<String>),
    /// A static configuration.
    Static(StaticIp),
}

fn parse_ip(value: &str) -> Result<IpArg, String> {
    match value {
        "" | "dhcp" | "on" | "any" | "off" | "none" => return Ok(IpArg::Dhcp(None)),
        _ => {}
    }
    let f: Vec<&str> = value.split(':').collect();
    // The kernel's DHCP form names the device and the method only:
    // `ip=:::::eth0:dhcp`.
    if matches!(f.get(6).copied(), Some("dhcp" | "on" | "any")) {
        let device = f
            .get(5)
            .filter(|d| !d.is_empty() && d.len() <= 15 && !d.contains('/'));
        return Ok(IpArg::Dhcp(device.map(|d| d.to_string())));
    }
    let addr = |i: usize, what: &str| -> Result<Option<Ipv4Addr>, String> {
        match f.get(i).copied().unwrap_or("") {
            "" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{what} {v:?} is not an IPv4 address")),
        }
    };
    let address = addr(0, "client address")?.ok_or("no client address (first field)")?;
    let gateway = addr(2, "gateway")?;
    let prefix = match addr(3, "netmask")? {
        None => 24,
        Some(m) => {
            let bits = u32::from(m);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(format!("netmask {m} is not contiguous"));
            }
            bits.leading_ones() as u8
        }
    };
    let device = f.get(5).filter(|d| !d.is_empty()).map(|d| d.to_string());
    if device
        .as_ref()
        .is_some_and(|d| d.len() > 15 || d.contains('/'))
    {
        return Err("device is not an interface name".into());
    }
    match f.get(6).copied().unwrap_or("") {
        "" | "off" | "none" => {}
        other => {
            return Err(format!(
                "autoconf {other:?}: only a static configuration (off/none) is read from ip="
            ))
        }
    }
    let dns = [addr(7, "dns0")?, addr(8, "dns1")?]
        .into_iter()
        .flatten()
        .collect();
    Ok(IpArg::Static(StaticIp {
        address,
        prefix,
        gateway,
        device,
        dns,
    }))
}

/// Settings taken from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Hub base URL (`cairn.hub=http://10.0.2.2:7400`).
    pub hub: Option<String>,
    /// Node id (`cairn.node=`); defaults to one derived from the first MAC.
    pub node: Option<String>,
    /// Key ids selected among the baked-in keys (`cairn.trust=id1,id2`).
    pub trust: Vec<String>,
    /// How often to poll the hub (`cairn.poll=5`, seconds).
    pub poll: Duration,
    /// Interface to run DHCP on (`cairn.iface=eth0`); default: first NIC.
    pub iface: Option<String>,
    /// Static configuration from `ip=` (None: DHCP).
    pub static_ip: Option<StaticIp>,
    /// `cairn.mode=loader`: verify and kexec the hub's OS instead of running
    /// workloads.
    pub loader: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hub: None,
            node: None,
            trust: Vec::new(),
            poll: Duration::from_secs(5),
            iface: None,
            static_ip: None,
            loader: false,
        }
    }
}

/// A command-line value we could not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line: {key}={value:?}: {reason}; using the default")]
pub struct CmdlineError {
    /// Key.
    pub key: String,
    /// Offending value.
    pub value: String,
    /// Why.
    pub reason: String,
}

fn err(key: &str, value: &str, reason: &str) -> CmdlineError {
    CmdlineError {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn valid_node(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Parses the command line text. Unknown `cairn.*` keys are errors too
/// (they are usually typos); other keys belong to the kernel and are ignored.
pub fn parse(text: &str) -> (Config, Vec<CmdlineError>) {
    let mut cfg = Config::default();
    let mut errors = Vec::new();
    for word in text.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "cairn.hub" => {
                let v = value.trim_end_matches('/');
                if v.starts_with("http://") || v.starts_with("https://") {
                    if v.len() > "https://".len() {
                        cfg.hub = Some(v.to_string());
                    } else {
                        errors.push(err(key, value, "no host after the scheme"));
                    }
                } else {
                    errors.push(err(key, value, "must start with http:// or https://"));
                }
            }
            "cairn.node" => {
                if valid_node(value) {
                    cfg.node = Some(value.to_string());
                } else {
                    errors.push(err(
                        key,
                        value,
                        "node ids are lowercase letters, digits, '-' and '.', at most 63",
                    ));
                }
            }
            "cairn.trust" => {
                for id in value.split(',').filter(|s| !s.is_empty()) {
                    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                        cfg.trust.push(id.to_ascii_lowercase());
                    } else {
                        errors.push(err(key, id, "a key id is 16 hex characters"));
                    }
                }
            }
            "cairn.poll" => match value.parse::<u64>() {
                Ok(s) if (1..=3600).contains(&s) => cfg.poll = Duration::from_secs(s),
                _ => errors.push(err(key, value, "seconds between 1 and 3600")),
            },
            // The OS version of this boot entry (read by the OS updater).
            "cairn.os" if !cairn_manifest::is_os_version(value) => {
                errors.push(err(
                    key,
                    value,
                    "an OS version is 1-64 of [0-9a-z._], starting with a letter or digit",
                ));
            }
            "cairn.os" => {}
            "cairn.mode" => match value {
                "loader" => cfg.loader = true,
                "node" => cfg.loader = false,
                _ => errors.push(err(key, value, "node or loader")),
            },
            "cairn.iface" => {
                if !value.is_empty() && value.len() < 16 && !value.contains('/') {
                    cfg.iface = Some(value.to_string());
                } else {
                    errors.push(err(key, value, "not an interface name"));
                }
            }
            "ip" => match parse_ip(value) {
                Ok(IpArg::Static(s)) => cfg.static_ip = Some(s),
                Ok(IpArg::Dhcp(device)) => {
                    cfg.static_ip = None;
                    if device.is_some() {
                        cfg.iface = device;
                    }
                }
                Err(reason) => errors.push(err(key, value, &reason)),
            },
            k if k.starts_with("cairn.") => errors.push(err(key, value, "unknown cairn option")),
            _ => {}
        }
    }
    (cfg, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_keys() {
        let (c, e) = parse(
            "console=ttyS0 cairn.hub=http://10.0.2.2:7400/ cairn.node=edge-1 cairn.trust=0123456789abcdef cairn.poll=2 quiet",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.hub.as_deref(), Some("http://10.0.2.2:7400"));
        assert_eq!(c.node.as_deref(), Some("edge-1"));
        assert_eq!(c.trust, vec!["0123456789abcdef"]);
        assert_eq!(c.poll, Duration::from_secs(2));
    }

    #[test]
    fn malformed_values_are_named_and_defaulted() {
        let (c, e) = parse(
            "cairn.hub=ftp://x cairn.node=Bad_Name cairn.poll=0 cairn.trust=xyz cairn.colour=blue",
        );
        assert_eq!(c, Config::default());
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cairn.hub",
                "cairn.node",
                "cairn.poll",
                "cairn.trust",
                "cairn.colour"
            ]
        );
        assert!(e[1].to_string().contains("Bad_Name"), "{}", e[1]);
        assert!(e[1].to_string().contains("using the default"));
    }

    #[test]
    fn static_ip_syntax() {
        let (c, e) = parse("ip=10.77.0.20::10.77.0.1:255.255.255.0:n1:eth0:off:10.77.0.53");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            c.static_ip,
            Some(StaticIp {
                address: Ipv4Addr::new(10, 77, 0, 20),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 77, 0, 1)),
                device: Some("eth0".into()),
                dns: vec![Ipv4Addr::new(10, 77, 0, 53)],
            })
        );
        let (c, _) = parse("ip=192.0.2.9::::::");
        assert_eq!(
            c.static_ip.map(|s| (s.prefix, s.gateway, s.device)),
            Some((24, None, None))
        );
        for v in ["dhcp", "off", "none", ""] {
            let (c, e) = parse(&format!("ip={v}"));
            assert!(c.static_ip.is_none() && e.is_empty(), "{v}");
        }
        let (c, e) = parse("ip=:::::eth1:dhcp");
        assert!(e.is_empty() && c.static_ip.is_none(), "{e:?}");
        assert_eq!(
            c.iface.as_deref(),
            Some("eth1"),
            "DHCP on the named device only"
        );
        for bad in [
            "ip=10.0.0",
            "ip=10.0.0.1::gw",
            "ip=10.0.0.1:::255.0.255.0",
            "ip=:::::eth0",
        ] {
            let (c, e) = parse(bad);
            assert!(c.static_ip.is_none(), "{bad}");
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].to_string().contains("using the default"), "{}", e[0]);
        }
    }

    #[test]
    fn empty_and_garbage_do_not_panic() {
        for s in [
            "",
            "=",
            "cairn.hub",
            "cairn.hub=",
            "cairn.node=",
            "cairn.trust=,,,",
            "\u{0}\u{ff}",
        ] {
            let _ = parse(s);
        }
    }
}
