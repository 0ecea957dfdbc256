//! Per-route header rules (CONTRACT §8 `request_headers`, `response_headers`): fields set
//! and removed after fairway's own, and the request ID every request carries.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::RawFields;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Fields set and removed, validated by `check` (no hop-by-hop field, nothing that frames
/// a message or that fairway forwards on the client's behalf).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// Set, replacing every field of the same name.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Removed.
    pub remove: Vec<HeaderName>,
}

impl HeaderRules {
    /// Builds the rules from validated names and values; names the config wrote in any case.
    pub fn new<'a>(
        set: impl IntoIterator<Item = (&'a str, &'a str)>,
        remove: impl IntoIterator<Item = &'a str>,
    ) -> HeaderRules {
        HeaderRules {
            set: set
                .into_iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            remove: remove
                .into_iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// Whether a field of this name is replaced or removed by the rules: the client's (or
    /// fairway's) own is then left out.
    pub fn overrides(&self, name: &HeaderName) -> bool {
        self.overrides_name(name.as_str().as_bytes())
    }

    /// [`HeaderRules::overrides`], for a name in lower case.
    pub fn overrides_name(&self, name: &[u8]) -> bool {
        let is = |n: &HeaderName| n.as_str().as_bytes() == name;
        self.remove.iter().any(is) || self.set.iter().any(|(n, _)| is(n))
    }

    /// Applies the rules to a message's fields.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// The request ID to forward: the one a trusted peer sent when it is 1–128 visible ASCII
/// characters (CONTRACT §8 `request_id`), else a new one.
pub fn request_id(fields: &RawFields, trusted: bool) -> HeaderValue {
    if trusted
        && let Some(v) = fields.only(b"x-request-id")
        && (1..=128).contains(&v.len())
        && v.iter().all(|c| (0x21..=0x7e).contains(c))
        && let Ok(v) = HeaderValue::from_maybe_shared(v)
    {
        return v;
    }
    new_request_id()
}

/// Puts the request's ID in a response's fields, marked never to be indexed by HTTP/2's
/// header compression: a value seen once would only push the fields worth keeping out of
/// the table, and each new one would be compared with every ID still in it.
pub fn put_request_id(headers: &mut HeaderMap, id: &HeaderValue) {
    let mut id = id.clone();
    id.set_sensitive(true);
    headers.insert(X_REQUEST_ID.clone(), id);
}

/// 128 random bits as 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::random();
    let mut out = [0u8; 32];
    for (pair, b) in out.chunks_exact_mut(2).zip(bits.to_be_bytes()) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    // Owned by a shared buffer from the start: the copies that go into the response and
    // the access log share it without another allocation. Hex digits are a valid value;
    // taken from the table, the compiler knows it too and leaves out the check of each
    // byte (digits computed by arithmetic cost 110 more instructions per ID, with it).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_id_replaces_any_and_is_never_indexed() {
        let mut h = HeaderMap::new();
        h.append(&X_REQUEST_ID, HeaderValue::from_static("from-upstream"));
        let id = new_request_id();
        put_request_id(&mut h, &id);
        let all: Vec<_> = h.get_all(&X_REQUEST_ID).iter().collect();
        assert_eq!(all, [&id]);
        assert!(all[0].is_sensitive());
    }

    #[test]
    fn a_new_id_is_32_lowercase_hex_digits_and_differs_each_time() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(
            a.as_bytes()
                .iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn an_id_is_kept_only_from_a_trusted_peer_and_only_when_well_formed() {
        let request_id =
            |h: &HeaderMap, trusted| request_id(&crate::headers::tests::lines(h), trusted);
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h, true), "abc-123");
        assert_ne!(request_id(&h, false), "abc-123");
        for bad in ["has space", "", &"x".repeat(129)] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            assert_ne!(request_id(&h, true), bad, "{bad:?}");
        }
        h.insert(
            &X_REQUEST_ID,
            HeaderValue::from_str(&"x".repeat(128)).unwrap(),
        );
        assert_eq!(request_id(&h, true).len(), 128);
        // Two IDs: neither is believed.
        h.append(&X_REQUEST_ID, HeaderValue::from_static("other"));
        assert_eq!(request_id(&h, true).len(), 32);
    }

    #[test]
    fn rules_remove_then_set() {
        let r = HeaderRules::new(
            [("Strict-Transport-Security", "max-age=63072000")],
            ["X-Powered-By"],
        );
        let mut h = HeaderMap::new();
        h.insert("x-powered-by", HeaderValue::from_static("Express"));
        h.append(
            "strict-transport-security",
            HeaderValue::from_static("max-age=1"),
        );
        h.append(
            "strict-transport-security",
            HeaderValue::from_static("max-age=2"),
        );
        r.apply(&mut h);
        assert!(!h.contains_key("x-powered-by"));
        let v: Vec<_> = h.get_all("strict-transport-security").iter().collect();
        assert_eq!(v, ["max-age=63072000"]);
        assert!(r.overrides(&HeaderName::from_static("x-powered-by")));
        assert!(!r.overrides(&HeaderName::from_static("server")));
    }
}
