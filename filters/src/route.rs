//! Route matching and forbidden targets.

use std::borrow::Cow;

use http::Method;
use sidecar_config::Upstream;

use crate::path::{normalize, PathError};

/// What the router needs to know of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Request method.
    pub method: &'a Method,
    /// Path of the request target (no query), as the client sent it: the router normalises it.
    pub path: &'a str,
    /// Authority of an absolute-form target (`GET http://host/x`), if the client sent one.
    pub absolute_authority: Option<&'a str>,
    /// `Host` header (or `:authority`).
    pub host: Option<&'a str>,
}

/// The router's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// Forward to `upstreams[index]` with this path (before the query).
    Upstream {
        /// Index into the configured upstreams.
        index: usize,
        /// The client's path, normalised ([`normalize`]): what the route and the rate limits
        /// match. Borrowed when the client's path was already normal.
        normalized: Cow<'a, str>,
        /// Path to send upstream: the normalised path, prefix stripped and base path prepended
        /// as configured; `None` when that is the client's path unchanged.
        path: Option<String>,
    },
    /// A target the sidecar must never reach for (`forbidden_target`).
    Forbidden(&'static str),
    /// A path that escapes its route or cannot be normalised (`bad_request`).
    BadPath(PathError),
    /// No route takes the path (`no_route`).
    NoRoute,
}

struct Compiled {
    prefix: String,
    host: Option<String>,
    strip: bool,
    base_path: String,
}

/// The compiled route table; built once per config.
pub struct Routes {
    routes: Vec<Compiled>,
    /// Authorities an absolute-form target may name: host (lowercase) and port, `None` for
    /// any port (`match.host` names).
    known: Vec<(String, Option<u16>)>,
    /// Some route has `match.host`.
    any_host_route: bool,
}

