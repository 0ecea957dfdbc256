//! fairway: an HTTP load balancer and reverse proxy for a pool of identical application
//! nodes. The binary is a thin shell over this library, so tests and benches drive the same
//! code.
//!
//! # Layout
//! In data-path order:
//! - [`app`]: starts listeners and background tasks; reload and graceful shutdown.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers from trusted load balancers.
//! - [`listener`]: accept loop, hyper-util auto server (HTTP/1.1 + h2c), per-connection
//!   watchdog for `header_read_timeout` and `idle_timeout`.
//! - [`listeners`]: the bound listeners, reconciled by diff on reload.
//! - [`reload`]: file watcher and the one reload path.
//! - [`maintenance`]: the maintenance switch.
//! - [`proxy`]: route → select → forward with retries → response.
//! - [`tunnel`]: upgraded (WebSocket) connections after a `101`.
//! - [`headers`]: hop-by-hop stripping, HTTP/2 cookie crumbs; in `headers/forwarded.rs`,
//!   `X-Forwarded-*`, `Forwarded`, their underscore spellings and the client IP.
//! - [`route`]: host and path-prefix routing on the normalized path.
//! - [`upstream`]: a named pool as one snapshot sees it; server selection with backups.
//! - [`balance`]: smooth weighted round robin and the `ip_hash` ring.
//! - [`dns`]: servers given by host name, resolved periodically.
//! - [`server`]: one long-lived server (health, in-flight count, pool).
//! - [`client`]: upstream connections and the per-server idle pool.
//! - [`health`]: health state, active checker task, probe.
//! - [`tls`]: rustls on the client listeners and towards upstreams.
//! - [`body`]: the streaming body types.
//! - [`config`]: the TOML file, its units and validation.
//! - [`runtime`]: the immutable snapshot built from a config.
//! - [`access`]: the access log and its writer task.
//! - [`admin`]: the admin listener and its guard against cross-site requests.
//! - [`metrics`]: Prometheus metrics and their pre-resolved handles.
//! - [`error`]: `ProxyError` and `ConfigError`.
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
pub mod config;
pub mod connection;
pub mod context;
pub mod control;
pub mod demo;
pub mod dns;
pub mod error;
pub mod headers;
pub mod health;
pub mod maintenance;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod resolve;
pub mod route;
pub mod runtime;
pub mod server;
pub mod sockets;
pub mod timing;
pub mod tls;
pub mod tunnel;
pub mod upload;
pub mod upstream;

pub use app::{App, AppHandle};
pub use body::Body;
pub use config::Config;
