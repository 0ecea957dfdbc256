//! The value types of the configuration file that parse themselves: durations and sizes
//! with units, listen addresses, CIDRs, status ranges, the small enums for `balance` and
//! `[log] access`, and `split_host_port` for server addresses. Each turns a bad value into
//! the message the user sees; the raw sections are built from them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// `[log] access = "..."`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessFormat {
    /// No access log.
    #[default]
    Off,
    /// A common-log-style text line with the upstream server, duration and tries appended.
    Common,
    /// One JSON object per line.
    Json,
}

/// `balance = "..."`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceKind {
    /// Smooth weighted round robin (Nginx's algorithm).
    #[default]
    RoundRobin,
    /// Consistent hashing of the client IP.
    IpHash,
    /// Weighted power of two choices on in-flight requests.
    LeastRequest,
}

impl BalanceKind {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            BalanceKind::RoundRobin => "round_robin",
            BalanceKind::IpHash => "ip_hash",
            BalanceKind::LeastRequest => "least_request",
        }
    }
}

/// A duration written with a unit: `"250ms"`, `"2s"`, `"1m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string with a unit, such as \"250ms\", \"2s\" or \"1m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                parse_duration(s).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{n}s\" or \"{n}ms\", not {n}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"250ms"`, `"2s"`, `"1m"`, `"1h 30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid duration {s:?}: a unit is required, such as \"{t}s\" or \"{t}ms\""
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!(
            "invalid duration {s:?} ({e}); write a number and a unit: \"250ms\", \"2s\", \"1m\""
        )
    })
}

/// A size in bytes: an integer, or a string with a unit (`"64KiB"`, `"100MiB"`, `"1GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a size: bytes as an integer, or a string such as \"64KiB\" or \"100MiB\"",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                parse_size(s).map(ByteSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({n})")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"512"`, `"64KiB"`, `"100MiB"`, `"1GiB"`, and Nginx's `"64k"`/`"10m"`/`"1g"`
/// (binary multiples, as Nginx reads them). `"KB"`/`"MB"` are refused as ambiguous.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit {
        "" | "B" | "b" => 1,
        "KiB" | "k" | "K" => 1 << 10,
        "MiB" | "m" | "M" => 1 << 20,
        "GiB" | "g" | "G" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" | "MB" | "GB" | "TB" | "kb" | "mb" | "gb" => {
            return Err(format!(
                "ambiguous size unit in {s:?}: write KiB, MiB or GiB (multiples of 1024)"
            ));
        }
        _ => {
            return Err(format!(
                "invalid size {s:?}: write bytes or a number with KiB, MiB or GiB, such as \"64KiB\""
            ));
        }
    };
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: a number is missing"));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: {num:?} is not a number"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("size {s:?} is too large"));
    }
    Ok(bytes as u64)
}

/// A socket address `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_listen(&s).map(Addr).map_err(de::Error::custom)
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Some(port) = t.strip_prefix(':') {
        // Nginx's `listen :8080`-style shorthand for every IPv4 address.
        if let Ok(p) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([0, 0, 0, 0], p)));
        }
    }
    if t.starts_with("localhost:")
        && let Ok(p) = t["localhost:".len()..].parse::<u16>()
    {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    t.parse::<SocketAddr>().map_err(|_| {
        format!(
            "invalid listen address {s:?}: write IP:PORT, such as \"0.0.0.0:8080\" or \"[::]:8080\""
        )
    })
}

