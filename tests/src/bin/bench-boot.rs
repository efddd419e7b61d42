//! `make bench` (boot part): boots the node N times on the closed test
//! network and prints the median boot timeline (ms since kernel start) and
//! the sizes of what boots. Absolute times under TCG are noisy: read medians.

use anyhow::{Context, Result};
use cairn_e2e::{inputs_or_skip, workload, Scenario, NODE};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let Some(inp) = inputs_or_skip() else {
        return Ok(());
    };
    let mut sc = Scenario::setup(&inp)?;
    let v1 = sc.sign("v1", &sc.manifest(1, ""))?;
    sc.publish(NODE, &v1)?;
    let mut phases: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut walls = Vec::new();
    let mut last_boot = String::new();
    for i in 0..runs {
        let t = Instant::now();
        sc.boot()?;
        let mut st = serde_json::Value::Null;
        sc.net
            .wait_until("container answering", Duration::from_secs(180), || {
                st = sc.status()?;
                Ok(st["boot_id"].as_str().is_some_and(|b| b != last_boot)
                    && workload(&st, "web").is_some_and(|w| w["answering"] == true))
            })?;
        walls.push(t.elapsed().as_millis() as u64);
        last_boot = st["boot_id"].as_str().unwrap_or_default().to_string();
        for p in st["timeline"].as_array().context("no timeline")? {
            let name = p["phase"].as_str().unwrap_or("?").to_string();
            phases
                .entry(name)
                .or_default()
                .push(p["ms"].as_u64().unwrap_or(0));
        }
        sc.net.stop("qemu");
        println!(
            "run {}/{runs}: QEMU start -> container answering {} ms (wall)",
            i + 1,
            walls[i]
        );
    }
    println!("\nboot timeline over {runs} boots (ms since kernel start; min / median / max):");
    let order = [
        "pid1",
        "address",
        "manifest-verified",
        "workload-started",
        "workload-answering",
    ];
    for name in order {
        if let Some(v) = phases.get_mut(name) {
            let (min, max) = (*v.iter().min().unwrap_or(&0), *v.iter().max().unwrap_or(&0));
            println!("  {name:<20} {min:>6} / {:>6} / {max:>6}", median(v));
        }
    }
    if let (Some(a), Some(p)) = (phases.get("workload-answering"), phases.get("pid1")) {
        let mut d: Vec<u64> = a.iter().zip(p).map(|(a, p)| a.saturating_sub(*p)).collect();
        println!(
            "  PID 1 start -> container answering: median {} ms",
            median(&mut d)
        );
    }
    println!(
        "  QEMU start -> container answering (wall): median {} ms",
        median(&mut walls)
    );
    let kernel = std::fs::metadata(&sc.kernel)?.len();
    let initrd = std::fs::metadata(&sc.initrd)?.len();
    println!("\nsizes: kernel {kernel} bytes ({:.2} MiB), initramfs {initrd} bytes ({:.2} MiB, target <= 4 MiB)",
        kernel as f64 / 1048576.0, initrd as f64 / 1048576.0);
    Ok(())
}
