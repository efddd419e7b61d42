//! The workload DNS responder, on the bridge address port 53: a workload's
//! name resolves to its address (so containers, and later VMs, find each
//! other with no configuration); every other query is relayed to the node's
//! resolvers and the answer relayed back. Parsing never panics: malformed
//! queries get FORMERR or are dropped.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Names → addresses, shared with the supervisor.
pub type Table = Arc<RwLock<BTreeMap<String, Ipv4Addr>>>;

/// A parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Transaction id.
    pub id: u16,
    /// Lowercased name without the trailing dot.
    pub name: String,
    /// QTYPE (1 = A, 28 = AAAA).
    pub qtype: u16,
    /// QCLASS (1 = IN).
    pub qclass: u16,
    /// Recursion desired.
    pub rd: bool,
    /// End of the question section in the packet.
    pub end: usize,
}

/// Why a packet is not a query we can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Shorter than a header, or the question runs off the end.
    #[error("truncated DNS packet")]
    Truncated,
    /// A response, or not a standard query, or not exactly one question.
    #[error("not a standard query with one question")]
    NotAQuery,
    /// Compression in a question, label > 63, name > 255, or bad bytes.
    #[error("malformed name in the question")]
    BadName,
}

/// Parses a query's header and single question.
pub fn parse_query(p: &[u8]) -> Result<Query, DnsError> {
    if p.len() < 12 {
        return Err(DnsError::Truncated);
    }
    let flags = u16::from_be_bytes([p[2], p[3]]);
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let qdcount = u16::from_be_bytes([p[4], p[5]]);
    if qr || opcode != 0 || qdcount != 1 {
        return Err(DnsError::NotAQuery);
    }
    let mut i = 12;
    let mut labels: Vec<String> = Vec::new();
    let mut total = 0usize;
    loop {
        let len = *p.get(i).ok_or(DnsError::Truncated)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return Err(DnsError::BadName); // includes compression pointers (0xc0)
        }
        let label = p.get(i..i + len).ok_or(DnsError::Truncated)?;
        total += len + 1;
        if total > 255 || !label.iter().all(|b| b.is_ascii_graphic() && *b != b'.') {
            return Err(DnsError::BadName);
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let tail = p.get(i..i + 4).ok_or(DnsError::Truncated)?;
    Ok(Query {
        id: u16::from_be_bytes([p[0], p[1]]),
        name: labels.join("."),
        qtype: u16::from_be_bytes([tail[0], tail[1]]),
        qclass: u16::from_be_bytes([tail[2], tail[3]]),
        rd: flags & 0x0100 != 0,
        end: i + 4,
    })
}

/// Builds an authoritative answer to `q` (whose packet is `p`): one A
/// record when `addr` is given, otherwise NOERROR with no records (the
/// name exists but not with that type) or NXDOMAIN per `rcode`.
pub fn answer(p: &[u8], q: &Query, addr: Option<Ipv4Addr>, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end + 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    let mut flags: u16 = 0x8000 | 0x0400 | 0x0080; // QR, AA, RA
    if q.rd {
        flags |= 0x0100;
    }
    flags |= u16::from(rcode & 0xf);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&u16::from(addr.is_some()).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(&p[12..q.end]);
    if let Some(a) = addr {
        out.extend_from_slice(&[0xc0, 12]); // pointer to the question name
        out.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        out.extend_from_slice(&5u32.to_be_bytes()); // TTL: addresses can move
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&a.octets());
    }
    out
}

/// FORMERR for a packet whose question we could not read.
fn formerr(p: &[u8]) -> Option<Vec<u8>> {
    (p.len() >= 12).then(|| {
        let mut out = p[..12].to_vec();
        out[2] = 0x80 | (p[2] & 0x01);
        out[3] = 0x81; // RA, FORMERR
        out[4..12].fill(0);
        out
    })
}

/// What to do with one packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Relay the packet to an upstream resolver.
    Forward,
    /// Ignore it.
    Drop,
}

