//! A minimal DHCPv4 client (RFC 2131): DISCOVER → OFFER → REQUEST → ACK on
//! one interface, enough to boot on QEMU user networking and dnsmasq.
//! The full client (renew/rebind, NAK, INIT-REBOOT, option 121) is the
//! networking work's; the codec here is shared with it.
//!
//! Before the interface has an address we send from 0.0.0.0:68 with the
//! BROADCAST flag set, so servers broadcast their replies and a plain UDP
//! socket bound to the device receives them (no raw socket needed).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

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

/// Encodes a client message.
pub fn encode_request(
    kind: MsgType,
    xid: u32,
    mac: [u8; 6],
    requested: Option<(Ipv4Addr, Ipv4Addr)>,
    hostname: &str,
) -> Vec<u8> {
    let mut p = vec![0u8; FIXED_LEN];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80; // BROADCAST flag
    p[28..34].copy_from_slice(&mac);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[53, 1, kind.code()]);
    // Client identifier: type 1 (ethernet) + MAC.
    p.extend_from_slice(&[61, 7, 1]);
    p.extend_from_slice(&mac);
    if let Some((addr, server)) = requested {
        p.extend_from_slice(&[50, 4]);
        p.extend_from_slice(&addr.octets());
        p.extend_from_slice(&[54, 4]);
        p.extend_from_slice(&server.octets());
    }
    let host = hostname.as_bytes();
    if !host.is_empty() && host.len() < 64 {
        p.extend_from_slice(&[12, host.len() as u8]);
        p.extend_from_slice(host);
    }
    // Parameter request list: mask, router, dns, hostname, domain, mtu, ntp, lease, T1, T2, server id.
    p.extend_from_slice(&[55, 11, 1, 3, 6, 12, 15, 26, 42, 51, 58, 59, 54]);
    p.push(255);
    p
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
            _ => {} // unknown or malformed-length options are ignored
        }
        i += 2 + len;
    }
    Ok(r)
}

/// A lease we got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address.
    pub address: Ipv4Addr,
    /// Prefix length from the netmask.
    pub prefix: u8,
    /// Default gateway.
    pub router: Option<Ipv4Addr>,
    /// Resolvers.
    pub dns: Vec<Ipv4Addr>,
    /// Search domain.
    pub domain: Option<String>,
    /// Server identifier.
    pub server: Ipv4Addr,
    /// Lease time.
    pub lease_secs: u32,
}

/// Netmask → prefix length (counts leading ones).
pub fn prefix_len(mask: Ipv4Addr) -> u8 {
    u32::from(mask).leading_ones() as u8
}

fn random_xid() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u32::from_ne_bytes(b) ^ (crate::timeline::boot_ms() as u32)
}

fn bind_socket(iface: &str) -> io::Result<UdpSocket> {
    use std::os::fd::AsRawFd;
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))?;
    sock.set_broadcast(true)?;
    let name = iface.as_bytes();
    // SAFETY: the fd is a valid socket; `name` points to `name.len()` bytes.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn exchange(
    sock: &UdpSocket,
    packet: &[u8],
    xid: u32,
    want: MsgType,
    wait: Duration,
) -> io::Result<Option<Reply>> {
    sock.send_to(packet, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67))?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match decode_reply(&buf[..n]) {
            Ok(r)
                if r.xid == xid
                    && (r.msg_type == Some(want) || r.msg_type == Some(MsgType::Nak)) =>
            {
                return Ok(Some(r))
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "ignoring DHCP packet"),
        }
    }
    Ok(None)
}

/// Runs DISCOVER/OFFER/REQUEST/ACK until a lease is had, retransmitting with
/// exponential backoff (1 s doubling to 16 s) plus jitter. Each attempt is
/// bounded; the caller decides how long to keep trying.
pub fn acquire(iface: &str, mac: [u8; 6], hostname: &str, attempts: u32) -> io::Result<Lease> {
    let sock = bind_socket(iface)?;
    let mut wait = Duration::from_secs(1);
    for attempt in 1..=attempts {
        let xid = random_xid();
        let jitter = Duration::from_millis(u64::from(xid % 250));
        let discover = encode_request(MsgType::Discover, xid, mac, None, hostname);
        if let Some(offer) = exchange(&sock, &discover, xid, MsgType::Offer, wait + jitter)? {
            if offer.msg_type == Some(MsgType::Offer) {
                let server = offer.server_id.unwrap_or(Ipv4Addr::UNSPECIFIED);
                let request = encode_request(
                    MsgType::Request,
                    xid,
                    mac,
                    Some((offer.yiaddr, server)),
                    hostname,
                );
                match exchange(&sock, &request, xid, MsgType::Ack, wait + jitter)? {
                    Some(ack) if ack.msg_type == Some(MsgType::Ack) => {
                        return Ok(Lease {
                            address: ack.yiaddr,
                            prefix: ack.netmask.map_or(24, prefix_len),
                            router: ack.router,
                            dns: ack.dns,
                            domain: ack.domain,
                            server: ack.server_id.unwrap_or(server),
                            lease_secs: ack.lease_secs.unwrap_or(3600),
                        })
                    }
                    Some(_) => tracing::warn!(iface, attempt, "DHCP NAK; starting over"),
                    None => tracing::warn!(iface, attempt, "no DHCP ACK"),
                }
            }
        } else {
            tracing::warn!(
                iface,
                attempt,
                wait_ms = wait.as_millis() as u64,
                "no DHCP offer yet"
            );
        }
        wait = (wait * 2).min(Duration::from_secs(16));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no DHCP lease on {iface} after {attempts} attempts"),
    ))
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
    fn encodes_a_request_with_server_id() {
        let p = encode_request(
            MsgType::Request,
            0xdeadbeef,
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            Some((Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2))),
            "node1",
        );
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
}
