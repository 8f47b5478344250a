//! Which address a request really comes from.

use std::net::IpAddr;

use ipnet::IpNet;

/// The client address: the peer itself, unless the peer is a trusted proxy, in which
/// case `X-Forwarded-For` is walked from the right past every trusted hop and the
/// first untrusted address wins. Entries a client added before the first trusted hop
/// are never believed, so an untrusted client cannot choose its address.
pub fn resolve_client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted_proxies: &[IpNet],
) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted_proxies) {
        return peer;
    }
    let mut client = peer;
    // Several X-Forwarded-For headers form one list in order; walk all of them backwards.
    for header in forwarded_for.rev() {
        for entry in header.rsplit(|&b| b == b',') {
            let Some(hop) = parse_hop(entry) else {
                // Garbage in the chain: stop at the last address we could trust.
                return client;
            };
            client = hop;
            if !is_trusted(hop, trusted_proxies) {
                return hop;
            }
        }
    }
    client
}

fn is_trusted(ip: IpAddr, trusted_proxies: &[IpNet]) -> bool {
    trusted_proxies.iter().any(|net| net.contains(&ip))
}

fn parse_hop(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    // Some proxies write "ip:port" or "[v6]:port".
    text.parse::<std::net::SocketAddr>().ok().map(|sa| sa.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn resolve(peer: &str, xff: &[&str], trusted: &[&str]) -> String {
        let headers: Vec<&[u8]> = xff.iter().map(|h| h.as_bytes()).collect();
        resolve_client_ip(peer.parse().unwrap(), headers.into_iter(), &nets(trusted)).to_string()
    }

    #[test]
    fn untrusted_peer_cannot_spoof_with_forwarded_for() {
        assert_eq!(resolve("203.0.113.5", &["10.9.9.9"], &["10.0.0.0/8"]), "203.0.113.5");
        assert_eq!(resolve("203.0.113.5", &["10.9.9.9"], &[]), "203.0.113.5");
    }

    #[test]
    fn trusted_peer_forwards_the_client() {
        assert_eq!(resolve("10.0.0.2", &["198.51.100.7"], &["10.0.0.0/8"]), "198.51.100.7");
    }

    #[test]
    fn chain_is_walked_right_to_left_past_trusted_hops() {
        // The client wrote a fake first entry; the trusted proxies appended the real hops.
        assert_eq!(resolve("10.0.0.2", &["1.1.1.1, 198.51.100.7, 10.0.0.9"], &["10.0.0.0/8"]), "198.51.100.7");
    }

    #[test]
    fn several_headers_form_one_list() {
        assert_eq!(resolve("10.0.0.2", &["1.1.1.1, 198.51.100.7", "10.0.0.9"], &["10.0.0.0/8"]), "198.51.100.7");
    }

    #[test]
    fn all_trusted_chain_yields_the_leftmost() {
        assert_eq!(resolve("10.0.0.2", &["10.0.0.3, 10.0.0.4"], &["10.0.0.0/8"]), "10.0.0.3");
    }

    #[test]
    fn trusted_peer_without_header_is_the_client() {
        assert_eq!(resolve("10.0.0.2", &[], &["10.0.0.0/8"]), "10.0.0.2");
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        assert_eq!(resolve("10.0.0.2", &["198.51.100.7, nonsense"], &["10.0.0.0/8"]), "10.0.0.2");
    }

    #[test]
    fn ports_and_ipv6_entries_are_understood() {
        assert_eq!(resolve("10.0.0.2", &["198.51.100.7:5555"], &["10.0.0.0/8"]), "198.51.100.7");
        assert_eq!(resolve("::1", &["2001:db8::7"], &["::1/128"]), "2001:db8::7");
        assert_eq!(resolve("10.0.0.2", &["[2001:db8::7]:443"], &["10.0.0.0/8"]), "2001:db8::7");
    }

    #[test]
    fn ipv4_mapped_peers_are_treated_as_ipv4() {
        assert_eq!(resolve("::ffff:10.0.0.2", &["198.51.100.7"], &["10.0.0.0/8"]), "198.51.100.7");
        assert_eq!(resolve("::ffff:203.0.113.5", &[], &[]), "203.0.113.5");
    }
}
