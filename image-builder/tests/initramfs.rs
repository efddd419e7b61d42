//! `cairn-image initramfs` end to end: reproducibility, and the archive as
//! GNU cpio sees it.

mod common;

use common::{have, last_line, run_err, run_ok, s};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Fixture {
    dir: tempfile::TempDir,
    init: PathBuf,
    keys: PathBuf,
    key_id: String,
}

/// A fake PID 1 and a keys directory holding one freshly generated key.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("fake-init");
    std::fs::write(&init, b"\x7fELF not really PID 1\n").unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key = cairn_manifest::SigningKey::generate().unwrap();
    std::fs::write(keys.join("operator.pub"), key.public_file_text()).unwrap();
    // Not a *.pub: ignored (a signing key must never end up on a node).
    std::fs::write(keys.join("operator.key"), key.to_file_text()).unwrap();
    Fixture {
        init,
        keys,
        key_id: key.id().to_string(),
        dir,
    }
}

impl Fixture {
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn build(&self, out: &Path, extra: &[&str]) -> String {
        let mut args = vec![
            "initramfs",
            "--init",
            s(&self.init),
            "--keys",
            s(&self.keys),
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        run_ok(&args)
    }
}

fn cpio_list(archive: &Path, verbose: bool) -> String {
    let out = Command::new("cpio")
        .arg(if verbose { "-itv" } else { "-it" })
        .arg("--quiet")
        .stdin(std::fs::File::open(archive).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rebuilds_are_byte_identical_and_epoch_changes_bytes() {
    let f = fixture();
    let (a, b, c) = (f.out("a.img"), f.out("b.img"), f.out("c.img"));
    let sa = f.build(&a, &["--epoch", "1700000000"]);
    f.build(&b, &["--epoch", "1700000000"]);
    f.build(&c, &["--epoch", "1700000001"]);
    let (ba, bb, bc) = (
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(&c).unwrap(),
    );
    assert_eq!(ba, bb, "same inputs, same bytes");
    assert_ne!(ba, bc, "another epoch, other bytes");

    // The summary line: path, sizes, sha256 of what was written.
    let line = last_line(&sa);
    let sha = hex::encode(Sha256::digest(&ba));
    let expect_start = format!("initramfs: {} {} bytes (", a.display(), ba.len());
    assert!(line.starts_with(&expect_start), "{line}");
    assert!(line.contains(" MiB) compressed, "), "{line}");
    assert!(
        line.ends_with(&format!(" uncompressed, sha256 {sha}")),
        "{line}"
    );
    // zstd magic, and the frame decodes.
    assert_eq!(&ba[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    let raw = zstd::decode_all(&ba[..]).unwrap();
    assert!(
        line.contains(&format!(", {} uncompressed,", raw.len())),
        "{line}"
    );

    // SOURCE_DATE_EPOCH is the default epoch.
    let d = f.out("d.img");
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-image"))
        .args([
            "initramfs",
            "--init",
            s(&f.init),
            "--keys",
            s(&f.keys),
            "--out",
            s(&d),
        ])
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read(&d).unwrap(), ba);

    // gzip and none are reproducible too; gzip carries no timestamp.
    for comp in ["gzip", "none"] {
        let (x, y) = (f.out(&format!("x.{comp}")), f.out(&format!("y.{comp}")));
        f.build(&x, &["--compression", comp, "--epoch", "5"]);
        f.build(&y, &["--compression", comp, "--epoch", "5"]);
        let bx = std::fs::read(&x).unwrap();
        assert_eq!(bx, std::fs::read(&y).unwrap(), "{comp}");
        if comp == "gzip" {
            assert_eq!(&bx[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bx[..]), &mut raw)
                .unwrap();
            assert!(raw.starts_with(b"070701"));
        } else {
            assert!(bx.starts_with(b"070701"));
        }
    }
}

#[test]
fn gnu_cpio_reads_the_archive() {
    if !have("cpio") {
        println!("SKIP: GNU cpio not installed");
        return;
    }
    let f = fixture();
    let img = f.out("initramfs.img");
    let epoch = 1_650_000_000u64;
    f.build(&img, &["--epoch", &epoch.to_string()]);
    let raw = zstd::decode_all(&std::fs::read(&img).unwrap()[..]).unwrap();
    let cpio = f.out("initramfs.cpio");
    std::fs::write(&cpio, &raw).unwrap();

    let list = cpio_list(&cpio, false);
    let names: Vec<&str> = list.lines().collect();
    let key_entry = format!("etc/cairn/keys/{}.pub", f.key_id);
    // Exactly our entries, in path order; nothing from the build host.
    let expected = [
        "dev",
        "dev/console",
        "etc",
        "etc/cairn",
        "etc/cairn/build-epoch",
        "etc/cairn/keys",
        &key_entry,
        "init",
        "mnt",
        "proc",
        "run",
        "sys",
        "tmp",
        "var",
        "var/lib",
    ];
    assert_eq!(names, expected);

    let verbose = cpio_list(&cpio, true);
    let console: Vec<&str> = verbose
        .lines()
        .find(|l| l.ends_with(" dev/console"))
        .expect("dev/console in -itv")
        .split_whitespace()
        .collect();
    assert_eq!(console[0], "crw-------", "{console:?}");
    assert_eq!((console[4], console[5]), ("5,", "1"), "{console:?}");
    let tmp = verbose.lines().find(|l| l.ends_with(" tmp")).unwrap();
    assert!(tmp.starts_with("drwxrwxrwt"), "{tmp}");
    let init = verbose.lines().find(|l| l.ends_with(" init")).unwrap();
    assert!(init.starts_with("-rwxr-xr-x   1 root     root"), "{init}");

    // Unpack everything but the device node (mknod may be refused here).
    let root = f.out("root");
    std::fs::create_dir(&root).unwrap();
    let out = Command::new("cpio")
        .args([
            "-idm",
            "--quiet",
            "--no-absolute-filenames",
            "-f",
            "dev/console",
        ])
        .current_dir(&root)
        .stdin(std::fs::File::open(&cpio).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(root.join("init")).unwrap(),
        std::fs::read(&f.init).unwrap()
    );
    let meta = std::fs::metadata(root.join("init")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        meta.modified().unwrap(),
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/cairn/build-epoch")).unwrap(),
        format!("{epoch}\n")
    );
    let key = root.join(&key_entry);
    let parsed = cairn_manifest::keys::read_public(&key).unwrap();
    assert_eq!(cairn_manifest::KeyId::of(&parsed).to_string(), f.key_id);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o7777,
        0o644
    );
}

#[test]
fn extra_files_get_parents_and_normalised_modes() {
    if !have("cpio") {
        println!("SKIP: GNU cpio not installed");
        return;
    }
    let f = fixture();
    let script = f.out("tool.sh");
    std::fs::write(&script, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let conf = f.out("app.conf");
    std::fs::write(&conf, b"x=1\n").unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let img = f.out("extra.img");
    let a = format!("{}:/usr/local/bin/tool", s(&script));
    let b = format!("{}:etc/app.conf", s(&conf));
    f.build(&img, &["--compression", "none", "--file", &a, "--file", &b]);
    let list = cpio_list(&img, true);
    let line = |name: &str| {
        list.lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} missing:\n{list}"))
            .to_string()
    };
    assert!(line("usr/local/bin/tool").starts_with("-rwxr-xr-x"));
    assert!(line("usr/local/bin").starts_with("drwxr-xr-x"));
    assert!(line("usr").starts_with("drwxr-xr-x"));
    assert!(line("etc/app.conf").starts_with("-rw-r--r--"));
}

#[test]
fn bad_inputs_are_refused_clearly() {
    let f = fixture();
    let img = f.out("x.img");
    let base = |keys: &Path| {
        vec![
            "initramfs".to_string(),
            "--init".into(),
            s(&f.init).into(),
            "--keys".into(),
            s(keys).into(),
            "--out".into(),
            s(&img).into(),
        ]
    };
    let run = |args: Vec<String>| run_err(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // An invalid key file is named.
    std::fs::write(f.keys.join("broken.pub"), "# oops\nnot hex\n").unwrap();
    let err = run(base(&f.keys));
    assert!(err.contains("broken.pub"), "{err}");
    std::fs::remove_file(f.keys.join("broken.pub")).unwrap();

    // No keys at all.
    let empty = f.out("nokeys");
    std::fs::create_dir(&empty).unwrap();
    let err = run(base(&empty));
    assert!(
        err.contains("an initramfs with no trusted key could never accept a manifest"),
        "{err}"
    );

    // --file cannot replace our entries or sneak keys past validation.
    for (dest, why) in [
        ("init", "init is already in the initramfs"),
        (
            "/etc/cairn/build-epoch",
            "etc/cairn/build-epoch is already in the initramfs",
        ),
        ("etc", "etc is already in the initramfs"),
        ("etc/cairn/keys/evil.pub", "trusted keys come from --keys"),
        ("init/x", "parent init is not a directory"),
        ("../x", "`.` and `..` are not allowed"),
    ] {
        let mut args = base(&f.keys);
        args.push("--file".into());
        args.push(format!("{}:{dest}", s(&f.init)));
        let err = run(args);
        assert!(err.contains(why), "{dest}: {err}");
    }

    // A missing init is named.
    let mut args = base(&f.keys);
    args[2] = s(&f.out("missing-init")).into();
    let err = run(args);
    assert!(err.contains("missing-init"), "{err}");
    assert!(!img.exists(), "no output on failure");
}

#[test]
fn warns_over_the_size_budget() {
    let f = fixture();
    // 4.5 MiB that does not compress: --compression none keeps the test fast.
    let big = f.out("big-init");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..(4 * 1024 * 1024 + 512 * 1024))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&big, &data).unwrap();
    let img = f.out("big.img");
    let out = common::run(&[
        "initramfs",
        "--init",
        s(&big),
        "--keys",
        s(&f.keys),
        "--out",
        s(&img),
        "--compression",
        "none",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: the initramfs is"), "{err}");
}