/// Decides the reply from the table: workload names (bare, or with the
/// `.cairn` suffix) are answered here; everything else is forwarded.
pub fn decide(p: &[u8], table: &BTreeMap<String, Ipv4Addr>) -> Reply {
    let q = match parse_query(p) {
        Ok(q) => q,
        Err(DnsError::NotAQuery) => return Reply::Drop,
        Err(_) => return formerr(p).map_or(Reply::Drop, Reply::Answer),
    };
    let name = q.name.strip_suffix(".cairn").unwrap_or(&q.name);
    match table.get(name) {
        Some(a) if q.qclass == 1 && q.qtype == 1 => Reply::Answer(answer(p, &q, Some(*a), 0)),
        Some(_) => Reply::Answer(answer(p, &q, None, 0)),
        None if q.name.ends_with(".cairn") || q.name == "cairn" => {
            Reply::Answer(answer(p, &q, None, 3))
        }
        None => Reply::Forward,
    }
}

/// Resolvers the relay forwards to; the node updates them as leases change.
pub type Upstream = Arc<RwLock<Vec<Ipv4Addr>>>;

/// Relays in flight at most; beyond that, SERVFAIL at once (a workload
/// flooding queries must not exhaust PID 1's threads and descriptors).
const MAX_RELAYS: usize = 64;

/// Who may ask: only workloads, `network/prefix`.
#[derive(Debug, Clone, Copy)]
pub struct Clients {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Clients {
    fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(a) & mask == u32::from(self.network) & mask
    }
}

/// Serves on `listen` (bound to `device`, answering only `clients`) until
/// the process ends. The listen address itself is never used as an
/// upstream (a resolver list pointing at us would loop forever).
pub fn serve(
    listen: SocketAddrV4,
    device: &str,
    clients: Clients,
    table: Table,
    upstream: Upstream,
) -> io::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    {
        use std::os::fd::AsRawFd;
        let name = device.as_bytes();
        // SAFETY: valid socket fd; `name` points to `name.len()` bytes. Bound
        // to the bridge, the responder cannot be reached from the uplink.
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
    }
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _ = std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let SocketAddr::V4(from4) = from else {
                    continue;
                };
                if !clients.contains(*from4.ip()) {
                    continue; // not a workload: no open resolver, no reflection
                }
                let packet = buf[..n].to_vec();
                let reply = decide(&packet, &table.read().unwrap_or_else(|e| e.into_inner()));
                match reply {
                    Reply::Answer(a) => {
                        let _ = sock.send_to(&a, from);
                    }
                    Reply::Forward => {
                        let ups: Vec<Ipv4Addr> = upstream
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .iter()
                            .copied()
                            .filter(|u| *u != *listen.ip() && !u.is_unspecified())
                            .collect();
                        let busy =
                            in_flight.load(std::sync::atomic::Ordering::Relaxed) >= MAX_RELAYS;
                        let sock2 = sock.try_clone();
                        match (busy || ups.is_empty(), sock2) {
                            (false, Ok(sock2)) => {
                                in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let counter = in_flight.clone();
                                // One short-lived thread per relayed query keeps a
                                // slow upstream from blocking answers for workloads.
                                let spawned = std::thread::Builder::new()
                                    .name("dns-fwd".into())
                                    .spawn(move || {
                                        relay(&sock2, &packet, from, &ups);
                                        counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                                    });
                                if spawned.is_err() {
                                    in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                            _ => {
                                if let Ok(q) = parse_query(&packet) {
                                    let _ = sock.send_to(&answer(&packet, &q, None, 2), from);
                                }
                            }
                        }
                    }
                    Reply::Drop => {}
                }
            }
        });
    tracing::info!(listen = %listen, device, "workload DNS responder up");
    Ok(())
}

