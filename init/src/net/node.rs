//! The node's own networking from the manifest's `[network]` section: VLANs,
//! bonds, per-interface static addresses (IPv4 and IPv6), routes, MTU,
//! resolvers and which links run DHCP, applied as a reconcile.
//!
//! [`plan`] resolves the section against the node's links (names and MACs)
//! without touching anything: an unknown interface or a name clash is an
//! error and the previous configuration stays. [`NodeConfig::apply`] then
//! changes only what differs from what it applied last time: an unchanged
//! VLAN keeps its ifindex, an unchanged address is not re-added, a link
//! whose DHCP client already runs keeps it (and its lease).
//!
//! Links the manifest does not mention keep the boot behaviour: DHCP on
//! every NIC (or the `ip=` static address).

use super::dhcp::driver::Running;
use super::dhcp::Lease;
use super::link::{LinkInfo, Netlink};
use super::{dns, fmt_mac, write_resolv_conf_logged};
use cairn_manifest::netcheck::{parse_mac, Cidr};
use cairn_manifest::{BondSpec, NetworkSpec};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

/// Default metric of routes from static configuration: below DHCP's 100+,
/// so a configured gateway wins over a leased one.
pub const STATIC_METRIC: u32 = 50;

/// The node's resolvers from every source, merged in rank order (static
/// interface config, then DHCP by route metric, then `network.dns`) and
/// written to /etc/resolv.conf and the workload DNS relay when they change.
pub struct DnsBook {
    entries: BTreeMap<(u32, String), Vec<Ipv4Addr>>,
    domain: Option<String>,
    upstream: dns::Upstream,
    written: Option<Vec<Ipv4Addr>>,
    /// Write /etc/resolv.conf (not in tests, which share the host's /etc).
    write_file: bool,
}

/// A shared [`DnsBook`].
pub type SharedBook = Arc<Mutex<DnsBook>>;

impl DnsBook {
    /// An empty book feeding `upstream`.
    pub fn new(upstream: dns::Upstream) -> DnsBook {
        DnsBook {
            entries: BTreeMap::new(),
            domain: None,
            upstream,
            written: None,
            write_file: true,
        }
    }

    /// A book that only feeds `upstream` (no /etc/resolv.conf).
    #[cfg(test)]
    pub fn detached(upstream: dns::Upstream) -> DnsBook {
        DnsBook {
            write_file: false,
            ..DnsBook::new(upstream)
        }
    }

    /// Sets `source`'s resolvers at `rank` (replacing what it had).
    pub fn set(&mut self, rank: u32, source: &str, dns: &[Ipv4Addr], domain: Option<&str>) {
        self.entries.retain(|(_, s), _| s != source);
        if !dns.is_empty() {
            self.entries
                .insert((rank, source.to_string()), dns.to_vec());
        }
        if domain.is_some() {
            self.domain = domain.map(str::to_string);
        }
        self.publish();
    }

    /// Forgets `source` (a link whose DHCP stopped, an interface removed).
    pub fn remove(&mut self, source: &str) {
        self.entries.retain(|(_, s), _| s != source);
        self.publish();
    }

    /// The merged list, duplicates dropped.
    pub fn merged(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = Vec::new();
        for d in self.entries.values().flatten() {
            if !v.contains(d) {
                v.push(*d);
            }
        }
        v
    }

    fn publish(&mut self) {
        let merged = self.merged();
        if self.written.as_ref() == Some(&merged) {
            return;
        }
        if self.write_file {
            write_resolv_conf_logged(&merged, self.domain.as_deref());
        }
        *self.upstream.write().unwrap_or_else(|e| e.into_inner()) = merged.clone();
        tracing::info!(resolvers = ?merged, "node resolvers");
        self.written = Some(merged);
    }
}

/// A link this manifest wants to exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WantLink {
    /// A bond and its member NICs (by name).
    Bond {
        /// Name.
        name: String,
        /// Mode.
        mode: String,
        /// MII monitoring interval.
        miimon_ms: u32,
        /// Member NIC names.
        members: Vec<String>,
    },
    /// A VLAN on `parent` (a NIC's or a declared bond's name).
    Vlan {
        /// Name.
        name: String,
        /// Parent link name.
        parent: String,
        /// VLAN id.
        id: u16,
    },
}

impl WantLink {
    fn name(&self) -> &str {
        match self {
            WantLink::Bond { name, .. } | WantLink::Vlan { name, .. } => name,
        }
    }

    /// Same link, apart from what can change in place (bond members).
    fn same_kind(&self, other: &WantLink) -> bool {
        match (self, other) {
            (
                WantLink::Bond {
                    mode: a,
                    miimon_ms: b,
                    ..
                },
                WantLink::Bond {
                    mode: c,
                    miimon_ms: d,
                    ..
                },
            ) => a == c && b == d,
            (a @ WantLink::Vlan { .. }, b @ WantLink::Vlan { .. }) => a == b,
            _ => false,
        }
    }
}

/// A route of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// Destination.
    pub dst: Cidr,
    /// Next hop; `None` = on-link.
    pub via: Option<IpAddr>,
    /// Metric.
    pub metric: u32,
}

