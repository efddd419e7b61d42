//! DHCPv4 wire format (RFC 2131/2132, RFC 3442 for option 121): encoding
//! client messages and decoding server replies. Decoding never panics on
//! hostile input: truncated options are errors, malformed fixed-size options
//! are ignored.

use std::net::Ipv4Addr;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const FIXED_LEN: usize = 236;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    /// 1
    Discover,
    /// 2
    Offer,
    /// 3
    Request,
    /// 5
    Ack,
    /// 6
    Nak,
    /// Anything else.
    Other(u8),
}

impl MsgType {
    fn code(self) -> u8 {
        match self {
            MsgType::Discover => 1,
            MsgType::Offer => 2,
            MsgType::Request => 3,
            MsgType::Ack => 5,
            MsgType::Nak => 6,
            MsgType::Other(c) => c,
        }
    }
    fn from_code(c: u8) -> MsgType {
        match c {
            1 => MsgType::Discover,
            2 => MsgType::Offer,
            3 => MsgType::Request,
            5 => MsgType::Ack,
            6 => MsgType::Nak,
            c => MsgType::Other(c),
        }
    }
}

/// A decoded server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Transaction id.
    pub xid: u32,
    /// Offered address.
    pub yiaddr: Ipv4Addr,
    /// Option 53.
    pub msg_type: Option<MsgType>,
    /// Option 1.
    pub netmask: Option<Ipv4Addr>,
    /// Option 3 (first).
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain: Option<String>,
    /// Option 51, seconds.
    pub lease_secs: Option<u32>,
    /// Option 54: where REQUESTs and renewals go (never `siaddr`).
    pub server_id: Option<Ipv4Addr>,
    /// Option 26.
    pub mtu: Option<u16>,
    /// Option 12 (the name the server gives us).
    pub hostname: Option<String>,
    /// Option 42.
    pub ntp: Vec<Ipv4Addr>,
    /// Option 58, seconds.
    pub t1: Option<u32>,
    /// Option 59, seconds.
    pub t2: Option<u32>,
    /// Option 121: (destination, prefix length, router); overrides option 3.
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
}

/// Why a packet was not a usable reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed header + magic.
    #[error("DHCP packet too short ({0} bytes)")]
    Short(usize),
    /// Not a BOOTREPLY.
    #[error("not a BOOTREPLY (op {0})")]
    NotReply(u8),
    /// Missing magic cookie.
    #[error("no DHCP magic cookie")]
    NoMagic,
    /// An option runs past the end.
    #[error("option {code} length {len} runs past the end of the packet")]
    Truncated {
        /// Option code.
        code: u8,
        /// Claimed length.
        len: usize,
    },
}

/// A client message, with the fields RFC 2131 (table 5) varies by state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// DISCOVER or REQUEST (or RELEASE).
    pub kind: MsgType,
    /// Transaction id.
    pub xid: u32,
    /// Our MAC (chaddr and client identifier).
    pub mac: [u8; 6],
    /// Our address when renewing/rebinding, else 0.0.0.0.
    pub ciaddr: Ipv4Addr,
    /// Option 50: in SELECTING and INIT-REBOOT only.
    pub requested: Option<Ipv4Addr>,
    /// Option 54: in SELECTING only.
    pub server_id: Option<Ipv4Addr>,
    /// Ask for broadcast replies (we have no address yet).
    pub broadcast: bool,
    /// Option 12.
    pub hostname: &'a str,
}

/// Encodes a client message.
pub fn encode(r: &Request) -> Vec<u8> {
    let mut p = vec![0u8; FIXED_LEN];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&r.xid.to_be_bytes());
    if r.broadcast {
        p[10] = 0x80;
    }
    p[12..16].copy_from_slice(&r.ciaddr.octets());
    p[28..34].copy_from_slice(&r.mac);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[53, 1, r.kind.code()]);
    // Client identifier: type 1 (ethernet) + MAC.
    p.extend_from_slice(&[61, 7, 1]);
    p.extend_from_slice(&r.mac);
    if let Some(addr) = r.requested {
        p.extend_from_slice(&[50, 4]);
        p.extend_from_slice(&addr.octets());
    }
    if let Some(server) = r.server_id {
        p.extend_from_slice(&[54, 4]);
        p.extend_from_slice(&server.octets());
    }
    let host = r.hostname.as_bytes();
    if !host.is_empty() && host.len() < 64 {
        p.extend_from_slice(&[12, host.len() as u8]);
        p.extend_from_slice(host);
    }
    // Parameter request list: mask, router, dns, hostname, domain, mtu,
    // ntp, lease, T1, T2, server id, classless routes.
    p.extend_from_slice(&[55, 12, 1, 3, 6, 12, 15, 26, 42, 51, 58, 59, 54, 121]);
    p.push(255);
    p
}