/// `listen`: one address or an array of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen(pub Vec<SocketAddr>);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Listen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address string such as \"0.0.0.0:8080\", or an array of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Listen, E> {
                parse_listen(s).map(|a| Listen(vec![a])).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
                let mut out = Vec::new();
                while let Some(Addr(a)) = seq.next_element::<Addr>()? {
                    out.push(a);
                }
                Ok(Listen(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A CIDR (`"10.0.0.0/8"`) or a single address (`"10.0.0.1"`, taken as /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_cidr(&s).map(Cidr).map_err(de::Error::custom)
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    let net = match (t.parse::<IpNet>(), t.parse::<IpAddr>()) {
        (Ok(net), _) => net,
        (_, Ok(ip)) => IpNet::from(ip),
        _ => {
            return Err(format!(
                "invalid CIDR {s:?}: write an address or a network, such as \"10.0.0.0/8\" or \"192.168.1.10\""
            ));
        }
    };
    unmap_v4(net)
        .map(|n| n.trunc())
        .ok_or_else(|| {
            format!(
                "{s:?} is an IPv4-mapped IPv6 network with a prefix below 96, so it is not an IPv4 network: write the IPv4 form (\"::ffff:10.0.0.0/104\" is \"10.0.0.0/8\") or a prefix of 96 or more"
            )
        })
}

/// An IPv4-mapped network (`::ffff:a.b.c.d/NN`) as the IPv4 network it stands for
/// (`a.b.c.d/(NN-96)`); any other network unchanged. Peers are compared in IPv4 form (a
/// mapped peer address is turned into IPv4 first), so a mapped entry kept as IPv6 would
/// never match. `None` for a mapped address with a prefix below 96: that network reaches
/// beyond the mapped range, and no IPv4 network is what was meant.
fn unmap_v4(net: IpNet) -> Option<IpNet> {
    let IpNet::V6(v6) = net else {
        return Some(net);
    };
    let Some(v4) = v6.addr().to_ipv4_mapped() else {
        return Some(net);
    };
    let prefix = v6.prefix_len().checked_sub(96)?;
    ipnet::Ipv4Net::new(v4, prefix).ok().map(IpNet::V4)
}

/// A status range for health checks: `"200-399"`, `"200"` or `200`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange(pub u16, pub u16);

impl StatusRange {
    /// Whether `code` lies in the range.
    pub fn contains(&self, code: u16) -> bool {
        (self.0..=self.1).contains(&code)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StatusRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status code or range, such as \"200-399\" or 200")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StatusRange, E> {
                parse_status_range(s).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<StatusRange, E> {
                parse_status_range(&n.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_status_range(s: &str) -> Result<StatusRange, String> {
    let bad = || {
        format!("invalid status range {s:?}: write \"200-399\" or a single code such as \"200\"")
    };
    let code = |p: &str| -> Result<u16, String> {
        let c: u16 = p.trim().parse().map_err(|_| bad())?;
        if (100..=599).contains(&c) {
            Ok(c)
        } else {
            Err(format!("status {c} in {s:?} is outside 100-599"))
        }
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (code(a)?, code(b)?),
        None => {
            let c = code(s)?;
            (c, c)
        }
    };
    if lo > hi {
        return Err(format!(
            "status range {s:?} is reversed: write \"{hi}-{lo}\""
        ));
    }
    Ok(StatusRange(lo, hi))
}

/// Splits `"host:port"` (IPv6 as `"[::1]:port"`). Validates both parts.
pub fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let bad = || {
        format!(
            "invalid server address {addr:?}: write host:port, such as \"127.0.0.1:13000\" or \"app1:13000\""
        )
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        addr.rsplit_once(':').ok_or_else(bad)?
    };
    if host.is_empty() || host.contains(':') && !addr.starts_with('[') {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!(
            "server address {addr:?} has port 0: give the port the server listens on"
        ));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_size("1.5MiB").unwrap(), 3 << 19);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("64KB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("KiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("2").unwrap_err().contains("unit"));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }

    #[test]
    fn mapped_cidrs_are_ipv4_networks() {
        let v4 = |s: &str| parse_cidr(s).unwrap().to_string();
        assert_eq!(v4("::ffff:127.0.0.1"), "127.0.0.1/32");
        assert_eq!(v4("::ffff:10.1.2.3/104"), "10.0.0.0/8");
        assert_eq!(v4("::FFFF:192.168.1.0/120"), "192.168.1.0/24");
        assert_eq!(v4("::ffff:0.0.0.0/96"), "0.0.0.0/0");
        assert_eq!(v4("::ffff:10.0.0.1/128"), "10.0.0.1/32");
        // Not mapped: stays IPv6.
        assert_eq!(v4("::/0"), "::/0");
        assert_eq!(v4("64:ff9b::10.0.0.1"), "64:ff9b::a00:1/128");
        let e = parse_cidr("::ffff:10.0.0.0/64").unwrap_err();
        assert!(e.contains("below 96"), "{e}");

        let trusted = [parse_cidr("::ffff:127.0.0.1").unwrap()];
        for peer in ["127.0.0.1", "::ffff:127.0.0.1"] {
            assert!(
                crate::headers::is_trusted(peer.parse().unwrap(), &trusted),
                "{peer}"
            );
        }
        assert!(!crate::headers::is_trusted(
            "127.0.0.2".parse().unwrap(),
            &trusted
        ));
    }
}
