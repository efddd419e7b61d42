//! The DHCPv4 client state machine (RFC 2131 §4.4), free of I/O and clocks:
//! the driver feeds it packets and the time, and performs the [`Action`]s it
//! returns. That keeps every timer and transition unit-testable.
//!
//! ```text
//!  INIT ──DISCOVER──▶ SELECTING ──OFFER/REQUEST──▶ REQUESTING ──ACK──▶ BOUND
//!   ▲                                                  │NAK             │T1
//!   │◀─────────────────────────────────────────────────┘                ▼
//!   │◀──NAK / lease expired── REBINDING ◀──T2── RENEWING (unicast to the server id)
//!  INIT-REBOOT (previous address, carrier back) ──ACK──▶ BOUND, NAK/silence ──▶ INIT
//! ```
//!
//! Renewals go to the server identifier (option 54), never to `siaddr`
//! (the PXE next-server). Retransmissions back off exponentially (1 s
//! doubling to 16 s in INIT, half the remaining time in RENEWING and
//! REBINDING, at least 1 s) with up to ±25 % jitter.

use super::codec::{self, MsgType, Reply, Request};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// What the client knows about itself.
#[derive(Debug, Clone)]
pub struct Config {
    /// Interface MAC.
    pub mac: [u8; 6],
    /// Hostname to send (option 12).
    pub hostname: String,
}

/// A lease, as applied to the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address.
    pub address: Ipv4Addr,
    /// Prefix length (from option 1; /24 if absent... rather, see `from_ack`).
    pub prefix: u8,
    /// Default gateway: option 3, unless option 121 is present (RFC 3442).
    pub router: Option<Ipv4Addr>,
    /// Classless static routes (option 121), including any default route.
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    /// Resolvers.
    pub dns: Vec<Ipv4Addr>,
    /// Search domain.
    pub domain: Option<String>,
    /// NTP servers (option 42).
    pub ntp: Vec<Ipv4Addr>,
    /// MTU (option 26).
    pub mtu: Option<u16>,
    /// Server identifier: where renewals go.
    pub server: Ipv4Addr,
    /// Lease time, seconds.
    pub lease_secs: u32,
    /// T1, seconds (default lease/2).
    pub t1_secs: u32,
    /// T2, seconds (default lease*7/8).
    pub t2_secs: u32,
}

impl Lease {
    fn from_ack(ack: &Reply, fallback_server: Ipv4Addr) -> Lease {
        // Floors keep a hostile or broken server (lease 0, T1 0) from making
        // us renew in a tight loop: at most one renewal a second.
        let lease_secs = ack.lease_secs.unwrap_or(3600).max(10);
        let t2 = ack
            .t2
            .filter(|t| *t < lease_secs)
            .unwrap_or((u64::from(lease_secs) * 7 / 8) as u32)
            .max(2);
        let t1 = ack
            .t1
            .filter(|t| *t < t2)
            .unwrap_or(lease_secs / 2)
            .clamp(1, t2 - 1);
        Lease {
            address: ack.yiaddr,
            prefix: ack
                .netmask
                .map_or_else(|| classful_prefix(ack.yiaddr), codec::prefix_len),
            // RFC 3442: with option 121 present, option 3 is ignored.
            router: if ack.routes.is_empty() {
                ack.router
            } else {
                None
            },
            routes: ack.routes.clone(),
            dns: ack.dns.clone(),
            domain: ack.domain.clone(),
            ntp: ack.ntp.clone(),
            mtu: ack.mtu.filter(|m| *m >= 576),
            server: ack.server_id.unwrap_or(fallback_server),
            lease_secs,
            t1_secs: t1,
            t2_secs: t2,
        }
    }
}

fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255:67.
    Broadcast,
    /// The server's address, port 67.
    Unicast(Ipv4Addr),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this packet.
    Send(Vec<u8>, Dest),
    /// A lease was acquired or extended: apply it (replacing `previous`).
    Bind {
        /// The new lease.
        lease: Lease,
        /// What was applied before, if different.
        previous: Option<Lease>,
    },
    /// The lease is gone (expired or refused): remove its address and routes.
    Unbind(Lease),
}

