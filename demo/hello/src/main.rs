//! `hello`: the tiny HTTP/1.1 server that cairn runs as its demo container.
//!
//! std only, one thread per connection, `Connection: close` on every answer.
//! It exists to prove that a node pulled and started an image, that requests
//! reach it (the instance id tells restarts apart) and that PID 1 restarts a
//! workload that exits (`GET /exit` makes it exit with status 3).
//! `GET /note?set=WORD` stores a word in `$DATA_DIR/note` (default
//! `/data`), `GET /note` reads it (persistent volumes).
//! `GET /fetch?to=HOST:PORT/PATH` makes an outbound HTTP request and returns
//! what came back, which proves outbound NAT and name resolution.
//! UDP on the same port echoes each datagram back as
//! `udp host=NAME instance=ID got=PAYLOAD` (published UDP ports).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The exit status of `GET /exit`, distinct from 0 (SIGTERM) and from the
/// 1/101 of an error or a panic, so a test can tell the three apart.
const EXIT_STATUS: i32 = 3;

/// A request head larger than this is refused: the server only answers
/// three short paths and must not buffer whatever a client sends.
const MAX_HEAD: usize = 8 * 1024;

const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;

extern "C" {
    // From the C library std already links (glibc or musl); declared here so
    // the demo needs no `libc` crate.
    fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
    fn _exit(status: c_int) -> !;
}

extern "C" fn on_terminate(_signum: c_int) {
    // SAFETY: `_exit` is async-signal-safe; it runs no destructors or atexit
    // handlers that could deadlock on locks held by the interrupted thread.
    unsafe { _exit(0) }
}

/// What the server knows about itself.
struct State {
    host: String,
    instance: String,
    requests: AtomicU64,
    /// Set by `/sick`: `/healthz` fails from then on (this instance only).
    sick: AtomicBool,
}

/// One answer.
struct Response {
    status: u16,
    body: String,
    /// Exit the process once the answer is flushed.
    exit_after: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            body: body.into(),
            exit_after: false,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        503 => "Service Unavailable",
        431 => "Request Header Fields Too Large",
        _ => "Unknown",
    }
}

/// Maps a request line to an answer. Every request counts, including this one.
fn route(state: &State, method: &str, target: &str) -> Response {
    let n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match (method, path) {
        ("GET", "/") => Response::text(
            200,
            format!(
                "hello from cairn: host={} instance={} requests={}\n",
                state.host, state.instance, n
            ),
        ),
        ("GET", "/healthz") if state.sick.load(Ordering::Relaxed) => Response::text(503, "sick\n"),
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        // Task-limit demos (a contained fork bomb): start up to N threads
        // that live 3 s; report how many the pids limit allowed.
        ("GET", "/threads") => {
            let want: u32 = target
                .split_once("?n=")
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(100)
                .min(10_000);
            let mut started = 0;
            let mut error = String::new();
            for _ in 0..want {
                match std::thread::Builder::new()
                    .spawn(|| std::thread::sleep(Duration::from_secs(3)))
                {
                    Ok(_) => started += 1,
                    Err(e) => {
                        error = e.to_string();
                        break;
                    }
                }
            }
            Response::text(
                200,
                format!("threads started={started} of {want} {error}\n"),
            )
        }
        // Memory-limit demos: allocate (and touch) memory until the kernel
        // kills this process. Never answers.
        ("GET", "/hog") => {
            eprintln!("hello: allocating memory until killed");
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                let mut chunk = vec![0u8; 1 << 20];
                for b in chunk.iter_mut().step_by(4096) {
                    *b = 1;
                }
                hoard.push(std::hint::black_box(chunk));
            }
        }
        // Health-check demos: this instance reports unhealthy from now on.
        ("GET", "/sick") => {
            state.sick.store(true, Ordering::Relaxed);
            Response::text(200, "sick from now on\n")
        }
        ("GET", "/fetch") => {
            let to = target.split_once("?to=").map_or("", |(_, q)| q);
            match fetch(to) {
                Ok(body) => Response::text(200, body),
                Err(e) => Response::text(502, format!("fetch {to}: {e}\n")),
            }
        }
        // A note kept in $DATA_DIR (a persistent volume in the demos):
        // `/note?set=WORD` stores it, `/note` reads it back.
        ("GET", "/note") => {
            let dir = std::env::var("DATA_DIR").unwrap_or_else(|_| "/data".into());
            let file = std::path::Path::new(&dir).join("note");
            match target.split_once("?set=") {
                Some((_, v))
                    if !v.is_empty()
                        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
                {
                    match std::fs::write(&file, v)
                        .and_then(|()| std::fs::File::open(&file)?.sync_all())
                    {
                        Ok(()) => Response::text(200, format!("stored {v}\n")),
                        Err(e) => {
                            Response::text(500, format!("storing in {}: {e}\n", file.display()))
                        }
                    }
                }
                Some(_) => Response::text(400, "set=WORD (letters, digits, '-')\n"),
                None => match std::fs::read_to_string(&file) {
                    Ok(v) => Response::text(200, format!("note={v}\n")),
                    Err(e) => Response::text(404, format!("no note in {}: {e}\n", file.display())),
                },
            }
        }
        ("GET", "/exit") => Response {
            exit_after: true,
            ..Response::text(200, "bye\n")
        },
        _ => Response::text(404, "not found\n"),
    }
}

