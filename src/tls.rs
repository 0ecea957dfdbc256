//! TLS with rustls and the `ring` provider: the server side (`[server.tls]`, SNI
//! certificates, ALPN `h2` then `http/1.1`) and the client side towards upstreams
//! (`tls = true`, `ca`, `server_name`, `insecure_skip_verify`). Certificates are read when
//! a config is loaded (start and every reload); the snapshot holds the result, so new
//! handshakes use new certificates and open connections are untouched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{Config, TlsSection, UpstreamSection};
use crate::error::{ConfigError, KeyPath};

/// The process's one crypto provider (never the ambiguous process default).
pub fn provider() -> Arc<CryptoProvider> {
    static P: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    Arc::clone(P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Everything TLS a config needs, read from disk.
#[derive(Debug, Default, Clone)]
pub struct TlsMaterial {
    /// The server side, with `[server.tls]`.
    pub server: Option<ServerTls>,
    /// Client configs by upstream name, for upstreams with `tls = true`.
    pub upstreams: HashMap<String, Arc<UpstreamTls>>,
}

/// The server side: the rustls config and the certificates' expiry times.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Shared by every handshake until the next reload.
    pub config: Arc<rustls::ServerConfig>,
    /// (`server_name` label, notAfter as Unix seconds): `default` for the top-level
    /// certificate, each SNI name for the others.
    pub expiries: Vec<(String, i64)>,
}

/// TLS towards the servers of one upstream.
pub struct UpstreamTls {
    /// The connector.
    pub connector: tokio_rustls::TlsConnector,
    /// `server_name`, if set; otherwise each server's host.
    pub server_name: Option<ServerName<'static>>,
    /// Identifies the settings (and CA bundle content): equal fingerprints mean the same
    /// TLS behaviour, so health checkers need no restart on a reload.
    pub fingerprint: u64,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl UpstreamTls {
    /// The name to send in SNI and verify for a server at `host`.
    pub fn name_for(&self, host: &str) -> Option<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Some(n.clone());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).ok()
    }
}

/// A relative path in the config is relative to the config file's directory.
pub fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match config_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Every certificate, key and CA file the config names (for the watcher).
pub fn files(cfg: &Config, config_path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(t) = &cfg.server.tls {
        out.push(resolve(config_path, &t.cert));
        out.push(resolve(config_path, &t.key));
        for c in &t.certs {
            out.push(resolve(config_path, &c.cert));
            out.push(resolve(config_path, &c.key));
        }
    }
    for u in cfg.upstreams.values() {
        if let Some(ca) = &u.ca {
            out.push(resolve(config_path, ca));
        }
    }
    out
}

/// Reads every certificate and key the config names. `strict` (for `fairway check`) also
/// refuses certificates that have expired or are not valid yet; otherwise those are logged.
pub fn load(cfg: &Config, config_path: &Path, strict: bool) -> Result<TlsMaterial, ConfigError> {
    let mut material = TlsMaterial::default();
    if let Some(t) = &cfg.server.tls {
        material.server = Some(load_server(t, config_path, strict)?);
    }
    for (name, u) in &cfg.upstreams {
        if u.tls {
            let at = KeyPath::root().k("upstreams").k(name);
            let tls = load_upstream(name, u, config_path)
                .map_err(|(k, m)| ConfigError::other(config_path, Some(at.clone().k(k)), m))?;
            material.upstreams.insert(name.clone(), Arc::new(tls));
        }
    }
    Ok(material)
}

