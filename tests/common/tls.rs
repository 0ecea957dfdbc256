//! TLS seen from both sides of the proxy: a client that trusts the test CA (or anything),
//! HTTP/1.1 and HTTP/2 connections over it, and an upstream that speaks TLS.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fairway::tls::{NoVerification, provider};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::Reply;
use super::pki::{Ca, Leaf};

/// Bound on any single network step, so that a bug fails a test instead of hanging it.
pub const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// A TLS client

/// A client config trusting only `ca`, offering `alpn`.
pub fn trusting(ca: &Ca, alpn: &[&str]) -> Arc<ClientConfig> {
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
pub fn trusting_anything() -> Arc<ClientConfig> {
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
pub async fn connect(
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
pub fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref()
        .1
        .peer_certificates()
        .expect("no peer certificate")[0]
        .to_vec()
}

/// The certificate a new handshake for `name` gets, or `None` if it fails.
pub async fn served_cert(addr: SocketAddr, name: &str, cfg: &Arc<ClientConfig>) -> Option<Vec<u8>> {
    connect(addr, name, cfg).await.ok().map(|s| peer_cert(&s))
}

/// An HTTP connection over TLS: HTTP/1.1 (requests carry `Host: localhost`) or HTTP/2
/// (requests carry `https://localhost` as `:scheme`/`:authority`).
pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

pub async fn http1(s: TlsStream<TcpStream>) -> Conn {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    Conn::H1(sender)
}

pub async fn http2(s: TlsStream<TcpStream>) -> Conn {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    Conn::H2(sender)
}

impl Conn {
    /// A request builder for `path` that suits the protocol.
    pub fn request(&self, path: &str) -> http::request::Builder {
        match self {
            Conn::H1(_) => Request::get(path).header("host", "localhost"),
            Conn::H2(_) => Request::get(format!("https://localhost{path}")),
        }
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        let req = self.request(path).body(Full::default()).unwrap();
        self.send(req).await
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Reply {
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

    pub fn clone_h2(&self) -> Conn {
        match self {
            Conn::H2(s) => Conn::H2(s.clone()),
            Conn::H1(_) => panic!("an HTTP/1.1 connection carries one request at a time"),
        }
    }
}

/// A new TLS connection trusting `ca`, one GET of `path` on it.
pub async fn https_get(addr: SocketAddr, ca: &Ca, path: &str) -> Reply {
    let s = connect(addr, "localhost", &trusting(ca, &["http/1.1"]))
        .await
        .unwrap();
    http1(s).await.get(path).await
}

// ---------------------------------------------------------------------------------------
// A TLS upstream: answers `secure` on any path, 200 `ok` on /health

pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub health_hits: Arc<AtomicUsize>,
    /// The SNI name of every completed handshake (`None`: the client sent none).
    sni: Arc<Mutex<Vec<Option<String>>>>,
    stop: CancellationToken,
}

impl TlsUpstream {
    pub async fn start(leaf: &Leaf) -> TlsUpstream {
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

    pub fn handshakes(&self) -> usize {
        self.sni.lock().unwrap().len()
    }

    pub fn last_sni(&self) -> Option<Option<String>> {
        self.sni.lock().unwrap().last().cloned()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
