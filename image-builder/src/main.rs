//! `cairn-image`: the command line over the `cairn_image` library.
//! Results go to stdout (the last line is what scripts capture), warnings
//! and progress to stderr.

use anyhow::Context;
use cairn_image::initramfs::{self, Compression, ExtraFile};
use cairn_image::push::{BlobStatus, Target};
use cairn_image::{epoch, oci, output, push};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cairn-image",
    version,
    about = "Builds cairn images: initramfs, OCI layouts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the node's initramfs (cpio newc, compressed).
    Initramfs {
        /// The PID 1 binary, stored as /init.
        #[arg(long, value_name = "PATH")]
        init: PathBuf,
        /// Directory of trusted *.pub keys to bake in.
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Extra file to add (repeatable).
        #[arg(long = "file", value_name = "SRC:DEST")]
        files: Vec<ExtraFile>,
        /// zstd, gzip or none.
        #[arg(long, default_value_t = Compression::Zstd)]
        compression: Compression,
        /// mtime of every entry and the clock floor [default: $SOURCE_DATE_EPOCH or 0].
        #[arg(long, value_name = "N")]
        epoch: Option<u64>,
        /// A modular kernel's depmod'ed lib/modules/RELEASE directory.
        #[arg(long, value_name = "DIR", requires = "module_list")]
        modules: Option<PathBuf>,
        /// Modules to carry from --modules (one name per line; deps follow).
        #[arg(long, value_name = "FILE", requires = "modules")]
        module_list: Option<PathBuf>,
    },
    /// Build an OCI image layout for one static binary.
    Oci {
        /// The static binary.
        #[arg(long, value_name = "PATH")]
        binary: PathBuf,
        /// Output directory (replaced if it is an OCI layout).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// File name of the binary in the image (/NAME, the entrypoint).
        #[arg(long, default_value = "hello")]
        name: String,
        /// Port the binary listens on (PORT env, ExposedPorts).
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// mtime of every layer entry and the config's `created` [default: $SOURCE_DATE_EPOCH or 0].
        #[arg(long, value_name = "N")]
        epoch: Option<u64>,
    },
    /// Build the netboot ISO: iPXE that chains to the hub (≤ 4 MiB, BIOS, hybrid).
    NetbootIso {
        /// The hub's URL (http://host:port), built into the ISO.
        #[arg(long)]
        hub: String,
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Timestamps in the ISO [default: $SOURCE_DATE_EPOCH or 0].
        #[arg(long, value_name = "N")]
        epoch: Option<u64>,
    },
    /// Build the full ISO: kernel + initramfs (+ seed), BIOS (ISOLINUX) and
    /// UEFI (systemd-boot), hybrid so `dd` to a USB stick boots too.
    Iso {
        #[command(flatten)]
        media: Media,
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Build the cloud disk image: GPT, an EFI system partition with
    /// systemd-boot, a blank state partition the node formats at first boot.
    Disk {
        #[command(flatten)]
        media: Media,
        /// Disk size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Raw output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Also write a qcow2 copy here.
        #[arg(long, value_name = "FILE")]
        qcow2: Option<PathBuf>,
    },
    /// Push an OCI image layout to a registry (plain HTTP only, for now).
    Push {
        /// The OCI layout directory.
        #[arg(long, value_name = "DIR")]
        layout: PathBuf,
        /// Destination.
        #[arg(long, value_name = "HOST:PORT/REPO:TAG")]
        to: Target,
        /// Allow plain HTTP (required: HTTPS is not supported yet).
        #[arg(long)]
        insecure: bool,
    },
}

/// What the full ISO and the disk image boot.
#[derive(Args)]
struct Media {
    /// The kernel (bzImage).
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// The initramfs (from `cairn-image initramfs`).
    #[arg(long, value_name = "FILE")]
    initramfs: PathBuf,
    /// Kernel command line (hub, node id, console...).
    #[arg(long, default_value = "console=ttyS0 panic=10")]
    cmdline: String,
    /// OS version, in the boot entry and as `cairn.os=` on the command line.
    #[arg(long, default_value = "1")]
    os_version: String,
    /// A signed manifest the node runs with no hub (`cairnctl sign`).
    #[arg(long, value_name = "FILE")]
    seed_manifest: Option<PathBuf>,
    /// An OCI layout whose blobs the node uses before any registry (repeatable).
    #[arg(long, value_name = "DIR")]
    seed_image: Vec<PathBuf>,
    /// Every timestamp [default: $SOURCE_DATE_EPOCH or 0].
    #[arg(long, value_name = "N")]
    epoch: Option<u64>,
}

impl Media {
    fn payload(&self) -> anyhow::Result<cairn_image::boot::Payload> {
        let epoch = epoch::resolve(self.epoch)?;
        let kernel = std::fs::read(&self.kernel)
            .with_context(|| format!("reading {}", self.kernel.display()))?;
        let mut initrd = std::fs::read(&self.initramfs)
            .with_context(|| format!("reading {}", self.initramfs.display()))?;
        if self.seed_manifest.is_some() || !self.seed_image.is_empty() {
            let seed =
                cairn_image::boot::seed(self.seed_manifest.as_deref(), &self.seed_image, epoch)
                    .map_err(anyhow::Error::msg)?;
            eprintln!("seed: {} bytes appended to the initramfs", seed.len());
            initrd.extend_from_slice(&seed);
        }
        Ok(cairn_image::boot::Payload {
            kernel,
            initrd,
            cmdline: self.cmdline.clone(),
            version: self.os_version.clone(),
            epoch,
        })
    }
}

