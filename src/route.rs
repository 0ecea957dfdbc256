//! The route table: which upstream a request goes to (CONTRACT §2 `[[routes]]`). Among the
//! routes that match both host and path, the most specific host wins (exact, then the
//! longest `*.suffix`, then any host), then the longest path prefix; prefixes match whole
//! path segments (`/api` matches `/api` and `/api/x`, not `/apix`).

use crate::config::RouteSection;

/// Routes sorted so that the first match is the best one.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// With no routes and exactly one upstream, every request goes to it.
    fallback: Option<usize>,
}

#[derive(Debug)]
struct Route {
    host: HostMatch,
    prefix: String,
    upstream: usize,
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
    let h = if authority.starts_with('[') {
        match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        }
    } else {
        match authority.rfind(':') {
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

impl RouteTable {
    /// Builds the table; `upstream_index(name)` maps validated names to indexes.
    pub fn build(
        routes: &[RouteSection],
        upstream_count: usize,
        upstream_index: impl Fn(&str) -> Option<usize>,
    ) -> RouteTable {
        let mut out: Vec<Route> = routes
            .iter()
            .filter_map(|r| {
                let upstream = upstream_index(&r.upstream)?;
                let host = match r.host.as_deref() {
                    None | Some("*") | Some("") => HostMatch::Any,
                    Some(h) => {
                        let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
                        match h.strip_prefix('*') {
                            Some(suffix) => HostMatch::Suffix(suffix.to_owned()),
                            None => HostMatch::Exact(h),
                        }
                    }
                };
                Some(Route {
                    host,
                    prefix: normalize_prefix(&r.path_prefix).to_owned(),
                    upstream,
                })
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
        RouteTable {
            routes: out,
            fallback,
        }
    }

    /// The upstream index for a request to `host` (without port) and `path`.
    pub fn lookup(&self, host: &str, path: &str) -> Option<usize> {
        if let Some(u) = self.fallback {
            return Some(u);
        }
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && prefix_matches(&r.prefix, path))
            .map(|r| r.upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(Option<&str>, &str, usize)]) -> RouteTable {
        let sections: Vec<RouteSection> = routes
            .iter()
            .map(|(h, p, u)| RouteSection {
                host: h.map(str::to_owned),
                path_prefix: (*p).to_owned(),
                upstream: u.to_string(),
            })
            .collect();
        RouteTable::build(&sections, 9, |n| n.parse().ok())
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
        let t = RouteTable::build(&[], 1, |_| Some(0));
        assert_eq!(t.lookup("anything", "/x"), Some(0));
        let t = RouteTable::build(&[], 2, |_| Some(0));
        assert_eq!(t.lookup("anything", "/x"), None);
    }

    #[test]
    fn host_only_strips_port() {
        assert_eq!(host_only("a.com:8080"), "a.com");
        assert_eq!(host_only("a.com."), "a.com");
        assert_eq!(host_only("[::1]:80"), "[::1]");
        assert_eq!(host_only("a.com"), "a.com");
    }
}
