//! Runs a [`Client`] on one interface: a UDP socket on port 68 bound to the
//! device (broadcast replies reach it before we have an address; unicast
//! ones after), the client's timers, and leases applied with netlink.

use super::client::{Action, Client, Config, Dest, Lease};
use crate::net::link::Netlink;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A UDP socket on port 68 that only sees `iface`'s packets. The device
/// binding and SO_REUSEADDR are set before bind(2), so one client per NIC
/// can each hold port 68 (a plain bind would fail with EADDRINUSE).
fn bind_socket(iface: &str) -> io::Result<UdpSocket> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is checked and owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let name = iface.as_bytes();
    let set = |opt: libc::c_int, ptr: *const libc::c_void, len: usize| -> io::Result<()> {
        // SAFETY: `ptr` points to `len` readable bytes for the call.
        let rc =
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, ptr, len as libc::socklen_t) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(
        libc::SO_REUSEADDR,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>(),
    )?;
    set(
        libc::SO_BROADCAST,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>(),
    )?;
    set(libc::SO_BINDTODEVICE, name.as_ptr().cast(), name.len())?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 68u16.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in for the given length.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UdpSocket::from(owned))
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b) ^ crate::timeline::boot_ms()
}

/// Applies a lease: address, MTU, routes (option 121, else the router as
/// default route) with the link's route `metric` (so several uplinks have
/// an order). Leftovers of a different previous lease are removed.
pub fn apply(
    nl: &Netlink,
    index: u32,
    metric: u32,
    lease: &Lease,
    previous: Option<&Lease>,
) -> Result<(), String> {
    if let Some(p) = previous.filter(|p| p.address != lease.address || p.prefix != lease.prefix) {
        nl.del_address(index, IpAddr::V4(p.address), p.prefix)
            .map_err(|e| e.to_string())?;
    }
    nl.add_address(index, IpAddr::V4(lease.address), lease.prefix)
        .map_err(|e| e.to_string())?;
    // The address is what matters most; a refused MTU or route is logged
    // and the rest still applied.
    if let Some(mtu) = lease.mtu {
        if let Err(e) = nl.set_mtu(index, u32::from(mtu)) {
            tracing::error!(index, mtu, error = %e, "DHCP MTU not applied");
        }
    }
    let routes: Vec<(Ipv4Addr, u8, Ipv4Addr)> = if lease.routes.is_empty() {
        lease
            .router
            .map(|gw| (Ipv4Addr::UNSPECIFIED, 0, gw))
            .into_iter()
            .collect()
    } else {
        lease.routes.clone()
    };
    for (dst, len, gw) in routes {
        if let Err(e) = nl.add_route(index, dst, len, gw, metric) {
            tracing::error!(index, error = %e, "DHCP route not applied");
        }
    }
    Ok(())
}

/// A DHCP client running on one link in its own thread until stopped.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The link's name.
    pub iface: String,
    /// The link's index when the client started (a recreated link has a new one).
    pub index: u32,
    /// Route metric of its leases.
    pub metric: u32,
}

impl Running {
    /// Starts DHCP on `iface`, its routes at `metric`. `on_lease` sees every
    /// applied lease (the first, renewals, a new one after expiry). A
    /// client that fails (socket error) is restarted with backoff.
    pub fn spawn(
        iface: String,
        index: u32,
        mac: [u8; 6],
        metric: u32,
        hostname: String,
        mut on_lease: impl FnMut(&Lease) + Send + 'static,
    ) -> io::Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = iface.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dhcp-{iface}"))
            .spawn(move || {
                let mut delay = Duration::from_secs(1);
                while !flag.load(Ordering::SeqCst) {
                    let r = drive(&name, index, mac, metric, &hostname, &mut on_lease, None, false, &flag);
                    if let Err(e) = r {
                        tracing::error!(iface = %name, error = %e, retry_s = delay.as_secs(), "DHCP client stopped; restarting it");
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            })?;
        Ok(Running {
            stop,
            thread: Some(thread),
            iface,
            index,
            metric,
        })
    }

    /// Stops the client and removes its lease's address (within about a
    /// second: the client's waits are capped).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(iface = %self.iface, "DHCP client stopped");
    }
}

