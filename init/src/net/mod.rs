//! Node networking (first NIC by DHCP) and the workload network (one bridge,
//! one IPAM, a veth per container, published ports).

pub mod dhcp;
pub mod dns;
pub mod link;
pub mod nft;
pub mod node;
#[cfg(test)]
mod proptests;
pub mod proxy;
pub mod sntp;

use crate::cmdline::StaticIp;
use link::{NetError, Netlink};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

/// The node's uplink as configured.
pub struct NodeNet {
    /// Interface name.
    pub iface: String,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Address (the first lease's, for DHCP).
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// `dhcp` or `static`.
    pub source: &'static str,
    /// NTP servers (DHCP option 42).
    pub ntp: Vec<Ipv4Addr>,
    /// The node's resolvers (all links, merged), kept current as leases
    /// change; the workload DNS relay forwards to these.
    pub resolvers: dns::Upstream,
    /// DHCP clients, manifest links and settings (the reconcile's state).
    pub config: node::NodeConfig,
}

/// Every MAC-bearing, non-virtual link (the uplink candidates), by index;
/// or only the named one.
pub fn pick_uplinks(nl: &Netlink, want: Option<&str>) -> Result<Vec<link::LinkInfo>, NetError> {
    let mut links = nl.links()?;
    links.sort_by_key(|l| l.index);
    let ups: Vec<_> = links
        .into_iter()
        .filter(|l| l.mac.is_some())
        .filter(|l| match want {
            Some(w) => l.name == w,
            None => l.name != "lo" && !l.virtual_kind,
        })
        .collect();
    if ups.is_empty() {
        return Err(NetError::NoLink(
            want.unwrap_or("<any ethernet NIC>").to_string(),
        ));
    }
    Ok(ups)
}

/// Brings up loopback and the uplinks. With a static `ip=`, configures its
/// device (or the first NIC). Otherwise starts a DHCP client on every NIC
/// (or only `cairn.iface=`) in parallel, each keeping its lease for the
/// node's life, their default routes ordered by metric (100, 101, … in
/// ifindex order), and waits for the first lease. Retries forever with
/// backoff: a node without a network cannot do anything useful, but it must
/// not stop trying either.
pub fn bring_up_uplink(want: Option<&str>, hostname: &str, fixed: Option<&StaticIp>) -> NodeNet {
    let want = fixed.and_then(|f| f.device.as_deref()).or(want);
    let mut delay = std::time::Duration::from_secs(1);
    let ups = loop {
        let r = prepare_uplinks(want).and_then(|ups| match fixed {
            Some(f) => apply_static(&ups[0], f).map(|()| ups),
            None => Ok(ups),
        });
        match r {
            Ok(ups) => break ups,
            Err(e) => {
                tracing::error!(error = %e, retry_s = delay.as_secs(), "node network not up yet");
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
    };
    let resolvers: dns::Upstream = std::sync::Arc::new(std::sync::RwLock::new(Vec::new()));
    let book = std::sync::Arc::new(std::sync::Mutex::new(node::DnsBook::new(resolvers.clone())));
    let mut config = node::NodeConfig::new(hostname, book.clone());
    let links: Vec<&str> = ups.iter().map(|u| u.name.as_str()).collect();
    if let Some(f) = fixed {
        let up = &ups[0];
        book.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(0, "cmdline", &f.dns, None);
        tracing::info!(iface = %up.name, address = %format!("{}/{}", f.address, f.prefix), gateway = ?f.gateway, dns = ?f.dns, "static address applied (ip=)");
        return NodeNet {
            iface: up.name.clone(),
            mac: up.mac.unwrap_or_default(),
            address: f.address,
            prefix: f.prefix,
            source: "static",
            ntp: Vec::new(),
            resolvers,
            config,
        };
    }
    let (tx, rx) = std::sync::mpsc::channel::<(String, dhcp::Lease)>();
    config.report_leases_to(tx);
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        let started = Netlink::new().map_err(|e| e.to_string()).and_then(|nl| {
            ups.iter()
                .enumerate()
                .try_for_each(|(n, up)| config.default_dhcp_on(&nl, &up.name, 100 + n as u32))
        });
        match started {
            Ok(()) => break,
            Err(e) => {
                tracing::error!(error = %e, retry_s = delay.as_secs(), "DHCP not started yet");
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
    let (name, first) = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(x) => break x,
            Err(_) => tracing::warn!(links = ?links, "still waiting for a DHCP lease"),
        }
    };
    // Only the first lease is waited for; later ones need no listener.
    drop(rx);
    let up = ups.iter().find(|u| u.name == name).unwrap_or(&ups[0]);
    NodeNet {
        iface: up.name.clone(),
        mac: up.mac.unwrap_or_default(),
        address: first.address,
        prefix: first.prefix,
        ntp: first.ntp.clone(),
        source: "dhcp",
        resolvers,
        config,
    }
}

fn apply_static(up: &link::LinkInfo, f: &StaticIp) -> Result<(), String> {
    let nl = Netlink::new().map_err(|e| e.to_string())?;
    nl.add_address(up.index, IpAddr::V4(f.address), f.prefix)
        .map_err(|e| e.to_string())?;
    if let Some(gw) = f.gateway {
        nl.add_route(up.index, Ipv4Addr::UNSPECIFIED, 0, gw, 100)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub(crate) fn write_resolv_conf_logged(dns: &[Ipv4Addr], domain: Option<&str>) {
    if let Err(e) = write_resolv_conf(dns, domain) {
        tracing::error!(error = %e, "writing /etc/resolv.conf failed");
    }
}

fn prepare_uplinks(want: Option<&str>) -> Result<Vec<link::LinkInfo>, String> {
    let nl = Netlink::new().map_err(|e| e.to_string())?;
    let lo = nl.index_of("lo").map_err(|e| e.to_string())?;
    nl.set_up(lo).map_err(|e| e.to_string())?;
    let ups = pick_uplinks(&nl, want).map_err(|e| e.to_string())?;
    for up in &ups {
        nl.set_up(up.index).map_err(|e| e.to_string())?;
    }
    Ok(ups)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The resolv.conf text for these servers.
pub fn resolv_conf_text(dns: &[Ipv4Addr], domain: Option<&str>) -> String {
    let mut s = String::from("# written by cairn-init from DHCP\n");
    if let Some(d) = domain.filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_graphic())) {
        s.push_str(&format!("search {d}\n"));
    }
    for d in dns.iter().take(3) {
        s.push_str(&format!("nameserver {d}\n"));
    }
    s.push_str("options timeout:2 attempts:2\n");
    s
}

fn write_resolv_conf(dns: &[Ipv4Addr], domain: Option<&str>) -> std::io::Result<()> {
    std::fs::create_dir_all("/etc")?;
    std::fs::write("/etc/resolv.conf.tmp", resolv_conf_text(dns, domain))?;
    std::fs::rename("/etc/resolv.conf.tmp", "/etc/resolv.conf")
}

/// Name of the workload bridge.
pub const BRIDGE: &str = "cairn0";

/// One bridge and one address plan for every workload.
pub struct WorkloadNet {
    subnet: String,
    names: dns::Table,
    nl: Netlink,
    bridge: u32,
    network: Ipv4Addr,
    prefix: u8,
    /// Stable per name for the life of the node, so restarts keep addresses.
    by_name: BTreeMap<String, (Ipv4Addr, u32)>,
    next_slot: u32,
    /// `workload_reachability = "isolated"`: bridge ports isolated and no
    /// routing between workloads except published (DNATed) traffic.
    isolated: bool,
}

impl WorkloadNet {
    /// Creates the bridge with the first address of `subnet`, enables
    /// forwarding, and starts the DNS responder on the bridge address
    /// (relaying other names to `upstream`, the node's resolvers).
    pub fn new(subnet: &str, upstream: dns::Upstream) -> Result<WorkloadNet, String> {
        let (net, prefix) = cairn_manifest::parse_ipv4_cidr(subnet)
            .ok_or_else(|| format!("bad workload subnet {subnet:?}"))?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let network = Ipv4Addr::from(u32::from(net) & mask);
        let nl = Netlink::new().map_err(|e| e.to_string())?;
        let bridge = nl.ensure_bridge(BRIDGE).map_err(|e| e.to_string())?;
        let gw = Ipv4Addr::from(u32::from(network) + 1);
        nl.add_address(bridge, IpAddr::V4(gw), prefix)
            .map_err(|e| e.to_string())?;
        nl.set_up(bridge).map_err(|e| e.to_string())?;
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            tracing::warn!(error = %e, "could not enable IPv4 forwarding");
        }
        tracing::info!(bridge = BRIDGE, gateway = %gw, prefix, "workload network up");
        let names = dns::Table::default();
        dns::serve(
            SocketAddrV4::new(gw, 53),
            BRIDGE,
            dns::Clients { network, prefix },
            names.clone(),
            upstream,
        )
        .map_err(|e| format!("workload DNS responder on {gw}:53: {e}"))?;
        Ok(WorkloadNet {
            subnet: subnet.to_string(),
            names,
            nl,
            bridge,
            network,
            prefix,
            by_name: BTreeMap::new(),
            next_slot: 2,
            isolated: false,
        })
    }

    /// Replaces the NAT rules: masquerade out of the subnet plus `dnat`.
    pub fn apply_nat(&self, dnat: Vec<nft::Dnat>) -> std::io::Result<()> {
        nft::apply(&nft::NatPlan {
            network: self.network,
            prefix: self.prefix,
            bridge: BRIDGE.to_string(),
            dnat,
            isolate: self.isolated,
        })
    }

    /// Sets reachability between workloads (applied to the ports now and
    /// to every later one; the NAT rules follow on the next `apply_nat`).
    pub fn set_isolated(&mut self, isolated: bool) {
        if self.isolated == isolated {
            return;
        }
        self.isolated = isolated;
        tracing::info!(isolated, "workload reachability changed");
        let ports: Vec<u32> = self
            .nl
            .links()
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.master == Some(self.bridge))
            .map(|l| l.index)
            .collect();
        for p in ports {
            if let Err(e) = self.nl.set_port_isolated(p, isolated) {
                tracing::error!(port = p, error = %e, "bridge port isolation not set");
            }
        }
    }

    /// The subnet as configured.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// Makes exactly `names` resolvable (allocating their addresses).
    pub fn publish_names(&mut self, names: &[&str]) -> Result<(), String> {
        let mut table = std::collections::BTreeMap::new();
        for n in names {
            table.insert(n.to_string(), self.address_of(n)?.0);
        }
        *self.names.write().unwrap_or_else(|e| e.into_inner()) = table;
        Ok(())
    }

    /// Prefix length of the workload subnet.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The gateway address workloads use.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The address reserved for `name` (allocated on first use).
    pub fn address_of(&mut self, name: &str) -> Result<(Ipv4Addr, u32), String> {
        if let Some(a) = self.by_name.get(name) {
            return Ok(*a);
        }
        let size = 1u32 << (32 - u32::from(self.prefix));
        if self.next_slot >= size - 1 {
            return Err(format!("workload subnet /{} is full", self.prefix));
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        let a = (Ipv4Addr::from(u32::from(self.network) + slot), slot);
        self.by_name.insert(name.to_string(), a);
        Ok(a)
    }

    /// Creates the veth pair for `name`, attaches the host end to the bridge
    /// and moves the peer into the netns of `pid`.
    pub fn attach(&mut self, name: &str, pid: u32) -> Result<(), String> {
        let (address, slot) = self.address_of(name)?;
        let host = format!("vh{slot}");
        let peer = format!("vp{slot}");
        let (hi, pi) = self
            .nl
            .create_veth(&host, &peer)
            .map_err(|e| e.to_string())?;
        self.nl
            .set_master_up(hi, self.bridge)
            .map_err(|e| e.to_string())?;
        if self.isolated {
            self.nl
                .set_port_isolated(hi, true)
                .map_err(|e| e.to_string())?;
        }
        // The same MAC for the same address across restarts: neighbours
        // (the node, other workloads) keep a valid ARP entry, instead of
        // sending to the dead instance's MAC for seconds after a restart.
        self.nl
            .set_mac(pi, workload_mac(address))
            .map_err(|e| e.to_string())?;
        self.nl
            .move_to_pid_netns(pi, pid)
            .map_err(|e| e.to_string())?;
        tracing::debug!(workload = name, %address, host, peer, "veth attached");
        Ok(())
    }
}

/// A workload's MAC, derived from its address: locally administered,
/// unicast (`02:ca:` + the IPv4 address).
pub fn workload_mac(a: Ipv4Addr) -> [u8; 6] {
    let o = a.octets();
    [0x02, 0xca, o[0], o[1], o[2], o[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_keeps_three_servers_and_drops_bad_domains() {
        let dns: Vec<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let t = resolv_conf_text(&dns, Some("lab.example"));
        assert!(t.contains("search lab.example\n"));
        assert_eq!(t.matches("nameserver").count(), 3);
        let t = resolv_conf_text(&dns[..1], Some("evil\nnameserver 6.6.6.6"));
        assert!(!t.contains("6.6.6.6"), "{t}");
    }
}
