//! The one reading of an IP allowlist or trusted-proxy entry, used by the config
//! file, the keys file, the sync feed, the admin API and the CLI alike.

use ipnet::IpNet;

/// A CIDR, or a bare address meaning exactly that host (/32 or /128).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_are_single_host_networks() {
        assert_eq!(parse_cidr("192.0.2.7"), "192.0.2.7/32".parse().ok());
        assert_eq!(parse_cidr("::1"), "::1/128".parse().ok());
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("banana"), None);
    }
}