/// How one interface is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantIface {
    /// `dhcp`, `static` or `none`.
    pub mode: String,
    /// Static addresses.
    pub addresses: BTreeSet<Cidr>,
    /// Routes (the gateways as default routes included).
    pub routes: BTreeSet<Route>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Resolvers.
    pub dns: Vec<Ipv4Addr>,
    /// Route metric (DHCP's too).
    pub metric: u32,
}

/// `[network]` resolved against this node's links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Bonds first, then VLANs (a VLAN may sit on a bond).
    pub links: Vec<WantLink>,
    /// Interface settings by link name.
    pub ifaces: BTreeMap<String, WantIface>,
    /// `network.dns`.
    pub dns: Vec<Ipv4Addr>,
}

/// Loopback, the workload bridge and workload veths (`vh<slot>`): never
/// node interfaces.
fn is_workload_link(l: &LinkInfo) -> bool {
    l.name == "lo"
        || l.name == super::BRIDGE
        || (l.kind.as_deref() == Some("veth") && l.name.starts_with("vh"))
}

/// Can be a bond member: a NIC (or a dummy or veth), not a link built on
/// others.
fn nic_like(l: &LinkInfo) -> bool {
    !matches!(l.kind.as_deref(), Some("bond" | "vlan" | "bridge" | "tun"))
}

