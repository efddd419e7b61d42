//! DHCPv4: the wire codec, the client state machine and the driver that
//! runs it on an interface and applies its leases with netlink.

pub mod client;
pub mod codec;
pub mod driver;

pub use client::Lease;
