//! The PROXY protocol, versions 1 (text) and 2 (binary), as cloud L4 load balancers send it
//! (`server.proxy_protocol = true`): the header is read before anything else on the
//! connection (before TLS), only from peers in `trusted_proxies`, and the client address it
//! carries replaces the TCP peer for `ip_hash`, `X-Forwarded-For` and logs.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Largest v2 address block accepted (TLVs included).
const V2_MAX_LEN: usize = 512;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection from this client address.
    Proxied(SocketAddr),
    /// `LOCAL` (v2) or `UNKNOWN` (v1): the load balancer's own connection, such as a
    /// health check; the TCP peer stands.
    Local,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("PROXY protocol: {msg}"))
}

/// Reads one header (v1 or v2) and nothing more from `io`.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<Header> {
    let mut start = [0u8; 16];
    io.read_exact(&mut start[..8]).await?;
    if start[..6] == *b"PROXY " {
        let mut line = start[..8].to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(bad("v1 line longer than 107 bytes"));
            }
            line.push(io.read_u8().await?);
        }
        return parse_v1(&line);
    }
    if start[..8] != V2_SIGNATURE[..8] {
        return Err(bad("no PROXY header"));
    }
    io.read_exact(&mut start[8..]).await?;
    if start[..12] != V2_SIGNATURE {
        return Err(bad("bad v2 signature"));
    }
    let len = usize::from(u16::from_be_bytes([start[14], start[15]]));
    if len > V2_MAX_LEN {
        return Err(bad("v2 address block too long"));
    }
    let mut rest = vec![0u8; len];
    io.read_exact(&mut rest).await?;
    parse_v2(start[12], start[13], &rest)
}

/// `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n`.
pub fn parse_v1(line: &[u8]) -> io::Result<Header> {
    let text = std::str::from_utf8(line).map_err(|_| bad("v1 line is not text"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or_else(|| bad("v1 line without CRLF"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(bad("v1 line does not start with PROXY"));
    }
    let proto = parts.next().ok_or_else(|| bad("v1 protocol missing"))?;
    if proto == "UNKNOWN" {
        return Ok(Header::Local);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields.as_slice() else {
        return Err(bad("v1 line needs 4 fields after the protocol"));
    };
    let ip: IpAddr = src.parse().map_err(|_| bad("v1 source address"))?;
    let port: u16 = sport.parse().map_err(|_| bad("v1 source port"))?;
    match (proto, ip) {
        ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => {
            Ok(Header::Proxied(SocketAddr::new(ip, port)))
        }
        _ => Err(bad("v1 protocol does not match the address family")),
    }
}

/// The part after the 12-byte signature: version/command, family/transport, addresses.
pub fn parse_v2(ver_cmd: u8, fam: u8, rest: &[u8]) -> io::Result<Header> {
    if ver_cmd >> 4 != 2 {
        return Err(bad("unsupported v2 version"));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(Header::Local),
        1 => {}
        _ => return Err(bad("unknown v2 command")),
    }
    match fam {
        // TCP over IPv4: src(4) dst(4) sport(2) dport(2).
        0x11 if rest.len() >= 12 => {
            let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
            let port = u16::from_be_bytes([rest[8], rest[9]]);
            Ok(Header::Proxied(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        // TCP over IPv6: src(16) dst(16) sport(2) dport(2).
        0x21 if rest.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&rest[..16]);
            let port = u16::from_be_bytes([rest[32], rest[33]]);
            Ok(Header::Proxied(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                port,
            )))
        }
        // UNSPEC, UDP or UNIX: nothing usable, keep the peer.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => Ok(Header::Local),
        _ => Err(bad("v2 address block too short or unknown family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n").unwrap(),
            Header::Proxied(sa("192.0.2.1:56324"))
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n").unwrap(),
            Header::Proxied(sa("[2001:db8::1]:4000"))
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap(), Header::Local);
        assert!(parse_v1(b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n").is_err());
    }

    #[test]
    fn v2_blocks() {
        let v4 = [192, 0, 2, 1, 198, 51, 100, 1, 0xdc, 0x04, 0x01, 0xbb];
        assert_eq!(
            parse_v2(0x21, 0x11, &v4).unwrap(),
            Header::Proxied(sa("192.0.2.1:56324"))
        );
        assert_eq!(parse_v2(0x20, 0x00, &[]).unwrap(), Header::Local);
        assert!(parse_v2(0x31, 0x11, &v4).is_err());
        assert!(parse_v2(0x21, 0x11, &v4[..6]).is_err());
    }

    #[tokio::test]
    async fn reads_exactly_the_header() {
        let mut data: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n";
        let h = read_header(&mut data).await.unwrap();
        assert_eq!(h, Header::Proxied(sa("192.0.2.1:56324")));
        assert_eq!(data, b"GET / HTTP/1.1\r\n");

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 10, 0, 0, 7, 10, 0, 0, 1, 0x30, 0x39, 0, 80,
        ]);
        v2.extend_from_slice(b"rest");
        let mut data: &[u8] = &v2;
        let h = read_header(&mut data).await.unwrap();
        assert_eq!(h, Header::Proxied(sa("10.0.0.7:12345")));
        assert_eq!(data, b"rest");

        let mut data: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(read_header(&mut data).await.is_err());
    }
}
