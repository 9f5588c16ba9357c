//! Client networks: the CIDR lists behind ALLOWED_CLIENT_NETWORKS and
//! TRUSTED_PROXIES, and the rule that finds the client's address behind proxies.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::api_key::parse_allowed_ip;

/// A list of networks (addresses count as /32 or /128), parsed from a
/// comma-separated setting. An IPv4-mapped IPv6 address matches as its IPv4 form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpNetworks(Vec<IpNet>);

impl IpNetworks {
    /// `"10.0.0.0/8, ::1"`; an empty string is the empty list. The error names
    /// the entry that is neither an address nor a CIDR.
    pub fn parse(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| parse_allowed_ip(e).ok_or_else(|| format!("{e:?} is not an IP or CIDR")))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Development's "office/VPN" default: loopback and the private ranges.
    pub fn private_and_loopback() -> Self {
        Self::parse("127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7")
            .expect("constant networks parse")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// An empty list lets everyone in; otherwise `ip` must fall in one network.
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.is_empty() || self.contains(ip)
    }
}

impl fmt::Display for IpNetworks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(IpNet::to_string).collect();
        f.write_str(&list.join(","))
    }
}

impl<'de> serde::Deserialize<'de> for IpNetworks {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The client's address: the peer itself, unless the peer is a trusted proxy;
/// then X-Forwarded-For is read from the right (each proxy appends the address
/// it saw), skipping trusted proxies, and the first other address is the client.
/// Entries left of it are whatever the client claimed and are never used. An
/// unreadable entry stops the walk at the last proxy that could be trusted.
pub fn client_address(
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted_proxies: &IpNetworks,
) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted_proxies.contains(peer) {
        return peer;
    }
    let mut hop = peer;
    let entries = forwarded_for.into_iter().flat_map(|v| v.rsplit(','));
    for entry in entries {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => {
                hop = ip.to_canonical();
                if !trusted_proxies.contains(hop) {
                    return hop;
                }
            }
            Err(_) => return hop,
        }
    }
    hop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_counts_only_through_trusted_proxies() {
        let trusted = IpNetworks::parse("10.0.0.0/8").unwrap();
        let xff = Some("1.2.3.4, 203.0.113.7, 10.0.0.9");
        // An untrusted peer's claim is ignored.
        assert_eq!(
            client_address(ip("198.51.100.1"), xff, &trusted),
            ip("198.51.100.1")
        );
        // Through two trusted hops, the first untrusted address from the right.
        assert_eq!(
            client_address(ip("10.0.0.2"), xff, &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), None, &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), Some("junk, 10.0.0.3"), &trusted),
            ip("10.0.0.3")
        );
        assert_eq!(
            client_address(ip("::ffff:10.0.0.2"), Some("203.0.113.7"), &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), xff, &IpNetworks::default()),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn networks_parse_and_admit() {
        let dev = IpNetworks::private_and_loopback();
        for yes in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(dev.admits(ip(yes)), "{yes}");
        }
        for no in ["8.8.8.8", "172.32.0.1", "2001:db8::1"] {
            assert!(!dev.admits(ip(no)), "{no}");
        }
        assert!(IpNetworks::parse("").unwrap().admits(ip("8.8.8.8")));
        assert!(IpNetworks::parse("10.0.0.0/8, bogus")
            .unwrap_err()
            .contains("bogus"));
    }
}
