//! fairway: an HTTP load balancer and reverse proxy for a pool of identical application
//! nodes. The binary is a thin shell over this library, so tests and benches drive the same
//! code.
//!
//! # Layout
//! Layer by layer, bottom to top; a module imports only modules listed before it
//! (`docs/architecture.md` describes the layers, the path of a request and how a config is
//! applied).
//!
//! Pure modules:
//! - [`error`]: `ProxyError` (status, text, fault side), `ClientFault` and `ConfigError`.
//! - [`timing`]: the ticker of background tasks and a cheap random number.
//! - [`headers`]: hop-by-hop stripping, upgrades, response framing, HTTP/2 cookie crumbs; in
//!   `headers/forwarded.rs`, `X-Forwarded-*`, `Forwarded`, their underscore spellings and the
//!   client IP.
//! - [`compress`]: response compression: `Accept-Encoding` negotiation, which responses
//!   qualify, the compressed head, and the streaming gzip, brotli and zstd encoder.
//! - [`h1`]: the HTTP/1.1 wire format: request heads parsed from clients and written to
//!   upstreams, response heads parsed from upstreams and written to clients, body lengths,
//!   the chunked coding.
//! - [`workers`]: the threads that serve client connections, one event loop per core.
//! - [`stream`]: growing reads and a stream with bytes put back in front.
//! - [`wire`]: a client's HTTP/1.1 connection, held by its loop and shared with the body being
//!   read only while there is one.
//! - [`route`]: host and path-prefix routing on the normalized path.
//! - [`balance`]: smooth weighted round robin, `least_request` and the `ip_hash` ring.
//! - [`limit`]: rate limits (a token bucket per client key, bounded in memory) and open
//!   connections per client address.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers from trusted load balancers.
//! - [`metrics`]: Prometheus metrics and their pre-resolved handles.
//! - [`config`]: the TOML file, its units and validation.
//! - [`tls`]: rustls on the client listeners and towards upstreams.
//!
//! Upstream state:
//! - [`health`]: a server's health state and the active check's settings.
//! - [`upload`]: the client's request body on its way upstream; the client's faults.
//! - [`resolve`]: name resolution for servers given by host name.
//! - [`client`]: upstream connections, each exchange driven by its request's own task, and
//!   the per-server idle pool.
//! - [`server`]: one long-lived server (health, draining, in-flight count, pool).
//!
//! The snapshot:
//! - [`sticky`]: sticky sessions by cookie: server ids, the cookie read and set.
//! - [`upstream`]: a named pool as one snapshot sees it; server selection with backups.
//! - [`policy`]: what a route adds: its rate limit and header rules.
//! - [`runtime`]: the immutable snapshot built from a config.
//!
//! The data path:
//! - [`tunnel`]: upgraded (WebSocket) connections after a `101`.
//! - [`body`]: the response body types; the proxy's own short answers.
//! - [`maintenance`]: the maintenance switch.
//! - [`access`]: the access log and its writer task.
//! - [`context`]: what the data path shares (the snapshot, among others) and `ConnInfo`.
//! - [`proxy`]: route → select → forward with retries → response.
//! - [`connection`]: accept loop, PROXY protocol, TLS, fairway's own HTTP/1.1 server loop
//!   and its limits (`header_read_timeout`, `idle_timeout`, `send_timeout`); hyper's HTTP/2
//!   server (h2c and ALPN) with its watchdog.
//!
//! The control plane and background tasks:
//! - [`inherit`]: listening sockets handed over at start (systemd socket activation, a
//!   binary upgrade) and readiness notices to systemd.
//! - [`sockets`]: the bound listeners, reconciled by diff on reload.
//! - [`checker`]: the active health checker task and the probe.
//! - [`stats`]: the per-second samples of every server behind `/stats`: request rate, share of
//!   5xx and latency percentiles over the last minute.
//! - [`control`]: the control plane; `Control::apply` puts every config in force.
//! - [`dns`]: servers given by host name, re-resolved periodically.
//! - [`reload`]: the config file watcher.
//! - [`admin`]: the admin listener, its guard against cross-site requests, `/stats` and the
//!   dashboard page.
//!
//! The top:
//! - [`upgrade`]: `SIGUSR2`: a new fairway from the same executable, handed every listening
//!   socket; this one drains once it serves.
//! - [`app`]: starts the proxy and its background tasks; signals and graceful shutdown.
//! - [`demo`]: `fairway demo`.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

pub mod access;
pub mod admin;
pub mod app;
pub mod balance;
pub mod body;
pub mod checker;
pub mod client;
pub mod compress;
pub mod config;
pub mod connection;
pub mod context;
pub mod control;
pub mod demo;
pub mod dns;
pub mod error;
pub mod h1;
pub mod headers;
pub mod health;
pub mod inherit;
pub mod limit;
pub mod maintenance;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod resolve;
pub mod route;
pub mod runtime;
pub mod server;
pub mod sockets;
pub mod stats;
pub mod sticky;
pub mod stream;
pub mod timing;
pub mod tls;
pub mod tunnel;
pub mod upgrade;
pub mod upload;
pub mod upstream;
pub mod wire;
pub mod workers;

pub use app::{App, AppHandle};
pub use body::Body;
pub use config::Config;
