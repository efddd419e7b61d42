//! Helpers shared by the integration tests: run the real `cairn-image`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `cairn-image` with `args` and an empty environment for the epoch.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-image"))
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("running cairn-image")
}

/// Runs `cairn-image`, fails the test unless it succeeds, returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "cairn-image {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cairn-image`, fails the test if it succeeds, returns stderr.
pub fn run_err(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "cairn-image {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// The last line of some output.
pub fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}
