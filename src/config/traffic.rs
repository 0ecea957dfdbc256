//! The sections and values of the traffic features (CONTRACT §8): compression, rate limits,
//! header rules and sticky cookies. Like `sections.rs`, serde fills them and `validate.rs` checks the
//! rest.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::units::{ByteSize, Dur};
use crate::compress::{Algorithm, Level};
use crate::error::KeyPath;
use crate::headers::HOP_BY_HOP;

/// A failed check: where, and what to change.
type Check = Result<(), (KeyPath, String)>;

/// Request fields that fairway itself sets (or that frame the request): a rule that set one
/// could forge the client's address or desynchronise the upstream connection.
const REQUEST_SET_REFUSED: [&str; 9] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-request-id",
    "forwarded",
    "content-length",
    "transfer-encoding",
];

/// Request fields no rule removes: HTTP/1.1 needs `Host`, and the body's framing is
/// fairway's.
const REQUEST_REMOVE_REFUSED: [&str; 3] = ["host", "content-length", "transfer-encoding"];

/// Which way a set of header rules applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `request_headers`.
    Request,
    /// `response_headers`.
    Response,
}

/// `[compression]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSection {
    /// Compress eligible responses (a route may override it).
    #[serde(default)]
    pub enabled: bool,
    /// The encodings fairway may use, in order of preference on a tie.
    #[serde(default = "algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Responses with a known length below this are sent as they are.
    #[serde(default = "min_length")]
    pub min_length: ByteSize,
    /// Media types compressed (`text/*` wildcards allowed).
    #[serde(default = "types")]
    pub types: Vec<String>,
    /// How hard to compress.
    #[serde(default)]
    pub level: Level,
}

impl Default for CompressionSection {
    fn default() -> Self {
        CompressionSection {
            enabled: false,
            algorithms: algorithms(),
            min_length: min_length(),
            types: types(),
            level: Level::default(),
        }
    }
}

fn algorithms() -> Vec<Algorithm> {
    vec![Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip]
}
fn min_length() -> ByteSize {
    ByteSize(1024)
}
fn types() -> Vec<String> {
    [
        "text/html",
        "text/css",
        "text/plain",
        "text/javascript",
        "application/javascript",
        "application/json",
        "application/xml",
        "image/svg+xml",
        "application/wasm",
    ]
    .map(String::from)
    .to_vec()
}

