//! The route table: which upstream a request goes to (CONTRACT §2 `[[routes]]`). Among the
//! routes that match both host and path, the most specific host wins (exact, then the
//! longest `*.suffix`, then any host), then the longest path prefix; prefixes match whole
//! path segments (`/api` matches `/api` and `/api/x`, not `/apix`).
//!
//! Routes match the normalized path ([`normalize_path`]: unreserved escapes decoded, dot
//! segments removed), which is also the path sent upstream, so that the proxy and the
//! application resolve a request to the same place; [`RouteTable::route`] refuses a path
//! whose encoded `/` or encoded dot segments would route it elsewhere.

use std::borrow::Cow;

/// One `[[routes]]` entry, its upstream given by index.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec<'a> {
    /// `host`: exact, `*.suffix`, or any.
    pub host: Option<&'a str>,
    /// `path_prefix`, in normal form.
    pub path_prefix: &'a str,
    /// The upstream's index in the snapshot.
    pub upstream: usize,
}

/// Routes sorted so that the first match is the best one.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// With no routes and exactly one upstream, every request goes to it.
    fallback: Option<usize>,
    /// A route names a host: the request's host is looked at.
    by_host: bool,
}

#[derive(Debug)]
struct Route {
    host: HostMatch,
    prefix: String,
    target: Target,
}

/// Where a matching route sends a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    upstream: usize,
    /// The route's position in the config; none for the fallback.
    route: Option<usize>,
}

#[derive(Debug, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// Lowercase, no trailing dot.
    Exact(String),
    /// `.example.com` for `*.example.com`.
    Suffix(String),
}

impl HostMatch {
    fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(h) => (2, h.len()),
            HostMatch::Suffix(s) => (1, s.len()),
            HostMatch::Any => (0, 0),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

/// `"/api/"` → `"/api"`; `"/"` stays.
pub fn normalize_prefix(p: &str) -> &str {
    let t = p.trim_end_matches('/');
    if t.is_empty() { "/" } else { t }
}

/// The host part of a `Host` header or authority: no port, no trailing dot, IPv6 brackets
/// kept.
pub fn host_only(authority: &str) -> &str {
    // Searched as bytes: both are ASCII, and `str`'s char searcher costs more than the host.
    let b = authority.as_bytes();
    let h = if b.first() == Some(&b'[') {
        match b.iter().position(|&c| c == b']') {
            Some(i) => &authority[..=i],
            None => authority,
        }
    } else {
        match b.iter().rposition(|&c| c == b':') {
            Some(i) => &authority[..i],
            None => authority,
        }
    };
    h.strip_suffix('.').unwrap_or(h)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Why a request path is refused (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// A `..` segment climbs above the root (`/..`, `/a/../../b`).
    AboveRoot,
    /// The path routes differently once its encoded `/` (`%2F`) are decoded.
    EncodedSlash,
    /// The path routes differently when its encoded dot segments (`%2E%2E`) are taken as
    /// ordinary segments rather than removed.
    EncodedDotSegment,
}

impl BadPath {
    /// A short description for the log.
    pub fn reason(self) -> &'static str {
        match self {
            BadPath::AboveRoot => "path climbs above the root",
            BadPath::EncodedSlash => "an encoded '/' in the path would change the route",
            BadPath::EncodedDotSegment => {
                "an encoded dot segment in the path would change the route"
            }
        }
    }
}

/// A routed request: the upstream and the path to send it.
#[derive(Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    /// The upstream index in the snapshot.
    pub upstream: usize,
    /// The route's position in the config (`[[routes]]` entries in order); none when the
    /// only upstream takes every request for want of routes.
    pub route: Option<usize>,
    /// The normalized path; borrowed when it is the path as received.
    pub path: Cow<'a, str>,
}

/// The path as routed and sent upstream (RFC 3986 §6.2.2): `%XX` escapes of unreserved
/// characters decoded (§6.2.2.2), dot segments removed (§5.2.4). Only origin-form paths
/// (starting with `/`) are touched; `*` and the like come back unchanged. Other escapes stay
/// exactly as sent, hex case included, and so do malformed ones: they mean something only
/// to the application. Empty segments (`//`) stay. Unlike §5.2.4, a `..` with no segment
/// left to remove is an error rather than clamped at the root: the client names a place
/// outside the tree, and the proxy must not guess where the application puts it.
///
/// Runs on every request: a path without escapes or dot segments is returned borrowed
/// without allocating.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, BadPath> {
    normalize(path, false).map(|n| n.path)
}