fn load_server(t: &TlsSection, config_path: &Path, strict: bool) -> Result<ServerTls, ConfigError> {
    let base = KeyPath::root().k("server").k("tls");
    let err = |key: KeyPath, m: String| ConfigError::other(config_path, Some(key), m);
    let (default, not_after) = certified_key(config_path, &t.cert, &t.key, strict)
        .map_err(|(k, m)| err(base.clone().k(k), m))?;
    let mut expiries = vec![("default".to_owned(), not_after)];
    let mut exact = HashMap::new();
    let mut wildcard = Vec::new();
    for (i, c) in t.certs.iter().enumerate() {
        let (ck, not_after) = certified_key(config_path, &c.cert, &c.key, strict)
            .map_err(|(k, m)| err(base.clone().k("certs").i(i).k(k), m))?;
        for n in &c.server_names {
            let n = n.to_ascii_lowercase();
            expiries.push((n.clone(), not_after));
            match n.strip_prefix('*') {
                Some(suffix) => wildcard.push((suffix.to_owned(), Arc::clone(&ck))),
                None => {
                    exact.insert(n, Arc::clone(&ck));
                }
            }
        }
    }
    // Longest suffix first: the most specific wildcard wins.
    wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
    let resolver = SniResolver {
        exact,
        wildcard,
        default,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(base.clone(), format!("TLS setup failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        expiries,
    })
}

/// Reads a certificate chain and its key, and checks that they belong together. Returns the
/// key and the leaf's notAfter.
fn certified_key(
    config_path: &Path,
    cert: &Path,
    key: &Path,
    strict: bool,
) -> Result<(Arc<CertifiedKey>, i64), (&'static str, String)> {
    let cert_path = resolve(config_path, cert);
    let key_path = resolve(config_path, key);
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                "cert",
                format!("cannot read certificates from {}: {e}", cert_path.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            "cert",
            format!("{} holds no PEM certificate", cert_path.display()),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        (
            "key",
            format!("cannot read a private key from {}: {e}", key_path.display()),
        )
    })?;
    let (not_before, not_after) = validity(&chain[0]).ok_or_else(|| {
        (
            "cert",
            format!("{}: the certificate cannot be parsed", cert_path.display()),
        )
    })?;
    let ck = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        let m = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in {} does not belong to the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            other => format!("{}: unusable key: {other}", key_path.display()),
        };
        ("key", m)
    })?;
    let now = unix_now();
    let problem = if now > not_after {
        Some(format!(
            "the certificate in {} expired at {}: renew it",
            cert_path.display(),
            rfc3339(not_after)
        ))
    } else if now < not_before {
        Some(format!(
            "the certificate in {} is not valid before {}",
            cert_path.display(),
            rfc3339(not_before)
        ))
    } else {
        None
    };
    if let Some(p) = problem {
        if strict {
            return Err(("cert", p));
        }
        tracing::warn!("{p}");
    }
    Ok((Arc::new(ck), not_after))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Picks a certificate by SNI: exact name, then the longest matching `*.suffix`, then the
/// default.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(Arc::clone(&self.default));
        };
        let name = name.to_ascii_lowercase();
        if let Some(ck) = self.exact.get(&name) {
            return Some(Arc::clone(ck));
        }
        for (suffix, ck) in &self.wildcard {
            if name.len() > suffix.len() && name.ends_with(suffix.as_str()) {
                return Some(Arc::clone(ck));
            }
        }
        Some(Arc::clone(&self.default))
    }
}

