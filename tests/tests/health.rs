//! End to end: a health check, and logs through the hub. `web` is probed
//! over HTTP on its own address every second; after `/sick` its `/healthz`
//! answers 503, two failures in a row make it unhealthy, PID 1 kills it and
//! the restart policy brings up a fresh (healthy) instance. Both
//! instances' output, and PID 1's account of it, come back through
//! `cairnctl logs`; `-f` follows a third start. Last, `/hog` allocates
//! past `memory_mib`: the kernel kills it, PID 1 reports the OOM kill and
//! restarts it; and `/threads` asks for 500 threads under `pids_max = 40`.

use anyhow::{Context, Result};
use cairn_e2e::{answering, inputs_or_skip, instance, run, workload, Scenario, NODE};
use serde_json::Value;
use std::time::{Duration, Instant};

#[test]
fn a_failing_health_check_restarts_the_workload() -> Result<()> {
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    let mut sc = Scenario::setup(&inp)?;
    let health = r#"health = { kind = "http", port = 80, path = "/healthz", interval_s = 1, timeout_s = 1, failures = 2 }
memory_mib = 48
pids_max = 40"#;
    sc.publish(NODE, &sc.sign("v1", &sc.manifest(1, health))?)?;
    sc.boot()?;
    let mut st = Value::Null;
    sc.net.wait_until(
        "web to answer and be healthy",
        Duration::from_secs(300),
        || {
            st = sc.status()?;
            Ok(answering(&st, "web")
                && workload(&st, "web").is_some_and(|w| w["health"]["state"] == "healthy"))
        },
    )?;
    let ip = st["addresses"][0]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("node address")?
        .to_string();
    let url = format!("http://{ip}:8080/");
    let (_, body) = sc.net.http_get(&url)?;
    let first = instance(&body).context("instance id")?;
    let (code, _) = sc.net.http_get(&format!("http://{ip}:8080/sick"))?;
    assert_eq!(code, 200);
    let t0 = Instant::now();
    sc.net.wait_until(
        "web to be killed as unhealthy and come back healthy",
        Duration::from_secs(120),
        || {
            st = sc.status()?;
            let Some(w) = workload(&st, "web") else {
                return Ok(false);
            };
            Ok(w["health"]["unhealthy_restarts"] == 1
                && w["health"]["state"] == "healthy"
                && w["restarts"].as_u64().unwrap_or(0) >= 1)
        },
    )?;
    let (_, body) = sc.net.http_get(&url)?;
    let second = instance(&body).context("instance id")?;
    println!(
        "unhealthy -> restarted -> healthy in {:.1} s; instance {first} -> {second}; {}",
        t0.elapsed().as_secs_f64(),
        workload(&st, "web")
            .map(|w| w["health"].clone())
            .unwrap_or_default()
    );
    assert_ne!(first, second, "a new instance answers");
    // The exit says why (the new instance starts with a clean record).
    assert!(
        workload(&st, "web").unwrap()["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("health check failed")),
        "{}",
        workload(&st, "web").unwrap()
    );
    // peer has no health check: nothing reported, never restarted.
    assert!(workload(&st, "peer").unwrap()["health"].is_null());
    assert_eq!(workload(&st, "peer").unwrap()["restarts"], 0);

    // Logs, as the node shipped them to the hub.
    let ctl = sc.tools.join("cairnctl");
    let logs = |name: &str| {
        run(sc
            .net
            .cmd(&ctl)
            .args(["logs", "--hub", &sc.hub, NODE, name]))
    };
    sc.net.wait_until(
        "both instances' output in cairnctl logs",
        Duration::from_secs(30),
        || {
            let out = logs("web")?;
            Ok(out.contains(&format!("instance={first}"))
                && out.contains(&format!("instance={second}")))
        },
    )?;
    let own = logs("cairn-init")?;
    assert!(
        own.contains("unhealthy: killing it"),
        "PID 1's log says why"
    );
    let out_file = sc.net.dir.path().join("follow.out");
    let mut follow = sc.net.cmd(&ctl);
    follow
        .args(["logs", "-f", "--hub", &sc.hub, NODE, "web"])
        .stdout(std::fs::File::create(&out_file)?);
    let mut child = follow.spawn()?;
    let _ = sc.net.http_get(&format!("http://{ip}:8080/exit"));
    let followed = sc.net.wait_until(
        "cairnctl logs -f to show the next instance start",
        Duration::from_secs(60),
        || {
            Ok(std::fs::read_to_string(&out_file)?
                .matches("hello: listening")
                .count()
                >= 3)
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    followed?;
    let shown = std::fs::read_to_string(&out_file)?;
    println!(
        "cairnctl logs -f web: {} lines, last: {}",
        shown.lines().count(),
        shown.lines().last().unwrap_or_default()
    );

    // A contained fork bomb: 500 threads asked for, the pids limit (40
    // tasks in its cgroup) stops them; the node and the workload go on.
    let (code, body) = sc
        .net
        .http_get(&format!("http://{ip}:8080/threads?n=500"))?;
    println!("pids limit: {}", body.trim());
    let started: u32 = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("started="))
        .and_then(|n| n.parse().ok())
        .context("started=")?;
    assert_eq!(code, 200);
    assert!(started < 40, "the pids limit held: {body}");
    sc.net.wait_until(
        "web to answer after its threads ended",
        Duration::from_secs(30),
        || Ok(sc.net.http_get(&url).is_ok_and(|(c, _)| c == 200)),
    )?;

    // Out of memory: the kernel kills it at its 48 MiB limit. (Version 2
    // drops the health check first, so that a probe timing out while it
    // allocates cannot kill it before the kernel does.)
    sc.publish(
        NODE,
        &sc.sign("v2", &sc.manifest(2, "memory_mib = 48\npids_max = 40"))?,
    )?;
    sc.net.wait_until(
        "version 2 (no health check) to run",
        Duration::from_secs(60),
        || {
            st = sc.status()?;
            Ok(st["manifest"]["applied_version"] == 2
                && workload(&st, "web").is_some_and(|w| w["health"].is_null())
                && answering(&st, "web"))
        },
    )?;
    let _ = sc.net.http_get(&format!("http://{ip}:8080/hog"));
    sc.net.wait_until(
        "web's OOM kill to be reported and web back",
        Duration::from_secs(90),
        || {
            st = sc.status()?;
            Ok(workload(&st, "web").is_some_and(|w| {
                w["oom_kills"] == 1
                    && w["last_exit"]
                        .as_str()
                        .is_some_and(|e| e.contains("OOM-killed"))
            }) && answering(&st, "web"))
        },
    )?;
    println!("OOM: {}", workload(&st, "web").unwrap()["last_exit"]);
    assert_eq!(workload(&st, "peer").unwrap()["oom_kills"], 0);
    Ok(())
}
