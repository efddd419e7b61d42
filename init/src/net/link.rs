//! A blocking facade over rtnetlink: links, addresses, routes, bridge, veth.
//!
//! rtnetlink is async; PID 1's agent is a plain thread, so each call drives a
//! private current-thread runtime. A `Netlink` belongs to the network
//! namespace of the thread that created it.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    BondMode, InfoBond, InfoBridgePort, InfoData, InfoKind, InfoVlan, LinkAttribute, LinkMessage,
};
use rtnetlink::{
    LinkBond, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVlan, RouteMessageBuilder,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Netlink errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The socket or runtime could not be created.
    #[error("netlink setup: {0}")]
    Setup(#[from] std::io::Error),
    /// A request failed.
    #[error("netlink {what}: {source}")]
    Request {
        /// What we asked for.
        what: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// A named link does not exist.
    #[error("no network interface named {0:?}")]
    NoLink(String),
}

/// A physical-looking link.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// Kernel index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC address (a bond's ports take the bond's).
    pub mac: Option<[u8; 6]>,
    /// The hardware's own MAC (IFLA_PERM_ADDRESS), when the driver has one.
    pub perm_mac: Option<[u8; 6]>,
    /// Has a kind (bridge, veth, ...) rather than being a plain NIC.
    pub virtual_kind: bool,
    /// Carrier (IFF_LOWER_UP).
    pub carrier: bool,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Link kind (`vlan`, `bond`, `bridge`, `veth`, …); `None` for a NIC.
    pub kind: Option<String>,
    /// The bond or bridge this link is a port of.
    pub master: Option<u32>,
    /// A VLAN's parent link.
    pub parent: Option<u32>,
    /// A VLAN's id.
    pub vlan_id: Option<u16>,
    /// A bond's mode (`active-backup`, `802.3ad`, …).
    pub bond_mode: Option<String>,
    /// An active-backup bond's active port.
    pub bond_active: Option<u32>,
    /// MTU.
    pub mtu: u32,
}

/// A route as (destination, prefix length, gateway, metric).
pub type RouteEntry = (IpAddr, u8, Option<IpAddr>, u32);

/// Blocking netlink handle.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Request { what, source }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    /// All links.
    pub fn links(&self) -> Result<Vec<LinkInfo>, NetError> {
        let msgs: Vec<LinkMessage> = self
            .rt
            .block_on(self.handle.link().get().execute().try_collect())
            .map_err(req("list links"))?;
        Ok(msgs.into_iter().map(link_info).collect())
    }

    /// One link by index.
    pub fn link(&self, index: u32) -> Result<LinkInfo, NetError> {
        let msgs: Vec<LinkMessage> = self
            .rt
            .block_on(
                self.handle
                    .link()
                    .get()
                    .match_index(index)
                    .execute()
                    .try_collect(),
            )
            .map_err(req(format!("get link {index}")))?;
        msgs.into_iter()
            .next()
            .map(link_info)
            .ok_or_else(|| NetError::NoLink(format!("index {index}")))
    }

    /// A link's index by name.
    pub fn index_of(&self, name: &str) -> Result<u32, NetError> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.index)
            .ok_or_else(|| NetError::NoLink(name.to_string()))
    }

    /// Sets a link up.
    pub fn set_up(&self, index: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("set link {index} up")))
    }

    /// Renames a (down) link.
    pub fn rename(&self, index: u32, name: &str) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index)
            .name(name.to_string())
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("rename link {index} to {name}")))
    }

    /// Adds an address; an existing one is fine.
    pub fn add_address(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), NetError> {
        match self
            .rt
            .block_on(self.handle.address().add(index, addr, prefix).execute())
        {
            Err(e) if is_exists(&e) => Ok(()),
            r => r.map_err(req(format!("add address {addr}/{prefix} to link {index}"))),
        }
    }

    /// Every address on a link, as `addr/prefix` text.
    pub fn addresses(&self, index: u32) -> Result<Vec<String>, NetError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let msgs: Vec<_> = self
            .rt
            .block_on(
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect(),
            )
            .map_err(req(format!("list addresses of link {index}")))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(format!("{ip}/{}", m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Removes an address; a missing one is fine.
    pub fn del_address(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), NetError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let found = self.rt.block_on(async {
            let mut req = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            while let Some(m) = req.try_next().await? {
                let hit = m.header.prefix_len == prefix
                    && m.attributes
                        .iter()
                        .any(|a| matches!(a, AddressAttribute::Address(x) if *x == addr));
                if hit {
                    return Ok(Some(m));
                }
            }
            Ok::<_, rtnetlink::Error>(None)
        });
        match found.map_err(req(format!("list addresses of link {index}")))? {
            Some(m) => self
                .rt
                .block_on(self.handle.address().del(m).execute())
                .map_err(req(format!(
                    "delete address {addr}/{prefix} from link {index}"
                ))),
            None => Ok(()),
        }
    }

    /// Sets a link's MTU.
    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("set MTU {mtu} on link {index}")))
    }

    /// Sets an IPv4 route (`0.0.0.0/0` = default) out of link `index` at
    /// `metric`, replacing one with the same destination and metric (so a
    /// new router from a renewed lease takes effect). A 0.0.0.0 gateway
    /// means the destination is on-link.
    pub fn add_route(
        &self,
        index: u32,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        metric: u32,
    ) -> Result<(), NetError> {
        let via = (!gateway.is_unspecified()).then_some(IpAddr::V4(gateway));
        self.set_route(index, IpAddr::V4(dst), prefix, via, metric)
    }

    /// Sets a route of either family out of link `index` (replacing one with
    /// the same destination and metric); `via: None` = on-link.
    pub fn set_route(
        &self,
        index: u32,
        dst: IpAddr,
        prefix: u8,
        via: Option<IpAddr>,
        metric: u32,
    ) -> Result<(), NetError> {
        let msg = route_msg(index, dst, prefix, via, metric)?;
        self.rt
            .block_on(self.handle.route().add(msg).replace().execute())
            .map_err(req(format!(
                "set route {dst}/{prefix} via {via:?} (metric {metric})"
            )))
    }

    /// Removes a route set by [`Netlink::set_route`]; a missing one is fine.
    pub fn del_route(
        &self,
        index: u32,
        dst: IpAddr,
        prefix: u8,
        via: Option<IpAddr>,
        metric: u32,
    ) -> Result<(), NetError> {
        let msg = route_msg(index, dst, prefix, via, metric)?;
        match self.rt.block_on(self.handle.route().del(msg).execute()) {
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ESRCH => Ok(()),
            r => r.map_err(req(format!("delete route {dst}/{prefix} via {via:?}"))),
        }
    }

    /// Routes of the main table out of link `index`, both families:
    /// (destination, prefix length, gateway, metric).
    pub fn routes(&self, index: u32) -> Result<Vec<RouteEntry>, NetError> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
        let ip = |a: &RouteAddress| match a {
            RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
            RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
            _ => None,
        };
        let mut out = Vec::new();
        for (q, any) in [
            (
                RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ),
            (
                RouteMessageBuilder::<Ipv6Addr>::new().build(),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ),
        ] {
            let msgs: Vec<_> = self
                .rt
                .block_on(self.handle.route().get(q).execute().try_collect())
                .map_err(req(format!("list routes of link {index}")))?;
            for m in msgs {
                let (mut dst, mut gw, mut oif, mut metric, mut table) =
                    (any, None, None, 0, u32::from(m.header.table));
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = ip(d).unwrap_or(any),
                        RouteAttribute::Gateway(g) => gw = ip(g),
                        RouteAttribute::Oif(o) => oif = Some(*o),
                        RouteAttribute::Priority(p) => metric = *p,
                        RouteAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                if oif == Some(index) && table == 254 {
                    out.push((dst, m.header.destination_prefix_length, gw, metric));
                }
            }
        }
        Ok(out)
    }

    /// Creates an 802.1Q VLAN link on `parent` (down; see [`Netlink::set_up`]).
    pub fn create_vlan(&self, name: &str, parent: u32, id: u16) -> Result<u32, NetError> {
        let msg = LinkVlan::new(name, parent, id).build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(req(format!(
                "create VLAN {name} (id {id}) on link {parent}"
            )))?;
        self.index_of(name)
    }

    /// Creates a bond in `mode` (`active-backup` or `802.3ad`).
    pub fn create_bond(&self, name: &str, mode: &str, miimon_ms: u32) -> Result<u32, NetError> {
        let mode = match mode {
            "802.3ad" => BondMode::Ieee8023Ad,
            _ => BondMode::ActiveBackup,
        };
        let msg = LinkBond::new(name).mode(mode).miimon(miimon_ms).build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(req(format!("create bond {name}")))?;
        self.index_of(name)
    }

    /// Makes `index` a port of bond `master`: the kernel wants the port down
    /// while it joins; it is set up again afterwards.
    pub fn enslave(&self, index: u32, master: u32) -> Result<(), NetError> {
        self.set_down(index)?;
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("add link {index} to bond {master}")))?;
        self.set_up(index)
    }

    /// Takes `index` out of its bond or bridge.
    pub fn release(&self, index: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).nocontroller().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("release link {index} from its master")))
    }

    /// Sets a link down.
    pub fn set_down(&self, index: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).down().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("set link {index} down")))
    }

    /// Isolates a bridge port: isolated ports cannot exchange frames with
    /// each other, only with the bridge itself and non-isolated ports.
    pub fn set_port_isolated(&self, index: u32, isolated: bool) -> Result<(), NetError> {
        let msg = LinkBridgePort::new(index)
            .append_info_data(InfoBridgePort::Isolated(isolated))
            .build();
        self.rt
            .block_on(self.handle.link().set_port(msg).execute())
            .map_err(req(format!("set bridge port {index} isolated={isolated}")))
    }

    /// Creates a bridge (or finds it) and sets it up; returns its index.
    pub fn ensure_bridge(&self, name: &str) -> Result<u32, NetError> {
        if let Ok(i) = self.index_of(name) {
            return Ok(i);
        }
        let msg = LinkBridge::new(name).up().build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(req(format!("create bridge {name}")))?;
        self.index_of(name)
    }

    /// Creates a veth pair; returns (host index, peer index).
    pub fn create_veth(&self, host: &str, peer: &str) -> Result<(u32, u32), NetError> {
        // A leftover pair from a crashed start would make the add fail.
        if let Ok(i) = self.index_of(host) {
            self.delete(i)?;
        }
        let msg = LinkVeth::new(host, peer).build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(req(format!("create veth {host}/{peer}")))?;
        Ok((self.index_of(host)?, self.index_of(peer)?))
    }

    /// Attaches a link to a bridge and sets it up.
    pub fn set_master_up(&self, index: u32, bridge: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(bridge)
            .up()
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("attach link {index} to bridge {bridge}")))
    }

    /// Sets a link's MAC address.
    pub fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index)
            .address(mac.to_vec())
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("set the MAC of link {index}")))
    }

    /// Moves a link into the network namespace of a process.
    pub fn move_to_pid_netns(&self, index: u32, pid: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).setns_by_pid(pid).build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(req(format!("move link {index} to netns of pid {pid}")))
    }

    /// Deletes a link.
    pub fn delete(&self, index: u32) -> Result<(), NetError> {
        self.rt
            .block_on(self.handle.link().del(index).execute())
            .map_err(req(format!("delete link {index}")))
    }
}

