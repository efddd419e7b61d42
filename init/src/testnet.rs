//! Test-only: private network namespaces with real peers (dnsmasq, chronyd)
//! started inside, all removed and killed on drop. Nothing touches the
//! host's network.

use std::process::{Child, Command, Stdio};

/// Whether root-only network tests can run (prints the SKIP line if not).
pub fn can_run(what: &str, binaries: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: {what} needs root (network namespaces)");
        return false;
    }
    if let Some(missing) = binaries.iter().find(|b| !std::path::Path::new(b).exists()) {
        println!("SKIP: {what} needs {missing} (make deps)");
        return false;
    }
    true
}

/// One namespace, with processes started in it.
pub struct Ns {
    /// Its name under /run/netns.
    pub name: String,
    children: Vec<Child>,
}

impl Ns {
    /// Creates `<prefix><pid>x<n>` with loopback up.
    pub fn new(prefix: &str) -> Ns {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}{}x{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Ns {
            name,
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ARGS`, asserting success.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `ip -n <ns> ARGS` output.
    pub fn show(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("ip");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts `program args` inside; output to `log` (or dropped).
    pub fn spawn(&mut self, program: &str, args: &[&str], log: Option<&std::path::Path>) {
        let (out, err) = match log {
            Some(p) => {
                let f = std::fs::File::create(p).expect("log file");
                (
                    Stdio::from(f.try_clone().expect("log file")),
                    Stdio::from(f),
                )
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn in netns");
        self.children.push(child);
    }

    /// Kills every process started inside.
    pub fn kill_all(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `f` on a thread inside the namespace (threads it spawns inherit it).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).expect("netns file");
            // SAFETY: a valid netns fd; setns only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}