/// The result of [`normalize`].
struct Normalized<'a> {
    path: Cow<'a, str>,
    /// A dot segment written (partly) encoded, such as `%2E%2E`, was removed.
    has_encoded_dots: bool,
}

/// [`normalize_path`]; with `literal_encoded_dots`, encoded dot segments are kept as
/// ordinary segments, as written, which is how a downstream that does not decode `%2E`
/// before resolving dot segments sees them.
fn normalize(path: &str, literal_encoded_dots: bool) -> Result<Normalized<'_>, BadPath> {
    let unchanged = |path| {
        Ok(Normalized {
            path: Cow::Borrowed(path),
            has_encoded_dots: false,
        })
    };
    let Some(rest) = path.strip_prefix('/') else {
        return unchanged(path);
    };
    // A dot segment always follows a `/` in an origin-form path.
    if !path.contains('%') && !path.contains("/.") {
        return unchanged(path);
    }
    if !rest.split('/').any(needs_normalizing) {
        return unchanged(path);
    }
    let mut kept: Vec<Cow<'_, str>> = Vec::new();
    let mut has_encoded_dots = false;
    // §5.2.4: a final `.` or `..` leaves the path ending in `/` (`/a/b/..` is `/a/`).
    let mut ends_in_slash = false;
    for segment in rest.split('/') {
        // RFC 3986 §6.2.2.2: an escaped unreserved character is that character.
        let decoded = decode(segment, is_unreserved);
        let is_dot = decoded == ".";
        let is_dot_dot = decoded == "..";
        ends_in_slash = is_dot || is_dot_dot;
        if !ends_in_slash {
            kept.push(decoded);
            continue;
        }
        let is_encoded = decoded != segment;
        if is_encoded && literal_encoded_dots {
            kept.push(Cow::Borrowed(segment));
            ends_in_slash = false;
            continue;
        }
        has_encoded_dots |= is_encoded;
        if is_dot_dot && kept.pop().is_none() {
            return Err(BadPath::AboveRoot);
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if ends_in_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Normalized {
        path: Cow::Owned(out),
        has_encoded_dots,
    })
}

/// Whether normalizing changes `segment`: it is a dot segment or has an unreserved escape.
fn needs_normalizing(segment: &str) -> bool {
    segment == "." || segment == ".." || escapes(segment).any(|(_, byte)| is_unreserved(byte))
}

/// RFC 3986 §2.3: ALPHA / DIGIT / `-` / `.` / `_` / `~`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The well-formed `%XX` escapes in `s`: their byte offset and the byte they stand for.
fn escapes(s: &str) -> impl Iterator<Item = (usize, u8)> + '_ {
    let b = s.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() {
            let at = i;
            if b[at] == b'%'
                && let (Some(hi), Some(lo)) = (hex(b.get(at + 1)), hex(b.get(at + 2)))
            {
                i = at + 3;
                return Some((at, (hi << 4) | lo));
            }
            i = at + 1;
        }
        None
    })
}