/// RFC 3442: `width, significant destination octets, router` repeated.
/// Returns `None` for a malformed list (the whole option is then ignored,
/// as the RFC asks).
pub fn parse_classless_routes(mut d: &[u8]) -> Option<Vec<(Ipv4Addr, u8, Ipv4Addr)>> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let width = d[0];
        if width > 32 {
            return None;
        }
        let sig = usize::from(width).div_ceil(8);
        let rest = d.get(1..1 + sig + 4)?;
        let mut dst = [0u8; 4];
        dst[..sig].copy_from_slice(&rest[..sig]);
        // Host bits set in the destination would make the kernel refuse the
        // route: keep only the prefix.
        let mask = u32::MAX.checked_shl(32 - u32::from(width)).unwrap_or(0);
        let dst = (u32::from_be_bytes(dst) & mask).to_be_bytes();
        out.push((Ipv4Addr::from(dst), width, ipv4(&rest[sig..sig + 4])));
        d = &d[1 + sig + 4..];
    }
    Some(out)
}

fn ipv4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// Decodes a server reply. Never panics on hostile input.
pub fn decode_reply(p: &[u8]) -> Result<Reply, DecodeError> {
    if p.len() < FIXED_LEN + 4 {
        return Err(DecodeError::Short(p.len()));
    }
    if p[0] != 2 {
        return Err(DecodeError::NotReply(p[0]));
    }
    if p[FIXED_LEN..FIXED_LEN + 4] != MAGIC {
        return Err(DecodeError::NoMagic);
    }
    let mut r = Reply {
        xid: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        yiaddr: ipv4(&p[16..20]),
        msg_type: None,
        netmask: None,
        router: None,
        dns: Vec::new(),
        domain: None,
        lease_secs: None,
        server_id: None,
        mtu: None,
        hostname: None,
        ntp: Vec::new(),
        t1: None,
        t2: None,
        routes: Vec::new(),
    };
    let mut i = FIXED_LEN + 4;
    while i < p.len() {
        let code = p[i];
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 {
            break;
        }
        let len = *p
            .get(i + 1)
            .ok_or(DecodeError::Truncated { code, len: 0 })? as usize;
        let data = p
            .get(i + 2..i + 2 + len)
            .ok_or(DecodeError::Truncated { code, len })?;
        match (code, len) {
            (53, 1) => r.msg_type = Some(MsgType::from_code(data[0])),
            (1, 4) => r.netmask = Some(ipv4(data)),
            (3, l) if l >= 4 && l % 4 == 0 => r.router = Some(ipv4(data)),
            (6, l) if l >= 4 && l % 4 == 0 => r.dns = data.chunks_exact(4).map(ipv4).collect(),
            (15, _) => {
                r.domain = std::str::from_utf8(data)
                    .ok()
                    .map(|s| s.trim_end_matches('\0').to_string())
            }
            (51, 4) => {
                r.lease_secs = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]))
            }
            (54, 4) => r.server_id = Some(ipv4(data)),
            (26, 2) => r.mtu = Some(u16::from_be_bytes([data[0], data[1]])),
            (12, l) if l > 0 => {
                r.hostname = std::str::from_utf8(data)
                    .ok()
                    .map(|s| s.trim_end_matches('\0').to_string())
            }
            (42, l) if l >= 4 && l % 4 == 0 => r.ntp = data.chunks_exact(4).map(ipv4).collect(),
            (58, 4) => r.t1 = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]])),
            (59, 4) => r.t2 = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]])),
            (121, _) => r.routes = parse_classless_routes(data).unwrap_or_default(),
            _ => {} // unknown or malformed-length options are ignored
        }
        i += 2 + len;
    }
    Ok(r)
}

