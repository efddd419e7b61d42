//! A blocking facade over rtnetlink: links, addresses, routes, bridge, veth.
//!
//! rtnetlink is async; PID 1's agent is a plain thread, so each call drives a
//! private current-thread runtime. A `Netlink` belongs to the network
//! namespace of the thread that created it.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};

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
    /// MAC address.
    pub mac: Option<[u8; 6]>,
    /// Has a kind (bridge, veth, ...) rather than being a plain NIC.
    pub virtual_kind: bool,
    /// Carrier (IFF_LOWER_UP).
    pub carrier: bool,
}

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
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(index)
            .priority(metric);
        if gateway.is_unspecified() {
            b = b.scope(rtnetlink::packet_route::route::RouteScope::Link);
        } else {
            b = b.gateway(gateway);
        }
        self.rt
            .block_on(self.handle.route().add(b.build()).replace().execute())
            .map_err(req(format!(
                "set route {dst}/{prefix} via {gateway} (metric {metric})"
            )))
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

fn link_info(m: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: m.header.index,
        name: String::new(),
        mac: None,
        virtual_kind: false,
        carrier: m
            .header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::LowerUp),
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&a);
                info.mac = Some(mac);
            }
            LinkAttribute::LinkInfo(_) => info.virtual_kind = true,
            _ => {}
        }
    }
    info
}
