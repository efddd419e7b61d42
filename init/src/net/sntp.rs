//! SNTP (RFC 4330): ask the NTP servers DHCP named (option 42) for the time
//! at boot and step the clock when it is off by more than a second, never
//! below the clock floor (SNTP is unauthenticated, so a forged answer may
//! move the clock forward but cannot roll it back past what the node has
//! already seen). The offset is reported in the node status.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds from 1900-01-01 (NTP era 0) to 1970-01-01.
const NTP_UNIX_DELTA: u64 = 2_208_988_800;

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Server time minus ours, milliseconds.
    pub offset_ms: i64,
    /// Round-trip delay, milliseconds.
    pub delay_ms: i64,
    /// Server stratum.
    pub stratum: u8,
}

/// Why an answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SntpError {
    /// Not 48 bytes or more.
    #[error("short NTP reply ({0} bytes)")]
    Short(usize),
    /// Not a server-mode reply.
    #[error("NTP reply is not from a server (mode {0})")]
    Mode(u8),
    /// Stratum 0 (kiss-o'-death) or the server says it is unsynchronised.
    #[error("NTP server refused or is unsynchronised (stratum {stratum}, leap {leap})")]
    Unsynchronised {
        /// Stratum.
        stratum: u8,
        /// Leap indicator.
        leap: u8,
    },
    /// The reply does not echo our request's transmit time (spoofed or stale).
    #[error("NTP reply does not answer our request (origin timestamp mismatch)")]
    Origin,
    /// A zero receive or transmit time (RFC 4330 §5: discard).
    #[error("NTP reply carries a zero timestamp")]
    ZeroTime,
}

fn to_ntp(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + NTP_UNIX_DELTA;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// NTP timestamp → milliseconds since the Unix epoch (signed: the clock
/// under test may be anywhere).
fn ntp_ms(ts: u64) -> i64 {
    let secs = (ts >> 32) as i64 - NTP_UNIX_DELTA as i64;
    let frac_ms = (((ts & 0xffff_ffff) * 1000) >> 32) as i64;
    secs * 1000 + frac_ms
}

/// A client request carrying `t1` as its transmit timestamp.
pub fn request(t1: u64) -> [u8; 48] {
    let mut p = [0u8; 48];
    p[0] = 0x23; // LI 0, version 4, mode 3 (client)
    p[40..48].copy_from_slice(&t1.to_be_bytes());
    p
}

/// Checks a reply to the request sent at `t1` and received at `t4`.
pub fn parse_reply(p: &[u8], t1: u64, t4: u64) -> Result<Sample, SntpError> {
    if p.len() < 48 {
        return Err(SntpError::Short(p.len()));
    }
    let (leap, mode, stratum) = (p[0] >> 6, p[0] & 7, p[1]);
    if mode != 4 {
        return Err(SntpError::Mode(mode));
    }
    if stratum == 0 || stratum > 15 || leap == 3 {
        return Err(SntpError::Unsynchronised { stratum, leap });
    }
    let ts = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    if ts(24) != t1 {
        return Err(SntpError::Origin);
    }
    if ts(32) == 0 || ts(40) == 0 {
        return Err(SntpError::ZeroTime);
    }
    let (t1, t2, t3, t4) = (ntp_ms(t1), ntp_ms(ts(32)), ntp_ms(ts(40)), ntp_ms(t4));
    Ok(Sample {
        offset_ms: ((t2 - t1) + (t3 - t4)) / 2,
        delay_ms: (t4 - t1) - (t3 - t2),
        stratum,
    })
}

/// Asks one server (2 s in all, however many stray packets arrive).
pub fn query(server: Ipv4Addr) -> io::Result<Sample> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let t1 = to_ntp(SystemTime::now());
    sock.send_to(&request(t1), SocketAddrV4::new(server, 123))?;
    let mut buf = [0u8; 128];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{server}: no NTP answer in 2 s"),
            ));
        }
        sock.set_read_timeout(Some(left))?;
        let (n, from) = sock.recv_from(&mut buf)?;
        if from.ip() != std::net::IpAddr::V4(server) {
            continue;
        }
        let t4 = to_ntp(SystemTime::now());
        return parse_reply(&buf[..n], t1, t4)
            .map_err(|e| io::Error::other(format!("{server}: {e}")));
    }
}