/// Prints `what: FILE N bytes (M MiB), sha256 H`.
fn report(what: &str, path: &std::path::Path) -> anyhow::Result<()> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let len = std::io::copy(&mut f, &mut h)?;
    println!(
        "{what}: {} {len} bytes ({:.2} MiB), sha256 {}",
        path.display(),
        mib(len),
        hex::encode(h.finalize())
    );
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Iso { media, out } => {
            let inputs = cairn_image::boot::Inputs::debian().map_err(anyhow::Error::msg)?;
            let p = media.payload()?;
            cairn_image::boot::iso(&inputs, &p, &out).map_err(anyhow::Error::msg)?;
            report("full ISO", &out)?;
        }
        Command::Disk {
            media,
            size_mib,
            out,
            qcow2,
        } => {
            let inputs = cairn_image::boot::Inputs::debian().map_err(anyhow::Error::msg)?;
            let p = media.payload()?;
            cairn_image::boot::disk(&inputs, &p, size_mib << 20, &out)
                .map_err(anyhow::Error::msg)?;
            if let Some(q) = &qcow2 {
                cairn_image::boot::qcow2(&out, q).map_err(anyhow::Error::msg)?;
                report("cloud image (qcow2)", q)?;
            }
            report("cloud image (raw)", &out)?;
        }
        Command::NetbootIso { hub, out, epoch } => {
            let inputs = cairn_image::iso::Inputs::debian().map_err(anyhow::Error::msg)?;
            cairn_image::iso::build(&inputs, &hub, epoch::resolve(epoch)?, &out)
                .map_err(anyhow::Error::msg)?;
            let bytes = std::fs::read(&out)?;
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            println!(
                "netboot ISO: {} {} bytes ({:.2} MiB; target <= 4 MiB), sha256 {sha}, chains to {hub}/ipxe",
                out.display(),
                bytes.len(),
                mib(bytes.len() as u64)
            );
        }
        Command::Initramfs {
            init,
            keys,
            out,
            files,
            compression,
            epoch,
            modules,
            module_list,
        } => {
            let modules = match (modules, module_list) {
                (Some(dir), Some(list)) => Some((dir, cairn_image::modules::read_list(&list)?)),
                _ => None,
            };
            let spec = initramfs::Spec {
                modules,
                init,
                keys_dir: keys,
                extra_files: files,
                compression,
                epoch: epoch::resolve(epoch)?,
            };
            let image = initramfs::build(&spec).context("building the initramfs")?;
            output::write_atomic(&out, &image.bytes)?;
            let size = image.bytes.len() as u64;
            let ids: Vec<String> = image.keys.iter().map(ToString::to_string).collect();
            eprintln!(
                "initramfs: {} entries, {compression}, epoch {}, trusted keys {}",
                image.paths.len(),
                spec.epoch,
                ids.join(", ")
            );
            if size > initramfs::SIZE_BUDGET {
                eprintln!(
                    "warning: the initramfs is {:.2} MiB compressed, over the {} MiB budget",
                    mib(size),
                    initramfs::SIZE_BUDGET / (1024 * 1024)
                );
            }
            println!(
                "initramfs: {} {size} bytes ({:.2} MiB) compressed, {} uncompressed, sha256 {}",
                out.display(),
                mib(size),
                image.uncompressed_len,
                image.sha256
            );
        }
        Command::Oci {
            binary,
            out,
            name,
            port,
            epoch,
        } => {
            let spec = oci::Spec {
                binary,
                name,
                port,
                epoch: epoch::resolve(epoch)?,
            };
            let built = oci::build(&spec, &out).context("building the OCI layout")?;
            println!(
                "oci: {} layer {} ({} bytes, {} uncompressed), config {} ({} bytes), manifest {} bytes",
                out.display(),
                built.layer.digest,
                built.layer.size,
                built.tar_size,
                built.config.digest,
                built.config.size,
                built.manifest.size
            );
            println!("{}", built.manifest.digest);
        }
        Command::Push {
            layout,
            to,
            insecure,
        } => {
            let opened = oci::Layout::open(&layout)?;
            let pushed = push::push(&opened, &to, insecure)
                .with_context(|| format!("pushing {} to {to}", layout.display()))?;
            for b in &pushed.blobs {
                let what = match b.status {
                    BlobStatus::Exists => "exists",
                    BlobStatus::Uploaded => "uploaded",
                };
                println!("blob {} {} bytes: {what}", b.digest, b.size);
            }
            if !pushed.digest_confirmed {
                eprintln!("warning: the registry did not confirm the manifest digest (no Docker-Content-Digest header)");
            }
            println!(
                "pushed {}/{}@{}",
                to.registry, to.repository, pushed.manifest_digest
            );
        }
    }
    Ok(())
}
