//! The two error enums: [`ProxyError`] for the request path (each variant is one outcome of
//! CONTRACT §3, mapped to its status in one place) and [`ConfigError`] for loading and
//! validating a config file (file, line:column, key path and message).

use std::fmt;
use std::path::{Path, PathBuf};

use http::StatusCode;

/// Who caused a failed exchange (CONTRACT §3; SECURITY.md "attribution"). Only
/// [`Side::Upstream`] outcomes count as passive failures of a server or lead to a retry: a
/// client's fault is never a server's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: malformed or oversized request, stalled or abandoned body.
    Client,
    /// The server the request went to: connect failure, broken or invalid response, no
    /// answer in time.
    Upstream,
    /// Neither: the proxy answered by itself (no route, no healthy server, overload).
    Proxy,
}

/// What the client did wrong while sending its request body. Carried as the error of the
/// request body (see `upload::ClientBodyError`), so that an upstream connection that fails
/// because of it is recognised as the client's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Malformed body framing: a bad chunk size or line ending, chunk extensions or trailers
    /// over their limits, a chunk framing overhead far beyond the payload, an HTTP/2
    /// protocol or flow-control violation on the stream.
    Malformed(&'static str),
    /// The body grew past `max_body_bytes`.
    TooLarge,
    /// The body paused longer than `body_read_timeout`.
    Stalled,
    /// The client closed or reset its connection (or its HTTP/2 stream) mid-body.
    Gone,
}

impl ClientFault {
    /// The proxy error this fault is answered with.
    pub fn error(self) -> ProxyError {
        match self {
            ClientFault::Malformed(what) => ProxyError::BadBody(what),
            ClientFault::TooLarge => ProxyError::BodyTooLarge,
            ClientFault::Stalled => ProxyError::BodyTimeout,
            ClientFault::Gone => ProxyError::ClientGone,
        }
    }
}

