//! `cairnctl`: keys, signing, publishing and fleet status for cairn.
//! Thin wrapper over the `cairn_hub` library; errors end as
//! `cairnctl: <message>` with exit status 1.

use anyhow::{bail, Context};
use cairn_hub::authoring::{build_manifest, parse_ttl, Overrides};
use cairn_hub::timefmt::{now_unix, rfc3339_utc};
use cairn_hub::{HubClient, DEFAULT_HUB};
use cairn_manifest::{verify, Envelope, SigningKey, TrustStore};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// cairn operator tool: keys, signed manifests, publishing, fleet status.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create an ed25519 signing key pair (NAME.key, NAME.pub).
    Keygen {
        /// Directory to write the key files to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Base name of the key files.
        #[arg(long, default_value = "cairn")]
        name: String,
    },
    /// Compile a TOML manifest and sign it into an envelope.
    Sign {
        /// Signing key file.
        #[arg(long)]
        key: PathBuf,
        /// Override `node`.
        #[arg(long)]
        node: Option<String>,
        /// Override `version`.
        #[arg(long)]
        version: Option<u64>,
        /// Validity from now (3600, 90s, 30m, 24h, 7d); sets issued_at and expires_at.
        #[arg(long)]
        ttl: Option<String>,
        /// Output file (default: the input with a .bin extension).
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
        /// The manifest in TOML.
        manifest: PathBuf,
    },
    /// Publish a signed manifest for a node.
    Publish {
        /// Hub URL (default: $CAIRN_HUB, else http://127.0.0.1:7400).
        #[arg(long)]
        hub: Option<String>,
        /// Node name.
        node: String,
        /// Signed envelope (.bin).
        file: PathBuf,
    },
    /// List nodes and their latest status.
    Nodes {
        /// Hub URL (default: $CAIRN_HUB, else http://127.0.0.1:7400).
        #[arg(long)]
        hub: Option<String>,
        /// Print the hub's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a workload's log (or the node's own: `cairn-init`) as the node
    /// shipped it to the hub; `-f` keeps following it.
    Logs {
        /// Hub URL (default: $CAIRN_HUB, else http://127.0.0.1:7400).
        #[arg(long)]
        hub: Option<String>,
        /// Node name.
        node: String,
        /// Workload name, or `cairn-init` for the node's own log.
        workload: String,
        /// Keep printing new lines as they arrive.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Show one node's latest status as JSON.
    Status {
        /// Hub URL (default: $CAIRN_HUB, else http://127.0.0.1:7400).
        #[arg(long)]
        hub: Option<String>,
        /// Node name.
        node: String,
    },
    /// Upload a boot file (kernel, initramfs) for netbooting nodes.
    BootPut {
        /// Hub URL (default: $CAIRN_HUB, else http://127.0.0.1:7400).
        #[arg(long)]
        hub: Option<String>,
        /// Name on the hub (default: the file's name).
        #[arg(long)]
        name: Option<String>,
        /// The file.
        file: PathBuf,
    },
    /// Set the iPXE profile of a machine (by MAC) or the default one.
    Ipxe {
        /// Hub URL (default: $CAIRN_HUB, else http://127.0.0.1:7400).
        #[arg(long)]
        hub: Option<String>,
        /// The machine's MAC; without it, the default profile.
        #[arg(long)]
        mac: Option<String>,
        /// Node id it boots as (default: its hardware-derived id).
        #[arg(long)]
        node: Option<String>,
        /// Extra kernel arguments.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        /// Kernel boot file name.
        #[arg(long, default_value = "bzImage")]
        kernel: String,
        /// Initramfs boot file name.
        #[arg(long, default_value = "initramfs.cpio.zst")]
        initrd: String,
    },
    /// Decode a signed manifest; with --trust, verify it too.
    Inspect {
        /// Signed envelope (.bin).
        file: PathBuf,
        /// Directory of trusted public keys (*.pub) to verify against.
        #[arg(long)]
        trust: Option<PathBuf>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("cairnctl: {}", cairn_hub::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn hub(arg: Option<String>) -> HubClient {
    let url = arg
        .or_else(|| std::env::var("CAIRN_HUB").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_HUB.to_string());
    HubClient::new(&url)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Keygen { out, name } => keygen(&out, &name),
        Cmd::BootPut { hub: h, name, file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = name.unwrap_or_else(|| {
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            hub(h).put_boot(&name, &bytes)?;
            println!("boot file {name} uploaded ({} bytes)", bytes.len());
            Ok(())
        }
        Cmd::Ipxe {
            hub: h,
            mac,
            node,
            cmdline,
            kernel,
            initrd,
        } => {
            let profile = cairn_hub::ipxe::Profile {
                node,
                kernel,
                initrd,
                cmdline,
            };
            profile.check().map_err(anyhow::Error::msg)?;
            let key = match &mac {
                Some(m) => cairn_hub::ipxe::normalize_mac(m)
                    .with_context(|| format!("{m:?} is not a MAC"))?,
                None => "default".to_string(),
            };
            hub(h).put_ipxe(&key, &profile)?;
            println!("iPXE profile {key} set");
            Ok(())
        }
        Cmd::Sign {
            key,
            node,
            version,
            ttl,
            out,
            manifest,
        } => sign(&key, node, version, ttl.as_deref(), out, &manifest),
        Cmd::Publish { hub: h, node, file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let client = hub(h);
            client.put_manifest(&node, &bytes)?;
            let version = Envelope::from_bytes(&bytes)
                .ok()
                .and_then(|e| e.decode_payload().ok())
                .map_or_else(|| "?".to_string(), |m| m.version.to_string());
            println!("published {node} version {version} to {}", client.base());
            Ok(())
        }
        Cmd::Nodes { hub: h, json } => {
            let nodes = hub(h).nodes()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print!("{}", cairn_hub::fleet::table(&nodes, now_unix()));
            }
            Ok(())
        }
        Cmd::Logs {
            hub: h,
            node,
            workload,
            follow,
        } => {
            use std::io::Write;
            let client = hub(h);
            let mut at = 0;
            let mut out = std::io::stdout();
            let mut warned = false;
            loop {
                let (bytes, next, end) = match client.get_log(&node, &workload, at) {
                    Ok(r) => r,
                    // Following: a log not shipped yet, or a hub restarting,
                    // is waited out (said once).
                    Err(e) if follow => {
                        if !warned {
                            eprintln!("cairnctl: {e}; still trying");
                            warned = true;
                        }
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                warned = false;
                out.write_all(&bytes)?;
                out.flush()?;
                at = next;
                if !bytes.is_empty() && at < end {
                    continue;
                }
                if !follow {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        Cmd::Status { hub: h, node } => {
            let rec = hub(h).node(&node)?;
            println!("{}", serde_json::to_string_pretty(&rec)?);
            Ok(())
        }
        Cmd::Inspect { file, trust } => inspect(&file, trust.as_deref()),
    }
}

fn keygen(dir: &Path, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') {
        bail!("invalid key name {name:?}: it must be a plain file name");
    }
    let key_path = dir.join(format!("{name}.key"));
    let pub_path = dir.join(format!("{name}.pub"));
    for p in [&key_path, &pub_path] {
        if p.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = SigningKey::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| format!("creating {}", key_path.display()))?;
    f.write_all(key.to_file_text().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", key_path.display()))?;
    std::fs::write(&pub_path, key.public_file_text())
        .with_context(|| format!("writing {}", pub_path.display()))?;
    println!("key id {}", key.id());
    println!(
        "secret key: {} (keep it off nodes and out of git)",
        key_path.display()
    );
    println!(
        "public key: {} (bake it into node images)",
        pub_path.display()
    );
    Ok(())
}

fn sign(
    key_path: &Path,
    node: Option<String>,
    version: Option<u64>,
    ttl: Option<&str>,
    out: Option<PathBuf>,
    input: &Path,
) -> anyhow::Result<()> {
    let key = SigningKey::read(key_path)?;
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let overrides = Overrides {
        node,
        version,
        ttl: ttl.map(parse_ttl).transpose()?,
    };
    let now = now_unix();
    let manifest =
        build_manifest(&text, &overrides, now).with_context(|| input.display().to_string())?;
    if manifest.expires_at <= manifest.issued_at {
        eprintln!(
            "cairnctl: warning: expires_at {} is not after issued_at {}",
            manifest.expires_at, manifest.issued_at
        );
    }
    if manifest.expires_at <= now {
        eprintln!(
            "cairnctl: warning: this manifest is already expired ({}); nodes will refuse it",
            rfc3339_utc(manifest.expires_at)
        );
    }
    let out = out.unwrap_or_else(|| input.with_extension("bin"));
    if out == input {
        bail!(
            "output {} would overwrite the input; pass -o",
            out.display()
        );
    }
    let bytes = Envelope::seal(&manifest, &key).to_bytes();
    cairn_hub::store::write_atomic(&out, &bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "signed {} version {} with key {} (expires {}) -> {}",
        manifest.node,
        manifest.version,
        key.id(),
        rfc3339_utc(manifest.expires_at),
        out.display()
    );
    Ok(())
}

fn inspect(file: &Path, trust: Option<&Path>) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let env = Envelope::from_bytes(&bytes).with_context(|| file.display().to_string())?;
    println!("key id:   {}", env.key_id);
    println!("format:   {}", env.format);
    println!("size:     {} bytes", bytes.len());
    let manifest = env
        .decode_payload()
        .with_context(|| file.display().to_string())?;
    println!("issued:   {}", rfc3339_utc(manifest.issued_at));
    println!("expires:  {}", rfc3339_utc(manifest.expires_at));
    println!();
    print!(
        "{}",
        toml::to_string_pretty(&manifest).context("rendering the manifest as TOML")?
    );
    let Some(dir) = trust else { return Ok(()) };
    println!();
    let (store, errors) = TrustStore::load_dir(dir);
    for e in &errors {
        eprintln!("cairnctl: warning: {e}");
    }
    if store.is_empty() {
        bail!("no usable public keys (*.pub) in {}", dir.display());
    }
    match verify(&bytes, &store, &manifest.node, now_unix(), None) {
        Ok(_) => {
            println!(
                "verify:   OK (signed by trusted key {}, node {}, version {})",
                env.key_id, manifest.node, manifest.version
            );
            Ok(())
        }
        Err(r) => {
            println!("verify:   REJECTED ({}): {r}", r.code());
            bail!("{} rejected: {r}", file.display())
        }
    }
}
