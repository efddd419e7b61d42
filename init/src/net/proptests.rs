//! Property tests of everything that parses bytes from the network: DHCP
//! replies (options with bogus lengths, truncation anywhere, option 121),
//! DNS queries (hostile names, pointers, flags) and what a DHCP server's
//! domain can put into /etc/resolv.conf. cargo-fuzz needs a nightly
//! toolchain this project does not pin; these run in every `make test`.

use super::dhcp::codec::{decode_reply, parse_classless_routes};
use super::dns::{decide, parse_query, Reply};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// A syntactically plausible BOOTREPLY head (op 2, magic cookie) followed
/// by `options`: the fuzzer's bytes land in the option parser.
fn reply_with(options: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 2;
    p[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    p[16..20].copy_from_slice(&[10, 0, 0, 5]);
    p.extend_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(options);
    p
}

/// Options as (code, claimed length, data) where the claimed length may lie.
fn options() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        (
            any::<u8>(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..40),
        ),
        0..12,
    )
    .prop_map(|opts| {
        let mut out = Vec::new();
        for (code, len, data) in opts {
            out.push(code);
            if code != 0 && code != 255 {
                out.push(len);
                out.extend_from_slice(&data);
            }
        }
        out
    })
}

fn query(id: u16, flags: u16, labels: &[Vec<u8>], tail: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for l in labels {
        p.push(l.len().min(255) as u8);
        p.extend_from_slice(l);
    }
    p.push(0);
    p.extend_from_slice(tail);
    p
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn dhcp_decoder_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
        let _ = decode_reply(&bytes);
    }

    #[test]
    fn dhcp_options_with_lying_lengths_are_refused_or_bounded(opts in options(), cut in 0usize..800) {
        let p = reply_with(&opts);
        for bytes in [&p[..], &p[..cut.min(p.len())]] {
            if let Ok(r) = decode_reply(bytes) {
                // Nothing decoded can be bigger than the packet carried.
                prop_assert!(r.dns.len() * 4 <= bytes.len());
                prop_assert!(r.ntp.len() * 4 <= bytes.len());
                prop_assert!(r.routes.len() * 5 <= bytes.len());
                prop_assert!(r.routes.iter().all(|(_, len, _)| *len <= 32));
                prop_assert!(r.domain.as_ref().is_none_or(|d| d.len() < 256));
            }
        }
    }

    #[test]
    fn classless_routes_never_exceed_32_bits(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        if let Some(routes) = parse_classless_routes(&bytes) {
            for (dst, len, _) in routes {
                prop_assert!(len <= 32);
                // The destination has no bits beyond its prefix.
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                prop_assert_eq!(u32::from(dst) & !mask, 0);
            }
        }
    }

    #[test]
    fn dns_never_panics_and_never_answers_a_response(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut table = BTreeMap::new();
        table.insert("web".to_string(), Ipv4Addr::new(10, 88, 0, 2));
        match decide(&bytes, &table) {
            Reply::Answer(a) => {
                prop_assert!(bytes.len() >= 12);
                prop_assert_eq!(&a[..2], &bytes[..2], "answer keeps the query id");
                prop_assert!(a[2] & 0x80 != 0, "answers are responses");
                prop_assert!(bytes[2] & 0x80 == 0, "a response was answered");
                prop_assert!(a.len() <= bytes.len() + 16 + 12);
            }
            Reply::Forward => prop_assert!(parse_query(&bytes).is_ok()),
            Reply::Drop => {}
        }
    }

    #[test]
    fn hostile_names_parse_to_clean_lowercase_or_are_refused(
        labels in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..70), 0..8),
        flags in any::<u16>(),
        tail in prop::collection::vec(any::<u8>(), 0..6),
    ) {
        let p = query(7, flags & 0x7fff & !0x7800, &labels, &tail);
        if let Ok(q) = parse_query(&p) {
            prop_assert!(q.name.len() <= 255);
            prop_assert!(q.name.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
            prop_assert!(!q.name.contains(".."));
            prop_assert!(q.end <= p.len());
        }
    }

    #[test]
    fn a_dhcp_domain_cannot_inject_resolv_conf_lines(domain in ".{0,300}") {
        let text = super::resolv_conf_text(&[Ipv4Addr::new(10, 0, 0, 1)], Some(&domain));
        for line in text.lines() {
            prop_assert!(
                line.starts_with("nameserver ") || line.starts_with("search ") || line.starts_with("options ") || line.starts_with('#') || line.is_empty(),
                "unexpected line {:?}", line
            );
        }
        prop_assert_eq!(text.lines().filter(|l| l.starts_with("nameserver")).count(), 1);
        prop_assert!(text.lines().filter(|l| l.starts_with("options")).count() <= 1);
    }
}
