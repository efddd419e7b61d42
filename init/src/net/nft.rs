//! Workload NAT with nftables over netlink (no `nft` binary): masquerade for
//! traffic leaving the workload subnet, DNAT for published tcp/udp ports on
//! the node's own addresses (from outside, from the node itself, and from
//! other workloads, which are masqueraded so replies come back through us).
//!
//! The whole table `ip cairn` is replaced in one netfilter batch, so the
//! kernel applies it atomically: there is never a moment without NAT, and a
//! refused batch leaves the previous rules in place.
//!
//! Equivalent nft syntax of what [`ruleset`] builds:
//! ```text
//! table ip cairn {
//!   chain prerouting  { type nat hook prerouting  priority -100; fib daddr type local <proto> dport P dnat to A:Q ... }
//!   chain output      { type nat hook output      priority -100; fib daddr type local <proto> dport P dnat to A:Q ... }
//!   chain postrouting { type nat hook postrouting priority 100;
//!                       ip saddr SUBNET oifname != "cairn0" masquerade
//!                       ip saddr SUBNET oifname "cairn0" ct status dnat masquerade }
//! }
//! ```

use std::io;
use std::net::Ipv4Addr;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_IPV4: u8 = 2;
const NLMSG_ERROR: u16 = 2;

/// Table name.
pub const TABLE: &str = "cairn";

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    /// 6 = tcp, 17 = udp.
    pub proto: u8,
    /// Port on the node.
    pub port: u16,
    /// Workload address.
    pub to: Ipv4Addr,
    /// Port in the workload.
    pub to_port: u16,
}

/// Everything NAT needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatPlan {
    /// Workload subnet network address.
    pub network: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The workload bridge.
    pub bridge: String,
    /// Published ports.
    pub dnat: Vec<Dnat>,
    /// Workloads may not reach each other directly (routed through the
    /// node either): only DNATed (published) traffic crosses the bridge.
    pub isolate: bool,
}

/// Builds netlink attributes.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.raw(ty, &b)
    }
    fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.raw(ty, &v.to_be_bytes())
    }
    fn nest(&mut self, ty: u16, inner: Attrs) -> &mut Self {
        self.raw(ty | NLA_F_NESTED, &inner.0)
    }
    fn data(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        let mut d = Attrs::default();
        d.raw(1, value); // NFTA_DATA_VALUE
        self.nest(ty, d)
    }
}

/// One nftables expression: its name and attributes.
struct Expr(&'static str, Attrs);

fn expr(name: &'static str, f: impl FnOnce(&mut Attrs)) -> Expr {
    let mut a = Attrs::default();
    f(&mut a);
    Expr(name, a)
}

const REG1: u32 = 1;
const REG2: u32 = 2;

fn meta(key: u32) -> Expr {
    expr("meta", |a| {
        a.be32(1, REG1).be32(2, key); // DREG, KEY
    })
}
fn cmp(op: u32, value: &[u8]) -> Expr {
    expr("cmp", |a| {
        a.be32(1, REG1).be32(2, op).data(3, value); // SREG, OP, DATA
    })
}
fn payload(base: u32, offset: u32, len: u32) -> Expr {
    expr("payload", |a| {
        a.be32(1, REG1).be32(2, base).be32(3, offset).be32(4, len);
    })
}
fn bitwise(mask: &[u8]) -> Expr {
    expr("bitwise", |a| {
        a.be32(1, REG1)
            .be32(2, REG1)
            .be32(3, mask.len() as u32)
            .data(4, mask)
            .data(5, &vec![0; mask.len()]);
    })
}
fn immediate(reg: u32, value: &[u8]) -> Expr {
    expr("immediate", |a| {
        a.be32(1, reg).data(2, value);
    })
}

const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_L4PROTO: u32 = 16;
const BASE_NETWORK: u32 = 1;
const BASE_TRANSPORT: u32 = 2;

fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(16, 0);
    b
}

fn saddr_in(network: Ipv4Addr, prefix: u8) -> Vec<Expr> {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    vec![
        payload(BASE_NETWORK, 12, 4),
        bitwise(&mask.to_be_bytes()),
        cmp(CMP_EQ, &network.octets()),
    ]
}

