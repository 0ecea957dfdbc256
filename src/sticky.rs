//! Sticky sessions by cookie (CONTRACT §8 `[upstreams.NAME.sticky]`): each server's opaque
//! id, the cookie read from a request and the `Set-Cookie` that pins a client to a server.
//!
//! A server's id is a digest of its upstream's name and its address, so every replica with
//! the same upstream section gives a server the same id without sharing any state, and the
//! cookie never shows the address itself.

use http::HeaderValue;

use crate::config::{Secure, StickySection};
use crate::headers::RawFields;

/// Characters of a server id (hex digits of a digest).
const ID_LEN: usize = 16;

/// The id of server `addr` (as the snapshot names it: `IP:PORT` once resolved) of upstream
/// `upstream`: 64 bits of SHA-256, as 16 hex digits.
pub fn server_id(upstream: &str, addr: &str) -> Box<str> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"fairway sticky\0");
    ctx.update(upstream.as_bytes());
    ctx.update(b"\0");
    ctx.update(addr.as_bytes());
    let digest = ctx.finish();
    let mut out = String::with_capacity(ID_LEN);
    for b in &digest.as_ref()[..ID_LEN / 2] {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out.into_boxed_str()
}

/// The value of the first cookie called `name` among a request's `Cookie` fields (HTTP/2
/// may split them into several).
pub fn cookie_value<'a>(fields: &'a RawFields, name: &str) -> Option<&'a [u8]> {
    fields
        .all(b"cookie")
        .flat_map(|v| v.split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
        .map(|v| {
            v.strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v)
        })
}

/// An upstream's sticky cookie.
#[derive(Debug, Clone)]
pub struct Sticky {
    /// The cookie's name.
    pub cookie: String,
    /// `; Path=...; Max-Age=...; HttpOnly; SameSite=...`, written once.
    attributes: String,
    secure: Secure,
}

impl Sticky {
    /// The cookie a validated section describes.
    pub fn new(s: &StickySection) -> Sticky {
        let mut attributes = format!("; Path={}", s.path);
        if let Some(age) = s.max_age {
            attributes.push_str(&format!("; Max-Age={}", age.0.as_secs()));
        }
        if s.http_only {
            attributes.push_str("; HttpOnly");
        }
        attributes.push_str("; SameSite=");
        attributes.push_str(s.same_site.as_str());
        Sticky {
            cookie: s.cookie.clone(),
            attributes,
            secure: s.secure,
        }
    }

    /// The `Set-Cookie` value pinning a client to the server `id`; `tls` says whether the
    /// request arrived over TLS (for `secure = "auto"`).
    pub fn set_cookie(&self, id: &str, tls: bool) -> HeaderValue {
        let secure = match self.secure {
            Secure::Always => true,
            Secure::Never => false,
            Secure::Auto => tls,
        };
        let mut v =
            String::with_capacity(self.cookie.len() + id.len() + self.attributes.len() + 10);
        v.push_str(&self.cookie);
        v.push('=');
        v.push_str(id);
        v.push_str(&self.attributes);
        if secure {
            v.push_str("; Secure");
        }
        // Name, path and id were validated as cookie characters.
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, SameSite};
    use std::time::Duration;

    #[test]
    fn an_id_is_stable_opaque_and_differs_per_server_and_upstream() {
        let a = server_id("app", "10.0.0.1:13000");
        assert_eq!(a, server_id("app", "10.0.0.1:13000"));
        assert_eq!(a.len(), 16);
        assert!(!a.contains("10.0.0.1"));
        assert_ne!(a, server_id("app", "10.0.0.2:13000"));
        assert_ne!(a, server_id("api", "10.0.0.1:13000"));
    }

    #[test]
    fn the_cookie_is_found_among_others_and_split_fields() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; fairway_stickyx=no"),
        );
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("b=2;fairway_sticky=\"abc\" ; c=3"),
        );
        let h = RawFields::from_map(&h, &mut Default::default());
        assert_eq!(cookie_value(&h, "fairway_sticky"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(&h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie_value(&h, "missing"), None);
    }

    #[test]
    fn set_cookie_carries_the_attributes() {
        let mut s = StickySection {
            cookie: "srv".into(),
            max_age: Some(Dur(Duration::from_secs(7200))),
            path: "/app".into(),
            secure: Secure::Auto,
            http_only: true,
            same_site: SameSite::Strict,
        };
        let c = Sticky::new(&s);
        assert_eq!(
            c.set_cookie("0123", false),
            "srv=0123; Path=/app; Max-Age=7200; HttpOnly; SameSite=Strict"
        );
        assert!(
            c.set_cookie("0123", true)
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
        s.secure = Secure::Never;
        s.http_only = false;
        s.max_age = None;
        let c = Sticky::new(&s);
        assert_eq!(c.set_cookie("9", true), "srv=9; Path=/app; SameSite=Strict");
    }
}