/// The clock to step to, or None when the offset is within a second. Never
/// below `floor` (unix seconds).
pub fn step_target(now_ms: i64, offset_ms: i64, floor: u64) -> Option<i64> {
    if offset_ms.abs() <= 1000 {
        return None;
    }
    Some((now_ms + offset_ms).max(floor as i64 * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(origin: u64, t2: u64, t3: u64, stratum: u8, first: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = first;
        p[1] = stratum;
        p[24..32].copy_from_slice(&origin.to_be_bytes());
        p[32..40].copy_from_slice(&t2.to_be_bytes());
        p[40..48].copy_from_slice(&t3.to_be_bytes());
        p
    }

    const S: u64 = 1 << 32; // one second in NTP units

    #[test]
    fn offset_and_delay() {
        let t1 = (NTP_UNIX_DELTA + 1_800_000_000) << 32;
        // Server 10 s ahead; 100 ms each way; 0 ms processing.
        let t2 = t1 + 10 * S + S / 10;
        let t3 = t2;
        let t4 = t1 + S / 5;
        let s = parse_reply(&reply(t1, t2, t3, 2, 0x24), t1, t4).unwrap();
        assert_eq!(s.stratum, 2);
        assert!((s.offset_ms - 10_000).abs() <= 1, "{s:?}");
        assert!((s.delay_ms - 200).abs() <= 1, "{s:?}");
    }

    #[test]
    fn refuses_bad_replies() {
        let t1 = (NTP_UNIX_DELTA + 1_800_000_000) << 32;
        assert_eq!(parse_reply(&[0; 10], t1, t1), Err(SntpError::Short(10)));
        assert_eq!(
            parse_reply(&reply(t1, t1, t1, 2, 0x23), t1, t1),
            Err(SntpError::Mode(3))
        );
        assert!(matches!(
            parse_reply(&reply(t1, t1, t1, 0, 0x24), t1, t1),
            Err(SntpError::Unsynchronised { .. })
        ));
        assert!(matches!(
            parse_reply(&reply(t1, t1, t1, 2, 0xe4), t1, t1),
            Err(SntpError::Unsynchronised { .. })
        ));
        assert_eq!(
            parse_reply(&reply(t1 + 1, t1, t1, 2, 0x24), t1, t1),
            Err(SntpError::Origin)
        );
        // Zero times would pull the clock back to 1900 (then to the floor).
        assert_eq!(
            parse_reply(&reply(t1, 0, 0, 2, 0x24), t1, t1),
            Err(SntpError::ZeroTime)
        );
    }

    #[test]
    fn steps_only_beyond_a_second_and_never_below_the_floor() {
        assert_eq!(step_target(1_000_000, 500, 0), None);
        assert_eq!(step_target(1_000_000, 5_000, 0), Some(1_005_000));
        // A forged answer far in the past cannot take the clock below the floor.
        assert_eq!(
            step_target(2_000_000_000_000, -1_900_000_000_000, 1_800_000_000),
            Some(1_800_000_000_000)
        );
    }

    #[test]
    fn request_layout() {
        let p = request(0x1122_3344_5566_7788);
        assert_eq!(p[0], 0x23);
        assert_eq!(&p[40..48], &0x1122_3344_5566_7788u64.to_be_bytes());
    }

    /// Against a real NTP server: chronyd in a private network namespace
    /// (its clock control off).
    #[test]
    fn queries_a_real_chronyd() {
        use crate::testnet::{can_run, Ns};
        if !can_run("SNTP test", &["/usr/sbin/chronyd"]) {
            return;
        }
        let mut ns = Ns::new("cntp");
        let dir = std::env::temp_dir().join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "allow all\nlocal stratum 8\nport 123\nbindaddress 127.0.0.1\ncmdport 0\npidfile {}\n",
                dir.join("chronyd.pid").display()
            ),
        )
        .unwrap();
        ns.spawn(
            "chronyd",
            &["-x", "-d", "-f", &conf.display().to_string()],
            None,
        );
        let sample = ns
            .enter(|| {
                let mut last = String::new();
                for _ in 0..30 {
                    match query(Ipv4Addr::LOCALHOST) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e.to_string(),
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(last)
            })
            .join()
            .unwrap();
        ns.kill_all();
        let _ = std::fs::remove_dir_all(&dir);
        let s = sample.expect("chronyd answered");
        assert_eq!(s.stratum, 8);
        // Same machine, same clock: the offset is small (not a timing gate:
        // a wrong sign or unit would be off by decades).
        assert!(s.offset_ms.abs() < 2_000, "{s:?}");
        assert!(s.delay_ms >= 0, "{s:?}");
    }
}
