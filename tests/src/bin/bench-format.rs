//! `make bench`: formatting a 4 GiB state volume, cairn's own ext4
//! formatter beside Debian's `mkfs.ext4` (e2fsprogs), alternating, on
//! sparse files in the same temp directory. Medians over `CAIRN_BENCH_RUNS`
//! (default 7) runs each, and their ratio. Each result is checked with
//! `e2fsck -fn` once.

use std::process::Command;
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("CAIRN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let size: u64 = 4 << 30;
    let dir = tempfile::Builder::new()
        .prefix("cairn-bench-format.")
        .tempdir()
        .expect("tempdir");
    let img = dir.path().join("vol.img");
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let fresh = || {
        let _ = std::fs::remove_file(&img);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&img)
            .expect("image");
        f.set_len(size).expect("set_len");
        f
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let f = fresh();
        let t = Instant::now();
        let p = cairn_storage::ext4::Params {
            label: "cairn-state".into(),
            uuid: [i as u8; 16],
            hash_seed: [7; 16],
            now: 1_796_000_000,
        };
        cairn_storage::ext4::format(&f, size, &p).expect("format");
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(f);
        if i == 0 {
            let o = Command::new("e2fsck")
                .arg("-fn")
                .arg(&img)
                .output()
                .expect("e2fsck");
            assert!(
                o.status.success(),
                "e2fsck: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        if let Some(mkfs) = mkfs {
            drop(fresh());
            let t = Instant::now();
            // Comparable work: a journal, no lazy init, no discard.
            let o = Command::new(mkfs)
                .args([
                    "-q",
                    "-F",
                    "-b",
                    "4096",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                ])
                .arg(&img)
                .output()
                .expect("mkfs.ext4");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            theirs.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let m_ours = median(&mut ours);
    println!(
        "format 4 GiB, {runs} runs each, alternating (sparse file in {})",
        dir.path().display()
    );
    println!("  cairn ext4::format  median {m_ours:7.1} ms");
    match mkfs {
        Some(_) => {
            let m_theirs = median(&mut theirs);
            println!("  mkfs.ext4 (no lazy init) median {m_theirs:7.1} ms");
            println!("  ratio cairn/mkfs.ext4: {:.2}", m_ours / m_theirs);
        }
        None => println!("SKIP: mkfs.ext4 not installed, no peer to compare with"),
    }
}