/// A plain HTTP/1.0 GET to `host:port/path` (host is a name or an IP);
/// returns the response body.
fn fetch(to: &str) -> io::Result<String> {
    use std::net::ToSocketAddrs;
    let (hostport, path) = to.split_once('/').unwrap_or((to, ""));
    let addr = hostport.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{hostport} has no address"),
        )
    })?;
    let mut s = TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply
        .split_once("\r\n\r\n")
        .map_or(reply.clone(), |(_, b)| b.to_string()))
}

/// Reads the request head (up to the blank line) and returns its first line.
fn read_request_line(stream: &TcpStream) -> Result<String, u16> {
    let mut reader = BufReader::new(stream.take(MAX_HEAD as u64));
    let mut first = String::new();
    let mut line = String::new();
    let mut total = 0usize;
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|_| 400u16)?;
        if n == 0 {
            // EOF before the blank line: either truncated or too large.
            return Err(if total >= MAX_HEAD { 431 } else { 400 });
        }
        total += n;
        if first.is_empty() {
            first = line.trim_end().to_string();
            if first.is_empty() {
                return Err(400);
            }
        } else if line == "\r\n" || line == "\n" {
            return Ok(first);
        }
    }
}

fn handle(state: &State, stream: TcpStream) -> io::Result<()> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let (request, response) = match read_request_line(&stream) {
        Ok(line) => {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(method), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
                    (line.clone(), route(state, method, target))
                }
                _ => (line.clone(), Response::text(400, "bad request\n")),
            }
        }
        Err(status) => ("-".to_string(), Response::text(status, "bad request\n")),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    let mut out = &stream;
    let written = out
        .write_all(head.as_bytes())
        .and_then(|()| out.write_all(response.body.as_bytes()))
        .and_then(|()| out.flush());
    eprintln!(
        "hello: {peer} \"{request}\" {} {}",
        response.status,
        response.body.len()
    );
    if response.exit_after {
        // Flushed above; shutting down the write side sends FIN so the
        // client sees the whole answer before the process goes away.
        let _ = stream.shutdown(Shutdown::Write);
        eprintln!("hello: exiting with status {EXIT_STATUS} as asked");
        std::process::exit(EXIT_STATUS);
    }
    written
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
        .or_else(|| read_trimmed("/etc/hostname"))
        .unwrap_or_else(|| "unknown".to_string())
}

fn instance_id() -> String {
    read_trimmed("/proc/sys/kernel/random/uuid").unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}-{nanos}", std::process::id())
    })
}

