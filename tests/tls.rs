//! TLS end to end (CONTRACT §2 `[server] tls`, §7 `[[server.tls.certs]]`, `redirect_http`,
//! upstream `tls`/`ca`/`server_name`/`insecure_skip_verify`, the certificate expiry gauge):
//! HTTPS with a test CA, ALPN h2/http1.1, every usual key type, WebSocket over TLS, SNI
//! certificates, rotation on file change and bad certificates kept out, handshake failures
//! closing only their connection, the 308 redirect listener, TLS to upstreams (health checks
//! included) and `fairway check` on certificate problems.
mod common;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::process::{Output, fairway, output};
use common::*;
use fairway::tls::{NoVerification, provider};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// CONTRACT §6: a change (a renewed certificate too) takes effect within 2 seconds.
const WITHIN: Duration = Duration::from_secs(2);
/// Bound on any single network step, so that a bug fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// A test PKI: one CA, leaf certificates of every usual key type, PEM files

/// A 2048-bit RSA key in PKCS#8, made once with `openssl genpkey` (ring cannot generate RSA
/// keys). A test key only: it protects nothing.
const RSA_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQC9Ql/X/C5shXJz
X0d1VOoQW2I4zhM+zfZ0/4oGlucFKL+po4R5yBvRu85nDiVXzbFTLQK7zGnITpEp
RuFgKYL4JEduTg36KW0G0wfC6AMOu2J0B7+RrJ+KzJWVLmN0U5OXEI8wsFsL7dfs
O8WABERVSlx/QipNyNN1TZHhXtGFKnWCMge0F2z0ti1R2ZOvr+9gpjCyFnNmEFfU
8UsFff2K7KmNfHc5keNhSjkC9d1dHFpfx/zJvN3quJI8yJXmcdXVZ3RP+HFZB0hW
Ctn65nvC3Nb1RNzDGbW+tEcpHO/X2bdqSvb+3HkKXGhl72Cq74Eb67znuAJfRSBC
55UE1m2rAgMBAAECggEAPEAGogw6vTqIcnkpFw22zAlDjiDwmIRaCuoVBz8AAbD0
vyz6rghJ7u1yanVi5v5pDrkcDywmmumEJddWRVZBxvxJrzBzG6oXdt40sNRKsORv
lc+nqVkCm13A2vKfH7fBmwxfAVmLSpNns2Fd4QC6vkpDgxHNxOCDjOrqX4xfeBw9
Nn7SxV0uL6v9AtHmDOFUIEH6s3bzIuMqb9MaNIXVJSkoaHG+z1SZkZnYZEITX7Vv
daaZr6KsSIt5DNdWjNA97QwqCwNGPOWMCiSYlPiyBwLY3kXx24gIafbEWiOSE3H+
t6pTCAH0Yj7dbCifZxscibdutowuUoVFC7P9A2AA3QKBgQDsYJv5tRI4TbSXMh4H
NVmx7wYBwrLBjrq/ETO6jqseFP4oJv7sV+wsA8sP7sq+0/E4fvWz+1PHtPCAu8Ne
s16VtH+3eKJJGL2fPglSxvcZz0365SV4WcXwrqu+SVEpd3GCKcM1WysMIFpy2R2L
B2mlEILcj1wDkd/0cOGm3QlUtwKBgQDM+G5suFaX8FMoHITX77ck49qp7S3PCLZT
PEbRmvP1H7R8HeRFm+FAr2CFk6A5igLm/gesl1AQB4NyKK0S4LUqYdNveaSvA1Ni
rcAOu58+6UVf6tw3nPSghy5j/bSkk/pc5r+dPelimsm4/wY4tkJlYyxBkY7v0WHD
70/RqNdCrQKBgQChOCdKAfkCU+V3NiSK8BVUKd2j98JqB8pRJQ9uD36gjtrmUeqP
EkyvnIq0PD8mNnIRAW7dqe5ziHJ8qxPOlHJPkwOFBI9TYb97TBmZzsCcZusd04ph
8oDx7oCO0Xy81o2hpJBS5PKQW8S1DmZ6+7xPa9qFSnYMrULdetw9Lgb+MwKBgQCh
0QOEa2dZnk5YHWO3AjXJNuVbP7bpesxOHAkg0z8D5trbHdIoLi7/nTULX4efxVgT
OrueQvrfHL9mMbypaaM86Ww91n/v9yUug1Nbjj3jMdAmMElY0l3CGdbC8/lX8Mc3
7qeZoNYOlXrpxNQJk8IJPukifqKkq92ODPEr6SrAJQKBgQC7fSsXzaJPOs+w6Lq/
U9PCka2hzCugXTsYpYab4CoH1aqUxUqjqLIb0Q6XsiDbMRumMt0wnokx9cbnrR6J
xJ4J66xnH5ZVK23FhiJX1/NiEFV6UBfB445xvlepnMswGHJaSJk4bfNC9sdkMaHB
0Rtfy25TUs/JyZgZ98c3PbJSyg==
-----END PRIVATE KEY-----
";

/// The names every default test certificate is valid for.
const LOCAL: &[&str] = &["localhost", "127.0.0.1"];

/// Key types and encodings a leaf certificate's key file can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// ECDSA P-256 in PKCS#8 (`PRIVATE KEY`).
    EcdsaP256,
    /// ECDSA P-256 in SEC1 (`EC PRIVATE KEY`), as `openssl ecparam -genkey` writes it.
    EcdsaP256Sec1,
    /// ECDSA P-384 in PKCS#8.
    EcdsaP384,
    /// Ed25519 in PKCS#8.
    Ed25519,
    /// RSA 2048 in PKCS#8.
    Rsa,
    /// RSA 2048 in PKCS#1 (`RSA PRIVATE KEY`), as older tools write it.
    RsaPkcs1,
}