fn load_upstream(
    name: &str,
    u: &UpstreamSection,
    config_path: &Path,
) -> Result<UpstreamTls, (&'static str, String)> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls", format!("TLS setup failed: {e}")))?;
    let mut config = if u.insecure_skip_verify {
        tracing::warn!(
            upstream = name,
            "insecure_skip_verify = true: server certificates are NOT verified; anyone on the path can read and change this traffic"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &u.ca {
            Some(ca) => {
                let path = resolve(config_path, ca);
                let certs = CertificateDer::pem_file_iter(&path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| ("ca", format!("cannot read {}: {e}", path.display())))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err((
                        "ca",
                        format!("{} holds no usable CA certificate", path.display()),
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err((
                        "ca",
                        "no system CA certificates found: set ca = \"PATH\" (PEM)".to_owned(),
                    ));
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = match &u.server_name {
        Some(n) => Some(
            ServerName::try_from(n.clone())
                .map_err(|_| ("server_name", format!("{n:?} is not a valid name")))?,
        ),
        None => None,
    };
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        u.insecure_skip_verify.hash(&mut h);
        u.server_name.hash(&mut h);
        if let Some(ca) = &u.ca {
            std::fs::read(resolve(config_path, ca)).ok().hash(&mut h);
        }
        h.finish()
    };
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
        fingerprint,
    })
}

/// `insecure_skip_verify`: accepts any certificate (signatures are still checked so the
/// handshake itself is sound).
#[derive(Debug)]
pub struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// The validity period of an X.509 certificate, from its DER, without a full parser.

/// One DER element: (tag, content, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// `(notBefore, notAfter)` as Unix seconds.
pub fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (_, cert, _) = der(cert)?; // Certificate SEQUENCE
    let (_, tbs, _) = der(cert)?; // TBSCertificate SEQUENCE
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r; // [0] version
    }
    for _ in 0..3 {
        rest = der(rest)?.2; // serialNumber, signature, issuer
    }
    let (_, validity, _) = der(rest)?;
    let (t1, nb, r) = der(validity)?;
    let (t2, na, _) = der(r)?;
    Some((asn1_time(t1, nb)?, asn1_time(t2, na)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) to Unix seconds.
fn asn1_time(tag: u8, s: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(s).ok()?.strip_suffix('Z')?;
    let num = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (year, rest) = match tag {
        0x17 => {
            let yy = num(0, 2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        0x18 => (num(0, 4)?, 4),
        _ => return None,
    };
    let (mo, d, h, mi, se) = (
        num(rest, rest + 2)?,
        num(rest + 2, rest + 4)?,
        num(rest + 4, rest + 6)?,
        num(rest + 6, rest + 8)?,
        num(rest + 8, rest + 10)?,
    );
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 29), 20_786);
    }

    #[test]
    fn asn1_times() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(
            asn1_time(0x17, b"491231235959Z"),
            Some(days_from_civil(2049, 12, 31) * 86_400 + 86_399)
        );
        assert_eq!(
            asn1_time(0x18, b"20500101000000Z"),
            Some(days_from_civil(2050, 1, 1) * 86_400)
        );
        assert_eq!(asn1_time(0x17, b"garbage"), None);
    }

    #[test]
    fn sni_resolution_order() {
        let key = |name: &str| {
            let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
            let der = PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap();
            Arc::new(CertifiedKey::from_der(vec![c.cert.der().clone()], der, &provider()).unwrap())
        };
        let (d, a, w) = (key("default"), key("a.example.com"), key("x.example.com"));
        let r = SniResolver {
            exact: HashMap::from([("a.example.com".to_owned(), Arc::clone(&a))]),
            wildcard: vec![(".example.com".to_owned(), Arc::clone(&w))],
            default: Arc::clone(&d),
        };
        let pick = |n: &str| {
            let n = n.to_ascii_lowercase();
            if let Some(ck) = r.exact.get(&n) {
                return Arc::clone(ck);
            }
            r.wildcard
                .iter()
                .find(|(s, _)| n.len() > s.len() && n.ends_with(s.as_str()))
                .map_or(Arc::clone(&r.default), |(_, ck)| Arc::clone(ck))
        };
        assert!(Arc::ptr_eq(&pick("A.example.com"), &a));
        assert!(Arc::ptr_eq(&pick("b.example.com"), &w));
        assert!(Arc::ptr_eq(&pick("example.com"), &d));
    }

    #[test]
    fn validity_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["v.example".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2024, 1, 2);
        params.not_after = rcgen::date_time_ymd(2051, 6, 7);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (nb, na) = validity(cert.der()).unwrap();
        assert_eq!(nb, days_from_civil(2024, 1, 2) * 86_400);
        assert_eq!(na, days_from_civil(2051, 6, 7) * 86_400);
    }
}
