//! `make bench` (DHCP part): link up → address configured, our client
//! (`cairn-init dhcp-once`) beside busybox's `udhcpc`, alternating A B A B
//! against the same dnsmasq on the closed test network. Each figure is a
//! whole process: start → lease applied (address + default route) → exit.
//! udhcpc applies its lease with its usual shell script calling `ip`; ours
//! uses netlink in-process. Prints medians and the ratio pair by pair.

use anyhow::{bail, Context, Result};
use cairn_e2e::{inputs_or_skip, run, TestNet};
use std::process::Command;
use std::time::Instant;

struct ClientNs(String);

impl Drop for ClientNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let runs: usize = std::env::var("CAIRN_BENCH_DHCP_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(busybox) = busybox else {
        println!("SKIP: busybox (Debian busybox-static) not installed: no udhcpc to compare with");
        return Ok(());
    };
    let mut net = TestNet::new()?;
    net.start_dhcp()?;
    let cns = ClientNs(format!("{}c", net.ns));
    run(Command::new("ip").args(["netns", "add", &cns.0]))?;
    run(Command::new("ip").args([
        "-n", &net.ns, "link", "add", "dh-s", "type", "veth", "peer", "name", "dh-c", "netns",
        &cns.0,
    ]))?;
    run(Command::new("ip").args(["-n", &net.ns, "link", "set", "dh-s", "master", "br0", "up"]))?;
    run(Command::new("ip").args(["-n", &cns.0, "link", "set", "dh-c", "up"]))?;
    let script = net.dir.path().join("udhcpc.script");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr add \"$ip/$mask\" dev \"$interface\"\n  [ -n \"$router\" ] && ip route add default via \"${router%% *}\"\n;; esac\nexit 0\n",
    )?;
    run(Command::new("chmod").arg("755").arg(&script))?;
    let reset = || -> Result<()> {
        run(Command::new("ip").args(["-n", &cns.0, "addr", "flush", "dev", "dh-c"]))?;
        let _ = Command::new("ip")
            .args(["-n", &cns.0, "route", "flush", "default"])
            .status();
        Ok(())
    };
    let ours = || {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &cns.0])
            .arg(&inp.init)
            .args(["dhcp-once", "dh-c"]);
        c
    };
    let theirs = || {
        let mut c = Command::new("ip");
        c.args([
            "netns", "exec", &cns.0, busybox, "udhcpc", "-i", "dh-c", "-f", "-q", "-n", "-t", "5",
            "-T", "1", "-s",
        ])
        .arg(&script);
        c
    };
    let time = |make: &dyn Fn() -> Command| -> Result<f64> {
        reset()?;
        let mut c = make();
        let t = Instant::now();
        let out = c.output().context("running a DHCP client")?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            bail!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let addrs = run(Command::new("ip").args(["-n", &cns.0, "-4", "addr", "show", "dh-c"]))?;
        if !addrs.contains("10.77.0.") {
            bail!("{c:?} exited 0 but no address is configured:\n{addrs}");
        }
        Ok(ms)
    };
    // Warm-up: dnsmasq probes a new address once (ICMP) before offering it.
    time(&ours)?;
    time(&theirs)?;
    let (mut a, mut b, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let x = time(&ours)?;
        let y = time(&theirs)?;
        a.push(x);
        b.push(y);
        ratio.push(x / y);
    }
    let (amin, amax) = (
        a.iter().cloned().fold(f64::MAX, f64::min),
        a.iter().cloned().fold(0.0, f64::max),
    );
    let (bmin, bmax) = (
        b.iter().cloned().fold(f64::MAX, f64::min),
        b.iter().cloned().fold(0.0, f64::max),
    );
    println!("DHCP: process start -> lease applied, {runs} runs each, alternating (ms; min / median / max):");
    println!(
        "  cairn-init dhcp-once  {amin:7.1} / {:7.1} / {amax:7.1}",
        median(&mut a)
    );
    println!(
        "  busybox udhcpc        {bmin:7.1} / {:7.1} / {bmax:7.1}",
        median(&mut b)
    );
    println!(
        "  ratio cairn/udhcpc, median of pairs: {:.2}",
        median(&mut ratio)
    );
    Ok(())
}