/// The authority of an absolute-form request target (`http://host:port/path`), from the raw
/// request line: proxies may normalise the parsed URI to its path.
pub fn absolute_form_authority(raw_target: &[u8]) -> Option<&str> {
    // The origin form (`/path`), what nearly every request has: no scheme to look for.
    if raw_target.first() == Some(&b'/') {
        return None;
    }
    let text = std::str::from_utf8(raw_target).ok()?;
    let scheme_end = text.find("://")?;
    let scheme = &text[..scheme_end];
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let rest = &text[scheme_end + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Splits `host[:port]` (IPv6 in brackets).
fn split_authority(authority: &str) -> (String, Option<u16>) {
    let host = strip_port(authority).to_ascii_lowercase();
    let port = authority
        .rsplit_once(':')
        .filter(|(h, _)| !h.is_empty() && (!authority.starts_with('[') || h.ends_with(']')))
        .and_then(|(_, p)| p.parse().ok());
    (host, port)
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// `prefix` matches `path` on a segment boundary; the empty prefix is `/`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

impl Routes {
    /// Compiles the upstream list.
    pub fn new(upstreams: &[Upstream]) -> Routes {
        let mut known = Vec::new();
        for u in upstreams {
            known.push((u.host.to_ascii_lowercase(), Some(u.port)));
            if let Some(h) = &u.match_host {
                known.push((h.clone(), None));
            }
        }
        Routes {
            routes: upstreams
                .iter()
                .map(|u| Compiled {
                    // Matched against normalised paths, so normalised the same way: a
                    // prefix written `/a//b` or `/a/./b` must not silently never match.
                    prefix: normalize(&u.path_prefix)
                        .map_or_else(|_| u.path_prefix.clone(), Cow::into_owned),
                    host: u.match_host.clone(),
                    strip: u.strip_prefix,
                    base_path: u.base_path.clone(),
                })
                .collect(),
            known,
            any_host_route: upstreams.iter().any(|u| u.match_host.is_some()),
        }
    }

    /// Picks the route for the normalised path: host matches win over path-only routes, then
    /// the longest prefix, then file order.
    pub fn route<'a>(&self, req: &RequestView<'a>) -> Route<'a> {
        if req.method == Method::CONNECT {
            return Route::Forbidden("CONNECT is not supported: the sidecar is not an open proxy");
        }
        let host = match req.absolute_authority {
            Some(authority) => {
                let (h, port) = split_authority(authority);
                let port = port.unwrap_or(80);
                let allowed = self
                    .known
                    .iter()
                    .any(|(kh, kp)| *kh == h && kp.is_none_or(|p| p == port));
                if !allowed {
                    return Route::Forbidden(
                        "the absolute-form target is not a configured upstream",
                    );
                }
                Some(h)
            }
            // The Host header only matters when some route matches on it: no work otherwise.
            None if self.any_host_route => req.host.map(|h| strip_port(h).to_ascii_lowercase()),
            None => None,
        };
        // Everything below (matching, stripping, joining to the base path) works on the
        // normalised path: it has no dot segment, so it cannot climb out of the base path.
        let normalized = match normalize(req.path) {
            Ok(p) => p,
            Err(e) => return Route::BadPath(e),
        };
        let mut best: Option<(usize, (bool, usize))> = None;
        for (i, r) in self.routes.iter().enumerate() {
            let host_ok = match &r.host {
                Some(want) => host.as_deref() == Some(want.as_str()),
                None => true,
            };
            if !host_ok || !prefix_matches(&r.prefix, &normalized) {
                continue;
            }
            let rank = (r.host.is_some(), r.prefix.len());
            if best.is_none_or(|(_, b)| rank > b) {
                best = Some((i, rank));
            }
        }
        let Some((index, _)) = best else {
            return Route::NoRoute;
        };
        let r = &self.routes[index];
        let rest = if r.strip {
            &normalized[r.prefix.len()..]
        } else {
            &normalized
        };
        let path = if r.base_path.is_empty() && !r.strip {
            match &normalized {
                Cow::Borrowed(_) => None,
                Cow::Owned(p) => Some(p.clone()),
            }
        } else {
            let rest = if rest.is_empty() { "/" } else { rest };
            Some(if r.base_path.is_empty() {
                rest.to_string()
            } else {
                format!("{}{}", r.base_path, rest)
            })
        };
        Route::Upstream {
            index,
            normalized,
            path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidecar_config::Config;

    fn routes() -> Routes {
        let yaml = r#"
upstreams:
  - { name: root, url: "http://127.0.0.1:1" }
  - { name: api, url: "http://127.0.0.1:2/v1/", match: { path_prefix: /api, strip_prefix: true } }
  - { name: apikeep, url: "http://127.0.0.1:3", match: { path_prefix: /api/keep } }
  - { name: hub, url: "http://10.0.0.9:4", match: { host: hub.local } }
"#;
        Routes::new(&Config::parse(yaml, "t.yaml").unwrap().upstreams)
    }

    /// Index and forwarded path of an upstream route.
    fn fwd(route: Route<'_>) -> (usize, Option<String>) {
        match route {
            Route::Upstream { index, path, .. } => (index, path),
            other => panic!("not an upstream route: {other:?}"),
        }
    }

    fn view<'a>(method: &'a Method, path: &'a str, host: Option<&'a str>) -> RequestView<'a> {
        RequestView {
            method,
            path,
            absolute_authority: None,
            host,
        }
    }

    #[test]
    fn longest_prefix_and_strip() {
        let r = routes();
        let get = Method::GET;
        assert_eq!(fwd(r.route(&view(&get, "/x", None))), (0, None));
        assert_eq!(
            fwd(r.route(&view(&get, "/api/items/1", None))),
            (1, Some("/v1/items/1".into()))
        );
        assert_eq!(
            fwd(r.route(&view(&get, "/api", None))),
            (1, Some("/v1/".into()))
        );
        assert_eq!(fwd(r.route(&view(&get, "/api/keep/x", None))), (2, None));
        // Segment boundary: /apix is not under /api.
        assert_eq!(fwd(r.route(&view(&get, "/apix", None))), (0, None));
    }

    #[test]
    fn host_match_wins_and_ignores_port_and_case() {
        let r = routes();
        let get = Method::GET;
        assert_eq!(
            fwd(r.route(&view(&get, "/api/x", Some("Hub.Local:8080")))),
            (3, None)
        );
        assert_eq!(
            fwd(r.route(&view(&get, "/x", Some("127.0.0.1:8080")))),
            (0, None)
        );
    }

    #[test]
    fn connect_and_foreign_absolute_targets_are_forbidden() {
        let r = routes();
        assert!(matches!(
            r.route(&view(&Method::CONNECT, "/", None)),
            Route::Forbidden(_)
        ));
        let get = Method::GET;
        let foreign = RequestView {
            absolute_authority: Some("evil.example.com:80"),
            ..view(&get, "/x", None)
        };
        assert!(matches!(r.route(&foreign), Route::Forbidden(_)));
        let known = RequestView {
            absolute_authority: Some("hub.local"),
            ..view(&get, "/x", None)
        };
        assert_eq!(fwd(r.route(&known)), (3, None));
    }

    #[test]
    fn prefixes_are_normalised_like_the_paths_they_match() {
        let yaml = "upstreams:\n  - { name: a, url: \"http://127.0.0.1:1\", match: { path_prefix: /a//./b } }\n";
        let r = Routes::new(&Config::parse(yaml, "t.yaml").unwrap().upstreams);
        assert_eq!(fwd(r.route(&view(&Method::GET, "/a/b/x", None))), (0, None));
    }

    #[test]
    fn no_route_without_catch_all() {
        let yaml = "upstreams:\n  - { name: a, url: \"http://127.0.0.1:1\", match: { path_prefix: /a } }\n";
        let r = Routes::new(&Config::parse(yaml, "t.yaml").unwrap().upstreams);
        assert_eq!(r.route(&view(&Method::GET, "/b", None)), Route::NoRoute);
        assert_eq!(fwd(r.route(&view(&Method::GET, "/a/b", None))), (0, None));
    }

    #[test]
    fn absolute_form_must_name_an_upstream_with_its_port() {
        let r = routes();
        let get = Method::GET;
        let abs = |a: &'static str, p: &'static str| RequestView {
            method: &Method::GET,
            path: p,
            absolute_authority: Some(a),
            host: None,
        };
        let _ = &get;
        assert!(matches!(
            r.route(&abs("127.0.0.1:9", "/x")),
            Route::Forbidden(_)
        ));
        assert!(matches!(
            r.route(&abs("127.0.0.1", "/x")),
            Route::Forbidden(_)
        ));
        assert_eq!(
            fwd(r.route(&abs("127.0.0.1:2", "/api/x"))),
            (1, Some("/v1/x".into()))
        );
        assert_eq!(
            split_authority("[::1]:8080"),
            ("::1".to_string(), Some(8080))
        );
        assert_eq!(
            split_authority("Example.com"),
            ("example.com".to_string(), None)
        );
    }

    fn based() -> Routes {
        let yaml = r#"
upstreams:
  - { name: base, url: "http://127.0.0.1:1/api" }
  - { name: v1, url: "http://127.0.0.1:2/v1", match: { path_prefix: /s, strip_prefix: true } }
  - { name: keep, url: "http://127.0.0.1:3", match: { path_prefix: /keep } }
"#;
        Routes::new(&Config::parse(yaml, "t.yaml").unwrap().upstreams)
    }

    #[test]
    fn routes_and_forwards_the_normalised_path() {
        let r = based();
        let get = Method::GET;
        let cases: &[(&str, usize, Option<&str>)] = &[
            ("/b/../__log", 0, Some("/api/__log")),
            ("/x", 0, Some("/api/x")),
            ("/s/x/../y", 1, Some("/v1/y")),
            ("/s/%2e%2e/keep/x", 2, Some("/keep/x")),
            ("/keep/./x", 2, Some("/keep/x")),
            ("/keep//x", 2, Some("/keep/x")),
            ("/keep/x", 2, None),
        ];
        for (path, index, forward) in cases {
            let got = fwd(r.route(&view(&get, path, None)));
            assert_eq!(got, (*index, forward.map(String::from)), "{path}");
        }
        // What the rate limits match: the normalised client path, borrowed when unchanged.
        match r.route(&view(&get, "/keep/x/../History/a", None)) {
            Route::Upstream { normalized, .. } => assert_eq!(normalized, "/keep/History/a"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.route(&view(&get, "/keep/History/a", None)),
            Route::Upstream {
                normalized: Cow::Borrowed("/keep/History/a"),
                ..
            }
        ));
    }

    #[test]
    fn a_path_that_escapes_is_a_bad_path() {
        let r = based();
        let get = Method::GET;
        for (path, why) in [
            ("/./../x", PathError::AboveRoot),
            ("/%2e%2e/__log", PathError::AboveRoot),
            ("/a/%2E%2E/%2e%2e/x", PathError::AboveRoot),
            ("/s/../../x", PathError::AboveRoot),
            ("/s/..%2f..%2fx", PathError::HiddenDotSegment),
            ("*", PathError::NotAbsolute),
        ] {
            assert_eq!(
                r.route(&view(&get, path, None)),
                Route::BadPath(why),
                "{path}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, ..Default::default() })]

        /// Whatever the client sends, a route with a base path forwards under that base path,
        /// and never a dot segment.
        #[test]
        fn nothing_escapes_the_base_path(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "/", ".", "..", "%2e", "%2E", "__log", "s", "keep", "%2f", "\\", "x",
                ]),
                0..12,
            )
        ) {
            static ROUTES: std::sync::OnceLock<Routes> = std::sync::OnceLock::new();
            let r = ROUTES.get_or_init(based);
            let path = format!("/{}", pieces.concat());
            if let Route::Upstream { index, path: forward, .. } = r.route(&view(&Method::GET, &path, None)) {
                let forward = forward.unwrap_or_else(|| path.clone());
                let base = ["/api/", "/v1/", "/keep"][index];
                proptest::prop_assert!(forward.starts_with(base), "{} -> {}", path, forward);
                proptest::prop_assert!(
                    forward.split('/').all(|s| s != "." && s != ".." && !s.contains("%2e") && !s.contains("%2E")),
                    "{} -> {}", path, forward
                );
            }
        }
    }

    #[test]
    fn ports_and_ipv6_are_stripped() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
