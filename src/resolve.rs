//! Name resolution for servers given by host name: the addresses each `host:port` entry has
//! ([`Resolved`]), and how they are looked up. With `resolver = "IP:PORT"` the queries (A
//! and AAAA over UDP) go to that server; otherwise the system resolver answers. The task
//! that re-resolves periodically is `dns`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use crate::config::{Config, split_host_port};
use crate::metrics::Metrics;

/// (upstream name, entry `addr` as written) → resolved addresses, sorted.
pub type Resolved = HashMap<(String, String), Vec<SocketAddr>>;

/// How long one resolution may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The entries of `cfg` whose host is a name, as (upstream, addr, host, port).
pub fn name_entries(cfg: &Config) -> Vec<(String, String, String, u16)> {
    let mut out = Vec::new();
    for (name, u) in &cfg.upstreams {
        for e in &u.servers {
            let Ok((host, port)) = split_host_port(&e.addr) else {
                continue;
            };
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if literal.parse::<IpAddr>().is_err() {
                out.push((name.clone(), e.addr.clone(), host.to_owned(), port));
            }
        }
    }
    out
}

/// Resolves `host` (blocking): through `resolver` when given, else the system's.
pub fn resolve(host: &str, port: u16, resolver: Option<SocketAddr>) -> io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = match resolver {
        None => (host, port).to_socket_addrs()?.collect(),
        Some(server) => {
            let mut ips = query(server, host, RecordType::A)?;
            ips.extend(query(server, host, RecordType::Aaaa)?);
            ips.into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()
        }
    };
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no address"),
        ));
    }
    Ok(addrs)
}

/// Resolves the name entries of `cfg` that `known` has no answer for yet; keeps the rest.
pub fn resolve_missing(cfg: &Config, known: &Resolved, metrics: &Metrics) -> Resolved {
    let mut out = Resolved::new();
    for (upstream, addr, host, port) in name_entries(cfg) {
        let key = (upstream.clone(), addr.clone());
        if let Some(v) = known.get(&key) {
            out.insert(key, v.clone());
            continue;
        }
        let resolver = cfg.upstreams[&upstream].resolver.map(|a| a.0);
        match resolve(&host, port, resolver) {
            Ok(v) => {
                metrics.record_dns(&upstream, true);
                out.insert(key, v);
            }
            Err(e) => {
                metrics.record_dns(&upstream, false);
                tracing::warn!(upstream = %upstream, server = %addr, error = %e, "cannot resolve; connections will resolve it themselves until it does");
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// A minimal DNS client: one question, recursion desired, A or AAAA answers.

#[derive(Debug, Clone, Copy)]
enum RecordType {
    A = 1,
    Aaaa = 28,
}

fn query(server: SocketAddr, host: &str, rtype: RecordType) -> io::Result<Vec<IpAddr>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().map_err(io::Error::other)?
    } else {
        "[::]:0".parse().map_err(io::Error::other)?
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(server)?;
    let id = (crate::timing::fast_random() & 0xffff) as u16;
    let packet = encode_query(id, host, rtype)?;
    socket.send(&packet)?;
    let mut buf = [0u8; 1500];
    loop {
        let n = socket.recv(&mut buf)?;
        if let Some(ips) = decode_answer(&buf[..n], id, rtype)? {
            return Ok(ips);
        }
    }
}

fn encode_query(id: u16, host: &str, rtype: RecordType) -> io::Result<Vec<u8>> {
    let mut p = Vec::with_capacity(32 + host.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x01, 0x00]); // recursion desired
    p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in host.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad DNS name {host:?}"),
            ));
        }
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.push(0);
    p.extend_from_slice(&(rtype as u16).to_be_bytes());
    p.extend_from_slice(&[0, 1]); // class IN
    Ok(p)
}

/// Skips a (possibly compressed) name; returns the offset after it.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        if len == 0 {
            return Some(at + 1);
        }
        at += 1 + usize::from(len);
    }
}

/// `Ok(None)` for an answer to another query (a stale or spoofed id); an error for a
/// failure code.
fn decode_answer(msg: &[u8], id: u16, rtype: RecordType) -> io::Result<Option<Vec<IpAddr>>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed DNS answer");
    if msg.len() < 12 {
        return Err(bad());
    }
    if u16::from_be_bytes([msg[0], msg[1]]) != id || msg[2] & 0x80 == 0 {
        return Ok(None);
    }
    match msg[3] & 0x0f {
        0 => {}
        3 => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such name (NXDOMAIN)",
            ));
        }
        code => {
            return Err(io::Error::other(format!(
                "DNS server answered rcode {code}"
            )));
        }
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at).ok_or_else(bad)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(msg, at).ok_or_else(bad)?;
        let head = msg.get(at..at + 10).ok_or_else(bad)?;
        let t = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[8], head[9]]));
        let data = msg.get(at + 10..at + 10 + len).ok_or_else(bad)?;
        at += 10 + len;
        match (t, len) {
            (1, 4) if matches!(rtype, RecordType::A) => {
                out.push(IpAddr::from([data[0], data[1], data[2], data[3]]));
            }
            (28, 16) if matches!(rtype, RecordType::Aaaa) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(data);
                out.push(IpAddr::from(a));
            }
            // CNAMEs and other records: the resolver follows CNAMEs for us.
            _ => {}
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `q` with the given A records (name compressed to the question).
    fn answer(q: &[u8], ips: &[[u8; 4]]) -> Vec<u8> {
        let mut m = q.to_vec();
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = ips.len() as u8;
        for ip in ips {
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            m.extend_from_slice(ip);
        }
        m
    }

    #[test]
    fn query_and_answer_round_trip() {
        let q = encode_query(0x1234, "app.svc.local", RecordType::A).unwrap();
        assert_eq!(&q[12..17], b"\x03app\x03");
        let a = answer(&q, &[[10, 0, 0, 1], [10, 0, 0, 2]]);
        let ips = decode_answer(&a, 0x1234, RecordType::A).unwrap().unwrap();
        assert_eq!(
            ips,
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        assert_eq!(decode_answer(&a, 0x9999, RecordType::A).unwrap(), None);
        let mut nx = answer(&q, &[]);
        nx[3] = 0x83;
        assert!(decode_answer(&nx, 0x1234, RecordType::A).is_err());
        assert!(decode_answer(&a[..a.len() - 2], 0x1234, RecordType::A).is_err());
    }

    #[test]
    fn name_entries_skip_ip_literals() {
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"10.0.0.1:80\", \"[::1]:80\", \"app.svc:13000\"]\n",
        )
        .unwrap();
        let e = name_entries(&cfg);
        assert_eq!(
            e,
            vec![(
                "app".into(),
                "app.svc:13000".into(),
                "app.svc".into(),
                13000
            )]
        );
    }

    #[test]
    fn system_resolver_answers_localhost() {
        let v = resolve("localhost", 80, None).unwrap();
        assert!(v.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
    }
}
