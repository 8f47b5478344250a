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
    use proptest::prelude::*;

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

    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
            // A small pool, so that chains and trusted networks often meet.
            (0u8..4, 0u8..4).prop_map(|(a, b)| IpAddr::from([10, 0, a, b])),
            (0u8..4).prop_map(|b| IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, u16::from(b)])),
        ]
    }

    fn net() -> impl Strategy<Value = IpNet> {
        (addr(), any::<u8>()).prop_map(|(ip, len)| {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            IpNet::new(ip, len % (max + 1)).unwrap().trunc()
        })
    }

    /// One X-Forwarded-For entry as proxies and clients write them, or garbage.
    fn entry() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            addr().prop_map(|ip| ip.to_string().into_bytes()),
            (addr(), any::<u16>()).prop_map(|(ip, port)| std::net::SocketAddr::new(ip, port).to_string().into_bytes()),
            addr().prop_map(|ip| format!("  {ip}\t").into_bytes()),
            "[ -~]{0,12}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..12),
        ]
    }

    fn header() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(entry(), 0..5).prop_map(|entries| entries.join(&b","[..])),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn client_is_the_peer_or_a_hop_behind_trusted_proxies_only(
            peer in addr(),
            trust_peer in any::<bool>(),
            mut trusted in proptest::collection::vec(net(), 0..3),
            headers in proptest::collection::vec(header(), 0..4),
        ) {
            if trust_peer {
                trusted.push(IpNet::from(peer.to_canonical()));
            }
            let client = resolve_client_ip(peer, headers.iter().map(Vec::as_slice), &trusted);
            let peer = peer.to_canonical();
            if !is_trusted(peer, &trusted) {
                // An untrusted peer's chain is never believed.
                prop_assert_eq!(client, peer);
                return Ok(());
            }
            if client == peer {
                return Ok(());
            }
            // Otherwise the client is an entry with only trusted hops to its right.
            let hops: Vec<Option<IpAddr>> =
                headers.iter().flat_map(|h| h.split(|&b| b == b',')).map(parse_hop).collect();
            let behind_trusted = |j: usize| hops[j + 1..].iter().all(|h| h.is_some_and(|ip| is_trusted(ip, &trusted)));
            prop_assert!(
                (0..hops.len()).any(|j| hops[j] == Some(client) && behind_trusted(j)),
                "{client} is not a hop behind trusted proxies in {hops:?}"
            );
        }
    }
}
