//! The dashboard (CONTRACT §9): `GET /`, one self-contained HTML page (`dashboard.html`,
//! embedded in the binary, its script and style inline), and `GET /stats`, the `/status`
//! document plus each server's last minute from the stats sampler, which the page reads
//! every 2 s. The page is served with the `/stats` document of the moment in a data block,
//! so it shows every server at once, script or not yet. Its own POSTs (drain, maintenance,
//! reload) come from the admin listener's origin, so the cross-site guard lets them through.

use std::sync::OnceLock;
use std::time::UNIX_EPOCH;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::Body;
use crate::control::Control;
use crate::runtime::Runtime;

/// The page; [`INITIAL`] stands where the document of the moment goes.
const PAGE: &str = include_str!("dashboard.html");

/// The placeholder in the page's `<script type="application/json">` data block.
const INITIAL: &str = "INITIAL_STATS";

/// `GET /`: the page, with a Content-Security-Policy that lets only its own inline script
/// and style run (by their hashes), lets it fetch only from the admin listener, and keeps it
/// out of frames (its buttons act).
pub fn page(rt: &Runtime, control: &Control) -> Response<Body> {
    let data = script_safe(&document(rt, control).to_string());
    let mut r = Response::new(Body::full(PAGE.replacen(INITIAL, &data, 1)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CONTENT_SECURITY_POLICY, policy().clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// The page's Content-Security-Policy, computed once.
fn policy() -> &'static HeaderValue {
    static POLICY: OnceLock<HeaderValue> = OnceLock::new();
    POLICY.get_or_init(|| {
        let script = inline_hash(PAGE, "script");
        let style = inline_hash(PAGE, "style");
        let text = format!(
            "default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        );
        HeaderValue::from_str(&text).expect("a policy of ASCII words and base64")
    })
}

/// JSON that cannot end the `<script>` element it sits in: `<`, `>` and `&` occur only inside
/// strings, where their `\u` escapes mean the same.
fn script_safe(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// `'sha256-…'` of the text inside the page's first `<TAG>…</TAG>` element (no attributes:
/// the data block is `<script type=…>`), as a browser hashes it; `'none'` when there is no
/// such element.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let Some(start) = page.find(&open).map(|i| i + open.len()) else {
        return "'none'".to_owned();
    };
    let Some(len) = page[start..].find(&close) else {
        return "'none'".to_owned();
    };
    let text = &page.as_bytes()[start..start + len];
    let digest = ring::digest::digest(&ring::digest::SHA256, text);
    format!("'sha256-{}'", base64(digest.as_ref()))
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /stats`: the `/status` document; per server `rps`, `error_ratio`, `p50_ms`, `p99_ms`
/// over the last minute and its `history`; and `process_start_time`, `last_reload` and the
/// client listeners' `certificates`.
pub fn stats(rt: &Runtime, control: &Control) -> Response<Body> {
    let mut r = super::json(StatusCode::OK, &document(rt, control));
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The `/stats` document.
fn document(rt: &Runtime, control: &Control) -> serde_json::Value {
    let mut doc = super::status_with(rt, control, |s, fields| {
        let w = control.stats.window(&s.upstream, &s.addr);
        let history: Vec<serde_json::Value> = w
            .history
            .iter()
            .map(|p| serde_json::json!({ "rps": p.rps, "p99_ms": p.p99_ms }))
            .collect();
        for (key, value) in [
            ("rps", serde_json::json!(w.rps)),
            ("error_ratio", serde_json::json!(w.error_ratio)),
            ("p50_ms", serde_json::json!(w.p50_ms)),
            ("p99_ms", serde_json::json!(w.p99_ms)),
            ("history", serde_json::json!(history)),
        ] {
            fields.insert(key.to_owned(), value);
        }
    });
    let last_reload = control.last_reload().map(|r| {
        let at =
            r.at.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
        match r.result {
            Ok(version) => serde_json::json!({
                "result": "success", "at": at, "config_version": version, "error": null,
            }),
            Err(error) => serde_json::json!({
                "result": "failure", "at": at, "config_version": null, "error": error,
            }),
        }
    });
    let certificates: Vec<serde_json::Value> = rt
        .files
        .tls
        .server
        .iter()
        .flat_map(|t| &t.expiries)
        .map(|(name, at)| serde_json::json!({ "server_name": name, "expires_at": at }))
        .collect();
    if let serde_json::Value::Object(top) = &mut doc {
        for (key, value) in [
            (
                "process_start_time",
                serde_json::json!(control.ctx.metrics.process_start_time),
            ),
            (
                "window_seconds",
                serde_json::json!(crate::stats::WINDOW.as_secs()),
            ),
            ("last_reload", serde_json::json!(last_reload)),
            ("certificates", serde_json::json!(certificates)),
        ] {
            top.insert(key.to_owned(), value);
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_in_the_page_cannot_close_its_element() {
        let doc = serde_json::json!({ "name": "</script><script>alert(1)</script>&" });
        let safe = script_safe(&doc.to_string());
        assert!(!safe.contains('<') && !safe.contains('>') && !safe.contains('&'));
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn base64_of_known_values() {
        // RFC 4648 §10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn the_policy_hashes_the_inline_script_and_style() {
        // `echo -n 'a' | openssl dgst -sha256 -binary | base64`
        assert_eq!(
            inline_hash("<p><script>a</script>", "script"),
            "'sha256-ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs='"
        );
        assert_eq!(inline_hash("<p>", "style"), "'none'");
        let text = policy().to_str().unwrap();
        assert!(
            text.starts_with("default-src 'none'; script-src 'sha256-"),
            "{text}"
        );
        assert!(!text.contains("'none'; style-src 'none'"), "{text}");
        assert!(!text.contains("unsafe"), "{text}");
    }

    #[test]
    fn the_page_is_self_contained() {
        // One script and one style element, hashed as served: no carriage return (a browser
        // would hash the text with it normalized away). The data block is the other script.
        for tag in ["<script>", "<style>", "</style>"] {
            assert_eq!(PAGE.matches(tag).count(), 1, "{tag}");
        }
        assert_eq!(PAGE.matches("</script>").count(), 2);
        assert_eq!(PAGE.matches(INITIAL).count(), 1);
        let data = PAGE.find(INITIAL).unwrap();
        assert!(
            data < PAGE.find("<script>").unwrap(),
            "the data block comes first"
        );
        assert!(!PAGE.contains('\r'));
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://"));
        assert!(!PAGE.contains("<script src") && !PAGE.contains("<link rel=\"stylesheet"));
        // The page sets no style attribute: the policy would refuse it.
        assert!(!PAGE.contains(" style=\""));
        assert!(PAGE.contains("'/stats'"));
    }
}
