//! Health probes: run from the node against a workload's own address, on a
//! thread per running workload; the supervisor counts the results.

use cairn_manifest::{HealthCheck, HealthKind};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One probe: `Ok` when healthy, else what went wrong.
pub fn probe(h: &HealthCheck, addr: Ipv4Addr) -> Result<(), String> {
    let to = SocketAddr::from((addr, h.port));
    let timeout = Duration::from_secs(u64::from(h.timeout_s));
    let mut c =
        TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"))?;
    if h.kind == HealthKind::Tcp {
        return Ok(());
    }
    c.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    c.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        c,
        "GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: cairn-health\r\n\r\n",
        h.path
    )
    .map_err(|e| format!("GET {}: {e}", h.path))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match c.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) if n > 0 => break,
            Err(e) => return Err(format!("GET {}: {e}", h.path)),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status: u16 = line
        .strip_prefix("HTTP/")
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {}: not an HTTP answer", h.path))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {}: HTTP {status}", h.path))
    }
}

/// Probes every `interval_s` until `alive` is cleared, reporting each
/// result through `report` (the supervisor applies `grace_s`).
pub fn spawn(
    name: &str,
    h: HealthCheck,
    addr: Ipv4Addr,
    alive: Arc<AtomicBool>,
    report: impl Fn(Result<(), String>) -> bool + Send + 'static,
) {
    let _ = std::thread::Builder::new()
        .name(format!("health-{name}"))
        .spawn(move || {
            while alive.load(Ordering::SeqCst) {
                // Sleep in short steps: a stopped prober ends within a
                // second, not after a whole (up to an hour's) interval.
                for _ in 0..h.interval_s * 4 {
                    std::thread::sleep(Duration::from_millis(250));
                    if !alive.load(Ordering::SeqCst) {
                        return;
                    }
                }
                let result = probe(&h, addr);
                if !alive.load(Ordering::SeqCst) || !report(result) {
                    return;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: HealthKind, port: u16) -> HealthCheck {
        HealthCheck {
            kind,
            port,
            path: "/healthz".into(),
            interval_s: 1,
            timeout_s: 1,
            failures: 2,
            grace_s: 10,
        }
    }

    /// A server that answers every connection with `status`.
    fn serve(status: &'static str) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(c, "HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n");
            }
        });
        port
    }

    #[test]
    fn http_and_tcp_probes() {
        let lo = Ipv4Addr::LOCALHOST;
        assert_eq!(probe(&check(HealthKind::Http, serve("200 OK")), lo), Ok(()));
        assert_eq!(
            probe(&check(HealthKind::Http, serve("302 Found")), lo),
            Ok(())
        );
        let e = probe(
            &check(HealthKind::Http, serve("503 Service Unavailable")),
            lo,
        )
        .unwrap_err();
        assert!(e.contains("HTTP 503") && e.contains("/healthz"), "{e}");
        assert_eq!(probe(&check(HealthKind::Tcp, serve("200 OK")), lo), Ok(()));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = probe(&check(HealthKind::Tcp, port), lo).unwrap_err();
        assert!(e.contains("connect"), "{e}");
        // Not HTTP at all.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(b"SSH-2.0-x\r\n");
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf);
            }
        });
        let e = probe(&check(HealthKind::Http, port), lo).unwrap_err();
        assert!(e.contains("not an HTTP answer"), "{e}");
    }
}