fn route_msg(
    index: u32,
    dst: IpAddr,
    prefix: u8,
    via: Option<IpAddr>,
    metric: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage, NetError> {
    use rtnetlink::packet_route::route::RouteScope;
    let mismatch = || {
        NetError::NoLink(format!(
            "route {dst}/{prefix}: gateway {via:?} is another address family"
        ))
    };
    Ok(match dst {
        IpAddr::V4(d) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, prefix)
                .output_interface(index)
                .priority(metric);
            b = match via {
                None => b.scope(RouteScope::Link),
                Some(IpAddr::V4(g)) => b.gateway(g),
                Some(IpAddr::V6(_)) => return Err(mismatch()),
            };
            b.build()
        }
        IpAddr::V6(d) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, prefix)
                .output_interface(index)
                .priority(metric);
            b = match via {
                None => b,
                Some(IpAddr::V6(g)) => b.gateway(g),
                Some(IpAddr::V4(_)) => return Err(mismatch()),
            };
            b.build()
        }
    })
}

fn link_info(m: LinkMessage) -> LinkInfo {
    use rtnetlink::packet_route::link::{LinkFlags, LinkInfo as Info};
    let mut info = LinkInfo {
        index: m.header.index,
        name: String::new(),
        mac: None,
        perm_mac: None,
        virtual_kind: false,
        carrier: m.header.flags.contains(LinkFlags::LowerUp),
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
        master: None,
        parent: None,
        vlan_id: None,
        bond_mode: None,
        bond_active: None,
        mtu: 0,
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&a);
                info.mac = Some(mac);
            }
            LinkAttribute::PermAddress(a) if a.len() == 6 && a.iter().any(|b| *b != 0) => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&a);
                info.perm_mac = Some(mac);
            }
            LinkAttribute::LinkInfo(infos) => {
                info.virtual_kind = true;
                for i in infos {
                    match i {
                        Info::Kind(k) => info.kind = Some(kind_name(&k)),
                        Info::Data(InfoData::Vlan(v)) => {
                            info.vlan_id = v.iter().find_map(|x| match x {
                                InfoVlan::Id(id) => Some(*id),
                                _ => None,
                            })
                        }
                        Info::Data(InfoData::Bond(b)) => {
                            for x in b {
                                match x {
                                    InfoBond::Mode(m) => info.bond_mode = Some(m.to_string()),
                                    InfoBond::ActivePort(p) => info.bond_active = Some(p),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            LinkAttribute::Controller(c) => info.master = Some(c),
            LinkAttribute::Link(p) => info.parent = Some(p),
            LinkAttribute::Mtu(m) => info.mtu = m,
            _ => {}
        }
    }
    info
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Vlan => "vlan".into(),
        InfoKind::Bond => "bond".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}