fn relay(sock: &UdpSocket, packet: &[u8], from: SocketAddr, upstream: &[Ipv4Addr]) {
    for up in upstream {
        let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.send_to(packet, (*up, 53)).is_err() {
            continue;
        }
        let mut buf = [0u8; 4096];
        if let Ok((n, src)) = s.recv_from(&mut buf) {
            // Only a reply from the server we asked, to the same id.
            if src.ip() == std::net::IpAddr::V4(*up) && n >= 2 && buf[..2] == packet[..2] {
                let _ = sock.send_to(&buf[..n], from);
                return;
            }
        }
    }
    // No upstream answered: SERVFAIL rather than silence.
    if let Ok(q) = parse_query(packet) {
        let _ = sock.send_to(&answer(packet, &q, None, 2), from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            p.push(l.len() as u8);
            p.extend_from_slice(l.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        p
    }

    fn table() -> BTreeMap<String, Ipv4Addr> {
        BTreeMap::from([("web".to_string(), Ipv4Addr::new(10, 88, 0, 2))])
    }

    #[test]
    fn answers_workload_names() {
        for name in ["web", "WEB", "web.cairn"] {
            let q = query(name, 1);
            let Reply::Answer(a) = decide(&q, &table()) else {
                panic!("{name}")
            };
            assert_eq!(&a[..2], &[0x12, 0x34]);
            assert_eq!(a[3] & 0xf, 0, "NOERROR");
            assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
            assert_eq!(&a[a.len() - 4..], &[10, 88, 0, 2]);
        }
        // AAAA for a known name: NOERROR, no records.
        let Reply::Answer(a) = decide(&query("web", 28), &table()) else {
            panic!()
        };
        assert_eq!((a[3] & 0xf, u16::from_be_bytes([a[6], a[7]])), (0, 0));
        // Unknown .cairn name: NXDOMAIN. Anything else: forwarded.
        let Reply::Answer(a) = decide(&query("nope.cairn", 1), &table()) else {
            panic!()
        };
        assert_eq!(a[3] & 0xf, 3);
        assert_eq!(decide(&query("example.org", 1), &table()), Reply::Forward);
    }

    #[test]
    fn hostile_packets_do_not_panic() {
        let good = query("web", 1);
        for n in 0..good.len() {
            let _ = decide(&good[..n], &table());
        }
        // A compression pointer loop in the question: FORMERR, not a hang.
        let mut p = good[..12].to_vec();
        p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(decide(&p, &table()), Reply::Answer(a) if a[3] & 0xf == 1));
        // A response (QR set) is dropped, never answered (no reflection loops).
        let mut r = good.clone();
        r[2] |= 0x80;
        assert_eq!(decide(&r, &table()), Reply::Drop);
        // Over-long names and odd bytes are FORMERR.
        let long = query(&vec!["a".repeat(63); 5].join("."), 1);
        assert!(matches!(decide(&long, &table()), Reply::Answer(a) if a[3] & 0xf == 1));
        let mut odd = query("we b", 1);
        odd[13] = b' ';
        assert!(matches!(decide(&odd, &table()), Reply::Answer(a) if a[3] & 0xf == 1));
        // Pseudo-random garbage.
        let mut x: u32 = 7;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let mut p = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                p.push(x as u8);
            }
            let _ = decide(&p, &table());
        }
    }

    /// The relay path against a real resolver: dnsmasq answering a record
    /// in a private network namespace, our responder beside it.
    #[test]
    fn relays_other_names_to_a_real_resolver() {
        use crate::testnet::{can_run, Ns};
        if !can_run("DNS relay test", &["/usr/sbin/dnsmasq"]) {
            return;
        }
        let mut ns = Ns::new("cdns");
        ns.ip(&["addr", "add", "127.0.0.53/8", "dev", "lo"]);
        ns.spawn(
            "dnsmasq",
            &[
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--listen-address=127.0.0.53",
                "--bind-interfaces",
                "--address=/example.test/192.0.2.77",
            ],
            None,
        );
        std::thread::sleep(Duration::from_millis(300));
        let answer = ns
            .enter(|| {
                let table = Table::default();
                table
                    .write()
                    .unwrap()
                    .insert("web".into(), Ipv4Addr::new(10, 88, 0, 2));
                let listen = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5353);
                let clients = Clients {
                    network: Ipv4Addr::new(127, 0, 0, 0),
                    prefix: 8,
                };
                let ups = Arc::new(RwLock::new(vec![Ipv4Addr::new(127, 0, 0, 53)]));
                serve(listen, "lo", clients, table, ups).unwrap();
                let c = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut out = Vec::new();
                for name in ["example.test", "web"] {
                    c.send_to(&query(name, 1), listen).unwrap();
                    let mut buf = [0u8; 512];
                    let n = c.recv(&mut buf).unwrap();
                    out.push(buf[..n].to_vec());
                }
                out
            })
            .join()
            .unwrap();
        let (fwd, local) = (&answer[0], &answer[1]);
        assert_eq!(&fwd[..2], &[0x12, 0x34], "the relayed answer keeps the id");
        assert_eq!(fwd[3] & 0xf, 0);
        assert_eq!(
            &fwd[fwd.len() - 4..],
            &[192, 0, 2, 77],
            "answered by the upstream resolver"
        );
        assert_eq!(
            &local[local.len() - 4..],
            &[10, 88, 0, 2],
            "workload names stay local"
        );
    }
}
