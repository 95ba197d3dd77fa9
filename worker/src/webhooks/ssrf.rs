//! Which addresses a webhook may reach. Endpoint URLs come from configuration, but a name can
//! resolve anywhere: the resolver the delivery client uses keeps only public addresses, so the
//! check is made on exactly the addresses that are then connected to (no second lookup to
//! rebind between check and use).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A host that resolves only to addresses webhooks may not call.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to loopback, private or other non-public addresses")]
pub(crate) struct PrivateAddress(pub String);

/// Resolves with the system resolver, dropping non-public addresses unless `allow_private`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardedResolver {
    pub(crate) allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() && !found.is_empty() {
                return Err(Box::new(PrivateAddress(host)) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local, shared (CGNAT),
/// unspecified, multicast, broadcast, documentation or reserved, nor an IPv6 form of one.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible (::/96, deprecated; also holds :: and ::1): never a public
            // destination, whatever IPv4 address it embeds.
            if s[..6] == [0, 0, 0, 0, 0, 0] {
                return false;
            }
            // SIIT IPv4-translated (::ffff:0:0/96) and NAT64 (64:ff9b::/96) reach the IPv4
            // address in their last 32 bits.
            if s[..6] == [0, 0, 0, 0, 0xffff, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public_v4(embedded_v4(s[6], s[7]));
            }
            // 6to4 (2002::/16) reaches the IPv4 address in bits 16 to 48.
            if s[0] == 0x2002 {
                return is_public_v4(embedded_v4(s[1], s[2]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] == 0) // Teredo: tunnels to any IPv4 address
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // NAT64 local use (64:ff9b:1::/48)
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1))
        }
    }
}

/// The IPv4 address held in two 16-bit segments of an IPv6 address.
fn embedded_v4(high: u16, low: u16) -> Ipv4Addr {
    let [a, b] = high.to_be_bytes();
    let [c, d] = low.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_internal_addresses_and_their_ipv6_forms() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn ipv6_forms_are_judged_by_their_embedded_ipv4_or_refused() {
        let cases: &[(&str, bool)] = &[
            // IPv4-compatible (::/96, deprecated): the whole range is refused.
            ("::127.0.0.1", false),
            ("::10.0.0.1", false),
            ("::169.254.169.254", false),
            ("::8.8.8.8", false),
            // SIIT IPv4-translated (::ffff:0:0/96): the embedded IPv4 is judged.
            ("::ffff:0:127.0.0.1", false),
            ("::ffff:0:10.0.0.1", false),
            ("::ffff:0:169.254.169.254", false),
            ("::ffff:0:8.8.8.8", true),
            // NAT64 well-known prefix: the embedded IPv4 is judged; local-use prefix refused.
            ("64:ff9b::127.0.0.1", false),
            ("64:ff9b::8.8.8.8", true),
            ("64:ff9b:1::808:808", false),
            ("64:ff9b:1:ffff::1", false),
            // 6to4 (2002::/16): the IPv4 in bits 16-48 is judged.
            ("2002:7f00:1::1", false),
            ("2002:a00:1::", false),
            ("2002:a9fe:a9fe::1", false),
            ("2002:c0a8:101::1", false),
            ("2002:808:808::1", true),
            // Teredo (2001::/32): refused.
            ("2001::1", false),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false),
            // Site-local (fec0::/10, deprecated): refused.
            ("fec0::1", false),
            ("feff:ffff::1", false),
            // Neighbours of the refused ranges stay public.
            ("2001:4860:4860::8888", true),
            ("2003::1", true),
            ("64:ff9b:2::1", true),
        ];
        for &(ip, public) in cases {
            assert_eq!(
                is_public(ip.parse().unwrap()),
                public,
                "{ip} must be {}",
                if public { "allowed" } else { "refused" }
            );
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_unless_allowed() {
        let name: Name = "localhost".parse().unwrap();
        let refused = GuardedResolver {
            allow_private: false,
        }
        .resolve(name)
        .await;
        let err = refused.err().expect("localhost is refused");
        assert!(err.downcast_ref::<PrivateAddress>().is_some(), "{err}");
        let name: Name = "localhost".parse().unwrap();
        let allowed = GuardedResolver {
            allow_private: true,
        }
        .resolve(name)
        .await
        .expect("allowed");
        assert!(allowed.into_iter().all(|a| a.ip().is_loopback()));
    }
}