/// A key pair for `kind` and its key file as the proxy reads it.
fn key_of(kind: KeyKind) -> (KeyPair, String) {
    match kind {
        KeyKind::EcdsaP256 | KeyKind::EcdsaP384 | KeyKind::Ed25519 => {
            let alg = match kind {
                KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                _ => &rcgen::PKCS_ED25519,
            };
            let k = KeyPair::generate_for(alg).unwrap();
            let pem = k.serialize_pem();
            (k, pem)
        }
        KeyKind::EcdsaP256Sec1 => {
            let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            // A PKCS#8 EC key wraps the SEC1 `ECPrivateKey` in its OCTET STRING.
            let pem = pem("EC PRIVATE KEY", pkcs8_inner(&k.serialize_der()));
            (k, pem)
        }
        KeyKind::Rsa => (KeyPair::from_pem(RSA_PKCS8).unwrap(), RSA_PKCS8.to_owned()),
        KeyKind::RsaPkcs1 => {
            let k = KeyPair::from_pem(RSA_PKCS8).unwrap();
            // Likewise the PKCS#1 `RSAPrivateKey`.
            let pem = pem("RSA PRIVATE KEY", pkcs8_inner(&k.serialize_der()));
            (k, pem)
        }
    }
}

/// One DER element: (tag, content, rest).
fn der(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (input[0], input[1]);
    let (len, at) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    (tag, &input[at..at + len], &input[at + len..])
}

/// The private key inside a PKCS#8 `PrivateKeyInfo` (SEC1 for EC, PKCS#1 for RSA).
fn pkcs8_inner(pkcs8: &[u8]) -> &[u8] {
    let (_, info, _) = der(pkcs8);
    let (_, _, rest) = der(info); // version
    let (_, _, rest) = der(rest); // algorithm
    let (tag, key, _) = der(rest);
    assert_eq!(tag, 0x04, "PKCS#8 privateKey is an OCTET STRING");
    key
}

/// PEM text with `label` around `der`.
fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                B64[((v >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, as PEM files and DER.
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    /// notAfter as Unix seconds.
    not_after: i64,
}

/// Distinct serial numbers for every certificate the tests issue.
static SERIAL: AtomicU64 = AtomicU64::new(1000);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(p, key).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// An ECDSA P-256 leaf for `names`, valid from 2020 to 2040.
    fn leaf(&self, names: &[&str]) -> Leaf {
        self.issue(names, KeyKind::EcdsaP256, (2020, 1, 1), (2040, 1, 1))
    }

    /// A leaf for `names` with a `kind` key, valid between the two dates (y, m, d; UTC).
    fn issue(
        &self,
        names: &[&str],
        kind: KeyKind,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Leaf {
        let (key, key_pem) = key_of(kind);
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        p.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        p.serial_number = Some(SerialNumber::from_slice(
            &SERIAL.fetch_add(1, Ordering::Relaxed).to_be_bytes(),
        ));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem,
            der: cert.der().to_vec(),
            not_after: p.not_after.unix_timestamp(),
        }
    }
}

impl Leaf {
    /// The files `cert.pem` and `key.pem` under `prefix` (`""` or `"dir/"`).
    fn files(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            (format!("{prefix}cert.pem"), self.cert_pem.clone()),
            (format!("{prefix}key.pem"), self.key_pem.clone()),
        ]
    }
}

// ---------------------------------------------------------------------------------------
// The proxy, with its certificate files beside its config

/// `[server.tls]` naming `cert.pem` and `key.pem` next to the config (relative paths).
const TLS: &str = "[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";

/// `[server]` on port 0 with `server_extra`, then `tls` (the `[server.tls]` section and any
/// `[[server.tls.certs]]`), `[admin]` on port 0, and `rest`.
fn config(server_extra: &str, tls: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\n{tls}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{rest}"
    )
}

/// `[upstreams.app]` over one server.
fn app(addr: SocketAddr) -> String {
    format!("[upstreams.app]\nservers = [\"{addr}\"]\n")
}

/// `fairway_tls_certificate_expiry_timestamp_seconds{server_name=NAME}`.
async fn expiry(p: &TestProxy, server_name: &str) -> Option<i64> {
    admin::metrics(p)
        .await
        .get(
            "fairway_tls_certificate_expiry_timestamp_seconds",
            &[("server_name", server_name)],
        )
        .map(|v| v as i64)
}

/// `fairway_config_reloads_total{result="failure"}`.
async fn reload_failures(p: &TestProxy) -> u64 {
    admin::metrics(p)
        .await
        .must("fairway_config_reloads_total", &[("result", "failure")]) as u64
}

/// `/status` → `upstreams.app.servers[0].healthy`.
async fn healthy(p: &TestProxy) -> bool {
    let s = admin::status(p).await;
    s["upstreams"]["app"]["servers"][0]["healthy"]
        .as_bool()
        .unwrap_or_else(|| panic!("no healthy flag in /status: {s}"))
}

// ---------------------------------------------------------------------------------------
// A TLS client

/// A client config trusting only `ca`, offering `alpn`.
fn trusting(ca: &Ca, alpn: &[&str]) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(c)
}

/// A client config that accepts any certificate (to see which one a name gets even when it
/// would not verify for that name).
fn trusting_anything() -> Arc<ClientConfig> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerification))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// TCP to `addr`, then a TLS handshake for `name` (a DNS name, sent as SNI, or an IP
/// address, which sends none).
async fn connect(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let handshake = async {
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(Arc::clone(cfg))
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(STEP, handshake)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "handshake hung")))
}

