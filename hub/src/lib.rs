//! The cairn hub (control plane) and the library behind `cairnctl`.
//!
//! - [`server`]: the HTTP API (axum on tokio) over [`store`], the data
//!   directory of plain files written atomically;
//! - [`client`]: a blocking client for that API;
//! - [`authoring`]: TOML + command-line overrides → a manifest to sign;
//! - [`fleet`]: the `cairnctl nodes` table;
//! - [`names`], [`timefmt`]: small shared helpers.
//!
//! The hub is not trusted for integrity (nodes verify signatures); its write
//! API is unauthenticated and belongs on loopback or a closed test network
//! until mTLS lands. See docs/hub.md.
#![warn(missing_docs)]

pub mod authoring;
pub mod client;
pub mod fleet;
pub mod ipxe;
pub mod names;
pub mod server;
pub mod store;
pub mod timefmt;

pub use client::{ClientError, HubClient, DEFAULT_HUB};
pub use server::{Hub, HubConfig, ServerError};
pub use store::{NodeRecord, Published, StatusRecord, Store, StoreError};

/// Renders an error chain on one line, skipping causes whose text the
/// outer messages already include (many errors here embed their cause).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}
