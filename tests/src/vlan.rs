//! An 802.1Q peer without a VLAN driver: the host kernel of this machine has
//! no 8021q module, so the test speaks tagged ARP and ICMP itself on a
//! packet socket bound to the node's tap. What the node sends back proves
//! its VLAN link tags and untags frames on the wire.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x78, 0x01];

/// A frame received with its VLAN id (from the frame or the kernel's
/// auxiliary data, which holds the tag when the receive path stripped it).
struct Frame {
    vid: Option<u16>,
    ethertype: u16,
    src: [u8; 6],
    payload: Vec<u8>,
}

struct PacketSocket(i32);

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

impl PacketSocket {
    fn bind(ifname: &str) -> Result<PacketSocket> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: plain syscalls; the fd is owned by the returned value.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_ALL.to_be()),
            );
            if fd < 0 {
                bail!("packet socket: {}", std::io::Error::last_os_error());
            }
            let s = PacketSocket(fd);
            let index = libc::if_nametoindex(name.as_ptr());
            if index == 0 {
                bail!("no interface {ifname}");
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = index as i32;
            let rc = libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc != 0 {
                bail!("bind to {ifname}: {}", std::io::Error::last_os_error());
            }
            let one: i32 = 1;
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&one as *const i32).cast(),
                4,
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok(s)
        }
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: valid buffer for its length.
        let n = unsafe { libc::send(self.0, frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            bail!("send: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self) -> Option<Frame> {
        let mut buf = [0u8; 2048];
        let mut cbuf = [0u8; 256];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr filled with pointers to live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.len();
        // SAFETY: msg points at buffers that outlive the call.
        let n = unsafe { libc::recvmsg(self.0, &mut msg, 0) };
        if n < 14 {
            return None;
        }
        let data = &buf[..n as usize];
        let mut aux_vid = None;
        // SAFETY: walking the control messages the kernel just wrote.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux = std::ptr::read_unaligned(
                        libc::CMSG_DATA(c) as *const libc::tpacket_auxdata
                    );
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        aux_vid = Some(aux.tp_vlan_tci & 0x0fff);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let mut src = [0u8; 6];
        src.copy_from_slice(&data[6..12]);
        let et = u16::from_be_bytes([data[12], data[13]]);
        if et == ETH_P_8021Q && data.len() >= 18 {
            Some(Frame {
                vid: Some(u16::from_be_bytes([data[14], data[15]]) & 0x0fff),
                ethertype: u16::from_be_bytes([data[16], data[17]]),
                src,
                payload: data[18..].to_vec(),
            })
        } else {
            Some(Frame {
                vid: aux_vid,
                ethertype: et,
                src,
                payload: data[14..].to_vec(),
            })
        }
    }
}

fn tagged(dst: [u8; 6], vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&OUR_MAC);
    f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Asks `target` for its MAC with a tagged ARP request on `ifname`, then
/// pings it with a tagged ICMP echo; returns the node's MAC once a tagged
/// echo reply with our payload came back. Must run inside the namespace.
pub fn vlan_ping(
    ifname: &str,
    vid: u16,
    ours: Ipv4Addr,
    target: Ipv4Addr,
    limit: Duration,
) -> Result<[u8; 6]> {
    let s = PacketSocket::bind(ifname)?;
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&OUR_MAC);
    arp.extend_from_slice(&ours.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    let start = Instant::now();
    let mut node_mac = None;
    let mut last_send = None::<Instant>;
    while start.elapsed() < limit {
        if last_send.is_none_or(|t| t.elapsed() > Duration::from_millis(500)) {
            match node_mac {
                None => s.send(&tagged([0xff; 6], vid, ETH_P_ARP, &arp))?,
                Some(mac) => s.send(&tagged(mac, vid, ETH_P_IP, &echo(ours, target)))?,
            }
            last_send = Some(Instant::now());
        }
        let Some(f) = s.recv() else { continue };
        if f.vid != Some(vid) {
            continue;
        }
        let p = &f.payload;
        if f.ethertype == ETH_P_ARP && p.len() >= 28 && p[7] == 2 && p[14..18] == target.octets() {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&p[8..14]);
            node_mac = Some(mac);
            last_send = None;
        }
        if f.ethertype == ETH_P_IP
            && p.len() >= 28
            && p[9] == 1
            && p[12..16] == target.octets()
            && p[20] == 0
            && p.ends_with(b"cairn-vlan-probe")
        {
            return Ok(f.src);
        }
    }
    bail!(
        "no tagged (VLAN {vid}) {} from {target} on {ifname} within {limit:?}",
        if node_mac.is_some() {
            "ICMP echo reply"
        } else {
            "ARP reply"
        }
    )
}

fn echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(b"cairn-vlan-probe");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// Same as [`vlan_ping`], run on a thread inside `net`'s namespace.
pub fn vlan_ping_in(
    net: &crate::TestNet,
    ifname: &str,
    vid: u16,
    ours: Ipv4Addr,
    target: Ipv4Addr,
) -> Result<[u8; 6]> {
    let ifname = ifname.to_string();
    net.in_ns(move || vlan_ping(&ifname, vid, ours, target, Duration::from_secs(20)))?
        .context("VLAN probe")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        // RFC 1071 example bytes.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let ip = echo(Ipv4Addr::new(10, 78, 0, 1), Ipv4Addr::new(10, 78, 0, 2));
        assert_eq!(
            checksum(&ip[..20]),
            0,
            "a header with its checksum sums to zero"
        );
        assert_eq!(checksum(&ip[20..]), 0);
    }
}
