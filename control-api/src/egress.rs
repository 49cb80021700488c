//! Where the API may send requests of its own (webhook deliveries): only to public
//! addresses unless `events.webhook_allow_private` says otherwise. Without this, anyone who
//! may create a webhook could make the API POST into its own network (the database, the
//! storage admin port, a cloud metadata service) and read the status codes in `last_error`.
//!
//! Host names are checked where they are resolved ([`PublicResolver`], used by the HTTP
//! client for every connection, so a name that later resolves to a private address is still
//! refused); IP literals, which are never resolved, are checked by [`check_url`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// IPv4 networks that are not reachable on the public internet (RFC 6890 and friends).
const V4_NOT_PUBLIC: &[(u32, u32)] = &[
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network"
    (0x0a00_0000, 8),  // 10.0.0.0/8 private
    (0x6440_0000, 10), // 100.64.0.0/10 carrier-grade NAT
    (0x7f00_0000, 8),  // 127.0.0.0/8 loopback
    (0xa9fe_0000, 16), // 169.254.0.0/16 link-local (cloud metadata services)
    (0xac10_0000, 12), // 172.16.0.0/12 private
    (0xc000_0000, 24), // 192.0.0.0/24 protocol assignments
    (0xc000_0200, 24), // 192.0.2.0/24 documentation
    (0xc058_6300, 24), // 192.88.99.0/24 6to4 relay anycast
    (0xc0a8_0000, 16), // 192.168.0.0/16 private
    (0xc612_0000, 15), // 198.18.0.0/15 benchmarking
    (0xc633_6400, 24), // 198.51.100.0/24 documentation
    (0xcb00_7100, 24), // 203.0.113.0/24 documentation
    (0xe000_0000, 4),  // 224.0.0.0/4 multicast
    (0xf000_0000, 4),  // 240.0.0.0/4 reserved, broadcast
];

/// IPv6 networks that are not public, other than those that embed an IPv4 address.
const V6_NOT_PUBLIC: &[(u128, u32)] = &[
    (0, 96),                      // ::/96 unspecified, loopback, IPv4-compatible
    (0x0064_ff9b_0001 << 80, 48), // 64:ff9b:1::/48 local-use NAT64
    (0x0100 << 112, 64),          // 100::/64 discard
    (0x2001_0db8 << 96, 32),      // 2001:db8::/32 documentation
    (0xfc00 << 112, 7),           // fc00::/7 unique local
    (0xfe80 << 112, 10),          // fe80::/10 link-local
    (0xfec0 << 112, 10),          // fec0::/10 site-local (deprecated)
    (0xff00 << 112, 8),           // ff00::/8 multicast
];

fn in_net<T>(addr: T, net: T, prefix: u32) -> bool
where
    T: Copy + std::ops::Shr<u32, Output = T> + PartialEq,
{
    let bits = std::mem::size_of::<T>() as u32 * 8;
    prefix == 0 || addr >> (bits - prefix) == net >> (bits - prefix)
}

fn v4_public(ip: Ipv4Addr) -> bool {
    let a = u32::from(ip);
    !V4_NOT_PUBLIC.iter().any(|&(net, p)| in_net(a, net, p))
}

/// True when `ip` is reachable on the public internet; addresses that embed an IPv4
/// address (mapped, NAT64, 6to4) are judged by that address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_public(v4),
        IpAddr::V6(v6) => {
            let a = u128::from(v6);
            let embedded = |shift: u32| Ipv4Addr::from((a >> shift) as u32);
            if in_net(a, 0xffff << 32, 96) || in_net(a, 0x0064_ff9b << 96, 96) {
                // ::ffff:a.b.c.d (mapped) and 64:ff9b::a.b.c.d (NAT64).
                return v4_public(embedded(0));
            }
            if in_net(a, 0x2002 << 112, 16) {
                // 2002:AABB:CCDD::/48 (6to4).
                return v4_public(embedded(80));
            }
            !V6_NOT_PUBLIC.iter().any(|&(net, p)| in_net(a, net, p))
        }
    }
}

/// Refuses a URL whose host is an IP literal that is not public (host names are left to
/// [`PublicResolver`]); with `allow_private`, everything passes.
pub fn check_url(url: &reqwest::Url, allow_private: bool) -> Result<(), String> {
    let host = url.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    if allow_private || is_public(ip) {
        Ok(())
    } else {
        Err(format!(
            "{ip} is not a public address (set events.webhook_allow_private to allow it)"
        ))
    }
}

/// Resolves host names with the system resolver and drops every address that is not
/// public; a name left with none fails to resolve, so no connection is made.
#[derive(Debug, Clone, Copy)]
pub struct PublicResolver;

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(resolve_public(name.as_str().to_string()))
    }
}

async fn resolve_public(host: String) -> Result<Addrs, Box<dyn std::error::Error + Send + Sync>> {
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
    let public: Vec<SocketAddr> = found
        .iter()
        .copied()
        .filter(|a| is_public(a.ip()))
        .collect();
    if public.is_empty() && !found.is_empty() {
        return Err(format!(
            "{host} resolves only to addresses that are not public \
             (set events.webhook_allow_private to allow them)"
        )
        .into());
    }
    Ok(Box::new(public.into_iter()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> bool {
        is_public(s.parse().expect("ip"))
    }

    #[test]
    fn private_loopback_link_local_and_reserved_are_not_public() {
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.2.10",
            "192.168.1.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001:db8::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(!public(ip), "{ip} must not be public");
        }
    }

    #[test]
    fn internet_addresses_are_public() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2606:4700:4700::1111",
        ] {
            assert!(public(ip), "{ip} must be public");
        }
    }

    #[test]
    fn urls_with_private_literals_are_refused_unless_allowed() {
        let url = |s: &str| reqwest::Url::parse(s).expect("url");
        assert!(check_url(&url("http://127.0.0.1:9/hook"), false).is_err());
        assert!(check_url(&url("http://[::1]/hook"), false).is_err());
        assert!(check_url(&url("http://127.0.0.1:9/hook"), true).is_ok());
        assert!(check_url(&url("https://8.8.8.8/hook"), false).is_ok());
        // Names are checked when they are resolved.
        assert!(check_url(&url("https://localhost/hook"), false).is_ok());
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused() {
        let err = PublicResolver
            .resolve("localhost".parse().expect("name"))
            .await
            .err()
            .expect("localhost must be refused");
        assert!(err.to_string().contains("not public"), "{err}");
    }
}
