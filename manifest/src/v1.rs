//! Format 1 payload types, frozen.
//!
//! Format 1 payloads are postcard, which is not self-describing: these
//! structs' field order and types *are* the wire format. They never change.
//! A node decodes a format 1 envelope (e.g. signed before the node was
//! upgraded) through these types and converts the result to the current
//! [`crate::Manifest`]. Field meanings are documented on the current types.

use serde::Deserialize;

#[derive(Deserialize)]
pub(crate) struct Manifest {
    node: String,
    version: u64,
    issued_at: u64,
    expires_at: u64,
    network: NetworkSpec,
    storage: StorageSpec,
    containers: Vec<ContainerSpec>,
    vms: Vec<VmSpec>,
    functions: Vec<FunctionSpec>,
}

#[derive(Deserialize)]
struct NetworkSpec {
    workload_subnet: String,
    dns: Vec<String>,
    interfaces: Vec<InterfaceSpec>,
}

#[derive(Deserialize)]
struct InterfaceSpec {
    matches: String,
    mode: String,
    addresses: Vec<String>,
    gateway: Option<String>,
    mtu: Option<u32>,
}

#[derive(Deserialize)]
struct StorageSpec {
    state_disk_serial: Option<String>,
    wipe: bool,
}

#[derive(Deserialize)]
enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Deserialize)]
struct ImageRef {
    registry: String,
    repository: String,
    digest: String,
    insecure: bool,
}

#[derive(Deserialize)]
struct PortSpec {
    host: u16,
    container: u16,
    protocol: String,
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct ContainerSpec {
    name: String,
    image: ImageRef,
    command: Option<Vec<String>>,
    env: Vec<EnvVar>,
    ports: Vec<PortSpec>,
    restart: RestartPolicy,
    max_restarts: u32,
    memory_mib: Option<u64>,
    cpu_millis: Option<u32>,
    pids_max: Option<u32>,
}

#[derive(Deserialize)]
struct Artifact {
    url: String,
    sha256: String,
}

#[derive(Deserialize)]
struct DiskSpec {
    source: Artifact,
    format: String,
    read_only: bool,
}

#[derive(Deserialize)]
struct VmSpec {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    kernel: Option<Artifact>,
    initrd: Option<Artifact>,
    cmdline: String,
    disks: Vec<DiskSpec>,
    ports: Vec<PortSpec>,
    restart: RestartPolicy,
}

#[derive(Deserialize)]
enum FunctionProtocol {
    Stdio,
    Http,
}

#[derive(Deserialize)]
struct FunctionSpec {
    name: String,
    image: ImageRef,
    command: Option<Vec<String>>,
    hot_instances: u32,
    max_concurrency: u32,
    timeout_ms: u64,
    protocol: FunctionProtocol,
    port: Option<u16>,
}

impl From<Manifest> for crate::Manifest {
    fn from(m: Manifest) -> crate::Manifest {
        let restart = |r: RestartPolicy| match r {
            RestartPolicy::Always => crate::RestartPolicy::Always,
            RestartPolicy::OnFailure => crate::RestartPolicy::OnFailure,
            RestartPolicy::Never => crate::RestartPolicy::Never,
        };
        let image = |i: ImageRef| crate::ImageRef {
            registry: i.registry,
            repository: i.repository,
            digest: i.digest,
            insecure: i.insecure,
        };
        let ports = |ps: Vec<PortSpec>| {
            ps.into_iter()
                .map(|p| crate::PortSpec {
                    host: p.host,
                    container: p.container,
                    protocol: p.protocol,
                })
                .collect()
        };
        let artifact = |a: Artifact| crate::Artifact {
            url: a.url,
            sha256: a.sha256,
        };
        crate::Manifest {
            node: m.node,
            version: m.version,
            issued_at: m.issued_at,
            expires_at: m.expires_at,
            network: crate::NetworkSpec {
                workload_subnet: m.network.workload_subnet,
                dns: m.network.dns,
                interfaces: m
                    .network
                    .interfaces
                    .into_iter()
                    .map(|i| crate::InterfaceSpec {
                        matches: i.matches,
                        mode: i.mode,
                        addresses: i.addresses,
                        gateway: i.gateway,
                        mtu: i.mtu,
                        ..crate::InterfaceSpec::default()
                    })
                    .collect(),
                ..crate::NetworkSpec::default()
            },
            storage: crate::StorageSpec {
                state_disk_serial: m.storage.state_disk_serial,
                wipe: m.storage.wipe,
                ..crate::StorageSpec::default()
            },
            containers: m
                .containers
                .into_iter()
                .map(|c| crate::ContainerSpec {
                    name: c.name,
                    image: image(c.image),
                    command: c.command,
                    env: c
                        .env
                        .into_iter()
                        .map(|e| crate::EnvVar {
                            name: e.name,
                            value: e.value,
                        })
                        .collect(),
                    ports: ports(c.ports),
                    restart: restart(c.restart),
                    max_restarts: c.max_restarts,
                    memory_mib: c.memory_mib,
                    cpu_millis: c.cpu_millis,
                    pids_max: c.pids_max,
                    volumes: Vec::new(),
                    health: None,
                    stop_signal: "TERM".into(),
                    stop_timeout_s: 10,
                })
                .collect(),
            vms: m
                .vms
                .into_iter()
                .map(|v| crate::VmSpec {
                    name: v.name,
                    vcpus: v.vcpus,
                    memory_mib: v.memory_mib,
                    kernel: v.kernel.map(artifact),
                    initrd: v.initrd.map(artifact),
                    cmdline: v.cmdline,
                    disks: v
                        .disks
                        .into_iter()
                        .map(|d| crate::DiskSpec {
                            source: artifact(d.source),
                            format: d.format,
                            read_only: d.read_only,
                        })
                        .collect(),
                    ports: ports(v.ports),
                    restart: restart(v.restart),
                })
                .collect(),
            functions: m
                .functions
                .into_iter()
                .map(|f| crate::FunctionSpec {
                    name: f.name,
                    image: image(f.image),
                    command: f.command,
                    hot_instances: f.hot_instances,
                    max_concurrency: f.max_concurrency,
                    timeout_ms: f.timeout_ms,
                    protocol: match f.protocol {
                        FunctionProtocol::Stdio => crate::FunctionProtocol::Stdio,
                        FunctionProtocol::Http => crate::FunctionProtocol::Http,
                    },
                    port: f.port,
                })
                .collect(),
            power: None,
            os: None,
        }
    }
}
