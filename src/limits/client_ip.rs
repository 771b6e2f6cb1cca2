//! The client's address: the TCP peer, or behind a trusted proxy the address it forwarded.

use std::net::IpAddr;

use ipnet::IpNet;

/// The address budgets are counted against. When the peer is one of `trusted` proxies, the client
/// is the last address in `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends
/// the address it saw, so entries left of it could have been written by the client). Otherwise,
/// and when the header is missing or unreadable, the peer is the client.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl FnOnce() -> Option<&'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for() else {
        return peer;
    };
    let mut client = peer;
    for entry in header.rsplit(',') {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else {
            return client;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn believes_forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let from = |peer, header| client_ip(ip(peer), || header, &trusted);
        assert_eq!(from("203.0.113.9", Some("1.2.3.4")), ip("203.0.113.9"));
        assert_eq!(from("10.1.1.1", Some("1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(
            from("10.1.1.1", Some("6.6.6.6, 1.2.3.4, 10.2.2.2")),
            ip("1.2.3.4"),
            "the client may have written 6.6.6.6 itself"
        );
        assert_eq!(from("10.1.1.1", None), ip("10.1.1.1"));
        assert_eq!(from("10.1.1.1", Some("junk, 1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(from("10.1.1.1", Some("1.2.3.4, junk")), ip("10.1.1.1"));
        assert_eq!(
            client_ip(ip("10.1.1.1"), || Some("1.2.3.4"), &[]),
            ip("10.1.1.1")
        );
    }
}
