//! Formats a file or device as ext4 (for trying the formatter by hand).
fn main() {
    let path = std::env::args().nth(1).expect("usage: fmt FILE");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let len = f.metadata().expect("stat").len();
    let p = cairn_storage::ext4::Params {
        label: "cairn-state".into(),
        uuid: *b"0123456789abcdef",
        hash_seed: *b"fedcba9876543210",
        now: 1_796_000_000,
    };
    let l = cairn_storage::ext4::format(&f, len, &p).expect("format");
    println!("{l:?}");
}