/// Client states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Sending DISCOVERs.
    Selecting,
    /// Asked for an offered address.
    Requesting {
        /// The offer we took.
        offer: Ipv4Addr,
        /// Its server identifier.
        server: Ipv4Addr,
    },
    /// Asking to keep an address we had (reboot, carrier back).
    InitReboot {
        /// The address.
        address: Ipv4Addr,
    },
    /// Holding a lease.
    Bound,
    /// Extending with the server that gave the lease.
    Renewing,
    /// Extending with any server.
    Rebinding,
}

/// The client.
#[derive(Debug)]
pub struct Client {
    cfg: Config,
    state: State,
    lease: Option<(Lease, Instant)>,
    xid: u32,
    attempt: u32,
    deadline: Instant,
    rng: u64,
}

const INIT_FIRST: Duration = Duration::from_secs(1);
const INIT_MAX: Duration = Duration::from_secs(16);
const REQUEST_TRIES: u32 = 4;
const REBOOT_TRIES: u32 = 2;

impl Client {
    /// A client in INIT (or INIT-REBOOT when an earlier address is known).
    /// `seed` feeds transaction ids and jitter.
    pub fn new(cfg: Config, previous: Option<Ipv4Addr>, now: Instant, seed: u64) -> Client {
        let mut c = Client {
            cfg,
            state: State::Selecting,
            lease: None,
            xid: 0,
            attempt: 0,
            deadline: now,
            rng: seed | 1,
        };
        c.state = match previous {
            Some(address) => State::InitReboot { address },
            None => State::Selecting,
        };
        c
    }