/// `cairn-init dhcp-once IFACE`: acquire and apply one lease, then exit
/// (0 = bound, 1 = none within 30 s). For measuring beside udhcpc and for
/// debugging a network by hand.
pub fn once_main(iface: &str) -> ! {
    let r = (|| -> Result<Lease, String> {
        let nl = Netlink::new().map_err(|e| e.to_string())?;
        let index = nl.index_of(iface).map_err(|e| e.to_string())?;
        nl.set_up(index).map_err(|e| e.to_string())?;
        let mac = nl
            .link(index)
            .map_err(|e| e.to_string())?
            .mac
            .ok_or(format!("{iface} has no MAC address"))?;
        let mut got = None;
        let until = Instant::now() + Duration::from_secs(30);
        let never = AtomicBool::new(false);
        let mut keep = |l: &Lease| got = Some(l.clone());
        drive(
            iface,
            index,
            mac,
            0,
            "cairn",
            &mut keep,
            Some(until),
            true,
            &never,
        )
        .map_err(|e| e.to_string())?;
        got.ok_or_else(|| format!("no DHCP lease on {iface} within 30 s"))
    })();
    match r {
        Ok(l) => {
            println!("{}/{} from {}", l.address, l.prefix, l.server);
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("cairn-init dhcp-once: {e}");
            std::process::exit(1)
        }
    }
}

