//! Checks of the `[network]` section that need no node: syntax of every
//! address, overlapping subnets, VLAN ids, bond modes, names. What depends on
//! the node's hardware (does `eth3` exist?) is checked by the node before it
//! touches anything.

use crate::types::{NetworkSpec, SpecError};
use std::net::{IpAddr, Ipv4Addr};

/// An address with its prefix length, `10.0.0.5/24` or `fd00::5/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The address as written (host bits kept).
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `addr/len` (IPv4 or IPv6).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = s.split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        let prefix: u8 = l.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & m))
            }
        }
    }

    /// Does `other`'s network overlap this one's (same family only)?
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let p = self.prefix.min(other.prefix);
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                mask(u32::from(a).into(), 32, p) == mask(u32::from(b).into(), 32, p)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                mask(u128::from(a), 128, p) == mask(u128::from(b), 128, p)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(v: u128, bits: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        v >> (bits - prefix)
    }
}

/// A Linux interface name: 1–15 bytes, no '/', ':', whitespace or NUL.
pub fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// `aa:bb:cc:dd:ee:ff` (case-insensitive) into bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Interface modes.
pub const MODES: &[&str] = &["dhcp", "static", "none"];
/// Bond modes.
pub const BOND_MODES: &[&str] = &["active-backup", "802.3ad"];

fn err(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError::Network {
        field: field.into(),
        problem: problem.into(),
    }
}

fn v4(field: &str, s: &str) -> Result<Ipv4Addr, SpecError> {
    s.parse()
        .map_err(|_| err(field, format!("{s:?} is not an IPv4 address")))
}