    /// Current state.
    #[cfg(test)]
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The lease held, if any.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref().map(|(l, _)| l)
    }

    /// When `on_timer` must be called next.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    fn rand(&mut self) -> u64 {
        // xorshift64: only for xids and jitter.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        let quarter = d.as_millis() as u64 / 4;
        if quarter == 0 {
            return d;
        }
        let r = self.rand() % (2 * quarter + 1);
        Duration::from_millis(d.as_millis() as u64 - quarter + r)
    }

    fn request(
        &self,
        kind: MsgType,
        ciaddr: Ipv4Addr,
        requested: Option<Ipv4Addr>,
        server_id: Option<Ipv4Addr>,
    ) -> Vec<u8> {
        codec::encode(&Request {
            kind,
            xid: self.xid,
            mac: self.cfg.mac,
            ciaddr,
            requested,
            server_id,
            broadcast: ciaddr.is_unspecified(),
            hostname: &self.cfg.hostname,
        })
    }

    fn backoff_init(&mut self) -> Duration {
        let base = INIT_FIRST
            .saturating_mul(1 << self.attempt.min(4))
            .min(INIT_MAX);
        self.jitter(base)
    }

    /// Half the time left until `until`, at least 1 s.
    fn half_until(&mut self, now: Instant, until: Instant) -> Instant {
        let left = until.saturating_duration_since(now);
        now + (left / 2)
            .max(Duration::from_secs(1))
            .min(left.max(Duration::from_millis(1)))
    }

    fn times(&self) -> Option<(Instant, Instant, Instant)> {
        self.lease.as_ref().map(|(l, at)| {
            (
                *at + Duration::from_secs(u64::from(l.t1_secs)),
                *at + Duration::from_secs(u64::from(l.t2_secs)),
                *at + Duration::from_secs(u64::from(l.lease_secs)),
            )
        })
    }

    fn restart_init(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some((l, _)) = self.lease.take() {
            out.push(Action::Unbind(l));
        }
        self.state = State::Selecting;
        self.attempt = 0;
        self.deadline = now;
        out
    }

    /// Carrier came back: verify the address we hold with INIT-REBOOT (we
    /// may be on another network now) instead of trusting it or starting
    /// from scratch. Without a lease, start a fresh DISCOVER at once.
    pub fn on_carrier_up(&mut self, now: Instant) {
        self.state = match self.lease() {
            Some(l) => State::InitReboot { address: l.address },
            None => State::Selecting,
        };
        self.attempt = 0;
        self.deadline = now;
    }

    /// Time passed: (re)transmit, or move on when a timer ran out.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        if now < self.deadline {
            return Vec::new();
        }
        // A held lease's own clock comes first: expiry beats everything.
        if let Some((t1, t2, end)) = self.times() {
            if now >= end {
                return self.restart_init(now);
            }
            if self.state == State::Bound && now >= t1 {
                self.state = State::Renewing;
                self.attempt = 0;
            }
            if self.state == State::Renewing && now >= t2 {
                self.state = State::Rebinding;
                self.attempt = 0;
            }
        }
        match self.state.clone() {
            State::Selecting => {
                // One xid for the whole SELECTING phase: a slow OFFER to an
                // earlier DISCOVER is still ours.
                if self.attempt == 0 {
                    self.xid = self.rand() as u32;
                }
                let pkt = self.request(MsgType::Discover, Ipv4Addr::UNSPECIFIED, None, None);
                let wait = self.backoff_init();
                self.attempt += 1;
                self.deadline = now + wait;
                vec![Action::Send(pkt, Dest::Broadcast)]
            }
            State::Requesting { offer, server } => {
                if self.attempt >= REQUEST_TRIES {
                    return self.restart_init(now);
                }
                let pkt = self.request(
                    MsgType::Request,
                    Ipv4Addr::UNSPECIFIED,
                    Some(offer),
                    Some(server),
                );
                let wait = self.backoff_init();
                self.attempt += 1;
                self.deadline = now + wait;
                vec![Action::Send(pkt, Dest::Broadcast)]
            }
            State::InitReboot { address } => {
                if self.attempt >= REBOOT_TRIES {
                    // Nobody answered. With an unexpired lease (carrier
                    // flap, server briefly away) keep it, as RFC 2131 allows,
                    // and go on renewing at T1; without one, start over.
                    if self.lease.is_some() {
                        tracing::warn!("no answer to INIT-REBOOT: keeping the unexpired lease");
                        self.state = State::Bound;
                        self.attempt = 0;
                        self.deadline = now;
                        return self.on_timer(now);
                    }
                    return self.restart_init(now);
                }
                if self.attempt == 0 {
                    self.xid = self.rand() as u32;
                }
                let pkt =
                    self.request(MsgType::Request, Ipv4Addr::UNSPECIFIED, Some(address), None);
                let wait = self.backoff_init();
                self.attempt += 1;
                self.deadline = now + wait;
                vec![Action::Send(pkt, Dest::Broadcast)]
            }
            State::Bound => {
                let (t1, _, _) = self.times().expect("bound implies a lease");
                self.deadline = t1;
                Vec::new()
            }
            State::Renewing => {
                let (_, t2, _) = self.times().expect("renewing implies a lease");
                let (addr, server) = self.lease().map(|l| (l.address, l.server)).expect("lease");
                if self.attempt == 0 {
                    self.xid = self.rand() as u32;
                }
                self.attempt += 1;
                let pkt = self.request(MsgType::Request, addr, None, None);
                self.deadline = self.half_until(now, t2);
                vec![Action::Send(pkt, Dest::Unicast(server))]
            }
            State::Rebinding => {
                let (_, _, end) = self.times().expect("rebinding implies a lease");
                let addr = self.lease().map(|l| l.address).expect("lease");
                if self.attempt == 0 {
                    self.xid = self.rand() as u32;
                }
                self.attempt += 1;
                let pkt = self.request(MsgType::Request, addr, None, None);
                self.deadline = self.half_until(now, end);
                vec![Action::Send(pkt, Dest::Broadcast)]
            }
        }
    }

    /// A packet arrived on port 68.
    pub fn on_packet(&mut self, bytes: &[u8], now: Instant) -> Vec<Action> {
        let Ok(r) = codec::decode_reply(bytes) else {
            return Vec::new();
        };
        if r.xid != self.xid || r.msg_type.is_none() {
            return Vec::new();
        }
        let from_server = |server: Ipv4Addr| r.server_id.is_none_or(|s| s == server);
        match (self.state.clone(), r.msg_type) {
            (State::Selecting, Some(MsgType::Offer)) if !r.yiaddr.is_unspecified() => {
                let Some(server) = r.server_id else {
                    return Vec::new();
                };
                self.state = State::Requesting {
                    offer: r.yiaddr,
                    server,
                };
                self.attempt = 0;
                self.deadline = now;
                self.on_timer(now)
            }
            (State::Requesting { offer, server }, Some(MsgType::Ack))
                if r.yiaddr == offer && from_server(server) =>
            {
                self.bind(&r, server, now)
            }
            (State::InitReboot { address }, Some(MsgType::Ack)) if r.yiaddr == address => {
                // Without option 54, keep renewing with the server we knew.
                let server = r
                    .server_id
                    .or(self.lease().map(|l| l.server))
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                self.bind(&r, server, now)
            }
            (State::Renewing | State::Rebinding, Some(MsgType::Ack))
                if Some(r.yiaddr) == self.lease().map(|l| l.address) =>
            {
                let server = self
                    .lease()
                    .map(|l| l.server)
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                self.bind(&r, server, now)
            }
            (
                State::Requesting { .. }
                | State::InitReboot { .. }
                | State::Renewing
                | State::Rebinding,
                Some(MsgType::Nak),
            ) => {
                tracing::warn!(state = ?self.state, server = ?r.server_id, "DHCP NAK: back to INIT");
                self.restart_init(now)
            }
            _ => Vec::new(),
        }
    }

    fn bind(&mut self, ack: &Reply, server: Ipv4Addr, now: Instant) -> Vec<Action> {
        let lease = Lease::from_ack(ack, server);
        let previous = self.lease.take().map(|(l, _)| l).filter(|p| *p != lease);
        self.lease = Some((lease.clone(), now));
        self.state = State::Bound;
        self.attempt = 0;
        self.deadline = now + Duration::from_secs(u64::from(lease.t1_secs));
        vec![Action::Bind { lease, previous }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const NEXT_SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
    const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

    fn client(prev: Option<Ipv4Addr>) -> (Client, Instant) {
        let now = Instant::now();
        (
            Client::new(
                Config {
                    mac: MAC,
                    hostname: "n1".into(),
                },
                prev,
                now,
                42,
            ),
            now,
        )
    }

    /// A server reply; `siaddr` is a PXE next-server, different from the server id.
    fn reply(xid: u32, kind: u8, yiaddr: Ipv4Addr, extra: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 236];
        p[0] = 2;
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&yiaddr.octets());
        p[20..24].copy_from_slice(&NEXT_SERVER.octets());
        p.extend_from_slice(&[99, 130, 83, 99, 53, 1, kind, 54, 4, 10, 0, 0, 1]);
        p.extend_from_slice(extra);
        p.push(255);
        p
    }

    fn sent(actions: &[Action]) -> (Vec<u8>, Dest) {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Send(p, d) => Some((p.clone(), *d)),
                _ => None,
            })
            .expect("a packet was sent")
    }

    fn xid_of(p: &[u8]) -> u32 {
        u32::from_be_bytes([p[4], p[5], p[6], p[7]])
    }

    /// lease 100 s, T1 10 s, T2 20 s, mask /24, router, classless route.
    const ACK_OPTS: &[u8] = &[
        51, 4, 0, 0, 0, 100, 58, 4, 0, 0, 0, 10, 59, 4, 0, 0, 0, 20, 1, 4, 255, 255, 255, 0, 3, 4,
        10, 0, 0, 254,
    ];

    fn bound() -> (Client, Instant) {
        let (mut c, now) = client(None);
        let d = c.on_timer(now);
        let xid = xid_of(&sent(&d).0);
        let r = c.on_packet(&reply(xid, 2, ME, &[]), now);
        assert!(matches!(c.state(), State::Requesting { .. }));
        let (req, dest) = sent(&r);
        assert_eq!(dest, Dest::Broadcast);
        assert!(
            req.windows(6).any(|w| w == [54, 4, 10, 0, 0, 1]),
            "REQUEST names the server id"
        );
        let a = c.on_packet(&reply(xid, 5, ME, ACK_OPTS), now);
        assert!(
            matches!(&a[0], Action::Bind { lease, previous: None } if lease.address == ME && lease.prefix == 24)
        );
        (c, now)
    }

    #[test]
    fn discover_offer_request_ack() {
        let (c, now) = bound();
        assert_eq!(c.state(), &State::Bound);
        assert_eq!(
            c.deadline(),
            now + Duration::from_secs(10),
            "next wake-up at T1"
        );
    }

    #[test]
    fn renews_by_unicast_to_the_server_id_never_the_next_server() {
        let (mut c, now) = bound();
        let t1 = now + Duration::from_secs(10);
        let a = c.on_timer(t1);
        assert_eq!(c.state(), &State::Renewing);
        let (p, dest) = sent(&a);
        assert_eq!(
            dest,
            Dest::Unicast(SERVER),
            "renewal goes to option 54, not siaddr {NEXT_SERVER}"
        );
        assert_eq!(&p[12..16], &ME.octets(), "ciaddr set while renewing");
        assert_eq!(p[10], 0, "no broadcast flag");
        // Retransmission at half the time left to T2 (20 s): 5 s later.
        assert_eq!(c.deadline(), t1 + Duration::from_secs(5));
        let ack = c.on_packet(
            &reply(xid_of(&p), 5, ME, ACK_OPTS),
            t1 + Duration::from_secs(1),
        );
        assert!(
            matches!(&ack[0], Action::Bind { previous: None, .. }),
            "same lease: nothing to replace"
        );
        assert_eq!(c.state(), &State::Bound);
    }

    #[test]
    fn rebinds_by_broadcast_at_t2_and_unbinds_at_expiry() {
        let (mut c, now) = bound();
        let _ = c.on_timer(now + Duration::from_secs(10));
        let a = c.on_timer(now + Duration::from_secs(20));
        assert_eq!(c.state(), &State::Rebinding);
        assert_eq!(sent(&a).1, Dest::Broadcast);
        // Retransmissions keep coming until expiry, then the address goes.
        let mut t = now + Duration::from_secs(20);
        while c.state() == &State::Rebinding {
            t = c.deadline();
            let a = c.on_timer(t);
            if let Some(Action::Unbind(l)) = a.first() {
                assert_eq!(l.address, ME);
            }
        }
        assert!(
            t >= now + Duration::from_secs(100),
            "address kept until the lease ends"
        );
        assert_eq!(c.state(), &State::Selecting);
        assert!(c.lease().is_none());
    }

    #[test]
    fn nak_while_renewing_unbinds_and_restarts() {
        let (mut c, now) = bound();
        let a = c.on_timer(now + Duration::from_secs(10));
        let xid = xid_of(&sent(&a).0);
        let a = c.on_packet(
            &reply(xid, 6, Ipv4Addr::UNSPECIFIED, &[]),
            now + Duration::from_secs(11),
        );
        assert!(matches!(&a[0], Action::Unbind(l) if l.address == ME));
        assert_eq!(c.state(), &State::Selecting);
    }

    #[test]
    fn init_reboot_asks_for_the_old_address_without_server_id() {
        let (mut c, now) = client(Some(ME));
        let (p, dest) = sent(&c.on_timer(now));
        assert_eq!(dest, Dest::Broadcast);
        assert!(p.windows(6).any(|w| w == [50, 4, 10, 0, 0, 50]));
        assert!(!p.windows(2).any(|w| w == [54, 4]));
        // NAK (wrong network): INIT.
        let _ = c.on_packet(&reply(xid_of(&p), 6, Ipv4Addr::UNSPECIFIED, &[]), now);
        assert_eq!(c.state(), &State::Selecting);
        // Silence: INIT after two tries.
        let (mut c, now) = client(Some(ME));
        let _ = c.on_timer(now);
        let _ = c.on_timer(c.deadline());
        let _ = c.on_timer(c.deadline());
        assert_eq!(c.state(), &State::Selecting);
        let _ = now;
    }

    #[test]
    fn carrier_return_verifies_the_address_with_init_reboot() {
        let (mut c, now) = bound();
        let later = now + Duration::from_secs(2);
        c.on_carrier_up(later);
        let (p, dest) = sent(&c.on_timer(later));
        assert_eq!(c.state(), &State::InitReboot { address: ME });
        assert_eq!(dest, Dest::Broadcast);
        assert!(
            p.windows(6).any(|w| w == [50, 4, 10, 0, 0, 50]),
            "asks for the held address"
        );
        let a = c.on_packet(&reply(xid_of(&p), 5, ME, ACK_OPTS), later);
        assert!(matches!(&a[0], Action::Bind { lease, previous: None } if lease.address == ME));
        assert_eq!(c.state(), &State::Bound);
        // Nobody answers: the unexpired lease is kept (no Unbind).
        c.on_carrier_up(later);
        let a1 = c.on_timer(later);
        let a2 = c.on_timer(c.deadline());
        let a3 = c.on_timer(c.deadline());
        assert!(![a1, a2, a3]
            .concat()
            .iter()
            .any(|a| matches!(a, Action::Unbind(_))));
        assert_eq!(c.state(), &State::Bound);
        assert!(c.lease().is_some());
        // On another network: NAK, the old address goes, DISCOVER again.
        c.on_carrier_up(later);
        let p = sent(&c.on_timer(later)).0;
        let a = c.on_packet(&reply(xid_of(&p), 6, Ipv4Addr::UNSPECIFIED, &[]), later);
        assert!(matches!(&a[0], Action::Unbind(l) if l.address == ME));
        assert_eq!(c.state(), &State::Selecting);
    }

    #[test]
    fn option_121_overrides_the_router() {
        let (mut c, now) = client(None);
        let xid = xid_of(&sent(&c.on_timer(now)).0);
        let _ = c.on_packet(&reply(xid, 2, ME, &[]), now);
        let mut opts = ACK_OPTS.to_vec();
        opts.extend_from_slice(&[121, 5, 0, 10, 0, 0, 253]); // 0/0 via .253
        let a = c.on_packet(&reply(xid, 5, ME, &opts), now);
        let Action::Bind { lease, .. } = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(lease.router, None, "option 3 ignored when 121 is present");
        assert_eq!(
            lease.routes,
            vec![(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(10, 0, 0, 253))]
        );
    }

    #[test]
    fn zero_lease_and_t1_do_not_make_a_renewal_storm() {
        let (mut c, now) = client(None);
        let xid = xid_of(&sent(&c.on_timer(now)).0);
        let _ = c.on_packet(&reply(xid, 2, ME, &[]), now);
        let a = c.on_packet(
            &reply(xid, 5, ME, &[51, 4, 0, 0, 0, 0, 58, 4, 0, 0, 0, 0]),
            now,
        );
        let Action::Bind { lease, .. } = &a[0] else {
            panic!("{a:?}")
        };
        assert!(
            lease.lease_secs >= 10 && lease.t1_secs >= 1 && lease.t2_secs > lease.t1_secs,
            "{lease:?}"
        );
        assert!(c.deadline() >= now + Duration::from_secs(1));
    }

    #[test]
    fn a_slow_offer_to_an_earlier_discover_is_accepted() {
        let (mut c, now) = client(None);
        let xid = xid_of(&sent(&c.on_timer(now)).0);
        let again = c.on_timer(c.deadline());
        assert_eq!(xid_of(&sent(&again).0), xid, "retransmissions keep the xid");
        let _ = c.on_packet(&reply(xid, 2, ME, &[]), now);
        assert!(matches!(c.state(), State::Requesting { .. }));
    }

    #[test]
    fn ignores_foreign_xids_and_garbage() {
        let (mut c, now) = client(None);
        let xid = xid_of(&sent(&c.on_timer(now)).0);
        assert!(c.on_packet(&reply(xid ^ 1, 2, ME, &[]), now).is_empty());
        assert!(c.on_packet(b"garbage", now).is_empty());
        assert_eq!(c.state(), &State::Selecting);
    }

    #[test]
    fn discover_backoff_doubles_to_16s_with_jitter() {
        let (mut c, mut now) = client(None);
        let mut waits = Vec::new();
        for _ in 0..7 {
            let _ = c.on_timer(now);
            waits.push(c.deadline() - now);
            now = c.deadline();
        }
        for (w, base) in waits.iter().zip([1u64, 2, 4, 8, 16, 16, 16]) {
            let ms = w.as_millis() as u64;
            assert!(ms >= base * 750 && ms <= base * 1250, "{waits:?}");
        }
    }
}