fn dnat_rule(d: &Dnat) -> Vec<Expr> {
    vec![
        // fib daddr type local (RTN_LOCAL = 2, host byte order in the register)
        expr("fib", |a| {
            a.be32(1, REG1).be32(2, 3).be32(3, 1 << 1);
        }),
        cmp(CMP_EQ, &2u32.to_ne_bytes()),
        meta(META_L4PROTO),
        cmp(CMP_EQ, &[d.proto]),
        payload(BASE_TRANSPORT, 2, 2),
        cmp(CMP_EQ, &d.port.to_be_bytes()),
        immediate(REG1, &d.to.octets()),
        immediate(REG2, &d.to_port.to_be_bytes()),
        expr("nat", |a| {
            // TYPE dnat, FAMILY ipv4, REG_ADDR_MIN, REG_PROTO_MIN
            a.be32(1, 1)
                .be32(2, u32::from(NFPROTO_IPV4))
                .be32(3, REG1)
                .be32(5, REG2);
        }),
    ]
}

fn masq() -> Expr {
    expr("masq", |_| {})
}

/// One message of the batch.
struct Msg {
    ty: u16,
    flags: u16,
    attrs: Attrs,
}

fn chain(name: &str, hook: u32, priority: i32) -> Msg {
    chain_of_type(name, hook, priority, "nat")
}

fn chain_of_type(name: &str, hook: u32, priority: i32, ty: &str) -> Msg {
    let mut h = Attrs::default();
    h.be32(1, hook).be32(2, priority as u32);
    let mut a = Attrs::default();
    a.str(1, TABLE).str(3, name).nest(4, h).str(7, ty);
    Msg {
        ty: NFT_MSG_NEWCHAIN,
        flags: NLM_F_CREATE,
        attrs: a,
    }
}

fn rule(chain: &str, exprs: Vec<Expr>) -> Msg {
    let mut list = Attrs::default();
    for Expr(name, data) in exprs {
        let mut e = Attrs::default();
        e.str(1, name).nest(2, data);
        list.nest(1, e);
    }
    let mut a = Attrs::default();
    a.str(1, TABLE).str(2, chain).nest(4, list);
    Msg {
        ty: NFT_MSG_NEWRULE,
        flags: NLM_F_CREATE | NLM_F_APPEND,
        attrs: a,
    }
}

fn table(ty: u16) -> Msg {
    let mut a = Attrs::default();
    a.str(1, TABLE);
    Msg {
        ty,
        flags: if ty == NFT_MSG_NEWTABLE {
            NLM_F_CREATE
        } else {
            0
        },
        attrs: a,
    }
}

/// The messages that replace table `cairn` with `plan` (add-if-missing,
/// delete, recreate: one atomic batch whether or not it existed).
fn ruleset(plan: &NatPlan) -> Vec<Msg> {
    let mut m = vec![
        table(NFT_MSG_NEWTABLE),
        table(NFT_MSG_DELTABLE),
        table(NFT_MSG_NEWTABLE),
    ];
    m.push(chain("prerouting", 0, -100));
    m.push(chain("output", 3, -100));
    m.push(chain("postrouting", 4, 100));
    for d in &plan.dnat {
        m.push(rule("prerouting", dnat_rule(d)));
        m.push(rule("output", dnat_rule(d)));
    }
    let mut out = saddr_in(plan.network, plan.prefix);
    out.push(meta(META_OIFNAME));
    out.push(cmp(CMP_NEQ, &ifname_bytes(&plan.bridge)));
    out.push(masq());
    m.push(rule("postrouting", out));
    // Hairpin: a workload reaching a published port lands on another (or the
    // same) workload on the bridge; masquerade so the reply returns via us.
    let mut hairpin = saddr_in(plan.network, plan.prefix);
    hairpin.push(meta(META_OIFNAME));
    hairpin.push(cmp(CMP_EQ, &ifname_bytes(&plan.bridge)));
    hairpin.push(expr("ct", |a| {
        a.be32(1, REG1).be32(2, 2); // DREG, KEY = status
    }));
    hairpin.push(bitwise(&0x20u32.to_ne_bytes())); // IPS_DST_NAT
    hairpin.push(cmp(CMP_NEQ, &0u32.to_ne_bytes()));
    hairpin.push(masq());
    m.push(rule("postrouting", hairpin));
    if plan.isolate {
        // forward: iifname BRIDGE oifname BRIDGE ct status & dnat == 0 drop
        m.push(chain_of_type("forward", 2, 0, "filter"));
        m.push(rule(
            "forward",
            vec![
                meta(META_IIFNAME),
                cmp(CMP_EQ, &ifname_bytes(&plan.bridge)),
                meta(META_OIFNAME),
                cmp(CMP_EQ, &ifname_bytes(&plan.bridge)),
                expr("ct", |a| {
                    a.be32(1, REG1).be32(2, 2);
                }),
                bitwise(&0x20u32.to_ne_bytes()),
                cmp(CMP_EQ, &0u32.to_ne_bytes()),
                drop_verdict(),
            ],
        ));
    }
    m
}