/// The status logged and counted for a client that went away before it got an answer
/// (Nginx's 499 "client closed request").
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What went wrong while proxying one request. Every variant maps to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matched the request.
    #[error("no route for this request")]
    NoRoute,
    /// Every server of the upstream is down (or already tried).
    #[error("no healthy server in upstream")]
    NoHealthyServer,
    /// Circuit breaking: every server is at `max_connections_per_server`, or `max_pending`
    /// requests already wait for a connection.
    #[error("upstream overloaded: {0}")]
    Overloaded(&'static str),
    /// Connecting to a server failed or timed out.
    #[error("could not connect to {server}: {source}")]
    Connect {
        /// The server's `addr` as written.
        server: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The upstream broke off before a complete response head.
    #[error("upstream broke off: {0}")]
    UpstreamBroke(#[source] std::io::Error),
    /// The upstream answered something the proxy cannot pass on (a `101` nobody asked for,
    /// a response head with conflicting framing).
    #[error("unusable upstream response: {0}")]
    BadUpstreamResponse(&'static str),
    /// `request_timeout` passed before the response head arrived.
    #[error("upstream did not answer in time")]
    Timeout,
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request body is malformed (see [`ClientFault::Malformed`]).
    #[error("bad request body: {0}")]
    BadBody(&'static str),
    /// The request head is larger than `max_header_bytes`.
    #[error("request head too large")]
    HeadTooLarge,
    /// The request uses something the proxy does not implement: a transfer coding other
    /// than chunked (RFC 9112 §6.1).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    /// The request body is larger than `max_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
    /// The client paused longer than `body_read_timeout` while sending the body.
    #[error("request body timed out")]
    BodyTimeout,
    /// The client closed or reset its connection before the exchange ended.
    #[error("client went away")]
    ClientGone,
    /// The route's rate limit refused the request; a token is there again after this many
    /// whole seconds (at least 1).
    #[error("rate limited: retry after {0}s")]
    RateLimited(u64),
}

impl ProxyError {
    /// The status code the contract assigns to this outcome.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyServer => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamBroke(_) => StatusCode::BAD_GATEWAY,
            ProxyError::BadUpstreamResponse(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BadBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientGone => client_closed_request(),
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Who caused this outcome.
    pub fn side(&self) -> Side {
        match self {
            // A rate limit is the proxy's policy, not a malformed message: the connection
            // stays open, as with Nginx's limit_req.
            ProxyError::NoRoute
            | ProxyError::NoHealthyServer
            | ProxyError::Overloaded(_)
            | ProxyError::RateLimited(_) => Side::Proxy,
            ProxyError::Connect { .. }
            | ProxyError::UpstreamBroke(_)
            | ProxyError::BadUpstreamResponse(_)
            | ProxyError::Timeout => Side::Upstream,
            ProxyError::BadRequest(_)
            | ProxyError::BadBody(_)
            | ProxyError::HeadTooLarge
            | ProxyError::NotImplemented(_)
            | ProxyError::BodyTooLarge
            | ProxyError::BodyTimeout
            | ProxyError::ClientGone => Side::Client,
        }
    }

    /// The short text body sent to the client.
    pub fn text(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "404 not found: no route for this request\n",
            ProxyError::NoHealthyServer => "503 service unavailable: no healthy server\n",
            ProxyError::Overloaded(_) => "503 service unavailable: upstream overloaded\n",
            ProxyError::Connect { .. } => "502 bad gateway: could not connect to upstream\n",
            ProxyError::UpstreamBroke(_) => "502 bad gateway: upstream closed the connection\n",
            ProxyError::BadUpstreamResponse(_) => "502 bad gateway: invalid upstream response\n",
            ProxyError::Timeout => "504 gateway timeout: upstream did not answer in time\n",
            ProxyError::BadRequest(_) => "400 bad request\n",
            ProxyError::BadBody(_) => "400 bad request: malformed request body\n",
            ProxyError::HeadTooLarge => "431 request header fields too large\n",
            ProxyError::NotImplemented(_) => "501 not implemented: unsupported transfer coding\n",
            ProxyError::BodyTooLarge => "413 payload too large\n",
            ProxyError::BodyTimeout => "408 request timeout: request body stalled\n",
            ProxyError::ClientGone => "499 client closed request\n",
            ProxyError::RateLimited(_) => "429 too many requests: slow down and retry later\n",
        }
    }

    /// Whether the answer closes the client's connection: after a client's fault the
    /// framing of whatever follows on it is unknown (a body left unread, a malformed one),
    /// RFC 9112 §9.6 and HTTP1-RULES "after a 4xx for a malformed head or body".
    pub fn closes_connection(&self) -> bool {
        self.side() == Side::Client
    }
}

/// 499, which `http` has no constant for.
fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
}

/// A key path in the config: `upstreams.app.servers[1].weight`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl KeyPath {
    /// The empty path (the document itself).
    pub fn root() -> KeyPath {
        KeyPath(Vec::new())
    }

    /// Appends a table key.
    pub fn k(mut self, key: &str) -> KeyPath {
        self.0.push(Seg::Key(key.to_owned()));
        self
    }

    /// Appends an array index.
    pub fn i(mut self, index: usize) -> KeyPath {
        self.0.push(Seg::Index(index));
        self
    }

    /// Whether the path is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Converts serde_path_to_error's path.
    pub fn from_serde(p: &serde_path_to_error::Path) -> KeyPath {
        use serde_path_to_error::Segment;
        let mut out = KeyPath::root();
        for seg in p.iter() {
            out = match seg {
                Segment::Map { key } | Segment::Enum { variant: key } => out.k(key),
                Segment::Seq { index } => out.i(*index),
                Segment::Unknown => out,
            };
        }
        out
    }

    /// The byte range of the deepest value along this path that exists in `text`.
    fn span_in(&self, text: &str) -> Option<std::ops::Range<usize>> {
        let doc = toml::de::DeTable::parse(text).ok()?;
        let mut span = None;
        let mut cur: Option<&toml::de::DeValue<'_>> = None;
        let mut table = Some(doc.get_ref());
        for seg in &self.0 {
            let next = match (seg, table, cur) {
                (Seg::Key(k), Some(t), _) => t.get(k.as_str()),
                (Seg::Index(i), _, Some(toml::de::DeValue::Array(a))) => a.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            span = Some(next.span());
            cur = Some(next.get_ref());
            table = next.get_ref().as_table();
        }
        span
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if n == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// A config file that cannot be used. Displays as `FILE:LINE:COL: KEY: MESSAGE`.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line and column, where known.
    pub location: Option<(usize, usize)>,
    /// The key path, where known.
    pub key: Option<KeyPath>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((line, col)) = self.location {
            write!(f, ":{line}:{col}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = self.key.as_ref().filter(|k| !k.is_empty()) {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl ConfigError {
    /// The file could not be read.
    pub fn io(path: &Path, e: &std::io::Error) -> ConfigError {
        ConfigError {
            path: path.to_owned(),
            location: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        }
    }

    /// A TOML syntax or type error from the toml crate.
    pub fn toml(path: &Path, text: &str, key: Option<KeyPath>, e: &toml::de::Error) -> ConfigError {
        let mut message = e.message().trim().to_owned();
        if let Some(rest) = message.strip_prefix("unknown field") {
            message = format!("unknown key{rest}; check the spelling (unknown keys are errors)");
        }
        // toml places an error in an array element on the whole array; the key path then
        // points at the element itself, which is the more useful place to show.
        let at_key = key.as_ref().and_then(|k| k.span_in(text));
        let span = match (e.span(), at_key) {
            (Some(outer), Some(inner))
                if outer.start <= inner.start
                    && inner.end <= outer.end
                    && inner.len() < outer.len() =>
            {
                Some(inner)
            }
            (Some(outer), _) => Some(outer),
            (None, inner) => inner,
        };
        let location = span.map(|s| line_col(text, s.start));
        ConfigError {
            path: path.to_owned(),
            location,
            key,
            message,
        }
    }

    /// A semantic error at `key`, located in `text` by walking the document.
    pub fn at_key(path: &Path, text: &str, key: KeyPath, message: String) -> ConfigError {
        let location = key.span_in(text).map(|s| line_col(text, s.start));
        ConfigError {
            path: path.to_owned(),
            location,
            key: Some(key),
            message,
        }
    }

    /// An error that concerns the whole file or something outside it (a bind failure).
    pub fn other(path: &Path, key: Option<KeyPath>, message: String) -> ConfigError {
        ConfigError {
            path: path.to_owned(),
            location: None,
            key,
            message,
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_proxy_error_has_its_contract_status() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases = [
            (ProxyError::NoRoute, 404),
            (ProxyError::NoHealthyServer, 503),
            (ProxyError::Overloaded("x"), 503),
            (
                ProxyError::Connect {
                    server: "a:1".into(),
                    source: io(),
                },
                502,
            ),
            (ProxyError::BadUpstreamResponse("x"), 502),
            (ProxyError::Timeout, 504),
            (ProxyError::BadRequest("x"), 400),
            (ProxyError::HeadTooLarge, 431),
            (ProxyError::NotImplemented("x"), 501),
            (ProxyError::BodyTooLarge, 413),
            (ProxyError::BodyTimeout, 408),
            (ProxyError::BadBody("x"), 400),
            (ProxyError::ClientGone, 499),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e}");
            assert!(e.text().starts_with(&code.to_string()), "{e}");
            // A client's fault closes its connection; the proxy's and the upstream's do not.
            assert_eq!(e.closes_connection(), e.side() == Side::Client, "{e}");
        }
    }

    #[test]
    fn key_path_display() {
        let k = KeyPath::root()
            .k("upstreams")
            .k("app")
            .k("servers")
            .i(1)
            .k("weight");
        assert_eq!(k.to_string(), "upstreams.app.servers[1].weight");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