/// The client loop; returns at `until`, after the first lease with
/// `first_only`, or when `stop` is set (removing the lease's address).
#[allow(clippy::too_many_arguments)]
fn drive(
    iface: &str,
    index: u32,
    mac: [u8; 6],
    metric: u32,
    hostname: &str,
    leases: &mut dyn FnMut(&Lease),
    until: Option<Instant>,
    first_only: bool,
    stop: &AtomicBool,
) -> io::Result<()> {
    let sock = bind_socket(iface)?;
    let nl = Netlink::new().map_err(io::Error::other)?;
    let cfg = Config {
        mac,
        hostname: hostname.to_string(),
    };
    let mut client = Client::new(cfg, None, Instant::now(), seed());
    let mut buf = [0u8; 1500];
    let mut carrier = nl.link(index).map(|l| l.carrier).unwrap_or(true);
    loop {
        // Carrier is polled at least once a second (the waits below are
        // capped): a link that comes back re-verifies its lease.
        let now_carrier = nl.link(index).map(|l| l.carrier).unwrap_or(carrier);
        if now_carrier && !carrier {
            tracing::info!(iface, "carrier back: verifying the lease (INIT-REBOOT)");
            client.on_carrier_up(Instant::now());
        } else if !now_carrier && carrier {
            tracing::warn!(iface, "carrier lost");
        }
        carrier = now_carrier;
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(());
        }
        if stop.load(Ordering::SeqCst) {
            if let Some(l) = client.lease() {
                tracing::info!(iface, address = %l.address, "DHCP stopping: removing the lease's address");
                if let Err(e) = nl.del_address(index, IpAddr::V4(l.address), l.prefix) {
                    tracing::error!(iface, error = %e, "removing the address failed");
                }
            }
            return Ok(());
        }
        let actions = client.on_timer(Instant::now());
        if perform(&sock, &nl, index, metric, iface, actions, leases) && first_only {
            return Ok(());
        }
        let mut wait = client
            .deadline()
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), Duration::from_secs(1));
        if let Some(u) = until {
            wait = wait.min(
                u.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            );
        }
        sock.set_read_timeout(Some(wait))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let actions = client.on_packet(&buf[..n], Instant::now());
                if perform(&sock, &nl, index, metric, iface, actions, leases) && first_only {
                    return Ok(());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn perform(
    sock: &UdpSocket,
    nl: &Netlink,
    index: u32,
    metric: u32,
    iface: &str,
    actions: Vec<Action>,
    leases: &mut dyn FnMut(&Lease),
) -> bool {
    let mut bound = false;
    for a in actions {
        match a {
            Action::Send(p, dest) => {
                let to = match dest {
                    Dest::Broadcast => Ipv4Addr::BROADCAST,
                    Dest::Unicast(ip) => ip,
                };
                if let Err(e) = sock.send_to(&p, SocketAddrV4::new(to, 67)) {
                    tracing::warn!(iface, to = %to, error = %e, "DHCP send failed");
                }
            }
            Action::Bind { lease, previous } => {
                match apply(nl, index, metric, &lease, previous.as_ref()) {
                    Ok(()) => tracing::info!(
                        iface,
                        address = %format!("{}/{}", lease.address, lease.prefix),
                        router = ?lease.router,
                        routes = lease.routes.len(),
                        dns = ?lease.dns,
                        server = %lease.server,
                        lease_s = lease.lease_secs,
                        t1_s = lease.t1_secs,
                        t2_s = lease.t2_secs,
                        "DHCP lease applied"
                    ),
                    Err(e) => tracing::error!(iface, error = %e, "applying the DHCP lease failed"),
                }
                bound = true;
                leases(&lease);
            }
            Action::Unbind(lease) => {
                tracing::warn!(iface, address = %lease.address, "DHCP lease lost: removing the address");
                if let Err(e) = nl.del_address(index, IpAddr::V4(lease.address), lease.prefix) {
                    tracing::error!(iface, error = %e, "removing the address failed");
                }
            }
        }
    }
    bound
}

#[cfg(test)]
mod tests {
    //! Against a real dnsmasq, in two network namespaces joined by a veth
    //! (nothing touches the host's network). Needs root, dnsmasq and ip.
    use super::*;
    use crate::testnet::{can_run, Ns};

    /// A server namespace (dnsmasq on `dh-s`, 10.99.0.1/24) and a client
    /// namespace (`dh-c`), joined by a veth.
    struct Lab {
        srv: Ns,
        cli: Ns,
        dir: std::path::PathBuf,
    }

    impl Lab {
        fn new() -> Lab {
            let (srv, cli) = (Ns::new("cdhs"), Ns::new("cdhc"));
            let dir = std::env::temp_dir().join(&srv.name);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            srv.ip(&[
                "link", "add", "dh-s", "type", "veth", "peer", "name", "dh-c", "netns", &cli.name,
            ]);
            srv.ip(&["addr", "add", "10.99.0.1/24", "dev", "dh-s"]);
            srv.ip(&["link", "set", "dh-s", "up"]);
            cli.ip(&["link", "set", "dh-c", "up"]);
            Lab { srv, cli, dir }
        }

        /// (Re)starts dnsmasq with a 2-minute lease on `range`.
        fn start_dnsmasq(&mut self, range: &str, extra: &[&str]) {
            self.srv.kill_all();
            let range = format!("--dhcp-range={range},255.255.255.0,2m");
            let leases = format!("--dhcp-leasefile={}", self.dir.join("leases").display());
            let mut args = vec![
                "--no-daemon",
                "--conf-file=/dev/null",
                "--interface=dh-s",
                "--bind-interfaces",
                "--port=0",
                "--log-dhcp",
                "--no-ping",
                &range,
                &leases,
                "--dhcp-option=option:router,10.99.0.1",
                "--dhcp-option=option:dns-server,10.99.0.53",
                "--dhcp-option=option:mtu,1400",
            ];
            args.extend_from_slice(extra);
            self.srv
                .spawn("dnsmasq", &args, Some(&self.dir.join("dnsmasq.log")));
            std::thread::sleep(Duration::from_millis(300));
        }

        fn show(&self, what: &[&str]) -> String {
            self.cli.show(what)
        }

        /// Starts the real client in the client namespace for `secs`.
        fn spawn_client(
            &self,
            secs: u64,
        ) -> (
            std::thread::JoinHandle<()>,
            std::sync::mpsc::Receiver<Lease>,
        ) {
            let (tx, rx) = std::sync::mpsc::channel();
            let t = self.cli.enter(move || {
                let nl = Netlink::new().unwrap();
                let index = nl.index_of("dh-c").unwrap();
                let mac = nl.link(index).unwrap().mac.unwrap();
                let until = Instant::now() + Duration::from_secs(secs);
                let mut send = |l: &Lease| drop(tx.send(l.clone()));
                let never = AtomicBool::new(false);
                drive(
                    "dh-c",
                    index,
                    mac,
                    100,
                    "lab-node",
                    &mut send,
                    Some(until),
                    false,
                    &never,
                )
                .unwrap();
            });
            (t, rx)
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn lease_options_renewal_and_nak_against_dnsmasq() {
        if !can_run("DHCP host test", &["/usr/sbin/dnsmasq"]) {
            return;
        }
        let mut lab = Lab::new();
        lab.start_dnsmasq(
            "10.99.0.50,10.99.0.59",
            &[
                "--dhcp-option=121,10.200.0.0/16,10.99.0.254,0.0.0.0/0,10.99.0.1",
                "--dhcp-option=option:T1,3",
                "--dhcp-option=option:T2,6",
            ],
        );
        // One client for the whole test, as on a node.
        let (client, rx) = lab.spawn_client(20);
        let mut leases = Vec::new();
        // T1 = 3 s: it binds, then renews (unicast to the server id).
        while leases.len() < 2 {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(l) => leases.push(l),
                Err(_) => break,
            }
        }
        let log = std::fs::read_to_string(lab.dir.join("dnsmasq.log")).unwrap();
        assert!(leases.len() >= 2, "bound and renewed: {leases:?}\n{log}");
        let l = leases[0].clone();
        let octets = l.address.octets();
        assert!(
            octets[..3] == [10, 99, 0] && (50..=59).contains(&octets[3]),
            "{l:?}"
        );
        assert_eq!(
            (l.prefix, l.mtu, l.t1_secs, l.t2_secs),
            (24, Some(1400), 3, 6)
        );
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 99, 0, 53)]);
        assert_eq!(l.router, None, "option 121 present: option 3 ignored");
        assert_eq!(leases[1].address, l.address, "renewal keeps the address");
        let addrs = lab.show(&["-4", "addr", "show", "dh-c"]);
        assert!(addrs.contains(&format!("{}/24", l.address)), "{addrs}");
        assert!(lab.show(&["link", "show", "dh-c"]).contains("mtu 1400"));
        let routes = lab.show(&["-4", "route"]);
        assert!(routes.contains("10.200.0.0/16 via 10.99.0.254"), "{routes}");
        assert!(routes.contains("default via 10.99.0.1"), "{routes}");
        assert!(log.matches("DHCPACK(dh-s)").count() >= 2, "{log}");

        // The server comes back authoritative for another range: the next
        // renewal is refused (NAK), the old address goes, a new lease comes.
        lab.start_dnsmasq(
            "10.99.0.150,10.99.0.159",
            &[
                "--dhcp-authoritative",
                "--dhcp-option=option:T1,3",
                "--dhcp-option=option:T2,6",
            ],
        );
        let mut moved = None;
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(15)) {
            if (150..=159).contains(&l.address.octets()[3]) {
                moved = Some(l);
                break;
            }
        }
        let log = std::fs::read_to_string(lab.dir.join("dnsmasq.log")).unwrap();
        let moved =
            moved.unwrap_or_else(|| panic!("no lease in the new range after the NAK\n{log}"));
        assert_eq!(moved.address.octets()[..3], [10, 99, 0]);
        assert!(log.contains("DHCPNAK"), "{log}");
        let addrs = lab.show(&["-4", "addr", "show", "dh-c"]);
        assert!(
            !addrs.contains(&format!("{}/24", l.address)),
            "old address removed: {addrs}"
        );
        assert!(addrs.contains(&format!("{}/24", moved.address)), "{addrs}");
        drop(rx);
        client.join().unwrap();
    }

    /// Carrier lost and back: the client re-verifies its lease with
    /// INIT-REBOOT at once (T1 is 100 s away, so no renewal can explain a
    /// new ACK) and keeps its address.
    #[test]
    fn carrier_return_reverifies_the_lease() {
        if !can_run("DHCP host test", &["/usr/sbin/dnsmasq"]) {
            return;
        }
        let mut lab = Lab::new();
        lab.start_dnsmasq("10.99.0.60,10.99.0.69", &["--dhcp-option=option:T1,100"]);
        let (client, rx) = lab.spawn_client(12);
        let first = rx
            .recv_timeout(Duration::from_secs(6))
            .expect("first lease");
        std::thread::sleep(Duration::from_millis(500));
        lab.srv.ip(&["link", "set", "dh-s", "down"]);
        std::thread::sleep(Duration::from_millis(1500));
        lab.srv.ip(&["link", "set", "dh-s", "up"]);
        let again = rx.recv_timeout(Duration::from_secs(6));
        let log = std::fs::read_to_string(lab.dir.join("dnsmasq.log")).unwrap();
        let again =
            again.unwrap_or_else(|_| panic!("no INIT-REBOOT after carrier returned\n{log}"));
        assert_eq!(again.address, first.address, "the same address, verified");
        assert_eq!(
            log.matches("DHCPDISCOVER").count(),
            1,
            "no new DISCOVER: {log}"
        );
        assert!(log.matches("DHCPACK(dh-s)").count() >= 2, "{log}");
        drop(rx);
        client.join().unwrap();
    }

    /// The server disappears. Case A: it comes back at another address
    /// before T2, so only a *broadcast* (rebinding) request can reach it
    /// (the unicast renewal at T1 goes to the old server id, which no
    /// longer exists): the client rebinds at T2 and keeps its address.
    /// Case B: it never comes back: the address is removed when the
    /// 2-minute lease (dnsmasq's shortest) expires. Both run at once in
    /// their own namespaces so the suite pays for the expiry only once.
    #[test]
    fn server_gone_rebind_and_expiry_against_dnsmasq() {
        if !can_run("DHCP host test", &["/usr/sbin/dnsmasq"]) {
            return;
        }
        let timers = ["--dhcp-option=option:T1,3", "--dhcp-option=option:T2,6"];
        let rebind = std::thread::spawn(move || {
            let mut lab = Lab::new();
            lab.start_dnsmasq("10.99.0.70,10.99.0.79", &timers);
            let (client, rx) = lab.spawn_client(20);
            let first = rx
                .recv_timeout(Duration::from_secs(8))
                .expect("first lease");
            let bound = Instant::now();
            assert_eq!(first.server, Ipv4Addr::new(10, 99, 0, 1));
            // Gone, and back at .2 with the same lease database.
            lab.srv.kill_all();
            lab.srv.ip(&["addr", "del", "10.99.0.1/24", "dev", "dh-s"]);
            lab.srv.ip(&["addr", "add", "10.99.0.2/24", "dev", "dh-s"]);
            lab.start_dnsmasq("10.99.0.70,10.99.0.79", &timers);
            let again = rx.recv_timeout(Duration::from_secs(12));
            let log = std::fs::read_to_string(lab.dir.join("dnsmasq.log")).unwrap();
            let again = again.unwrap_or_else(|_| panic!("no rebind after T2\n{log}"));
            let after = bound.elapsed();
            assert_eq!(again.address, first.address, "rebinding keeps the address");
            assert_eq!(again.server, Ipv4Addr::new(10, 99, 0, 2), "{again:?}");
            assert!(
                after >= Duration::from_millis(5500),
                "answered {after:?} after binding: before T2 (6 s), so not by rebinding\n{log}"
            );
            assert!(!log.contains("DHCPDISCOVER"), "no new DISCOVER: {log}");
            let addrs = lab.show(&["-4", "addr", "show", "dh-c"]);
            assert!(addrs.contains(&format!("{}/24", first.address)), "{addrs}");
            drop(rx);
            client.join().unwrap();
        });
        let expiry = std::thread::spawn(move || {
            let mut lab = Lab::new();
            lab.start_dnsmasq("10.99.0.80,10.99.0.89", &timers);
            let (client, rx) = lab.spawn_client(124);
            let first = rx
                .recv_timeout(Duration::from_secs(8))
                .expect("first lease");
            let bound = Instant::now();
            assert_eq!(first.lease_secs, 120);
            lab.srv.kill_all();
            let have = |lab: &Lab| {
                lab.show(&["-4", "addr", "show", "dh-c"])
                    .contains(&format!("{}/24", first.address))
            };
            // Held through T1 and T2 (the lease is still valid) ...
            std::thread::sleep(Duration::from_secs(100));
            assert!(have(&lab), "address dropped before the lease expired");
            // ... and removed when it expires.
            while have(&lab) && bound.elapsed() < Duration::from_secs(123) {
                std::thread::sleep(Duration::from_millis(200));
            }
            let gone_after = bound.elapsed();
            assert!(
                !have(&lab),
                "address kept {gone_after:?} after a 120 s lease"
            );
            assert!(
                gone_after >= Duration::from_secs(119),
                "removed early: {gone_after:?}"
            );
            assert!(rx.try_recv().is_err(), "no lease without a server");
            drop(rx);
            client.join().unwrap();
        });
        let (a, b) = (rebind.join(), expiry.join());
        if let Err(e) = a {
            std::panic::resume_unwind(e);
        }
        if let Err(e) = b {
            std::panic::resume_unwind(e);
        }
    }
}