/// Netmask → prefix length (counts leading ones).
pub fn prefix_len(mask: Ipv4Addr) -> u8 {
    u32::from(mask).leading_ones() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(options: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; FIXED_LEN];
        p[0] = 2;
        p[4..8].copy_from_slice(&7u32.to_be_bytes());
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        p.extend_from_slice(&MAGIC);
        p.extend_from_slice(options);
        p
    }

    #[test]
    fn decodes_an_ack() {
        let p = reply(&[
            53, 1, 5, 1, 4, 255, 255, 255, 0, 3, 4, 10, 0, 2, 2, 6, 8, 10, 0, 2, 3, 1, 1, 1, 1, 51,
            4, 0, 0, 14, 16, 54, 4, 10, 0, 2, 2, 26, 2, 5, 220, 0, 0, 255,
        ]);
        let r = decode_reply(&p).unwrap();
        assert_eq!(r.xid, 7);
        assert_eq!(r.msg_type, Some(MsgType::Ack));
        assert_eq!(r.yiaddr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(r.netmask.map(prefix_len), Some(24));
        assert_eq!(r.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(
            r.dns,
            vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)]
        );
        assert_eq!(r.lease_secs, Some(3600));
        assert_eq!(r.mtu, Some(1500));
    }

    #[test]
    fn hostile_packets_are_errors_not_panics() {
        assert_eq!(decode_reply(&[]), Err(DecodeError::Short(0)));
        assert!(matches!(
            decode_reply(&reply(&[53, 200])),
            Err(DecodeError::Truncated { code: 53, .. })
        ));
        assert!(matches!(
            decode_reply(&reply(&[6])),
            Err(DecodeError::Truncated { code: 6, len: 0 })
        ));
        // Bogus lengths for fixed-size options are ignored, not trusted.
        let r = decode_reply(&reply(&[1, 3, 1, 2, 3, 3, 3, 9, 9, 9, 255])).unwrap();
        assert_eq!(r.netmask, None);
        assert_eq!(r.router, None);
        // Every truncation of a valid packet decodes or errors cleanly.
        let full = reply(&[
            53, 1, 2, 6, 8, 1, 2, 3, 4, 5, 6, 7, 8, 15, 3, b'a', b'b', b'c', 255,
        ]);
        for n in 0..full.len() {
            let _ = decode_reply(&full[..n]);
        }
    }

    #[test]
    fn encodes_a_selecting_request() {
        let p = encode(&Request {
            kind: MsgType::Request,
            xid: 0xdeadbeef,
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested: Some(Ipv4Addr::new(10, 0, 2, 15)),
            server_id: Some(Ipv4Addr::new(10, 0, 2, 2)),
            broadcast: true,
            hostname: "node1",
        });
        assert_eq!(p[0], 1);
        assert_eq!(&p[4..8], &0xdeadbeefu32.to_be_bytes());
        assert_eq!(p[10], 0x80, "broadcast flag");
        assert_eq!(&p[28..34], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let opts = &p[FIXED_LEN + 4..];
        assert_eq!(&opts[..3], &[53, 1, 3]);
        assert!(opts.windows(6).any(|w| w == [50, 4, 10, 0, 2, 15]));
        assert!(opts.windows(6).any(|w| w == [54, 4, 10, 0, 2, 2]));
        assert!(opts
            .windows(7)
            .any(|w| w == [12, 5, b'n', b'o', b'd', b'e', b'1']));
        assert_eq!(*p.last().unwrap(), 255);
    }

    #[test]
    fn encodes_a_renewing_request() {
        let p = encode(&Request {
            kind: MsgType::Request,
            xid: 1,
            mac: [2; 6],
            ciaddr: Ipv4Addr::new(10, 0, 0, 9),
            requested: None,
            server_id: None,
            broadcast: false,
            hostname: "",
        });
        assert_eq!(p[10], 0, "no broadcast flag once we have an address");
        assert_eq!(&p[12..16], &[10, 0, 0, 9], "ciaddr");
        let opts = &p[FIXED_LEN + 4..];
        assert!(
            !opts.windows(2).any(|w| w == [50, 4]),
            "no requested address"
        );
        assert!(!opts.windows(2).any(|w| w == [54, 4]), "no server id");
    }

    #[test]
    fn classless_routes() {
        // 0.0.0.0/0 via 10.0.0.1; 192.168.128.0/17 via 10.0.0.2; 10.0.0.0/8 via 10.0.0.3
        let d = [
            0, 10, 0, 0, 1, 17, 192, 168, 128, 10, 0, 0, 2, 8, 10, 10, 0, 0, 3,
        ];
        let r = parse_classless_routes(&d).unwrap();
        assert_eq!(r[0], (Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            r[1],
            (
                Ipv4Addr::new(192, 168, 128, 0),
                17,
                Ipv4Addr::new(10, 0, 0, 2)
            )
        );
        assert_eq!(
            r[2],
            (Ipv4Addr::new(10, 0, 0, 0), 8, Ipv4Addr::new(10, 0, 0, 3))
        );
        assert_eq!(
            parse_classless_routes(&[33, 1, 2, 3, 4, 5, 6, 7, 8]),
            None,
            "width > 32"
        );
        assert_eq!(parse_classless_routes(&[24, 10, 0]), None, "truncated");
        for n in 0..d.len() {
            let _ = parse_classless_routes(&d[..n]);
        }
    }
}