fn main() {
    // SAFETY: `on_terminate` only calls the async-signal-safe `_exit`, and
    // `signal` is called before any other thread exists. Without a handler,
    // SIGTERM would be ignored whenever this server is PID 1 of its own PID
    // namespace (the kernel drops default-action signals to a namespace's init).
    unsafe {
        signal(SIGTERM, on_terminate);
        signal(SIGINT, on_terminate);
    }

    let port = match std::env::var("PORT") {
        Ok(p) => match p.parse::<u16>() {
            Ok(p) => p,
            Err(_) => {
                eprintln!("hello: PORT={p:?} is not a port number");
                std::process::exit(2);
            }
        },
        Err(_) => 80,
    };
    let state = Arc::new(State {
        host: hostname(),
        instance: instance_id(),
        requests: AtomicU64::new(0),
        sick: AtomicBool::new(false),
    });
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: cannot listen on 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(sock) => {
            let state = Arc::clone(&state);
            std::thread::spawn(move || udp_echo(&state, &sock));
        }
        Err(e) => eprintln!("hello: no UDP echo on port {port}: {e}"),
    }
    eprintln!(
        "hello: listening on 0.0.0.0:{port} (tcp + udp) host={} instance={}",
        state.host, state.instance
    );
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let state = Arc::clone(&state);
                // At a pids limit a thread may not start: drop that one
                // connection, keep serving.
                if let Err(e) = std::thread::Builder::new().spawn(move || {
                    if let Err(e) = handle(&state, stream) {
                        eprintln!("hello: connection error: {e}");
                    }
                }) {
                    eprintln!("hello: no thread for a connection: {e}");
                }
            }
            Err(e) => eprintln!("hello: accept: {e}"),
        }
    }
}

/// Answers every datagram with who we are and what came in.
fn udp_echo(state: &State, sock: &UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let got = String::from_utf8_lossy(&buf[..n.min(200)]).into_owned();
                let reply = udp_reply(state, got.trim());
                if let Err(e) = sock.send_to(reply.as_bytes(), from) {
                    eprintln!("hello: udp reply to {from}: {e}");
                }
            }
            Err(e) => {
                eprintln!("hello: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn udp_reply(state: &State, got: &str) -> String {
    format!(
        "udp host={} instance={} got={got}\n",
        state.host, state.instance
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            host: "node1".into(),
            instance: "abc".into(),
            requests: AtomicU64::new(0),
            sick: AtomicBool::new(false),
        }
    }

    #[test]
    fn note_is_stored_and_read_back() {
        let dir = tempfile_dir();
        std::env::set_var("DATA_DIR", &dir);
        let s = state();
        assert_eq!(route(&s, "GET", "/note").status, 404);
        assert_eq!(route(&s, "GET", "/note?set=a;rm").status, 400);
        assert_eq!(route(&s, "GET", "/note?set=kept-1").status, 200);
        let r = route(&s, "GET", "/note");
        assert_eq!((r.status, r.body.as_str()), (200, "note=kept-1\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("hello-note-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn udp_echo_answers_over_loopback() {
        let sock = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
        let addr = sock.local_addr().unwrap();
        std::thread::spawn(move || udp_echo(&state(), &sock));
        let c = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.send_to(b"ping 1\n", addr).unwrap();
        let mut buf = [0u8; 200];
        let n = c.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"udp host=node1 instance=abc got=ping 1\n");
    }

    #[test]
    fn root_counts_requests() {
        let s = state();
        let r = route(&s, "GET", "/");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            "hello from cairn: host=node1 instance=abc requests=1\n"
        );
        route(&s, "GET", "/healthz");
        let r = route(&s, "GET", "/?x=1");
        assert_eq!(
            r.body,
            "hello from cairn: host=node1 instance=abc requests=3\n"
        );
    }

    #[test]
    fn sick_makes_healthz_fail() {
        let s = state();
        assert_eq!(route(&s, "GET", "/healthz").status, 200);
        assert_eq!(route(&s, "GET", "/sick").status, 200);
        assert_eq!(route(&s, "GET", "/healthz").status, 503);
    }

    #[test]
    fn healthz_exit_and_unknown() {
        let s = state();
        let r = route(&s, "GET", "/healthz");
        assert_eq!(
            (r.status, r.body.as_str(), r.exit_after),
            (200, "ok\n", false)
        );
        let r = route(&s, "GET", "/exit");
        assert_eq!(
            (r.status, r.body.as_str(), r.exit_after),
            (200, "bye\n", true)
        );
        assert_eq!(route(&s, "GET", "/nope").status, 404);
        assert_eq!(route(&s, "POST", "/").status, 404);
    }
}
