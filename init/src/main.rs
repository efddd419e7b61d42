//! cairn-init: PID 1 of a cairn node, and (as subcommands of the same static
//! binary) the helpers it runs as child processes.

mod cmdline;
mod configdrive;
mod container;
mod health;
mod hub;
mod loader;
mod logs;
mod modules;
mod net;
mod oci;
mod osupdate;
mod pid1;
mod shim;
mod state;
mod supervisor;
mod sys;
#[cfg(test)]
mod testnet;
mod timeline;
mod workload;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("container-shim") if args.len() == 3 => shim::main(&args[2]),
        Some("dhcp-once") if args.len() == 3 => net::dhcp::driver::once_main(&args[2]),
        // The kernel's request_module, once PID 1 made us its modprobe.
        Some("-q") if std::process::id() != 1 => modules::modprobe_main(&args[1..]),
        Some("--version") => println!("cairn-init {}", env!("CARGO_PKG_VERSION")),
        _ if std::process::id() == 1 => pid1::main(),
        _ => {
            eprintln!(
                "cairn-init is the PID 1 of a cairn node: boot it as /init in the initramfs.\n\
                 Subcommands: dhcp-once IFACE (one DHCP lease, then exit), container-shim SPEC (internal)"
            );
            std::process::exit(2);
        }
    }
}