impl CompressionSection {
    /// Checks the lists; `at` is the section's key.
    pub fn check(&self, at: &KeyPath) -> Check {
        if self.algorithms.is_empty() {
            return Err((
                at.clone().k("algorithms"),
                "list at least one of \"zstd\", \"br\", \"gzip\", or set enabled = false".into(),
            ));
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            if self.algorithms[..i].contains(a) {
                return Err((
                    at.clone().k("algorithms").i(i),
                    format!("{} is listed twice: remove one", a.as_str()),
                ));
            }
        }
        for (i, t) in self.types.iter().enumerate() {
            let ok = match t.split_once('/') {
                Some((ty, sub)) => {
                    let token = |s: &str| {
                        !s.is_empty()
                            && s.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                    };
                    (token(ty) && (token(sub) || sub == "*")) || (ty == "*" && sub == "*")
                }
                None => false,
            };
            if !ok {
                return Err((
                    at.clone().k("types").i(i),
                    format!(
                        "{t:?} is not a media type: write type/subtype, such as \"text/html\" or \"text/*\" (no parameters)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A rate written as `"N/s"` or `"N/m"`, held in requests per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"10/s\" or \"600/m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Rate, E> {
                crate::limit::parse_rate(s).map(Rate).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Rate, E> {
                Err(E::custom(format!(
                    "a rate needs a unit: write \"{n}/s\" or \"{n}/m\", not {n}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// What requests are counted together by a rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// The client IP, after `trusted_proxies` and the PROXY protocol.
    ClientIp,
    /// The value of a request header (lowercase name); requests without it share one
    /// bucket.
    Header(http::HeaderName),
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "client_ip" {
            return Ok(RateKey::ClientIp);
        }
        let bad = || {
            de::Error::custom(format!(
                "\"{s}\" is not a rate limit key: write \"client_ip\" or \"header:NAME\", such as \"header:x-api-key\""
            ))
        };
        let name = s.strip_prefix("header:").ok_or_else(bad)?.trim();
        http::HeaderName::from_bytes(name.as_bytes())
            .map(RateKey::Header)
            .map_err(|_| bad())
    }
}

/// A route's `rate_limit = { rate, burst, key }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Requests per second refilled into a key's bucket.
    pub rate: Rate,
    /// The bucket size; the per-second rate rounded up (at least 1) when unset.
    #[serde(default)]
    pub burst: Option<u32>,
    /// What is counted together.
    #[serde(default = "client_ip")]
    pub key: RateKey,
}

fn client_ip() -> RateKey {
    RateKey::ClientIp
}

impl RateLimitSection {
    /// The bucket size in force.
    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| crate::limit::default_burst(self.rate.0))
    }
}

/// A route's `request_headers` or `response_headers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesSection {
    /// Fields set (replacing any of the same name).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Fields removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderRulesSection {
    /// Checks names, values and the fields no rule may touch; `at` is the section's key.
    pub fn check(&self, at: &KeyPath, dir: Direction) -> Check {
        for (name, value) in &self.set {
            let here = || at.clone().k("set").k(name);
            let lower = name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err((here(), format!("{name:?} is not a valid header name")));
            }
            let refused = match dir {
                Direction::Request => REQUEST_SET_REFUSED.contains(&lower.as_str()),
                Direction::Response => lower == "content-length",
            } || HOP_BY_HOP.contains(&lower.as_str());
            if refused {
                let why = match dir {
                    Direction::Request => {
                        "fairway sets it itself, or it frames the request or is hop-by-hop"
                    }
                    Direction::Response => "it frames the response or is hop-by-hop",
                };
                return Err((here(), format!("a rule may not set {name}: {why}")));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err((
                    here(),
                    format!(
                        "{value:?} is not a valid header value (no line breaks or control characters)"
                    ),
                ));
            }
            if self.remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                return Err((here(), format!("{name} is both set and removed: keep one")));
            }
        }
        for (i, name) in self.remove.iter().enumerate() {
            let here = || at.clone().k("remove").i(i);
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err((here(), format!("{name:?} is not a valid header name")));
            }
            if dir == Direction::Request
                && REQUEST_REMOVE_REFUSED.contains(&name.to_ascii_lowercase().as_str())
            {
                return Err((
                    here(),
                    format!("{name} cannot be removed: the request needs it to be read upstream"),
                ));
            }
        }
        Ok(())
    }
}

impl RateLimitSection {
    /// Checks the bucket size; `at` is the section's key.
    pub fn check(&self, at: &KeyPath) -> Check {
        if self.burst == Some(0) {
            return Err((
                at.clone().k("burst"),
                "0 would refuse every request: give 1 or more, or remove the key".into(),
            ));
        }
        Ok(())
    }
}

impl StickySection {
    /// Checks the cookie's attributes; `at` is the section's key.
    pub fn check(&self, at: &KeyPath) -> Check {
        // RFC 6265 §4.1.1: a cookie name is a token.
        if self.cookie.is_empty() || !self.cookie.bytes().all(crate::headers::is_tchar) {
            return Err((
                at.clone().k("cookie"),
                format!(
                    "{:?} is not a cookie name: use letters, digits and !#$%&'*+-.^_`|~",
                    self.cookie
                ),
            ));
        }
        if !self.path.starts_with('/')
            || self.path.bytes().any(|b| b == b';' || b.is_ascii_control())
        {
            return Err((
                at.clone().k("path"),
                format!(
                    "{:?} is not a cookie path: start with '/' and leave out ';'",
                    self.path
                ),
            ));
        }
        if matches!(self.max_age, Some(d) if d.0.as_secs() == 0) {
            return Err((
                at.clone().k("max_age"),
                "must be at least 1s; remove the key for a session cookie".into(),
            ));
        }
        if self.same_site == SameSite::None && self.secure == Secure::Never {
            return Err((
                at.clone().k("same_site"),
                "browsers drop a SameSite=None cookie without Secure: set secure = true or \"auto\", or use \"Lax\"".into(),
            ));
        }
        Ok(())
    }
}

/// `[upstreams.NAME.sticky]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickySection {
    /// The cookie's name.
    #[serde(default = "sticky_cookie")]
    pub cookie: String,
    /// `Max-Age`; a session cookie when unset.
    #[serde(default)]
    pub max_age: Option<Dur>,
    /// `Path`.
    #[serde(default = "slash")]
    pub path: String,
    /// `Secure`.
    #[serde(default)]
    pub secure: Secure,
    /// `HttpOnly`.
    #[serde(default = "yes")]
    pub http_only: bool,
    /// `SameSite`.
    #[serde(default)]
    pub same_site: SameSite,
}

fn sticky_cookie() -> String {
    "fairway_sticky".to_owned()
}
fn slash() -> String {
    "/".to_owned()
}
fn yes() -> bool {
    true
}

/// `secure = true | false | "auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Secure {
    /// Always `Secure`.
    Always,
    /// Never.
    Never,
    /// On requests that arrived over TLS.
    #[default]
    Auto,
}

impl<'de> Deserialize<'de> for Secure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Secure;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Secure, E> {
                Ok(if b { Secure::Always } else { Secure::Never })
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Secure, E> {
                if s == "auto" {
                    Ok(Secure::Auto)
                } else {
                    Err(E::custom(format!(
                        "\"{s}\" is not a choice: write true, false or \"auto\""
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `same_site = "Strict" | "Lax" | "None"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SameSite {
    /// `SameSite=Strict`.
    Strict,
    /// `SameSite=Lax`.
    #[default]
    Lax,
    /// `SameSite=None` (browsers want `Secure` with it).
    None,
}

impl SameSite {
    /// The attribute's value.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_defaults_to_the_per_second_rate_rounded_up() {
        let s = |rate: f64| RateLimitSection {
            rate: Rate(rate),
            burst: None,
            key: RateKey::ClientIp,
        };
        assert_eq!(s(10.0).burst(), 10);
        assert_eq!(s(2.5).burst(), 3);
        assert_eq!(s(0.5).burst(), 1);
    }
}
