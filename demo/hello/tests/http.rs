//! Runs the real `hello` binary on a free port and talks HTTP to it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server if a test fails before it exits on its own.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn start() -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "hello never listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, port }
}

/// Sends one request and returns (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: test\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    assert!(head.contains("Connection: close"));
    (status, body.to_string())
}

fn wait_exit(server: &mut Server) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "hello did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_root_healthz_404_and_exits_with_3() {
    let mut server = start();
    let (st, body) = get(server.port, "/");
    assert_eq!(st, 200);
    assert!(body.starts_with("hello from cairn: host="), "{body}");
    assert!(body.ends_with(" requests=1\n"), "{body}");
    let instance = body
        .split("instance=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(!instance.is_empty());
    assert_eq!(get(server.port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(server.port, "/missing").0, 404);
    let (_, body) = get(server.port, "/");
    assert!(body.ends_with(" requests=4\n"), "{body}");
    assert_eq!(get(server.port, "/exit"), (200, "bye\n".into()));
    assert_eq!(wait_exit(&mut server).code(), Some(3));

    // A new process is a new instance.
    let second = start();
    let (_, body) = get(second.port, "/");
    assert!(!body.contains(&format!("instance={instance} ")), "{body}");
}

#[test]
fn sigterm_exits_zero() {
    let mut server = start();
    let st = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(wait_exit(&mut server).code(), Some(0));
}