fn hex(b: Option<&u8>) -> Option<u8> {
    char::from(*b?)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// `s` with the escapes of the bytes that `decodes` selects replaced by those bytes (all of
/// them ASCII); borrowed when there are none.
fn decode(s: &str, decodes: impl Fn(u8) -> bool) -> Cow<'_, str> {
    let mut out: Option<String> = None;
    let mut copied = 0;
    for (at, byte) in escapes(s).filter(|&(_, b)| b.is_ascii() && decodes(b)) {
        let o = out.get_or_insert_with(|| String::with_capacity(s.len()));
        o.push_str(&s[copied..at]);
        o.push(char::from(byte));
        copied = at + 3;
    }
    match out {
        Some(mut o) => {
            o.push_str(&s[copied..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(s),
    }
}

impl RouteTable {
    /// Builds the table; `upstream_index(name)` maps validated names to indexes.
    pub fn build(routes: &[RouteSpec<'_>], upstream_count: usize) -> RouteTable {
        let mut out: Vec<Route> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let host = match r.host {
                    None | Some("*") | Some("") => HostMatch::Any,
                    Some(h) => {
                        let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
                        match h.strip_prefix('*') {
                            Some(suffix) => HostMatch::Suffix(suffix.to_owned()),
                            None => HostMatch::Exact(h),
                        }
                    }
                };
                Route {
                    host,
                    prefix: normalize_prefix(r.path_prefix).to_owned(),
                    target: Target {
                        upstream: r.upstream,
                        route: Some(i),
                    },
                }
            })
            .collect();
        // Stable: among equals, config order decides.
        out.sort_by(|a, b| {
            b.host
                .rank()
                .cmp(&a.host.rank())
                .then(b.prefix.len().cmp(&a.prefix.len()))
        });
        let fallback = (routes.is_empty() && upstream_count == 1).then_some(0);
        let by_host = out.iter().any(|r| r.host != HostMatch::Any);
        RouteTable {
            routes: out,
            fallback,
            by_host,
        }
    }

    /// Routes a request to `host` (without port) and `path` as received: `Ok(None)` when no
    /// route matches. The route is chosen on the normalized path ([`normalize_path`]), which
    /// is also the path to send. The proxy and the application must resolve a path to the
    /// same place, so a path is refused when a downstream reading its escapes differently
    /// would route it elsewhere:
    /// - with `%2F` decoded to `/` (and normalized again) it would take another route, or
    ///   climb above the root. Otherwise `%2F` stays encoded: applications use it inside ids;
    /// - with its encoded dot segments (`%2E%2E`, decoded as unreserved and then removed)
    ///   kept as ordinary segments, it would take another route.
    pub fn route<'a>(&self, host: &str, path: &'a str) -> Result<Option<Routed<'a>>, BadPath> {
        let n = normalize(path, false)?;
        let target = self.target(host, &n.path);
        if n.has_encoded_dots {
            let literal = normalize(path, true)?;
            if self.target(host, &literal.path) != target {
                return Err(BadPath::EncodedDotSegment);
            }
        }
        if let Cow::Owned(decoded) = decode(&n.path, |b| b == b'/') {
            let same =
                normalize(&decoded, false).is_ok_and(|d| self.target(host, &d.path) == target);
            if !same {
                return Err(BadPath::EncodedSlash);
            }
        }
        Ok(target.map(|t| Routed {
            upstream: t.upstream,
            route: t.route,
            path: n.path,
        }))
    }

    /// Whether a request's host can change where it goes: without a route that names a
    /// host, any host routes as an empty one.
    pub fn uses_host(&self) -> bool {
        self.by_host
    }

    /// The upstream index for a request to `host` (without port) and an already normalized
    /// `path`.
    pub fn lookup(&self, host: &str, path: &str) -> Option<usize> {
        self.target(host, path).map(|t| t.upstream)
    }

    /// The route a request to `host` and an already normalized `path` takes: two routes to
    /// the same upstream differ in their rate limits and header rules.
    fn target(&self, host: &str, path: &str) -> Option<Target> {
        if let Some(upstream) = self.fallback {
            return Some(Target {
                upstream,
                route: None,
            });
        }
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && prefix_matches(&r.prefix, path))
            .map(|r| r.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(Option<&str>, &str, usize)]) -> RouteTable {
        let specs: Vec<RouteSpec<'_>> = routes
            .iter()
            .map(|&(host, path_prefix, upstream)| RouteSpec {
                host,
                path_prefix,
                upstream,
            })
            .collect();
        RouteTable::build(&specs, 9)
    }

    #[test]
    fn only_a_table_with_a_route_by_host_uses_the_host() {
        assert!(!RouteTable::build(&[], 1).uses_host());
        assert!(!table(&[(None, "/", 0), (Some("*"), "/api", 1)]).uses_host());
        assert!(table(&[(None, "/", 0), (Some("app.example.com"), "/", 1)]).uses_host());
        assert!(table(&[(Some("*.example.com"), "/", 0)]).uses_host());
    }

    #[test]
    fn most_specific_host_then_longest_prefix() {
        let t = table(&[
            (None, "/", 0),
            (None, "/api", 1),
            (Some("*.example.com"), "/", 2),
            (Some("app.example.com"), "/", 3),
            (Some("app.example.com"), "/api/v2/", 4),
            (Some("*.b.example.com"), "/", 5),
        ]);
        assert_eq!(t.lookup("other.org", "/"), Some(0));
        assert_eq!(t.lookup("other.org", "/api/x"), Some(1));
        assert_eq!(t.lookup("other.org", "/apix"), Some(0));
        assert_eq!(t.lookup("x.example.com", "/api"), Some(2));
        assert_eq!(t.lookup("example.com", "/"), Some(0));
        assert_eq!(t.lookup("APP.example.com", "/api"), Some(3));
        assert_eq!(t.lookup("app.example.com", "/api/v2"), Some(4));
        assert_eq!(t.lookup("app.example.com", "/api/v2/users"), Some(4));
        assert_eq!(t.lookup("app.example.com", "/api/v20"), Some(3));
        assert_eq!(t.lookup("a.b.example.com", "/"), Some(5));
    }

    #[test]
    fn a_host_route_without_matching_prefix_falls_back_to_less_specific_hosts() {
        let t = table(&[(Some("a.com"), "/api", 1), (None, "/", 0)]);
        assert_eq!(t.lookup("a.com", "/api/x"), Some(1));
        assert_eq!(t.lookup("a.com", "/other"), Some(0));
    }

    #[test]
    fn no_match_is_none() {
        let t = table(&[(Some("a.com"), "/", 1)]);
        assert_eq!(t.lookup("b.com", "/"), None);
    }

    #[test]
    fn single_upstream_without_routes_takes_everything() {
        let t = RouteTable::build(&[], 1);
        assert_eq!(t.lookup("anything", "/x"), Some(0));
        let t = RouteTable::build(&[], 2);
        assert_eq!(t.lookup("anything", "/x"), None);
    }

    /// `normalize_path`, owned or borrowed, as a plain result.
    fn norm(path: &str) -> Result<String, BadPath> {
        normalize_path(path).map(Cow::into_owned)
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(norm("/./api/x").unwrap(), "/api/x");
        assert_eq!(norm("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(norm("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/a/..").unwrap(), "/");
        assert_eq!(norm("/.").unwrap(), "/");
        assert_eq!(norm("/a/../").unwrap(), "/");
        // Only whole segments are dot segments.
        assert_eq!(norm("/.well-known/x").unwrap(), "/.well-known/x");
        assert_eq!(norm("/a/..b/c.").unwrap(), "/a/..b/c.");
    }

    #[test]
    fn climbing_above_the_root_is_an_error() {
        assert_eq!(norm("/.."), Err(BadPath::AboveRoot));
        assert_eq!(norm("/../x"), Err(BadPath::AboveRoot));
        assert_eq!(norm("/a/../../b"), Err(BadPath::AboveRoot));
        assert_eq!(norm("/%2E%2E/x"), Err(BadPath::AboveRoot));
        assert_eq!(norm("/.%2e"), Err(BadPath::AboveRoot));
    }

    #[test]
    fn empty_segments_are_kept() {
        assert_eq!(norm("//a").unwrap(), "//a");
        assert_eq!(norm("/a//b/").unwrap(), "/a//b/");
        // An empty segment is a segment: `..` removes it (RFC 3986 §5.2.4).
        assert_eq!(norm("/a//../b").unwrap(), "/a/b");
        assert_eq!(norm("//..").unwrap(), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept_as_sent() {
        assert_eq!(norm("/%61pi").unwrap(), "/api");
        assert_eq!(norm("/%7Euser").unwrap(), "/~user");
        assert_eq!(norm("/%7euser/%2d%5F%2E%30").unwrap(), "/~user/-_.0");
        assert_eq!(norm("/a%2fb").unwrap(), "/a%2fb");
        assert_eq!(norm("/a%2Fb%20c%c3%A9").unwrap(), "/a%2Fb%20c%c3%A9");
        assert_eq!(norm("/%zz").unwrap(), "/%zz");
        assert_eq!(norm("/%4").unwrap(), "/%4");
        assert_eq!(norm("/%").unwrap(), "/%");
        assert_eq!(norm("/%%61").unwrap(), "/%a");
        // `%25` is `%`, not the start of another escape.
        assert_eq!(norm("/%2561").unwrap(), "/%2561");
        assert_eq!(norm("/é/%61").unwrap(), "/é/a");
    }

    #[test]
    fn encoded_dot_segments_are_dot_segments() {
        assert_eq!(norm("/a/%2E%2E/b").unwrap(), "/b");
        assert_eq!(norm("/a/%2e/b").unwrap(), "/a/b");
        assert_eq!(norm("/a/.%2E/b").unwrap(), "/b");
    }

    #[test]
    fn a_path_needing_nothing_is_borrowed() {
        for p in [
            "/",
            "/api/x",
            "/.well-known/x",
            "/a%2Fb%20c",
            "//a",
            "*",
            "",
        ] {
            assert!(
                matches!(normalize_path(p), Ok(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
    }

    #[test]
    fn only_origin_form_paths_are_normalized() {
        assert_eq!(norm("*").unwrap(), "*");
        assert_eq!(norm("a/../b").unwrap(), "a/../b");
    }

    fn routed(t: &RouteTable, path: &str) -> Result<Option<(usize, String)>, BadPath> {
        t.route("h", path)
            .map(|r| r.map(|r| (r.upstream, r.path.into_owned())))
    }

    #[test]
    fn routes_on_the_normalized_path_and_sends_it() {
        let t = table(&[(None, "/", 0), (None, "/api", 1)]);
        assert_eq!(routed(&t, "/./api/x"), Ok(Some((1, "/api/x".into()))));
        assert_eq!(routed(&t, "/%61pi/x"), Ok(Some((1, "/api/x".into()))));
        assert_eq!(
            routed(&t, "/public/../api/x"),
            Ok(Some((1, "/api/x".into())))
        );
        assert_eq!(routed(&t, "/api/../x"), Ok(Some((0, "/x".into()))));
        assert_eq!(routed(&t, "/../x"), Err(BadPath::AboveRoot));
        let r = t.route("h", "/api/x").unwrap().unwrap();
        assert!(matches!(r.path, Cow::Borrowed("/api/x")));
    }

    #[test]
    fn an_encoded_dot_segment_must_not_change_the_route() {
        let t = table(&[(None, "/public", 0), (None, "/api", 1)]);
        assert_eq!(
            routed(&t, "/public/%2E%2E/api/x"),
            Err(BadPath::EncodedDotSegment)
        );
        assert_eq!(
            routed(&t, "/public/.%2e/api/x"),
            Err(BadPath::EncodedDotSegment)
        );
        assert_eq!(
            routed(&t, "/api/%2E%2E/api/x"),
            Ok(Some((1, "/api/x".into())))
        );
        assert_eq!(routed(&t, "/api/%2E/x"), Ok(Some((1, "/api/x".into()))));
        // Taken literally, `/%2E/api/x` is under no route, while normalized it is `/api/x`.
        assert_eq!(routed(&t, "/%2E/api/x"), Err(BadPath::EncodedDotSegment));
        // A literal `..` is not suspicious: every reader resolves it the same way.
        assert_eq!(
            routed(&t, "/public/../api/x"),
            Ok(Some((1, "/api/x".into())))
        );
    }

    #[test]
    fn an_encoded_slash_must_not_change_the_route() {
        let t = table(&[(None, "/", 0), (None, "/api/x", 1), (None, "/files", 2)]);
        assert_eq!(routed(&t, "/api%2Fx"), Err(BadPath::EncodedSlash));
        assert_eq!(routed(&t, "/api%2fx/y"), Err(BadPath::EncodedSlash));
        assert_eq!(
            routed(&t, "/files/a%2Fb"),
            Ok(Some((2, "/files/a%2Fb".into())))
        );
        // Decoded, `/x/../files` is under `/files`.
        assert_eq!(routed(&t, "/x%2F..%2Ffiles"), Err(BadPath::EncodedSlash));
        assert_eq!(
            routed(&t, "/files/x%2F..%2Fy"),
            Ok(Some((2, "/files/x%2F..%2Fy".into())))
        );
        // Decoded, it climbs above the root.
        assert_eq!(
            routed(&t, "/files/..%2F..%2Fetc"),
            Err(BadPath::EncodedSlash)
        );
        // `%252F` is an encoded `%` followed by `2F`.
        assert_eq!(routed(&t, "/api%252Fx"), Ok(Some((0, "/api%252Fx".into()))));
    }

    #[test]
    fn a_miss_and_a_hit_differ() {
        let t = table(&[(None, "/api", 1)]);
        assert_eq!(routed(&t, "/x/%2E%2E/api"), Err(BadPath::EncodedDotSegment));
        assert_eq!(routed(&t, "/x%2F..%2Fapi"), Err(BadPath::EncodedSlash));
        assert_eq!(routed(&t, "/x"), Ok(None));
        assert_eq!(routed(&t, "/x/a%2Fb"), Ok(None));
    }

    #[test]
    fn host_only_strips_port() {
        assert_eq!(host_only("a.com:8080"), "a.com");
        assert_eq!(host_only("a.com."), "a.com");
        assert_eq!(host_only("[::1]:80"), "[::1]");
        assert_eq!(host_only("a.com"), "a.com");
    }
}