/// The leaf certificate the server presented.
fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref()
        .1
        .peer_certificates()
        .expect("no peer certificate")[0]
        .to_vec()
}

/// The certificate a new handshake for `name` gets, or `None` if it fails.
async fn served_cert(addr: SocketAddr, name: &str, cfg: &Arc<ClientConfig>) -> Option<Vec<u8>> {
    connect(addr, name, cfg).await.ok().map(|s| peer_cert(&s))
}

/// An HTTP connection over TLS: HTTP/1.1 (requests carry `Host: localhost`) or HTTP/2
/// (requests carry `https://localhost` as `:scheme`/`:authority`).
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn http1(s: TlsStream<TcpStream>) -> Conn {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    Conn::H1(sender)
}

async fn http2(s: TlsStream<TcpStream>) -> Conn {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    Conn::H2(sender)
}

impl Conn {
    /// A request builder for `path` that suits the protocol.
    fn request(&self, path: &str) -> http::request::Builder {
        match self {
            Conn::H1(_) => Request::get(path).header("host", "localhost"),
            Conn::H2(_) => Request::get(format!("https://localhost{path}")),
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let req = self.request(path).body(Full::default()).unwrap();
        self.send(req).await
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Reply {
        let exchange = async {
            let resp = match self {
                Conn::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
                Conn::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
            };
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(STEP, exchange)
            .await
            .expect("request timed out")
            .expect("request failed")
    }

    fn clone_h2(&self) -> Conn {
        match self {
            Conn::H2(s) => Conn::H2(s.clone()),
            Conn::H1(_) => panic!("an HTTP/1.1 connection carries one request at a time"),
        }
    }
}

/// A new TLS connection trusting `ca`, one GET of `path` on it.
async fn https_get(addr: SocketAddr, ca: &Ca, path: &str) -> Reply {
    let s = connect(addr, "localhost", &trusting(ca, &["http/1.1"]))
        .await
        .unwrap();
    http1(s).await.get(path).await
}

// ---------------------------------------------------------------------------------------
// A TLS upstream: answers `secure` on any path, 200 `ok` on /health

struct TlsUpstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    health_hits: Arc<AtomicUsize>,
    /// The SNI name of every completed handshake (`None`: the client sent none).
    sni: Arc<Mutex<Vec<Option<String>>>>,
    stop: CancellationToken,
}

impl TlsUpstream {
    async fn start(leaf: &Leaf) -> TlsUpstream {
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(leaf.der.clone())], key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = TlsUpstream {
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            health_hits: Arc::default(),
            sni: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (hits, health_hits, sni, stop) = (
            Arc::clone(&up.hits),
            Arc::clone(&up.health_hits),
            Arc::clone(&up.sni),
            up.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                };
                let (acceptor, hits, health_hits, sni, stop) = (
                    acceptor.clone(),
                    Arc::clone(&hits),
                    Arc::clone(&health_hits),
                    Arc::clone(&sni),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let name = tls.get_ref().1.server_name().map(str::to_owned);
                    sni.lock().unwrap().push(name);
                    let service = service_fn(move |req: Request<Incoming>| {
                        let body = if req.uri().path() == "/health" {
                            health_hits.fetch_add(1, Ordering::SeqCst);
                            "ok"
                        } else {
                            hits.fetch_add(1, Ordering::SeqCst);
                            "secure"
                        };
                        async move {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                body.as_bytes(),
                            ))))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        up
    }

    fn handshakes(&self) -> usize {
        self.sni.lock().unwrap().len()
    }

    fn last_sni(&self) -> Option<Option<String>> {
        self.sni.lock().unwrap().last().cloned()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---------------------------------------------------------------------------------------
// 1. HTTPS through to a plain upstream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_reaches_a_plain_upstream_as_forwarded_proto_https() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(LOCAL);
    let up = TestUpstream::start("plain").await;
    let p = TestProxy::start_with_files(&leaf.files(""), &config("", TLS, &app(up.addr))).await;

    let s = connect(p.addr, "localhost", &trusting(&ca, &["http/1.1"]))
        .await
        .expect("a client trusting the test CA completes the handshake");
    assert_eq!(peer_cert(&s), leaf.der);
    let mut c = http1(s).await;
    let r = c.get("/hello?x=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), "plain");
    assert_eq!(r.json()["uri"], "/hello?x=1");
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );
    assert_eq!(r.seen_header("host"), Some(vec!["localhost".into()]));

    // A client cannot pass itself off as plain HTTP; and the connection is kept alive.
    let forged = c
        .request("/again")
        .header("x-forwarded-proto", "http")
        .body(Full::default())
        .unwrap();
    let r = c.send(forged).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );
    assert_eq!(up.hits(), 2);

    // A client that does not trust the test CA refuses the certificate.
    let stranger = Ca::new("another CA");
    let refused = connect(p.addr, "localhost", &trusting(&stranger, &["http/1.1"])).await;
    assert!(refused.is_err(), "a certificate from an unknown CA passed");
}

// ---------------------------------------------------------------------------------------
// 2. ALPN

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_or_http11() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("alpn").await;
    let p = TestProxy::start_with_files(&ca.leaf(LOCAL).files(""), &config("", TLS, &app(up.addr)))
        .await;

    // h2 preferred: two requests multiplexed on one connection, HTTP/1.1 to the upstream.
    let s = connect(p.addr, "localhost", &trusting(&ca, &["h2", "http/1.1"]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut a = http2(s).await;
    let mut b = a.clone_h2();
    let (ra, rb) = tokio::join!(a.get("/h2/a"), b.get("/h2/b"));
    for (r, uri) in [(ra, "/h2/a"), (rb, "/h2/b")] {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["uri"], uri);
        assert_eq!(r.json()["version"], "HTTP/1.1");
        assert_eq!(
            r.seen_header("x-forwarded-proto"),
            Some(vec!["https".into()])
        );
        assert_eq!(r.seen_header("host"), Some(vec!["localhost".into()]));
    }

    // Only http/1.1 offered.
    let s = connect(p.addr, "localhost", &trusting(&ca, &["http/1.1"]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let r = http1(s).await.get("/h1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/1.1");

    // No ALPN at all (curl --no-alpn, old clients): HTTP/1.1.
    let s = connect(p.addr, "localhost", &trusting(&ca, &[]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    let r = http1(s).await.get("/no-alpn").await;
    assert_eq!(r.status, 200);

    // A protocol the proxy does not speak is refused rather than mis-served.
    let refused = connect(p.addr, "localhost", &trusting(&ca, &["spdy/3"])).await;
    assert!(
        refused.is_err(),
        "a handshake offering only an unknown ALPN protocol succeeded"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Key types

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_usual_key_type_serves() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("keys").await;
    let kinds = [
        KeyKind::EcdsaP256,
        KeyKind::EcdsaP256Sec1,
        KeyKind::EcdsaP384,
        KeyKind::Ed25519,
        KeyKind::Rsa,
        KeyKind::RsaPkcs1,
    ];
    for kind in kinds {
        let leaf = ca.issue(LOCAL, kind, (2020, 1, 1), (2040, 1, 1));
        let label = match kind {
            KeyKind::EcdsaP256Sec1 => "EC PRIVATE KEY",
            KeyKind::RsaPkcs1 => "RSA PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        assert!(
            leaf.key_pem
                .starts_with(&format!("-----BEGIN {label}-----\n")),
            "{kind:?}: {}",
            leaf.key_pem
        );
        let p = TestProxy::start_with_files(&leaf.files(""), &config("", TLS, &app(up.addr))).await;
        let s = connect(p.addr, "localhost", &trusting(&ca, &["h2", "http/1.1"]))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: handshake failed: {e}"));
        assert_eq!(peer_cert(&s), leaf.der, "{kind:?}");
        let r = http2(s).await.get(&format!("/{kind:?}")).await;
        assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    }
}

// ---------------------------------------------------------------------------------------
// 4. WebSocket over TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("wss").await;
    let p = TestProxy::start_with_files(&ca.leaf(LOCAL).files(""), &config("", TLS, &app(up.addr)))
        .await;

    let s = connect(p.addr, "localhost", &trusting(&ca, &["http/1.1"]))
        .await
        .unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async("wss://localhost/ws", s),
    )
    .await
    .expect("WebSocket handshake hung")
    .expect("WebSocket handshake failed");
    assert_eq!(resp.status(), 101);
    for text in ["hi", "again"] {
        ws.send(Message::text(text)).await.unwrap();
        let reply = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no echo")
            .expect("tunnel closed")
            .unwrap();
        assert_eq!(reply.to_text().unwrap(), format!("wss: {text}"));
    }
    ws.close(None).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. SNI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate() {
    let ca = Ca::new("test CA");
    let default = ca.leaf(LOCAL);
    let api = ca.issue(
        &["api.test", "*.apps.test"],
        KeyKind::EcdsaP256,
        (2020, 1, 1),
        (2038, 3, 4),
    );
    // An exact name inside the wildcard, and a longer wildcard, in a later entry.
    let deep = ca.issue(
        &["special.apps.test", "*.eu.apps.test"],
        KeyKind::Ed25519,
        (2020, 1, 1),
        (2039, 5, 6),
    );
    let up = TestUpstream::start("sni").await;
    let mut files = default.files("");
    files.push(("api.pem".into(), api.cert_pem.clone()));
    files.push(("api-key.pem".into(), api.key_pem.clone()));
    files.push(("deep.pem".into(), deep.cert_pem.clone()));
    files.push(("deep-key.pem".into(), deep.key_pem.clone()));
    let tls = format!(
        "{TLS}\n[[server.tls.certs]]\nserver_names = [\"api.test\", \"*.apps.test\"]\n\
         cert = \"api.pem\"\nkey = \"api-key.pem\"\n\n\
         [[server.tls.certs]]\nserver_names = [\"special.apps.test\", \"*.eu.apps.test\"]\n\
         cert = \"deep.pem\"\nkey = \"deep-key.pem\"\n"
    );
    let p = TestProxy::start_with_files(&files, &config("", &tls, &app(up.addr))).await;

    // Verifying clients: each name gets a certificate valid for it.
    let verify = trusting(&ca, &["http/1.1"]);
    for (name, want) in [
        ("api.test", &api),
        ("x.apps.test", &api),
        ("special.apps.test", &deep),
        ("x.eu.apps.test", &deep),
        ("localhost", &default),
        // An IP address: rustls sends no SNI at all.
        ("127.0.0.1", &default),
    ] {
        let s = connect(p.addr, name, &verify)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(peer_cert(&s) == want.der, "{name}: wrong certificate");
        let r = http1(s).await.get("/").await;
        assert_eq!(r.status, 200, "{name}");
    }

    // Names no SNI certificate covers get the default (seen without verification); names
    // match case-insensitively.
    let any = trusting_anything();
    for (name, want) in [
        ("other.test", &default),
        ("apps.test", &default),
        ("api.test.evil", &default),
        ("API.test", &api),
        ("y.APPS.test", &api),
    ] {
        let got = served_cert(p.addr, name, &any).await;
        assert!(got.as_ref() == Some(&want.der), "{name}: wrong certificate");
    }

    // The expiry gauge has one series per name.
    assert_eq!(expiry(&p, "default").await, Some(default.not_after));
    assert_eq!(expiry(&p, "api.test").await, Some(api.not_after));
    assert_eq!(expiry(&p, "*.apps.test").await, Some(api.not_after));
    assert_eq!(expiry(&p, "special.apps.test").await, Some(deep.not_after));
    assert_eq!(expiry(&p, "*.eu.apps.test").await, Some(deep.not_after));

    // A reload without the SNI entries: those names fall back to the default, and their
    // series leave the gauge.
    replace(&p.file("fairway.toml"), &config("", TLS, &app(up.addr)));
    p.handle().reload().expect("reload");
    assert_eq!(
        served_cert(p.addr, "api.test", &any).await,
        Some(default.der.clone())
    );
    assert_eq!(expiry(&p, "api.test").await, None);
    assert_eq!(expiry(&p, "*.eu.apps.test").await, None);
    assert_eq!(expiry(&p, "default").await, Some(default.not_after));
}

// ---------------------------------------------------------------------------------------
// 6. Rotation on file change

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_within_2s_and_open_connections_live_on() {
    let ca = Ca::new("test CA");
    let old = ca.issue(LOCAL, KeyKind::EcdsaP256, (2020, 1, 1), (2040, 1, 1));
    let new = ca.issue(LOCAL, KeyKind::EcdsaP256, (2024, 1, 1), (2041, 6, 15));
    let up = TestUpstream::start("rotate").await;
    // The certificates live in a directory of their own, named relative to the config.
    let tls = "[server.tls]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n";
    let p =
        TestProxy::start_with_files(&old.files("certs/"), &config("", tls, &app(up.addr))).await;
    assert_eq!(expiry(&p, "default").await, Some(old.not_after));

    let verify = trusting(&ca, &["http/1.1"]);
    let s = connect(p.addr, "localhost", &verify).await.unwrap();
    assert_eq!(peer_cert(&s), old.der);
    let mut open = http1(s).await;
    assert_eq!(open.get("/before").await.status, 200);

    replace(&p.file("certs/key.pem"), &new.key_pem);
    replace(&p.file("certs/cert.pem"), &new.cert_pem);
    let t0 = Instant::now();
    eventually(
        WITHIN,
        "new handshakes present the renewed certificate",
        || {
            let verify = Arc::clone(&verify);
            let (addr, want) = (p.addr, new.der.clone());
            async move { served_cert(addr, "localhost", &verify).await == Some(want) }
        },
    )
    .await;
    eprintln!("renewed certificate served after {:?}", t0.elapsed());

    // The connection opened with the old certificate keeps working.
    let r = open.get("/after").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/after");
    assert_eq!(https_get(p.addr, &ca, "/fresh").await.status, 200);
    assert_eq!(expiry(&p, "default").await, Some(new.not_after));
}

// ---------------------------------------------------------------------------------------
// 7. A bad certificate is kept out

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_fails_the_reload_and_the_old_one_stays() {
    let ca = Ca::new("test CA");
    let good = ca.leaf(LOCAL);
    let up = TestUpstream::start("bad").await;
    let p = TestProxy::start_with_files(&good.files(""), &config("", TLS, &app(up.addr))).await;
    let verify = trusting(&ca, &["http/1.1"]);
    let mut open = http1(connect(p.addr, "localhost", &verify).await.unwrap()).await;
    assert_eq!(open.get("/").await.status, 200);

    // Garbage in the certificate file.
    let failures = reload_failures(&p).await;
    replace(&p.file("cert.pem"), "this is not a certificate\n");
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("server.tls.cert"), "{}", r.text());
    assert!(r.text().contains("cert.pem"), "{}", r.text());
    assert!(reload_failures(&p).await > failures);
    assert_eq!(
        admin::metrics(&p)
            .await
            .get("fairway_config_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(
        served_cert(p.addr, "localhost", &verify).await,
        Some(good.der.clone())
    );
    assert_eq!(open.get("/still").await.status, 200);

    // A valid certificate that does not go with the key.
    let failures = reload_failures(&p).await;
    let stranger = ca.leaf(LOCAL);
    replace(&p.file("cert.pem"), &stranger.cert_pem);
    let e = p
        .handle()
        .reload()
        .expect_err("a certificate that does not match its key was accepted");
    assert!(e.to_string().contains("does not belong"), "{e}");
    assert!(reload_failures(&p).await > failures);
    assert_eq!(
        served_cert(p.addr, "localhost", &verify).await,
        Some(good.der.clone())
    );
    assert_eq!(expiry(&p, "default").await, Some(good.not_after));
    assert_eq!(open.get("/still").await.status, 200);

    // Putting the good file back is a successful reload.
    replace(&p.file("cert.pem"), &good.cert_pem);
    let r = admin::post(&p, "/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(https_get(p.addr, &ca, "/").await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 8. Handshake failures close that connection only

/// Connects, writes `bytes`, and reads until the proxy closes; returns what came back
/// (`None`: the connection was reset) and how long it took.
async fn until_closed(addr: SocketAddr, bytes: &'static [u8]) -> (Option<Vec<u8>>, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    if !bytes.is_empty() {
        s.write_all(bytes).await.unwrap();
    }
    let mut out = Vec::new();
    let r = tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("the proxy kept the connection open");
    (r.ok().map(|_| out), t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_close_only_their_connection() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("steady").await;
    let p = TestProxy::start_with_files(
        &ca.leaf(LOCAL).files(""),
        &config("header_read_timeout = \"300ms\"", TLS, &app(up.addr)),
    )
    .await;
    let verify = trusting(&ca, &["http/1.1"]);
    let mut good = http1(connect(p.addr, "localhost", &verify).await.unwrap()).await;
    assert_eq!(good.get("/").await.status, 200);

    let addr = p.addr;
    // Plain HTTP on the TLS port.
    let plain = tokio::spawn(until_closed(
        addr,
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ));
    // A TLS record header announcing a handshake, then nonsense.
    let junk = tokio::spawn(until_closed(addr, b"\x16\x03\x01\x00\x10garbagegarbage!!"));
    // A client that connects and says nothing.
    let silent = tokio::spawn(until_closed(addr, b""));
    // A client that completes the handshake and then says nothing.
    let v2 = Arc::clone(&verify);
    let quiet = tokio::spawn(async move {
        let mut s = connect(addr, "localhost", &v2).await.unwrap();
        let t0 = Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(STEP, s.read_to_end(&mut buf))
            .await
            .expect("the proxy kept a silent TLS connection open");
        (r.ok().map(|_| buf), t0.elapsed())
    });

    // Meanwhile the good client keeps being served.
    let mut served = 0;
    while !(plain.is_finished()
        && junk.is_finished()
        && silent.is_finished()
        && quiet.is_finished())
    {
        let r = good.get(&format!("/meanwhile/{served}")).await;
        assert_eq!(r.status, 200);
        served += 1;
    }
    assert!(served > 0);

    let (answer, _) = plain.await.unwrap();
    let answer = String::from_utf8_lossy(answer.as_deref().unwrap_or_default()).into_owned();
    assert!(
        !answer.contains("HTTP/1.1"),
        "plain HTTP on the TLS port was answered in plain HTTP: {answer:?}"
    );
    let (_, took) = junk.await.unwrap();
    assert!(took < WITHIN, "junk handshake closed after {took:?}");
    let (answer, took) = silent.await.unwrap();
    assert!(
        answer.is_none_or(|b| b.is_empty()),
        "a silent client got bytes"
    );
    assert!(
        took >= Duration::from_millis(250) && took < WITHIN,
        "a silent client was closed after {took:?} (header_read_timeout 300ms)"
    );
    let (answer, took) = quiet.await.unwrap();
    assert!(
        answer.is_none_or(|b| b.is_empty()),
        "a silent TLS client got bytes"
    );
    assert!(
        took >= Duration::from_millis(250) && took < WITHIN,
        "a silent TLS client was closed after {took:?} (header_read_timeout 300ms)"
    );

    // Still fine afterwards, old connection and new.
    assert_eq!(good.get("/after").await.status, 200);
    assert_eq!(https_get(addr, &ca, "/new").await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 9. redirect_http

/// The `Location` header of a raw HTTP/1.1 answer.
fn location(answer: &str) -> Option<&str> {
    answer.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location").then_some(v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_answers_308_to_https() {
    let ca = Ca::new("test CA");
    let up = TestUpstream::start("redirect").await;
    let p = TestProxy::start_with_files(
        &ca.leaf(LOCAL).files(""),
        &config("redirect_http = \"127.0.0.1:0\"", TLS, &app(up.addr)),
    )
    .await;
    let redirect = p.handle().redirect_addr().expect("redirect_http is bound");
    assert_ne!(redirect, p.addr);

    for (head, want) in [
        (
            "GET /path?q=1 HTTP/1.1\r\nHost: example.com\r\n",
            "https://example.com/path?q=1",
        ),
        // The plain port is not the https one: it is dropped, like Nginx's $host.
        (
            "GET /a/b HTTP/1.1\r\nHost: example.com:8080\r\n",
            "https://example.com/a/b",
        ),
        // 308 keeps the method and body: a POST is redirected too.
        (
            "POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n",
            "https://example.com/upload",
        ),
    ] {
        let req = format!("{head}Connection: close\r\n\r\n");
        let body = if head.starts_with("POST") { "hi" } else { "" };
        let answer = raw(
            redirect,
            format!("{req}{body}").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(raw_status(&answer), Some(308), "{answer}");
        assert_eq!(location(&answer), Some(want), "{answer}");
    }
    assert_eq!(up.hits(), 0, "a redirected request reached the upstream");
    // The TLS listener itself is not redirecting.
    assert_eq!(https_get(p.addr, &ca, "/").await.status, 200);
}

// ---------------------------------------------------------------------------------------
// 9b. TLS turned on and off by a reload, on the same port

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_turned_off_and_on_by_a_reload_on_the_same_port() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(LOCAL);
    let up = TestUpstream::start("toggle").await;
    let p = TestProxy::start_with_files(&leaf.files(""), &config("", TLS, &app(up.addr))).await;
    let verify = trusting(&ca, &["http/1.1"]);
    let mut open = http1(connect(p.addr, "localhost", &verify).await.unwrap()).await;
    assert_eq!(open.get("/").await.status, 200);

    // Off: new connections are plain HTTP; the open TLS connection lives on.
    replace(&p.file("fairway.toml"), &config("", "", &app(up.addr)));
    p.handle().reload().expect("reload without TLS");
    assert_eq!(p.handle().client_addrs(), vec![p.addr]);
    let r = get(&format!("http://{}/plain", p.addr)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["http".into()])
    );
    assert!(connect(p.addr, "localhost", &verify).await.is_err());
    let r = open.get("/still-tls").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );

    // On again.
    replace(&p.file("fairway.toml"), &config("", TLS, &app(up.addr)));
    p.handle().reload().expect("reload with TLS");
    let r = https_get(p.addr, &ca, "/tls-again").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-forwarded-proto"),
        Some(vec!["https".into()])
    );
}

// ---------------------------------------------------------------------------------------
// 10. TLS to upstreams

/// A plain-HTTP proxy (with admin) in front of the TLS upstream `up`, with `keys` added
/// under `[upstreams.app]` and the CA file `ca.pem` beside the config.
async fn proxy_to_tls(ca: &Ca, up: &TlsUpstream, keys: &str) -> TestProxy {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"{}\"]\n{keys}\n",
        up.addr
    );
    TestProxy::start_with_files(&[("ca.pem".into(), ca.pem())], &toml).await
}

async fn plain_get(p: &TestProxy, path: &str) -> Reply {
    get(&format!("http://{}{path}", p.addr)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verifies_against_the_configured_ca() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;

    // Verified against ca.pem, for the address's IP (no SNI for an IP).
    let p = proxy_to_tls(&ca, &up, "tls = true\nca = \"ca.pem\"").await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(up.last_sni(), Some(None));
    // Kept alive and pooled: a second request needs no new handshake.
    let handshakes = up.handshakes();
    let r = plain_get(&p, "/y").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(
        up.handshakes(),
        handshakes,
        "the pooled TLS connection was not reused"
    );
    drop(p);

    // A host name in `addr` is the name sent and verified.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"localhost:{}\"]\ntls = true\nca = \"ca.pem\"\n",
        up.addr.port()
    );
    let p = TestProxy::start_with_files(&[("ca.pem".into(), ca.pem())], &toml).await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(up.last_sni(), Some(Some("localhost".into())));
    drop(p);

    // server_name: sent as SNI and verified.
    let p = proxy_to_tls(
        &ca,
        &up,
        "tls = true\nca = \"ca.pem\"\nserver_name = \"localhost\"",
    )
    .await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    assert_eq!(up.last_sni(), Some(Some("localhost".into())));
    drop(p);

    // A name the certificate does not cover fails verification: 502.
    let hits = up.hits.load(Ordering::SeqCst);
    let p = proxy_to_tls(
        &ca,
        &up,
        "tls = true\nca = \"ca.pem\"\nserver_name = \"wrong.test\"",
    )
    .await;
    let r = plain_get(&p, "/x").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "a request went to an unverified server"
    );
    drop(p);

    // A certificate from a CA that ca.pem does not hold: 502.
    let other = Ca::new("other CA");
    let p = proxy_to_tls(&other, &up, "tls = true\nca = \"ca.pem\"").await;
    let r = plain_get(&p, "/x").await;
    assert_eq!(r.status, 502, "{}", r.text());
    drop(p);

    // insecure_skip_verify: any certificate, no CA needed.
    let p = proxy_to_tls(&other, &up, "tls = true\ninsecure_skip_verify = true").await;
    let r = plain_get(&p, "/x").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_upstream_ca_file_takes_effect_within_2s() {
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;
    // Starts with the wrong CA in ca.pem: nothing verifies. (Passive marking is kept out of
    // the way: a server that failed would otherwise rest for `fail_timeout`.)
    let keys = "tls = true\nca = \"ca.pem\"\n\n[upstreams.app.passive]\nmax_fails = 1000\n";
    let p = proxy_to_tls(&other, &up, keys).await;
    assert_eq!(plain_get(&p, "/").await.status, 502);

    replace(&p.file("ca.pem"), &ca.pem());
    let addr = p.addr;
    eventually(WITHIN, "the new CA file is used", || async move {
        get(&format!("http://{addr}/")).await.status == 200
    })
    .await;
    assert_eq!(plain_get(&p, "/").await.text(), "secure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_run_over_tls() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;
    let hc = "\n[upstreams.app.health_check]\npath = \"/health\"\ninterval = \"100ms\"\n\
              timeout = \"100ms\"\n";

    let p = proxy_to_tls(&ca, &up, &format!("tls = true\nca = \"ca.pem\"\n{hc}")).await;
    let start = up.health_hits.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(5),
        "three health checks over TLS",
        || {
            let h = Arc::clone(&up.health_hits);
            async move { h.load(Ordering::SeqCst) >= start + 3 }
        },
    )
    .await;
    assert!(
        healthy(&p).await,
        "checks over TLS pass: the server stays up"
    );
    let r = plain_get(&p, "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "secure"));
    drop(p);

    // Checks verify the certificate too: with a wrong name the server goes down.
    let p = proxy_to_tls(
        &ca,
        &up,
        &format!("tls = true\nca = \"ca.pem\"\nserver_name = \"wrong.test\"\n{hc}"),
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "an unverifiable server is marked down",
        || {
            let p = &p;
            async move { !healthy(p).await }
        },
    )
    .await;
    assert_eq!(plain_get(&p, "/").await.status, 503);
}

// ---------------------------------------------------------------------------------------
// 11. `fairway check` on certificates

/// `fairway check [extra] -c DIR/fairway.toml` with `toml` and `files` in a new directory.
fn check(files: &[(String, String)], toml: &str, extra: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("fairway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut args = vec!["check"];
    args.extend_from_slice(extra);
    args.extend(["-c", path.to_str().unwrap()]);
    (output(fairway(&args)), dir)
}

/// A config for `check` (nothing is bound) with `tls` as its `[server.tls]` part.
fn check_config(tls: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:8443\"\n\n{tls}\n\
         [upstreams.app]\nservers = [\"127.0.0.1:13000\"]\n"
    )
}

/// Runs `check`, expects exit 1 and each of `want` on stderr (`{dir}` is the directory).
fn check_fails(files: &[(String, String)], tls: &str, want: &[&str]) {
    let (o, dir) = check(files, &check_config(tls), &[]);
    assert_eq!(o.code, Some(1), "stdout: {} stderr: {}", o.stdout, o.stderr);
    for w in want {
        let w = w.replace("{dir}", dir.path().to_str().unwrap());
        assert!(o.stderr.contains(&w), "{w:?} not in stderr: {}", o.stderr);
    }
}

#[test]
fn check_accepts_good_certificates() {
    let ca = Ca::new("test CA");
    let mut files = ca.leaf(LOCAL).files("");
    let sni = ca.issue(&["api.test"], KeyKind::Ed25519, (2020, 1, 1), (2040, 1, 1));
    files.push(("api.pem".into(), sni.cert_pem));
    files.push(("api-key.pem".into(), sni.key_pem));
    let tls = format!(
        "{TLS}\n[[server.tls.certs]]\nserver_names = [\"api.test\"]\n\
         cert = \"api.pem\"\nkey = \"api-key.pem\"\n"
    );
    let (o, _dir) = check(&files, &check_config(&tls), &[]);
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
    assert!(o.stdout.contains("TLS"), "{}", o.stdout);
}

#[test]
fn check_names_a_missing_certificate_file() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(LOCAL);
    check_fails(
        &[("key.pem".into(), leaf.key_pem)],
        TLS,
        &["server.tls.cert", "{dir}/cert.pem"],
    );
}

#[test]
fn check_names_a_key_that_does_not_belong() {
    let ca = Ca::new("test CA");
    let (a, b) = (ca.leaf(LOCAL), ca.leaf(LOCAL));
    check_fails(
        &[
            ("cert.pem".into(), a.cert_pem),
            ("key.pem".into(), b.key_pem),
        ],
        TLS,
        &["does not belong", "{dir}/key.pem", "{dir}/cert.pem"],
    );
}

#[test]
fn check_refuses_an_expired_certificate() {
    let ca = Ca::new("test CA");
    let leaf = ca.issue(LOCAL, KeyKind::EcdsaP256, (2000, 1, 1), (2001, 1, 1));
    check_fails(
        &leaf.files(""),
        TLS,
        &["server.tls.cert", "expired", "2001-01-01"],
    );
}

#[test]
fn check_refuses_a_certificate_not_yet_valid() {
    let ca = Ca::new("test CA");
    let leaf = ca.issue(LOCAL, KeyKind::EcdsaP256, (2090, 1, 1), (2095, 1, 1));
    check_fails(
        &leaf.files(""),
        TLS,
        &["server.tls.cert", "not valid before", "2090-01-01"],
    );
}

#[test]
fn check_names_the_sni_entry_and_the_upstream_ca() {
    let ca = Ca::new("test CA");
    let mut files = ca.leaf(LOCAL).files("");
    let expired = ca.issue(
        &["api.test"],
        KeyKind::EcdsaP256,
        (2000, 1, 1),
        (2001, 1, 1),
    );
    files.push(("api.pem".into(), expired.cert_pem));
    files.push(("api-key.pem".into(), expired.key_pem));
    let tls = format!(
        "{TLS}\n[[server.tls.certs]]\nserver_names = [\"api.test\"]\n\
         cert = \"api.pem\"\nkey = \"api-key.pem\"\n"
    );
    check_fails(&files, &tls, &["server.tls.certs[0].cert", "expired"]);

    let toml = "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\n\
                servers = [\"127.0.0.1:13000\"]\ntls = true\nca = \"missing-ca.pem\"\n";
    let (o, _dir) = check(&[], toml, &[]);
    assert_eq!(o.code, Some(1), "stdout: {} stderr: {}", o.stdout, o.stderr);
    assert!(o.stderr.contains("upstreams.app.ca"), "{}", o.stderr);
    assert!(o.stderr.contains("missing-ca.pem"), "{}", o.stderr);
}

#[test]
fn check_refuses_upstream_tls_keys_without_tls() {
    for key in [
        "ca = \"ca.pem\"",
        "server_name = \"app.internal\"",
        "insecure_skip_verify = true",
    ] {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\n\
             servers = [\"127.0.0.1:13000\"]\n{key}\n"
        );
        let (o, _dir) = check(&[], &toml, &[]);
        assert_eq!(
            o.code,
            Some(1),
            "{key}: stdout: {} stderr: {}",
            o.stdout,
            o.stderr
        );
        let name = key.split(' ').next().unwrap();
        assert!(
            o.stderr.contains(&format!("upstreams.app.{name}")) && o.stderr.contains("tls = true"),
            "{key}: {}",
            o.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_probe_reaches_a_tls_upstream() {
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.leaf(LOCAL)).await;
    let files = vec![("ca.pem".to_owned(), ca.pem())];
    let toml = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\nservers = [\"{}\"]\n\
             tls = true\nca = \"ca.pem\"\n{extra}\n\
             [upstreams.app.health_check]\npath = \"/health\"\n",
            up.addr
        )
    };
    let (good, bad) = (toml(""), toml("server_name = \"wrong.test\""));
    let f2 = files.clone();
    let (o, _dir) = tokio::task::spawn_blocking(move || check(&f2, &good, &["--probe"]))
        .await
        .unwrap();
    assert_eq!(o.code, Some(0), "stdout: {} stderr: {}", o.stdout, o.stderr);
    assert!(up.health_hits.load(Ordering::SeqCst) >= 1);
    let (o, _dir) = tokio::task::spawn_blocking(move || check(&files, &bad, &["--probe"]))
        .await
        .unwrap();
    assert_eq!(o.code, Some(1), "stdout: {} stderr: {}", o.stdout, o.stderr);
}