/// Resolves `spec` against `links` (see the module doc). `ours` are the
/// links an earlier apply created (a link of that name may already exist).
pub fn plan(
    spec: &NetworkSpec,
    links: &[LinkInfo],
    ours: &BTreeSet<String>,
) -> Result<Plan, String> {
    let nics: Vec<&LinkInfo> = links.iter().filter(|l| !is_workload_link(l)).collect();
    let known = || {
        nics.iter()
            .filter(|l| matches!(l.kind.as_deref(), None | Some("bond" | "vlan")))
            .map(|l| {
                let mac = l.perm_mac.or(l.mac).map(|m| fmt_mac(&m));
                format!("{} ({})", l.name, mac.unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let declared: BTreeSet<&str> = spec
        .bonds
        .iter()
        .map(|b| b.name.as_str())
        .chain(spec.vlans.iter().map(|v| v.name.as_str()))
        .collect();
    let kinds: BTreeMap<&str, &str> = spec
        .bonds
        .iter()
        .map(|b| (b.name.as_str(), "bond"))
        .chain(spec.vlans.iter().map(|v| (v.name.as_str(), "vlan")))
        .collect();
    for name in &declared {
        if let Some(l) = links.iter().find(|l| l.name == *name) {
            // The bonding driver creates an empty `bond0` at load time: a
            // link of the declared kind with no ports is taken over.
            let unused = l.kind.as_deref() == kinds.get(name).copied()
                && !links.iter().any(|p| p.master == Some(l.index));
            if !ours.contains(*name) && !unused {
                return Err(format!(
                    "network: {name} is declared as a new link but the node already has a {} named so",
                    l.kind.as_deref().unwrap_or("NIC")
                ));
            }
        }
    }
    // A name or MAC → an existing link's name (NICs only when `nic_only`).
    let existing = |m: &str, nic_only: bool| -> Option<String> {
        let mac = parse_mac(m);
        nics.iter()
            .filter(|l| !nic_only || (nic_like(l) && !ours.contains(&l.name)))
            .find(|l| l.name == m || (mac.is_some() && l.perm_mac.or(l.mac) == mac))
            .map(|l| l.name.clone())
    };
    let mut out = Plan {
        links: Vec::new(),
        ifaces: BTreeMap::new(),
        dns: spec.dns.iter().filter_map(|d| d.parse().ok()).collect(),
    };
    let mut members: BTreeSet<String> = BTreeSet::new();
    for BondSpec {
        name,
        mode,
        members: ms,
        miimon_ms,
    } in &spec.bonds
    {
        let mut resolved = Vec::new();
        for m in ms {
            let n = existing(m, true).ok_or_else(|| {
                format!(
                    "network.bond[{name}]: member {m:?} is not a NIC of this node (NICs: {})",
                    known()
                )
            })?;
            if !members.insert(n.clone()) {
                return Err(format!(
                    "network.bond[{name}]: {n} is a member twice (by name and by MAC?)"
                ));
            }
            resolved.push(n);
        }
        out.links.push(WantLink::Bond {
            name: name.clone(),
            mode: mode.clone(),
            miimon_ms: *miimon_ms,
            members: resolved,
        });
    }
    for v in &spec.vlans {
        let parent = if declared.contains(v.parent.as_str()) {
            v.parent.clone()
        } else {
            existing(&v.parent, false).ok_or_else(|| {
                format!(
                    "network.vlan[{}]: parent {:?} is not an interface of this node (links: {})",
                    v.name,
                    v.parent,
                    known()
                )
            })?
        };
        if members.contains(&parent) {
            return Err(format!(
                "network.vlan[{}]: parent {parent} is a bond member; put the VLAN on the bond",
                v.name
            ));
        }
        out.links.push(WantLink::Vlan {
            name: v.name.clone(),
            parent,
            id: v.id,
        });
    }
    for i in &spec.interfaces {
        let name = if declared.contains(i.matches.as_str()) {
            i.matches.clone()
        } else {
            existing(&i.matches, false).ok_or_else(|| {
                format!(
                    "network.interface[{}]: no such interface on this node (links: {})",
                    i.matches,
                    known()
                )
            })?
        };
        if members.contains(&name) {
            return Err(format!(
                "network.interface[{}]: {name} is a bond member; configure the bond",
                i.matches
            ));
        }
        let metric = i.metric.unwrap_or(STATIC_METRIC);
        let mut routes = BTreeSet::new();
        let default4 = Cidr {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 0,
        };
        let default6 = Cidr {
            addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            prefix: 0,
        };
        for (gw, dst) in [(&i.gateway, default4), (&i.gateway6, default6)] {
            if let Some(g) = gw.as_deref().and_then(|g| g.parse().ok()) {
                routes.insert(Route {
                    dst,
                    via: Some(g),
                    metric,
                });
            }
        }
        for r in &i.routes {
            let dst = Cidr::parse(&r.to)
                .ok_or_else(|| format!("network.interface[{}]: route {:?}", i.matches, r.to))?;
            routes.insert(Route {
                dst,
                via: r.via.as_deref().and_then(|v| v.parse().ok()),
                metric,
            });
        }
        let want = WantIface {
            mode: i.mode.clone(),
            addresses: i.addresses.iter().filter_map(|a| Cidr::parse(a)).collect(),
            routes,
            mtu: i.mtu,
            dns: i.dns.iter().filter_map(|d| d.parse().ok()).collect(),
            metric,
        };
        if out.ifaces.insert(name.clone(), want).is_some() {
            return Err(format!(
                "network.interface[{}]: {name} is configured twice (by name and by MAC?)",
                i.matches
            ));
        }
    }
    Ok(out)
}

/// What runs on the node's links now, and what the last apply did.
pub struct NodeConfig {
    hostname: String,
    /// DHCP clients by link name.
    dhcp: BTreeMap<String, Running>,
    /// NICs that run DHCP when the manifest says nothing about them.
    /// (with the metric they had at boot).
    default_dhcp: BTreeMap<String, u32>,
    book: SharedBook,
    /// Links we created and how.
    created: BTreeMap<String, WantLink>,
    /// Interface settings applied last time.
    applied: BTreeMap<String, WantIface>,
    /// Leases by link name (for the status).
    leases: Arc<Mutex<BTreeMap<String, Lease>>>,
    first_lease: Option<std::sync::mpsc::Sender<(String, Lease)>>,
}

impl NodeConfig {
    /// Nothing running yet; DHCP clients report into `book`.
    pub fn new(hostname: &str, book: SharedBook) -> NodeConfig {
        NodeConfig {
            hostname: hostname.to_string(),
            dhcp: BTreeMap::new(),
            default_dhcp: BTreeMap::new(),
            book,
            created: BTreeMap::new(),
            applied: BTreeMap::new(),
            leases: Arc::new(Mutex::new(BTreeMap::new())),
            first_lease: None,
        }
    }

    /// Every lease is also sent here (boot waits for the first one).
    pub fn report_leases_to(&mut self, tx: std::sync::mpsc::Sender<(String, Lease)>) {
        self.first_lease = Some(tx);
    }

    /// Marks `name` as a NIC that runs DHCP by default and starts it.
    pub fn default_dhcp_on(&mut self, nl: &Netlink, name: &str, metric: u32) -> Result<(), String> {
        self.default_dhcp.insert(name.to_string(), metric);
        self.start_dhcp(nl, name, metric)
    }

    /// Links this node created from the manifest.
    pub fn created(&self) -> BTreeSet<String> {
        self.created.keys().cloned().collect()
    }

    /// Ensures a DHCP client runs on `name` at `metric`; one running on an
    /// older incarnation of the link (deleted and recreated) or at another
    /// metric is restarted.
    fn start_dhcp(&mut self, nl: &Netlink, name: &str, metric: u32) -> Result<(), String> {
        let index = nl.index_of(name).map_err(|e| e.to_string())?;
        match self.dhcp.get(name) {
            Some(r) if r.index == index && r.metric == metric => return Ok(()),
            Some(_) => self.stop_dhcp(name),
            None => {}
        }
        nl.set_up(index).map_err(|e| e.to_string())?;
        let mac = nl
            .link(index)
            .map_err(|e| e.to_string())?
            .mac
            .ok_or_else(|| format!("{name} has no MAC address for DHCP"))?;
        let (book, leases, first) = (
            self.book.clone(),
            self.leases.clone(),
            self.first_lease.clone(),
        );
        let source = format!("dhcp:{name}");
        let iface = name.to_string();
        let on_lease = move |l: &Lease| {
            book.lock().unwrap_or_else(|e| e.into_inner()).set(
                metric,
                &source,
                &l.dns,
                l.domain.as_deref(),
            );
            leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(iface.clone(), l.clone());
            if let Some(tx) = &first {
                let _ = tx.send((iface.clone(), l.clone()));
            }
        };
        tracing::info!(iface = %name, mac = %fmt_mac(&mac), metric, "starting DHCP");
        let r = Running::spawn(
            name.to_string(),
            index,
            mac,
            metric,
            self.hostname.clone(),
            on_lease,
        )
        .map_err(|e| format!("DHCP thread for {name}: {e}"))?;
        self.dhcp.insert(name.to_string(), r);
        Ok(())
    }

    fn stop_dhcp(&mut self, name: &str) {
        if let Some(r) = self.dhcp.remove(name) {
            r.stop();
            self.book
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&format!("dhcp:{name}"));
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
        }
    }

    /// Makes the node's links match `plan`, touching only what changed.
    /// Returns the problems met (each also logged); what could be applied
    /// is applied.
    pub fn apply(&mut self, nl: &Netlink, plan: &Plan) -> Vec<String> {
        let mut errs = Vec::new();
        let mut err = |e: String| {
            tracing::error!(error = %e, "network reconcile");
            errs.push(e);
        };
        let want_links: BTreeMap<&str, &WantLink> =
            plan.links.iter().map(|l| (l.name(), l)).collect();
        // 1. Links we created that are no longer wanted as they are.
        let doomed: Vec<String> = self
            .created
            .iter()
            .filter(|(n, l)| !want_links.get(n.as_str()).is_some_and(|w| w.same_kind(l)))
            .map(|(n, _)| n.clone())
            .collect();
        for n in doomed {
            self.unconfigure(nl, &n, &mut err);
            let old = self.created.remove(&n);
            tracing::info!(link = %n, "removing link no longer in the manifest (or changed)");
            if let Ok(i) = nl.index_of(&n) {
                if let Err(e) = nl.delete(i) {
                    err(format!("deleting {n}: {e}"));
                }
            }
            // Former members go back to their default configuration below.
            if let Some(WantLink::Bond { members, .. }) = old {
                for m in members {
                    self.applied.remove(&m);
                }
            }
        }
        // 2. Interfaces configured before but not now.
        let dropped: Vec<String> = self
            .applied
            .keys()
            .filter(|n| !plan.ifaces.contains_key(*n))
            .cloned()
            .collect();
        for n in dropped {
            self.unconfigure(nl, &n, &mut err);
        }
        // 3. Links to create, bond members to move.
        let mut members_now: BTreeSet<String> = BTreeSet::new();
        for want in &plan.links {
            let name = want.name().to_string();
            let index = match nl.index_of(&name) {
                Ok(i) if self.created.contains_key(&name) => i,
                found => {
                    // A same-named unused link the plan allowed us to take
                    // over (the kernel's own `bond0`): start from scratch.
                    if let Ok(i) = found {
                        if let Err(e) = nl.delete(i) {
                            err(format!("replacing the existing {name}: {e}"));
                            continue;
                        }
                    }
                    let r = match want {
                        WantLink::Bond {
                            mode, miimon_ms, ..
                        } => nl.create_bond(&name, mode, *miimon_ms),
                        WantLink::Vlan { parent, id, .. } => match nl.index_of(parent) {
                            Ok(p) => nl.create_vlan(&name, p, *id),
                            Err(e) => Err(e),
                        },
                    };
                    match r {
                        Ok(i) => {
                            tracing::info!(link = %name, spec = ?want, "link created");
                            i
                        }
                        Err(e) => {
                            err(format!("creating {name}: {e}"));
                            continue;
                        }
                    }
                }
            };
            if let WantLink::Bond { members, .. } = want {
                let old: Vec<String> = match self.created.get(&name) {
                    Some(WantLink::Bond { members, .. }) => members.clone(),
                    _ => Vec::new(),
                };
                for m in old.iter().filter(|m| !members.contains(m)) {
                    if let Ok(i) = nl.index_of(m) {
                        if let Err(e) = nl.release(i) {
                            err(format!("taking {m} out of {name}: {e}"));
                        }
                    }
                }
                for m in members {
                    members_now.insert(m.clone());
                    let Ok(mi) = nl.index_of(m) else {
                        err(format!("bond {name}: member {m} is gone"));
                        continue;
                    };
                    if nl.link(mi).ok().and_then(|l| l.master) == Some(index) {
                        continue;
                    }
                    // A member carries no configuration of its own.
                    self.stop_dhcp(m);
                    self.unconfigure(nl, m, &mut err);
                    match nl.enslave(mi, index) {
                        Ok(()) => tracing::info!(bond = %name, member = %m, "member joined"),
                        Err(e) => err(format!("adding {m} to {name}: {e}")),
                    }
                }
            }
            if let Err(e) = nl.set_up(index) {
                err(format!("setting {name} up: {e}"));
            }
            self.created.insert(name, want.clone());
        }
        // Clients on links that are gone (a deleted bond took its VLANs).
        let orphans: Vec<String> = self
            .dhcp
            .iter()
            .filter(|(n, r)| nl.index_of(n).ok() != Some(r.index))
            .map(|(n, _)| n.clone())
            .collect();
        for n in orphans {
            self.stop_dhcp(&n);
        }
        // 4. Interface settings.
        for (name, want) in &plan.ifaces {
            let Ok(index) = nl.index_of(name) else {
                err(format!("interface {name} does not exist"));
                continue;
            };
            let before = self.applied.get(name).cloned();
            let link = nl.link(index).ok();
            if link.as_ref().is_some_and(|l| !l.up) {
                if let Err(e) = nl.set_up(index) {
                    err(format!("setting {name} up: {e}"));
                }
            }
            if let Some(mtu) = want.mtu {
                if link.as_ref().map(|l| l.mtu) != Some(mtu) {
                    match nl.set_mtu(index, mtu) {
                        Ok(()) => tracing::info!(iface = %name, mtu, "MTU set"),
                        Err(e) => err(format!("MTU {mtu} on {name}: {e}")),
                    }
                }
            }
            let had_routes = before
                .as_ref()
                .map(|b| b.routes.clone())
                .unwrap_or_default();
            for r in had_routes.difference(&want.routes) {
                if let Err(e) = nl.del_route(index, r.dst.addr, r.dst.prefix, r.via, r.metric) {
                    err(format!("removing route {} from {name}: {e}", r.dst));
                }
            }
            let had_addrs = before
                .as_ref()
                .map(|b| b.addresses.clone())
                .unwrap_or_default();
            for a in had_addrs.difference(&want.addresses) {
                match nl.del_address(index, a.addr, a.prefix) {
                    Ok(()) => tracing::info!(iface = %name, address = %a, "address removed"),
                    Err(e) => err(format!("removing {a} from {name}: {e}")),
                }
            }
            if want.mode == "dhcp" {
                if let Err(e) = self.start_dhcp(nl, name, want.metric.max(100)) {
                    err(e);
                }
            } else {
                self.stop_dhcp(name);
            }
            let present = nl.addresses(index).unwrap_or_default();
            for a in &want.addresses {
                if present.contains(&a.to_string()) {
                    continue;
                }
                match nl.add_address(index, a.addr, a.prefix) {
                    Ok(()) => tracing::info!(iface = %name, address = %a, "static address added"),
                    Err(e) => err(format!("adding {a} to {name}: {e}")),
                }
            }
            // Routes are checked against the kernel, not only against the
            // last apply: removing an address drops the routes through it.
            let present = nl.routes(index).unwrap_or_default();
            for r in &want.routes {
                if present.contains(&(r.dst.addr, r.dst.prefix, r.via, r.metric)) {
                    continue;
                }
                match nl.set_route(index, r.dst.addr, r.dst.prefix, r.via, r.metric) {
                    Ok(()) => {
                        tracing::info!(iface = %name, to = %r.dst, via = ?r.via, metric = r.metric, "route set")
                    }
                    Err(e) => err(format!("route {} via {:?} on {name}: {e}", r.dst, r.via)),
                }
            }
            self.book.lock().unwrap_or_else(|e| e.into_inner()).set(
                want.metric.min(99),
                &format!("static:{name}"),
                &want.dns,
                None,
            );
            self.applied.insert(name.clone(), want.clone());
        }
        // 5. NICs the manifest no longer claims return to their default.
        let defaults: Vec<(String, u32)> = self
            .default_dhcp
            .iter()
            .filter(|(n, _)| !plan.ifaces.contains_key(*n) && !members_now.contains(*n))
            .map(|(n, m)| (n.clone(), *m))
            .collect();
        for (n, metric) in defaults {
            if let Err(e) = self.start_dhcp(nl, &n, metric) {
                err(e);
            }
        }
        self.book
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(1000, "manifest", &plan.dns, None);
        errs
    }

    /// Removes what an earlier apply put on `name` (addresses, routes,
    /// resolvers, a manifest-started DHCP client).
    fn unconfigure(&mut self, nl: &Netlink, name: &str, err: &mut impl FnMut(String)) {
        let Some(old) = self.applied.remove(name) else {
            return;
        };
        if old.mode == "dhcp" && !self.default_dhcp.contains_key(name) {
            self.stop_dhcp(name);
        }
        self.book
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&format!("static:{name}"));
        let Ok(index) = nl.index_of(name) else {
            return;
        };
        for r in &old.routes {
            if let Err(e) = nl.del_route(index, r.dst.addr, r.dst.prefix, r.via, r.metric) {
                err(format!("removing route {} from {name}: {e}", r.dst));
            }
        }
        for a in &old.addresses {
            if let Err(e) = nl.del_address(index, a.addr, a.prefix) {
                err(format!("removing {a} from {name}: {e}"));
            }
        }
        tracing::info!(iface = %name, "manifest configuration removed");
    }

    /// One status entry per node link (NICs, bonds, VLANs).
    pub fn status(&self, nl: &Netlink) -> Vec<Value> {
        let links = nl.links().unwrap_or_default();
        let name_of = |i: Option<u32>| {
            i.and_then(|i| links.iter().find(|l| l.index == i))
                .map(|l| l.name.clone())
        };
        let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        // NICs, bonds, VLANs and whatever the manifest configures; not the
        // kernel's idle fallback devices (sit0, dummy0, …).
        links
            .iter()
            .filter(|l| !is_workload_link(l))
            .filter(|l| {
                matches!(l.kind.as_deref(), None | Some("bond" | "vlan"))
                    || self.applied.contains_key(&l.name)
            })
            .map(|l| {
                json!({
                    "name": l.name,
                    "index": l.index,
                    "kind": l.kind.as_deref().unwrap_or("nic"),
                    "mac": l.mac.map(|m| fmt_mac(&m)),
                    "permanent_mac": l.perm_mac.map(|m| fmt_mac(&m)),
                    "up": l.up,
                    "carrier": l.carrier,
                    "mtu": l.mtu,
                    "master": name_of(l.master),
                    "parent": if l.kind.as_deref() == Some("vlan") { name_of(l.parent) } else { None },
                    "vlan_id": l.vlan_id,
                    "bond_mode": l.bond_mode,
                    "bond_active": name_of(l.bond_active),
                    "dhcp": self.dhcp.contains_key(&l.name),
                    "lease": leases.get(&l.name).map(|x| json!({
                        "address": format!("{}/{}", x.address, x.prefix),
                        "server": x.server.to_string(),
                        "lease_s": x.lease_secs,
                    })),
                    "configured": self.applied.contains_key(&l.name),
                    "addresses": nl.addresses(l.index).unwrap_or_default(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_manifest::{InterfaceSpec, VlanSpec};

    fn nic(index: u32, name: &str, mac: u8) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            mac: Some([0x52, 0x54, 0, 0, 0, mac]),
            perm_mac: None,
            virtual_kind: false,
            carrier: true,
            up: true,
            kind: None,
            master: None,
            parent: None,
            vlan_id: None,
            bond_mode: None,
            bond_active: None,
            mtu: 1500,
        }
    }

    fn links() -> Vec<LinkInfo> {
        let mut br = nic(9, "cairn0", 9);
        br.kind = Some("bridge".into());
        vec![nic(2, "eth0", 1), nic(3, "eth1", 2), nic(4, "eth2", 3), br]
    }

    #[test]
    fn resolves_names_macs_and_declared_links() {
        let mut n = NetworkSpec::default();
        n.bonds.push(BondSpec {
            name: "bond0".into(),
            mode: "active-backup".into(),
            members: vec!["eth1".into(), "52:54:00:00:00:03".into()],
            miimon_ms: 100,
        });
        n.vlans.push(VlanSpec {
            name: "v100".into(),
            parent: "bond0".into(),
            id: 100,
        });
        n.interfaces.push(InterfaceSpec {
            matches: "52:54:00:00:00:01".into(),
            mode: "static".into(),
            addresses: vec!["10.1.0.2/24".into(), "fd00::2/64".into()],
            gateway: Some("10.1.0.1".into()),
            ..InterfaceSpec::default()
        });
        n.interfaces.push(InterfaceSpec {
            matches: "v100".into(),
            ..InterfaceSpec::default()
        });
        let p = plan(&n, &links(), &BTreeSet::new()).unwrap();
        assert_eq!(
            p.links[0],
            WantLink::Bond {
                name: "bond0".into(),
                mode: "active-backup".into(),
                miimon_ms: 100,
                members: vec!["eth1".into(), "eth2".into()]
            }
        );
        assert_eq!(
            p.links[1],
            WantLink::Vlan {
                name: "v100".into(),
                parent: "bond0".into(),
                id: 100
            }
        );
        let eth0 = &p.ifaces["eth0"];
        assert_eq!(eth0.addresses.len(), 2);
        assert_eq!(
            eth0.routes.iter().next().unwrap().via,
            Some("10.1.0.1".parse().unwrap())
        );
        assert_eq!(eth0.metric, STATIC_METRIC);
        assert_eq!(p.ifaces["v100"].mode, "dhcp");
    }

    #[test]
    fn unknown_or_clashing_links_are_refused_by_name() {
        let cases: Vec<(NetworkSpec, &str)> = vec![
            (
                {
                    let mut n = NetworkSpec::default();
                    n.interfaces.push(InterfaceSpec {
                        matches: "eth7".into(),
                        ..InterfaceSpec::default()
                    });
                    n
                },
                "interface[eth7]: no such interface on this node (links: eth0 (52:54:00:00:00:01)",
            ),
            (
                {
                    let mut n = NetworkSpec::default();
                    n.interfaces.push(InterfaceSpec {
                        matches: "52:54:00:00:00:77".into(),
                        ..InterfaceSpec::default()
                    });
                    n
                },
                "no such interface",
            ),
            (
                {
                    let mut n = NetworkSpec::default();
                    n.interfaces.push(InterfaceSpec {
                        matches: "cairn0".into(),
                        ..InterfaceSpec::default()
                    });
                    n
                },
                "interface[cairn0]: no such interface",
            ),
            (
                {
                    let mut n = NetworkSpec::default();
                    n.vlans.push(VlanSpec {
                        name: "eth1".into(),
                        parent: "eth0".into(),
                        id: 5,
                    });
                    n
                },
                "eth1 is declared as a new link but the node already has a NIC",
            ),
            (
                {
                    let mut n = NetworkSpec::default();
                    n.vlans.push(VlanSpec {
                        name: "v5".into(),
                        parent: "eth9".into(),
                        id: 5,
                    });
                    n
                },
                "parent \"eth9\" is not an interface",
            ),
            (
                {
                    let mut n = NetworkSpec::default();
                    n.bonds.push(BondSpec {
                        name: "b0".into(),
                        mode: "active-backup".into(),
                        members: vec!["eth1".into(), "52:54:00:00:00:02".into()],
                        miimon_ms: 100,
                    });
                    n
                },
                "eth1 is a member twice",
            ),
            (
                {
                    let mut n = NetworkSpec::default();
                    n.interfaces.push(InterfaceSpec {
                        matches: "eth1".into(),
                        ..InterfaceSpec::default()
                    });
                    n.interfaces.push(InterfaceSpec {
                        matches: "52:54:00:00:00:02".into(),
                        ..InterfaceSpec::default()
                    });
                    n
                },
                "eth1 is configured twice",
            ),
        ];
        for (i, (n, want)) in cases.into_iter().enumerate() {
            let got = plan(&n, &links(), &BTreeSet::new()).unwrap_err();
            assert!(got.contains(want), "case {i}: want {want:?} in {got:?}");
        }
        // The bonding driver's own empty bond0 is taken over; one with ports is not.
        let mut with_bond = links();
        let mut b = nic(7, "bond0", 7);
        b.kind = Some("bond".into());
        with_bond.push(b);
        let mut n = NetworkSpec::default();
        n.bonds.push(BondSpec {
            name: "bond0".into(),
            mode: "802.3ad".into(),
            members: vec!["eth1".into()],
            miimon_ms: 100,
        });
        assert!(plan(&n, &with_bond, &BTreeSet::new()).is_ok());
        with_bond[2].master = Some(7);
        let e = plan(&n, &with_bond, &BTreeSet::new()).unwrap_err();
        assert!(e.contains("already has a bond named so"), "{e}");
        // A link of that name that we created earlier is fine.
        let mut n = NetworkSpec::default();
        n.vlans.push(VlanSpec {
            name: "eth1".into(),
            parent: "eth0".into(),
            id: 5,
        });
        let ours: BTreeSet<String> = ["eth1".to_string()].into();
        assert!(plan(&n, &links(), &ours).is_ok());
    }

    #[test]
    fn dns_book_merges_in_rank_order_and_forgets_sources() {
        let up: dns::Upstream = Arc::new(std::sync::RwLock::new(Vec::new()));
        let mut b = DnsBook::detached(up);
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let c: Ipv4Addr = "10.0.0.3".parse().unwrap();
        b.entries.insert((100, "dhcp:eth0".into()), vec![a, c]);
        b.entries.insert((50, "static:eth1".into()), vec![c]);
        assert_eq!(b.merged(), vec![c, a]);
        b.entries.retain(|(_, s), _| s != "static:eth1");
        assert_eq!(b.merged(), vec![a, c]);
    }

    /// A route line starting with `start` and at metric 50.
    fn has_route(table: &str, start: &str) -> bool {
        table
            .lines()
            .any(|l| l.starts_with(start) && l.contains("metric 50"))
    }

    /// Applies `specs` in turn inside `ns` (one NodeConfig throughout);
    /// returns each apply's errors and bond0's / d0's ifindex after it.
    fn apply_in(
        ns: &crate::testnet::Ns,
        specs: Vec<&'static str>,
        upstream: dns::Upstream,
    ) -> Vec<(Vec<String>, Option<u32>)> {
        let book = Arc::new(Mutex::new(DnsBook::detached(upstream)));
        ns.enter(move || {
            let nl = Netlink::new().unwrap();
            let mut cfg = NodeConfig::new("t", book);
            let mut out = Vec::new();
            for text in specs {
                let spec: NetworkSpec = toml::from_str(text).unwrap();
                cairn_manifest::netcheck::validate(&spec).unwrap();
                let p = plan(&spec, &nl.links().unwrap(), &cfg.created()).unwrap();
                let errs = cfg.apply(&nl, &p);
                out.push((errs, nl.index_of("bond0").ok().or(nl.index_of("v10").ok())));
            }
            out
        })
        .join()
        .unwrap()
    }

    /// The reconcile against the real kernel in a network namespace:
    /// static IPv4 + IPv6 addresses, gateway, a route, MTU and resolvers;
    /// then a changed version; then the same version again.
    #[test]
    fn reconcile_changes_only_what_changed() {
        use crate::testnet::{can_run, Ns};
        if !can_run("network reconcile host test", &[]) {
            return;
        }
        let ns = Ns::new("nr");
        ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d0p"]);
        let v1 = r#"
            [[interface]]
            matches = "d0"
            mode = "static"
            addresses = ["10.5.0.2/24", "fd05::2/64"]
            gateway = "10.5.0.1"
            mtu = 1400
            dns = ["10.5.0.53"]
            route = [{ to = "10.6.0.0/16", via = "10.5.0.254" }]
        "#;
        let v2 = r#"
            dns = ["10.9.9.9"]
            [[interface]]
            matches = "d0"
            mode = "static"
            addresses = ["10.5.0.3/24", "fd05::2/64"]
            gateway = "10.5.0.1"
        "#;
        let upstream: dns::Upstream = Arc::new(std::sync::RwLock::new(Vec::new()));
        // First v1 alone, to look at the result.
        let r = apply_in(&ns, vec![v1], upstream.clone());
        assert_eq!(r[0].0, Vec::<String>::new());
        let links = ns.show(&["link", "show", "d0"]);
        assert!(
            links.contains("mtu 1400") && links.contains(",UP"),
            "{links}"
        );
        let addrs = ns.show(&["addr", "show", "d0"]);
        for a in ["10.5.0.2/24", "fd05::2/64"] {
            assert!(addrs.contains(a), "{a} in {addrs}");
        }
        let routes = ns.show(&["route"]);
        assert!(
            has_route(&routes, "default via 10.5.0.1 dev d0"),
            "{routes}"
        );
        assert!(
            has_route(&routes, "10.6.0.0/16 via 10.5.0.254 dev d0"),
            "{routes}"
        );
        assert_eq!(
            *upstream.read().unwrap(),
            vec!["10.5.0.53".parse::<Ipv4Addr>().unwrap()]
        );
        // A fresh NodeConfig (a new boot) applying v1 over v1 then v2, v2.
        let r = apply_in(&ns, vec![v1, v2, v2], upstream.clone());
        assert!(r.iter().all(|(e, _)| e.is_empty()), "{r:?}");
        let addrs = ns.show(&["addr", "show", "d0"]);
        assert!(
            addrs.contains("10.5.0.3/24") && !addrs.contains("10.5.0.2/24"),
            "{addrs}"
        );
        assert!(addrs.contains("fd05::2/64"), "{addrs}");
        let routes = ns.show(&["route"]);
        assert!(!routes.contains("10.6.0.0/16"), "{routes}");
        assert!(
            has_route(&routes, "default via 10.5.0.1 dev d0"),
            "{routes}"
        );
        assert_eq!(
            *upstream.read().unwrap(),
            vec!["10.9.9.9".parse::<Ipv4Addr>().unwrap()]
        );
    }

    /// Bonds and VLANs need the bonding and 8021q drivers: cairn's kernel
    /// has them (the QEMU end-to-end test uses both); a host kernel
    /// without them skips this test.
    #[test]
    fn reconcile_bonds_and_vlans() {
        use crate::testnet::{can_run, Ns};
        if !can_run("bond/VLAN host test", &[]) {
            return;
        }
        let ns = Ns::new("nb");
        for d in ["d0", "d1", "d2"] {
            ns.ip(&[
                "link",
                "add",
                d,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{d}p"),
            ]);
        }
        let probe = std::process::Command::new("ip")
            .args(["-n", &ns.name, "link", "add", "probe0", "type", "bond"])
            .output()
            .unwrap();
        if !probe.status.success() {
            println!("SKIP: bond/VLAN host test: this host kernel has no bonding driver ({}); the QEMU e2e covers bonds and VLANs", String::from_utf8_lossy(&probe.stderr).trim());
            return;
        }
        ns.ip(&["link", "del", "probe0"]);
        let v1 = r#"
            [[bond]]
            name = "bond0"
            mode = "active-backup"
            members = ["d1", "d2"]
            [[vlan]]
            name = "v10"
            parent = "d0"
            id = 10
            [[interface]]
            matches = "bond0"
            mode = "static"
            addresses = ["10.7.0.2/24"]
            [[interface]]
            matches = "v10"
            mode = "static"
            addresses = ["10.8.0.2/24"]
        "#;
        let v2 = r#"
            [[bond]]
            name = "bond0"
            mode = "active-backup"
            members = ["d1"]
            [[interface]]
            matches = "bond0"
            mode = "static"
            addresses = ["10.7.0.2/24"]
        "#;
        let up: dns::Upstream = Arc::new(std::sync::RwLock::new(Vec::new()));
        let r = apply_in(&ns, vec![v1], up.clone());
        assert_eq!(r[0].0, Vec::<String>::new());
        let links = ns.show(&["-d", "link"]);
        assert!(
            links.contains("master bond0") && links.contains("bond mode active-backup"),
            "{links}"
        );
        assert!(
            links.contains("v10@d0") && links.contains("id 10"),
            "{links}"
        );
        let addrs = ns.show(&["addr"]);
        assert!(
            addrs.contains("10.7.0.2/24") && addrs.contains("10.8.0.2/24"),
            "{addrs}"
        );
        let r = apply_in(&ns, vec![v1, v2, v2], up);
        assert!(r.iter().all(|(e, _)| e.is_empty()), "{r:?}");
        assert_eq!(r[1].1, r[2].1, "bond kept, not recreated");
        assert!(!ns.show(&["link"]).contains("v10"));
        assert!(!ns.show(&["link", "show", "d2"]).contains("master"));
    }
}
