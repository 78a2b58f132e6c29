//! Peer addresses: the one parser `peer add`, Admin/AddPeer and the dialer share.

use crate::error::{Error, Result};

/// A peer address as the dialer uses it: `host:port`, `[IPv6]:port`, or a v3
/// `xxx.onion[:port]` (port defaulting to [`DEFAULT_ONION_PORT`](crate::tor::DEFAULT_ONION_PORT)).
///
/// This is the one check of peer addresses: `peer add`, Admin/AddPeer and
/// every dial parse with it, so an address accepted when it is given is one
/// the dialer can use, and a typo fails at once instead of on every dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAddress {
    /// A host name, an IPv4 literal, an IPv6 literal (without brackets) or a
    /// lower-case v3 onion name.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Reached through Tor.
    pub(crate) onion: bool,
}

impl PeerAddress {
    pub(crate) fn parse(address: &str) -> Result<PeerAddress> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "address {address:?} {why}: a peer address is host:port, [IPv6]:port or a v3 xxx.onion[:port]"
            ))
        };
        if address.is_empty() {
            return Err(bad("is empty"));
        }
        if address.chars().any(char::is_whitespace) {
            return Err(bad("contains whitespace"));
        }
        if address.contains("://") {
            return Err(bad("has a scheme (leave out e.g. http://)"));
        }
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return Err(bad("has a '[' without its ']'"));
            };
            if inside.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("needs an IPv6 address inside its brackets"));
            }
            let Some(port) = after.strip_prefix(':') else {
                return Err(bad("needs :port after the ']'"));
            };
            (inside, Some(port))
        } else if address.contains(['[', ']']) {
            return Err(bad("has unbalanced brackets"));
        } else {
            match address.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (address, None),
            }
        };
        let port = port
            .map(|p| parse_port(p).map_err(|why| bad(&why)))
            .transpose()?;
        if host.to_ascii_lowercase().ends_with(".onion") {
            // Tor's own parser: v3 only, checksum and version checked; its
            // messages say what a v3 address looks like.
            let (host, port) = crate::tor::parse_onion_target(address)
                .map_err(|e| Error::invalid(e.to_string()))?;
            return Ok(PeerAddress {
                host,
                port,
                onion: true,
            });
        }
        let Some(port) = port else {
            return Err(bad("has no port"));
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        // An unbracketed IPv6 literal (`::1:7450`, the port after the last
        // colon) has always dialed; keep it working.
        let ipv6 = host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_ok();
        if !ipv6 && !is_host_name(host) {
            return Err(bad(if host.contains(':') {
                "has a ':' in its host (put an IPv6 address in brackets: [::1]:7450)"
            } else {
                "has a host that is not a valid name (letters, digits, '-', '_' and dots)"
            }));
        }
        Ok(PeerAddress {
            host: host.to_string(),
            port,
            onion: false,
        })
    }
}

/// A port in 1..=65535, digits only (`str::parse` would take "+80").
fn parse_port(p: &str) -> std::result::Result<u16, String> {
    if p.is_empty() {
        return Err("has no port after the ':'".into());
    }
    if !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("has a port {p:?} that is not a number"));
    }
    match p.parse::<u32>() {
        Ok(0) => Err("has port 0, which cannot be dialed".into()),
        Ok(n) if n <= u16::MAX as u32 => Ok(n as u16),
        _ => Err(format!("has a port {p} over 65535")),
    }
}

