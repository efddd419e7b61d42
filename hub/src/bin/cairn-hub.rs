//! `cairn-hub`: serves manifests, node status and boot files from a data
//! directory. Thin wrapper over `cairn_hub::server`.

use anyhow::Context;
use cairn_hub::server::{shutdown_signal, Hub, HubConfig};
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The cairn hub: manifests, node status and boot files over HTTP.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Listen address, IP:PORT (port 0 picks a free port). Keep it on
    /// loopback or a closed test network: the write API is unauthenticated.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Write the bound port number to this file (atomically) once listening.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Largest boot file accepted, in bytes.
    #[arg(long, default_value_t = cairn_hub::server::DEFAULT_BOOT_LIMIT)]
    boot_limit: u64,
}

fn main() {
    let level = match std::env::var("CAIRN_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        Ok("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("cairn-hub: {}", cairn_hub::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let config = HubConfig {
            data: args.data.clone(),
            listen: args.listen,
            boot_limit: args.boot_limit,
        };
        let hub = Hub::bind(&config).await?;
        let addr = hub.local_addr();
        if let Some(pf) = &args.port_file {
            cairn_hub::store::write_atomic(pf, format!("{}\n", addr.port()).as_bytes())
                .with_context(|| format!("writing port file {}", pf.display()))?;
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "cairn-hub listening on http://{addr}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        drop(out);
        hub.serve(shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