/// `immediate` of the verdict NF_DROP into the verdict register.
fn drop_verdict() -> Expr {
    expr("immediate", |a| {
        let mut code = Attrs::default();
        code.be32(1, 0); // NFTA_VERDICT_CODE = NF_DROP
        let mut data = Attrs::default();
        data.nest(2, code); // NFTA_DATA_VERDICT
        a.be32(1, 0).nest(2, data); // DREG = NFT_REG_VERDICT, DATA
    })
}

fn nlmsg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0); // version
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

/// Encodes the whole batch; returns the bytes and how many acks to expect.
pub fn encode(plan: &NatPlan, first_seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut buf = Vec::new();
    let mut seq = first_seq;
    nlmsg(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut acked = Vec::new();
    for m in ruleset(plan) {
        seq += 1;
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | m.ty;
        nlmsg(
            &mut buf,
            ty,
            NLM_F_REQUEST | NLM_F_ACK | m.flags,
            seq,
            NFPROTO_IPV4,
            0,
            &m.attrs.0,
        );
        acked.push(seq);
    }
    seq += 1;
    nlmsg(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (buf, acked)
}

/// Replaces the NAT table in the kernel (the caller's network namespace).
pub fn apply(plan: &NatPlan) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let first_seq = (crate::timeline::boot_ms() as u32).wrapping_mul(1000);
    let (buf, mut pending) = encode(plan, first_seq);
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: buf and addr are valid for the given lengths.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rbuf = vec![0u8; 65536];
    while !pending.is_empty() {
        // SAFETY: rbuf is writable for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), rbuf.as_mut_ptr().cast(), rbuf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::other(format!(
                "no complete reply from nf_tables ({} of the batch's messages unacknowledged): {e}",
                pending.len()
            )));
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(rbuf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes([rbuf[off + 4], rbuf[off + 5]]);
            let seq = u32::from_ne_bytes(rbuf[off + 8..off + 12].try_into().expect("4 bytes"));
            if len < 16 || off + len > n {
                break;
            }
            if ty == NLMSG_ERROR && len >= 20 {
                let err = i32::from_ne_bytes(rbuf[off + 16..off + 20].try_into().expect("4 bytes"));
                if err != 0 {
                    let idx = seq.wrapping_sub(first_seq);
                    return Err(io::Error::other(format!(
                        "nftables refused batch message {idx}: {}",
                        io::Error::from_raw_os_error(-err)
                    )));
                }
                pending.retain(|s| *s != seq);
            }
            off += (len + 3) & !3;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NatPlan {
        NatPlan {
            network: Ipv4Addr::new(10, 88, 0, 0),
            prefix: 24,
            bridge: "cairn0".into(),
            dnat: vec![Dnat {
                proto: 6,
                port: 8080,
                to: Ipv4Addr::new(10, 88, 0, 2),
                to_port: 80,
            }],
            isolate: false,
        }
    }

    /// Walks the netlink messages: lengths must tile the buffer exactly.
    fn messages(buf: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            let flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]);
            out.push((ty, flags, buf[off + 20..off + len].to_vec()));
            off += len;
        }
        assert_eq!(off, buf.len());
        out
    }

    fn attrs_well_formed(mut a: &[u8]) {
        while !a.is_empty() {
            let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
            let ty = u16::from_ne_bytes([a[2], a[3]]);
            assert!(
                len >= 4 && len <= a.len(),
                "attribute length {len} overruns {}",
                a.len()
            );
            if ty & NLA_F_NESTED != 0 {
                attrs_well_formed(&a[4..len]);
            }
            a = &a[((len + 3) & !3).min(a.len())..];
        }
    }

    #[test]
    fn batch_is_framed_and_atomic() {
        let (buf, acks) = encode(&plan(), 100);
        let msgs = messages(&buf);
        assert_eq!(msgs.first().unwrap().0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs.last().unwrap().0, NFNL_MSG_BATCH_END);
        // add table, delete table, add table, 3 chains, 2 dnat rules, 2 masquerade rules
        assert_eq!(msgs.len() - 2, 10);
        assert_eq!(acks.len(), 10);
        let types: Vec<u16> = msgs[1..4].iter().map(|m| m.0 & 0xff).collect();
        assert_eq!(
            types,
            [NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWTABLE]
        );
        for (_, flags, attrs) in &msgs[1..msgs.len() - 1] {
            assert!(flags & NLM_F_ACK != 0);
            attrs_well_formed(attrs);
        }
    }

    #[test]
    fn dnat_rule_carries_port_and_target() {
        let (buf, _) = encode(&plan(), 1);
        let hay = &buf[..];
        let find = |needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(find(&8080u16.to_be_bytes()));
        assert!(find(&[10, 88, 0, 2]));
        assert!(find(b"masq\0"));
        assert!(find(b"cairn0\0\0\0\0\0\0\0\0\0\0"));
    }

    /// Applies the batch to the real kernel in a fresh network namespace and
    /// reads it back with Debian's `nft` (root and the nft binary needed).
    #[test]
    fn kernel_accepts_the_batch_and_replaces_it_atomically() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP: nftables kernel test needs root");
            return;
        }
        if !std::path::Path::new("/usr/sbin/nft").exists() {
            println!(
                "SKIP: nft (Debian package nftables) not installed, cannot read the ruleset back"
            );
            return;
        }
        let out = std::thread::spawn(|| {
            // SAFETY: unshare only affects this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            apply(&plan()).expect("first apply");
            let mut p2 = plan();
            p2.dnat.push(Dnat {
                proto: 17,
                port: 5353,
                to: Ipv4Addr::new(10, 88, 0, 3),
                to_port: 53,
            });
            p2.isolate = true;
            apply(&p2).expect("second apply replaces the table");
            let o = std::process::Command::new("/usr/sbin/nft")
                .args(["list", "table", "ip", TABLE])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .join()
        .unwrap();
        println!("{out}");
        assert!(
            out.contains("type nat hook prerouting priority dstnat"),
            "{out}"
        );
        assert!(out.contains("tcp dport 8080 dnat to 10.88.0.2:80"), "{out}");
        assert!(out.contains("udp dport 5353 dnat to 10.88.0.3:53"), "{out}");
        assert!(
            out.contains("ip saddr 10.88.0.0/24 oifname != \"cairn0\" masquerade"),
            "{out}"
        );
        assert!(out.contains("ct status dnat masquerade"), "{out}");
        assert_eq!(
            out.matches("dport 8080").count(),
            2,
            "prerouting + output, not duplicated by the second apply: {out}"
        );
        assert!(
            out.contains("type filter hook forward priority filter"),
            "{out}"
        );
        assert!(
            out.contains("iifname \"cairn0\" oifname \"cairn0\" ct status & dnat == 0 drop")
                || out
                    .contains("iifname \"cairn0\" oifname \"cairn0\" ct status & dnat == 0x0 drop")
                || out.contains("iifname \"cairn0\" oifname \"cairn0\" ct status ! dnat drop"),
            "isolation rule: {out}"
        );
    }
}