/// A DNS name or IPv4 literal: dot-separated labels of 1..=63 letters,
/// digits, '-' (not at either end) or '_', at most 253 bytes, one trailing
/// dot allowed.
fn is_host_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::PeerAddress;

    /// A valid v3 address (the Tor Project's).
    const V3: &str = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";

    fn ok(a: &str) -> PeerAddress {
        PeerAddress::parse(a).unwrap_or_else(|e| panic!("{a:?} refused: {e}"))
    }

    /// Refused as invalid input, with a message that names the address.
    fn refused(a: &str) -> String {
        let e = PeerAddress::parse(a).expect_err(a);
        assert_eq!(e.exit_code(), 2, "{a:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{a:?}")),
            "{a:?}: message lacks the address: {msg}"
        );
        msg
    }

    #[test]
    fn accepts_what_the_dialer_can_use() {
        let tcp = |host: &str, port| PeerAddress {
            host: host.into(),
            port,
            onion: false,
        };
        assert_eq!(ok("127.0.0.1:7450"), tcp("127.0.0.1", 7450));
        assert_eq!(ok("[::1]:7450"), tcp("::1", 7450));
        assert_eq!(ok("host.example:7450"), tcp("host.example", 7450));
        assert_eq!(ok("h:1"), tcp("h", 1));
        assert_eq!(ok("h:65535"), tcp("h", 65535));
        assert_eq!(
            ok("::1:7450"),
            tcp("::1", 7450),
            "unbracketed IPv6 always dialed"
        );
        let onion = |port| PeerAddress {
            host: V3.into(),
            port,
            onion: true,
        };
        assert_eq!(ok(V3), onion(crate::config::DEFAULT_PORT));
        assert_eq!(ok(&format!("{V3}:7450")), onion(7450));
        assert_eq!(ok(&format!("{V3}:443")), onion(443));
        assert_eq!(
            ok(&V3.to_uppercase()),
            onion(7450),
            "onion names are case-blind"
        );
    }

    #[test]
    fn refuses_empty() {
        assert!(refused("").contains("empty"));
    }

    #[test]
    fn refuses_a_missing_port() {
        assert!(refused("host.example").contains("no port"));
        assert!(refused("host.example:").contains("no port"));
        assert!(refused("[::1]").contains(":port"));
        assert!(refused("[::1]:").contains("no port"));
    }

    #[test]
    fn refuses_port_0() {
        assert!(refused("host.example:0").contains("port 0"));
        refused(&format!("{V3}:0"));
    }

    #[test]
    fn refuses_a_port_over_65535() {
        assert!(refused("host.example:65536").contains("over 65535"));
        refused("host.example:99999999999");
        refused(&format!("{V3}:99999"));
    }

    #[test]
    fn refuses_a_port_that_is_not_a_number() {
        for a in ["h:http", "h:+80", "h:-1", "h:8o", "h:1:2x"] {
            assert!(refused(a).contains("not a number"), "{a}");
        }
    }

    #[test]
    fn refuses_empty_brackets() {
        assert!(refused("[]:80").contains("IPv6"));
    }

    #[test]
    fn refuses_unbalanced_brackets() {
        for a in ["[::1:80", "::1]:80", "[::1]]:80", "h[:80", "[[::1]:80"] {
            refused(a);
        }
        // Brackets hold IPv6 only, and the port goes after them.
        refused("[host.example]:80");
        refused(&format!("[{V3}]:80"));
        refused("[::1]x:80");
    }

    #[test]
    fn refuses_an_onion_address_that_is_not_v3() {
        for a in [
            "short.onion".to_string(),
            "short.onion:7450".to_string(),
            "notanonion.onion:7450".to_string(),
            "expyuzz4wqqyqhjn.onion".to_string(), // v2
            V3.replacen("2gzy", "2gzz", 1),       // checksum no longer matches
            V3.replace('2', "1"),                 // '1' is not base32
            format!("www.{V3}"),
            ".onion:80".to_string(),
        ] {
            let e = PeerAddress::parse(&a).expect_err(&a);
            assert_eq!(e.exit_code(), 2, "{a}: {e}");
            assert!(e.to_string().contains("onion"), "{a}: {e}");
        }
    }

    #[test]
    fn refuses_whitespace() {
        for a in [" h:1", "h:1 ", "h :1", "h: 1", "h\t:1", "h:1\n"] {
            assert!(refused(a).contains("whitespace"), "{a:?}");
        }
        refused(&format!("{V3} "));
    }

    #[test]
    fn refuses_a_scheme() {
        for a in [
            "http://x:1",
            "https://host.example:443",
            "grpc://[::1]:7450",
        ] {
            assert!(refused(a).contains("scheme"), "{a}");
        }
    }

    #[test]
    fn refuses_a_host_with_invalid_characters() {
        for a in [
            "h@st:1",
            "ho/st:1",
            "host,example:1",
            "host..example:1",
            ".host:1",
            "-host:1",
            "host-:1",
            "hôst:1",
            ":80",
            "fe80::1::2:80",
        ] {
            refused(a);
        }
        assert!(refused("fe80:x:80").contains("brackets"));
        refused(&format!("{}:1", "a".repeat(64)));
    }
}
