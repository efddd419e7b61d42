//! Published TCP ports: a small forwarder on the node's addresses to the
//! workload's address. (The nftables DNAT path arrives with the workload
//! network work; this keeps ports working meanwhile, with the client's
//! address hidden from the workload.)

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Forward {
    target: Arc<Mutex<SocketAddrV4>>,
    stop: Arc<AtomicBool>,
}

/// The set of published TCP ports.
#[derive(Default)]
pub struct Proxies {
    by_port: BTreeMap<u16, Forward>,
}

impl Proxies {
    /// Makes `port` forward to `target`, starting a listener if needed.
    pub fn ensure(&mut self, port: u16, target: SocketAddrV4) -> io::Result<()> {
        if let Some(f) = self.by_port.get(&port) {
            *f.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
            return Ok(());
        }
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        let target = Arc::new(Mutex::new(target));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (target.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("port-{port}"))
            .spawn(move || accept_loop(listener, t, s))?;
        self.by_port.insert(port, Forward { target, stop });
        tracing::info!(port, "published tcp port");
        Ok(())
    }

    /// Stops forwarding ports not in `keep`.
    pub fn retain(&mut self, keep: &[u16]) {
        let gone: Vec<u16> = self
            .by_port
            .keys()
            .filter(|p| !keep.contains(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(f) = self.by_port.remove(&port) {
                f.stop.store(true, Ordering::SeqCst);
                // Wake the blocked accept() so the thread sees the flag.
                let _ = TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_millis(200),
                );
                tracing::info!(port, "unpublished tcp port");
            }
        }
    }
}

fn accept_loop(listener: TcpListener, target: Arc<Mutex<SocketAddrV4>>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let to = *target.lock().unwrap_or_else(|e| e.into_inner());
        let _ = std::thread::Builder::new()
            .name("port-conn".into())
            .spawn(move || relay(client, to));
    }
}

fn relay(client: TcpStream, to: SocketAddrV4) {
    let upstream = match TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(3)) {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(target = %to, error = %e, "published port: workload not answering");
            return;
        }
    };
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || pipe(c2, u2));
    pipe(upstream, client);
    let _ = t.join();
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}