/// Checks `[network]`; see the module doc.
pub fn validate(n: &NetworkSpec) -> Result<(), SpecError> {
    for d in &n.dns {
        v4("dns", d)?;
    }
    for d in &n.ntp {
        v4("ntp", d)?;
    }
    let workload = crate::types::parse_ipv4_cidr(&n.workload_subnet).map(|(a, p)| Cidr {
        addr: IpAddr::V4(a),
        prefix: p,
    });
    // Names of links this manifest creates.
    let mut created: Vec<&str> = Vec::new();
    for v in &n.vlans {
        let f = format!("vlan[{}]", v.name);
        if !is_ifname(&v.name) {
            return Err(err(
                f,
                "name must be 1-15 characters without '/', ':' or spaces",
            ));
        }
        if !(1..=4094).contains(&v.id) {
            return Err(err(f, format!("id {} is not in 1-4094", v.id)));
        }
        if v.parent.is_empty() {
            return Err(err(f, "parent is empty"));
        }
        created.push(&v.name);
    }
    let mut members: Vec<&str> = Vec::new();
    for b in &n.bonds {
        let f = format!("bond[{}]", b.name);
        if !is_ifname(&b.name) {
            return Err(err(
                f,
                "name must be 1-15 characters without '/', ':' or spaces",
            ));
        }
        if !BOND_MODES.contains(&b.mode.as_str()) {
            return Err(err(
                f,
                format!("mode {:?} is not one of {BOND_MODES:?}", b.mode),
            ));
        }
        if b.members.is_empty() {
            return Err(err(f, "a bond needs at least one member"));
        }
        if b.miimon_ms == 0 || b.miimon_ms > 60_000 {
            return Err(err(
                f,
                format!("miimon_ms {} is not in 1-60000", b.miimon_ms),
            ));
        }
        for m in &b.members {
            if members.contains(&m.as_str()) {
                return Err(err(
                    f,
                    format!("member {m:?} is listed twice (a NIC joins one bond)"),
                ));
            }
            members.push(m);
        }
        created.push(&b.name);
    }
    for (i, a) in created.iter().enumerate() {
        if created[..i].contains(a) {
            return Err(err(a.to_string(), "two links are declared with this name"));
        }
        if members.contains(a) {
            return Err(err(
                format!("bond member {a}"),
                "a bond member must be a NIC",
            ));
        }
    }
    for v in &n.vlans {
        if members.contains(&v.parent.as_str()) {
            return Err(err(
                format!("vlan[{}]", v.name),
                format!(
                    "parent {:?} is a bond member; put the VLAN on the bond",
                    v.parent
                ),
            ));
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut nets: Vec<(String, Cidr)> = Vec::new();
    for i in &n.interfaces {
        let f = format!("interface[{}]", i.matches);
        if !(is_ifname(&i.matches) || parse_mac(&i.matches).is_some()) {
            return Err(err(
                f,
                "matches must be an interface name or a MAC (aa:bb:cc:dd:ee:ff)",
            ));
        }
        if seen.contains(&i.matches.as_str()) {
            return Err(err(f, "listed twice"));
        }
        seen.push(&i.matches);
        if members.contains(&i.matches.as_str()) {
            return Err(err(f, "is a bond member; configure the bond instead"));
        }
        if !MODES.contains(&i.mode.as_str()) {
            return Err(err(f, format!("mode {:?} is not one of {MODES:?}", i.mode)));
        }
        if i.mode == "static" && i.addresses.is_empty() {
            return Err(err(f, "mode static needs at least one address"));
        }
        if i.mode == "none"
            && (!i.addresses.is_empty()
                || i.gateway.is_some()
                || i.gateway6.is_some()
                || !i.routes.is_empty())
        {
            return Err(err(f, "mode none carries no addresses, gateways or routes"));
        }
        if let Some(m) = i.mtu {
            if !(68..=65535).contains(&m) {
                return Err(err(f, format!("mtu {m} is not in 68-65535")));
            }
        }
        for d in &i.dns {
            v4(&format!("{f}.dns"), d)?;
        }
        let mut mine = Vec::new();
        for a in &i.addresses {
            let c = Cidr::parse(a).ok_or_else(|| {
                err(
                    format!("{f}.addresses"),
                    format!("{a:?} is not an address in CIDR form (10.0.0.5/24, fd00::5/64)"),
                )
            })?;
            if let Some(w) = workload.filter(|w| w.overlaps(&c)) {
                return Err(err(
                    format!("{f}.addresses"),
                    format!("{a} overlaps the workload subnet {w}"),
                ));
            }
            if let Some((other, o)) = nets.iter().find(|(_, o)| o.overlaps(&c)) {
                return Err(err(
                    format!("{f}.addresses"),
                    format!("{a} overlaps {o} on {other}"),
                ));
            }
            mine.push((i.matches.clone(), c));
        }
        nets.extend(mine);
        if let Some(g) = &i.gateway {
            v4(&format!("{f}.gateway"), g)?;
        }
        if let Some(g) = &i.gateway6 {
            g.parse::<std::net::Ipv6Addr>().map_err(|_| {
                err(
                    format!("{f}.gateway6"),
                    format!("{g:?} is not an IPv6 address"),
                )
            })?;
        }
        for r in &i.routes {
            let to = Cidr::parse(&r.to)
                .ok_or_else(|| err(format!("{f}.route"), format!("to {:?} is not a CIDR", r.to)))?;
            if to.network() != to.addr {
                return Err(err(
                    format!("{f}.route"),
                    format!(
                        "to {:?} has host bits set (did you mean {}/{}?)",
                        r.to,
                        to.network(),
                        to.prefix
                    ),
                ));
            }
            if let Some(via) = &r.via {
                let ok = via
                    .parse::<IpAddr>()
                    .is_ok_and(|v| v.is_ipv4() == to.addr.is_ipv4());
                if !ok {
                    return Err(err(
                        format!("{f}.route[{}]", r.to),
                        format!("via {via:?} is not an address of the same family"),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{BondSpec, InterfaceSpec, VlanSpec};

    fn iface(m: &str, addrs: &[&str]) -> InterfaceSpec {
        InterfaceSpec {
            matches: m.into(),
            mode: "static".into(),
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            ..InterfaceSpec::default()
        }
    }

    type Edit = Box<dyn Fn(&mut NetworkSpec)>;

    fn check(n: &NetworkSpec) -> String {
        validate(n)
            .map(|()| "ok".to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn cidr_parse_and_overlap() {
        let a = Cidr::parse("10.0.0.5/24").unwrap();
        assert!(a.overlaps(&Cidr::parse("10.0.0.200/30").unwrap()));
        assert!(!a.overlaps(&Cidr::parse("10.0.1.1/24").unwrap()));
        assert!(a.overlaps(&Cidr::parse("0.0.0.0/0").unwrap()));
        let b = Cidr::parse("fd00::5/64").unwrap();
        assert!(b.overlaps(&Cidr::parse("fd00::9/120").unwrap()));
        assert!(!b.overlaps(&Cidr::parse("fd00:0:0:1::5/64").unwrap()));
        assert!(!b.overlaps(&a));
        for bad in [
            "10.0.0.5",
            "10.0.0.5/33",
            "fd00::/129",
            "x/1",
            "/24",
            "10.0.0.5/-1",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn good_network_passes() {
        let mut n = NetworkSpec::default();
        n.bonds.push(BondSpec {
            name: "bond0".into(),
            mode: "802.3ad".into(),
            members: vec!["eth2".into(), "52:54:00:00:00:03".into()],
            miimon_ms: 100,
        });
        n.vlans.push(VlanSpec {
            name: "vlan100".into(),
            parent: "bond0".into(),
            id: 100,
        });
        n.interfaces
            .push(iface("bond0", &["10.1.0.2/24", "fd00:1::2/64"]));
        n.interfaces.push(iface("vlan100", &["10.2.0.2/24"]));
        n.interfaces.push(InterfaceSpec {
            matches: "eth0".into(),
            mode: "dhcp".into(),
            addresses: vec!["fd00:9::1/64".into()],
            ..InterfaceSpec::default()
        });
        assert_eq!(check(&n), "ok");
    }

    #[test]
    fn each_mistake_is_named() {
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|n| {
                    n.interfaces = vec![
                        iface("eth0", &["10.1.0.2/24"]),
                        iface("eth1", &["10.1.0.3/16"]),
                    ]
                }),
                "10.1.0.3/16 overlaps 10.1.0.2/24 on eth0",
            ),
            (
                Box::new(|n| n.interfaces = vec![iface("eth0", &["10.88.0.9/16"])]),
                "overlaps the workload subnet",
            ),
            (
                Box::new(|n| n.interfaces = vec![iface("eth0", &["10.1.0.2"])]),
                "interface[eth0].addresses: \"10.1.0.2\" is not an address in CIDR form",
            ),
            (
                Box::new(|n| n.interfaces = vec![iface("eth0", &[])]),
                "needs at least one address",
            ),
            (
                Box::new(|n| {
                    n.interfaces = vec![
                        iface("eth0", &["10.1.0.2/24"]),
                        iface("eth0", &["10.2.0.2/24"]),
                    ]
                }),
                "listed twice",
            ),
            (
                Box::new(|n| {
                    n.interfaces = vec![InterfaceSpec {
                        matches: "eth0".into(),
                        mode: "auto".into(),
                        ..InterfaceSpec::default()
                    }]
                }),
                "mode \"auto\" is not one of",
            ),
            (
                Box::new(|n| {
                    n.interfaces = vec![InterfaceSpec {
                        matches: "eth0/../x".into(),
                        ..InterfaceSpec::default()
                    }]
                }),
                "matches must be",
            ),
            (
                Box::new(|n| {
                    n.interfaces = vec![InterfaceSpec {
                        matches: "eth0".into(),
                        mtu: Some(12),
                        ..InterfaceSpec::default()
                    }]
                }),
                "mtu 12",
            ),
            (
                Box::new(|n| {
                    n.interfaces = vec![InterfaceSpec {
                        matches: "eth0".into(),
                        gateway: Some("fd00::1".into()),
                        ..InterfaceSpec::default()
                    }]
                }),
                "gateway: \"fd00::1\" is not an IPv4",
            ),
            (
                Box::new(|n| {
                    n.interfaces = vec![InterfaceSpec {
                        matches: "eth0".into(),
                        mode: "none".into(),
                        addresses: vec!["10.1.0.2/24".into()],
                        ..InterfaceSpec::default()
                    }]
                }),
                "mode none carries no",
            ),
            (
                Box::new(|n| {
                    n.interfaces = vec![InterfaceSpec {
                        matches: "eth0".into(),
                        routes: vec![crate::types::RouteSpec {
                            to: "10.9.0.0/16".into(),
                            via: Some("fd00::1".into()),
                        }],
                        ..InterfaceSpec::default()
                    }]
                }),
                "same family",
            ),
            (
                Box::new(|n| {
                    n.vlans = vec![VlanSpec {
                        name: "v".into(),
                        parent: "eth0".into(),
                        id: 4095,
                    }]
                }),
                "id 4095",
            ),
            (
                Box::new(|n| {
                    n.vlans = vec![VlanSpec {
                        name: "a-very-long-vlan-name".into(),
                        parent: "eth0".into(),
                        id: 5,
                    }]
                }),
                "1-15 characters",
            ),
            (
                Box::new(|n| {
                    n.bonds = vec![BondSpec {
                        name: "bond0".into(),
                        mode: "round-robin".into(),
                        members: vec!["eth1".into()],
                        miimon_ms: 100,
                    }]
                }),
                "mode \"round-robin\"",
            ),
            (
                Box::new(|n| {
                    n.bonds = vec![BondSpec {
                        name: "bond0".into(),
                        mode: "active-backup".into(),
                        members: vec![],
                        miimon_ms: 100,
                    }]
                }),
                "at least one member",
            ),
            (
                Box::new(|n| {
                    n.bonds = vec![
                        BondSpec {
                            name: "b0".into(),
                            mode: "active-backup".into(),
                            members: vec!["eth1".into()],
                            miimon_ms: 100,
                        },
                        BondSpec {
                            name: "b1".into(),
                            mode: "active-backup".into(),
                            members: vec!["eth1".into()],
                            miimon_ms: 100,
                        },
                    ]
                }),
                "listed twice",
            ),
            (
                Box::new(|n| {
                    n.bonds = vec![BondSpec {
                        name: "bond0".into(),
                        mode: "active-backup".into(),
                        members: vec!["eth1".into()],
                        miimon_ms: 100,
                    }];
                    n.interfaces = vec![iface("eth1", &["10.1.0.2/24"])];
                }),
                "is a bond member",
            ),
            (
                Box::new(|n| {
                    n.bonds = vec![BondSpec {
                        name: "bond0".into(),
                        mode: "active-backup".into(),
                        members: vec!["eth1".into()],
                        miimon_ms: 100,
                    }];
                    n.vlans = vec![VlanSpec {
                        name: "v5".into(),
                        parent: "eth1".into(),
                        id: 5,
                    }];
                }),
                "put the VLAN on the bond",
            ),
            (
                Box::new(|n| n.ntp = vec!["pool.ntp.org".into()]),
                "ntp: \"pool.ntp.org\" is not an IPv4",
            ),
        ];
        for (i, (f, want)) in cases.into_iter().enumerate() {
            let mut n = NetworkSpec::default();
            f(&mut n);
            let got = check(&n);
            assert!(got.contains(want), "case {i}: want {want:?} in {got:?}");
        }
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use crate::types::{BondSpec, InterfaceSpec, RouteSpec, VlanSpec};
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,20}",
            "[0-9a-f:./]{0,24}",
            "(10|fd00:)[0-9.:]{0,12}/[0-9]{1,3}",
            "eth[0-9]",
        ]
    }

    fn spec() -> impl Strategy<Value = NetworkSpec> {
        let iface = (
            text(),
            text(),
            prop::collection::vec(text(), 0..3),
            prop::option::of(text()),
            prop::option::of(any::<u32>()),
            prop::collection::vec((text(), prop::option::of(text())), 0..2),
        )
            .prop_map(
                |(matches, mode, addresses, gateway, mtu, routes)| InterfaceSpec {
                    matches,
                    mode,
                    addresses,
                    gateway,
                    mtu,
                    routes: routes
                        .into_iter()
                        .map(|(to, via)| RouteSpec { to, via })
                        .collect(),
                    ..InterfaceSpec::default()
                },
            );
        let vlan = (text(), text(), any::<u16>()).prop_map(|(name, parent, id)| VlanSpec {
            name,
            parent,
            id,
        });
        let bond = (
            text(),
            text(),
            prop::collection::vec(text(), 0..3),
            any::<u32>(),
        )
            .prop_map(|(name, mode, members, miimon_ms)| BondSpec {
                name,
                mode,
                members,
                miimon_ms,
            });
        (
            text(),
            prop::collection::vec(iface, 0..4),
            prop::collection::vec(vlan, 0..2),
            prop::collection::vec(bond, 0..2),
            prop::collection::vec(text(), 0..2),
        )
            .prop_map(
                |(workload_subnet, interfaces, vlans, bonds, dns)| NetworkSpec {
                    workload_subnet,
                    interfaces,
                    vlans,
                    bonds,
                    dns,
                    ..NetworkSpec::default()
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Any network section: a verdict, never a panic; and whatever
        /// passes survives the format 2 encoding unchanged.
        #[test]
        fn any_network_section_gets_a_verdict(n in spec()) {
            let _ = validate(&n);
            let json = serde_json::to_vec(&n).unwrap();
            let back: NetworkSpec = serde_json::from_slice(&json).unwrap();
            prop_assert_eq!(back, n);
        }
    }
}
