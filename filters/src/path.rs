//! One normalised view of a request path: routing, rate limiting and forwarding all
//! use the path this module returns, so what is matched is what is sent.
//!
//! The rule, applied once per request by [`normalize`]:
//!
//! - Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded (RFC 3986
//!   §6.2.2.2: `%2e` *is* `.`, `%48` *is* `H`), so neither `/%2e%2e/x` nor `/api/%48istory/a`
//!   can look different to a rate rule than to the upstream. Every other byte, encoded or not,
//!   is kept exactly as the client sent it (`%2F` stays `%2F`, `%25` stays `%25`).
//! - A `%` that does not start a `%XX` triplet is refused: decoding `%%32e` would otherwise
//!   make a `%2e` the client never sent.
//! - Dot segments are removed (RFC 3986 §5.2.4), decoded dots included: `/a/./b` and
//!   `/a/x/../b` are `/a/b`.
//! - A `..` that would climb above `/` is refused: the client's `/` is the top of its route
//!   (the upstream's base path), so there is nothing above it to reach.
//! - Runs of `/` are merged into one, as nginx does by default: many servers read `/a//b` as
//!   `/a/b`, and a rate rule on `/a/b/**` must see what they see. A trailing `/` is kept.
//! - A dot segment hidden behind an encoded slash (`%2F`, `%5C`), a backslash or a `;` (servlet
//!   containers drop `;params` and then see `..`) is refused: such a path cannot be normalised
//!   without guessing how the upstream splits it, and no honest client sends one. Encoded
//!   slashes without a hidden dot segment are left alone (some APIs put `a%2Fb` in a segment).
//! - Double encoding (`%252e`) is not decoded: the upstream reads it as the literal `%2e`.
//!
//! The common case (no dot segment, no `//`, no encoded unreserved character) returns the input
//! borrowed, without allocating.

use std::borrow::Cow;
use std::fmt;

/// Why a path is refused (400 `bad_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/` (for example the asterisk form `*`).
    NotAbsolute,
    /// A `..` climbs above the root of the route.
    AboveRoot,
    /// A `.` or `..` hidden behind `%2F`, `%5C`, `\` or `;`.
    HiddenDotSegment,
    /// A `%` not followed by two hex digits.
    BadPercent,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request path must start with /",
            PathError::AboveRoot => "the request path climbs above the root of its route",
            PathError::HiddenDotSegment => {
                "the request path hides a dot segment behind an encoded slash, a backslash or ;"
            }
            PathError::BadPercent => {
                "the request path has a % that is not followed by two hex digits"
            }
        })
    }
}

impl std::error::Error for PathError {}

/// What a path segment is once its unreserved characters are decoded.
enum Segment {
    Empty,
    Dot,
    DotDot,
    Other,
}

/// The normalised form of `path` (the request path without the query); see the module docs for
/// the rule. Borrowed and unchanged when the path is already normal; the empty path stays empty.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if path.is_empty() || plainly_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    by_segments(path)
}

/// Whether `path` starts with `/` and has nothing the rule could change or refuse: no `%`, `.`,
/// `\`, `;` and no `//`. Most request paths; one pass over the bytes, where going segment by
/// segment costs a few hundred instructions more per request.
fn plainly_normal(path: &[u8]) -> bool {
    let [b'/', rest @ ..] = path else {
        return false;
    };
    let mut slash = true;
    for &b in rest {
        match b {
            b'%' | b'.' | b'\\' | b';' => return false,
            b'/' if slash => return false,
            _ => {}
        }
        slash = b == b'/';
    }
    true
}

/// [`normalize`] the long way, segment by segment.
fn by_segments(path: &str) -> Result<Cow<'_, str>, PathError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    // `None` while every segment so far is kept as sent; from the first change on, the output
    // as `/seg/seg` (no trailing `/`, empty for the root).
    let mut out: Option<String> = None;
    let mut start = 1;
    let mut segments = rest.split('/').peekable();
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let seg_start = start;
        start += raw.len() + 1;
        let seg = decode_unreserved(raw)?;
        let kind = classify(&seg)?;
        if out.is_none() {
            match (&kind, &seg) {
                (Segment::Other, Cow::Borrowed(_)) => continue,
                (Segment::Empty, _) if last => continue,
                _ => {}
            }
        }
        // Every segment before this one was kept as sent: they are the output so far.
        let o = out.get_or_insert_with(|| {
            let mut o = String::with_capacity(path.len());
            o.push_str(&path[..seg_start - 1]);
            o
        });
        match kind {
            Segment::Other => {
                o.push('/');
                o.push_str(&seg);
            }
            Segment::Empty | Segment::Dot => {
                if last {
                    o.push('/');
                }
            }
            Segment::DotDot => {
                let parent = o.rfind('/').ok_or(PathError::AboveRoot)?;
                o.truncate(parent);
                if last {
                    o.push('/');
                }
            }
        }
    }
    Ok(match out {
        None => Cow::Borrowed(path),
        // Never empty: the last segment always leaves at least a `/`.
        Some(o) => Cow::Owned(o),
    })
}

fn classify(seg: &str) -> Result<Segment, PathError> {
    Ok(match seg {
        "" => Segment::Empty,
        "." => Segment::Dot,
        ".." => Segment::DotDot,
        _ if hides_dot_segment(seg.as_bytes()) => return Err(PathError::HiddenDotSegment),
        _ => Segment::Other,
    })
}

fn is_dots(part: &[u8]) -> bool {
    part == b"." || part == b".."
}

/// `seg` splits, on `%2F`, `%5C`, `\` or `;`, into parts one of which is `.` or `..`.
fn hides_dot_segment(seg: &[u8]) -> bool {
    let mut part = 0;
    let mut split = false;
    let mut i = 0;
    while i < seg.len() {
        let sep = match seg[i] {
            b'\\' | b';' => 1,
            b'%' if matches!(
                seg.get(i + 1..i + 3),
                Some([b'2', b'f' | b'F'] | [b'5', b'c' | b'C'])
            ) =>
            {
                3
            }
            _ => 0,
        };
        if sep == 0 {
            i += 1;
            continue;
        }
        if is_dots(&seg[part..i]) {
            return true;
        }
        split = true;
        i += sep;
        part = i;
    }
    split && is_dots(&seg[part..])
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `seg` with `%XX` of unreserved characters decoded; refuses a `%` without two hex digits.
fn decode_unreserved(seg: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = seg.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while let Some(at) = bytes[i..].iter().position(|&b| b == b'%').map(|p| p + i) {
        let (Some(hi), Some(lo)) = (
            bytes.get(at + 1).copied().and_then(hex),
            bytes.get(at + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadPercent);
        };
        let c = hi << 4 | lo;
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            // `at` and `copied` sit next to ASCII bytes: both are char boundaries.
            let o = out.get_or_insert_with(|| String::with_capacity(seg.len()));
            o.push_str(&seg[copied..at]);
            o.push(char::from(c));
            copied = at + 3;
        }
        i = at + 3;
    }
    Ok(match out {
        None => Cow::Borrowed(seg),
        Some(mut o) => {
            o.push_str(&seg[copied..]);
            Cow::Owned(o)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        use PathError::*;
        let cases: &[(&str, Result<&str, PathError>)] = &[
            // Already normal: unchanged.
            ("", Ok("")),
            ("/", Ok("/")),
            ("/a/b", Ok("/a/b")),
            ("/a/b/", Ok("/a/b/")),
            ("/a/file.json", Ok("/a/file.json")),
            ("/a/...", Ok("/a/...")),
            ("/a/.hidden/..b/b..", Ok("/a/.hidden/..b/b..")),
            ("/a%2Fb", Ok("/a%2Fb")),
            ("/a%2f..b", Ok("/a%2f..b")),
            ("/a;v=1", Ok("/a;v=1")),
            ("/a%252e%252e", Ok("/a%252e%252e")),
            ("/caf%C3%A9/é", Ok("/caf%C3%A9/é")),
            // Dot segments (RFC 3986 §5.2.4).
            ("/a/./b", Ok("/a/b")),
            ("/a/x/../b", Ok("/a/b")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("/a/b/../", Ok("/a/")),
            ("/a/..", Ok("/")),
            ("/.", Ok("/")),
            ("/./a", Ok("/a")),
            ("/b/../__log", Ok("/__log")),
            ("/api/./History/a", Ok("/api/History/a")),
            ("/api/x/../History/a", Ok("/api/History/a")),
            ("/a/b/c/../../d", Ok("/a/d")),
            // Encoded dots, either case, mixed.
            ("/a/%2e/b", Ok("/a/b")),
            ("/a/x/%2E%2e/b", Ok("/a/b")),
            ("/a/x/.%2e/b", Ok("/a/b")),
            ("/a/x/%2e./b", Ok("/a/b")),
            ("/a%2eb", Ok("/a.b")),
            // Other unreserved characters decoded, reserved ones kept.
            ("/api/%48istory/a", Ok("/api/History/a")),
            ("/%7e%41%2D%5F", Ok("/~A-_")),
            ("/a%2F%3F%25", Ok("/a%2F%3F%25")),
            // Slashes merged, a trailing one kept.
            ("//a", Ok("/a")),
            ("/a//b", Ok("/a/b")),
            ("/a///", Ok("/a/")),
            ("//", Ok("/")),
            ("/a//../b", Ok("/b")),
            // Climbing above the root.
            ("/..", Err(AboveRoot)),
            ("/../x", Err(AboveRoot)),
            ("/./../x", Err(AboveRoot)),
            ("/%2e%2e/__log", Err(AboveRoot)),
            ("/a/%2E%2E/%2e%2e/x", Err(AboveRoot)),
            ("/a/../..", Err(AboveRoot)),
            ("//..", Err(AboveRoot)),
            // Dot segments behind encoded slashes, backslashes, `;`.
            ("/a/..%2fx", Err(HiddenDotSegment)),
            ("/a/x%2F..", Err(HiddenDotSegment)),
            ("/a/%2e%2e%2Fx", Err(HiddenDotSegment)),
            ("/a/..%5cx", Err(HiddenDotSegment)),
            ("/a/x%5C.%5Cy", Err(HiddenDotSegment)),
            ("/a/..\\x", Err(HiddenDotSegment)),
            ("/a/..;/x", Err(HiddenDotSegment)),
            ("/a/.;jsessionid=1/x", Err(HiddenDotSegment)),
            // Malformed percent-encoding.
            ("/a%", Err(BadPercent)),
            ("/a%2", Err(BadPercent)),
            ("/a%zz", Err(BadPercent)),
            ("/a/%%32e%%32e/x", Err(BadPercent)),
            // Not a path.
            ("*", Err(NotAbsolute)),
            ("a/b", Err(NotAbsolute)),
        ];
        for (input, want) in cases {
            let got = normalize(input);
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                *want,
                "normalize({input:?})"
            );
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "",
            "/",
            "/a/b",
            "/a/b/",
            "/api/History/a",
            "/a%2Fb",
            "/x.y/..z",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p),
                "{p}"
            );
        }
    }

    /// `part` decoded (unreserved only) and split on what some server may read as a slash.
    fn dot_parts(part: &str) -> bool {
        let decoded = part
            .replace("%2e", ".")
            .replace("%2E", ".")
            .replace("%2f", "/")
            .replace("%2F", "/")
            .replace("%5c", "/")
            .replace("%5C", "/")
            .replace(['\\', ';'], "/");
        decoded.split('/').any(|p| p == "." || p == "..")
    }

    /// RFC 3986 `remove_dot_segments` on plain segments, `None` when it climbs above `/`.
    fn model(segments: &[&str]) -> Option<String> {
        let mut stack: Vec<&str> = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match *s {
                "." => {}
                ".." => {
                    stack.pop()?;
                }
                s => stack.push(s),
            }
            if last && matches!(*s, "." | "..") {
                stack.push("");
            }
        }
        let out = format!("/{}", stack.join("/"));
        Some(out)
    }

    /// Paths made of the pieces that matter here: slashes, dots in every spelling, encoded
    /// separators, stray `%`, plain text.
    fn any_path() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "/", "/", ".", "..", "%2e", "%2E", "%2f", "%5C", "%", "%25", "%41", "%4", "\\", ";",
            "a", "Zz", "~", "é", "-_", "0",
        ]);
        (any::<bool>(), prop::collection::vec(piece, 0..12)).prop_map(|(slash, pieces)| {
            let body = pieces.concat();
            if slash {
                format!("/{body}")
            } else {
                body
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn never_panics_on_any_string(
            bytes in prop::collection::vec(
                prop_oneof![any::<u8>(), prop::sample::select(b"/.%2ef\\;".to_vec())],
                0..40,
            )
        ) {
            // Arbitrary bytes, invalid UTF-8 replaced: multi-byte characters next to `%` too.
            let _ = normalize(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn output_is_normal_and_stable(p in any_path()) {
            if let Ok(out) = normalize(&p) {
                prop_assert!(out.is_empty() || out.starts_with('/'), "{out}");
                prop_assert!(!out.contains("//"), "{out}");
                for seg in out.split('/') {
                    prop_assert!(!dot_parts(seg), "{p} gave {out}");
                }
                // Idempotent, and an already-normal path comes back borrowed and unchanged.
                let again = normalize(&out);
                prop_assert!(
                    matches!(&again, Ok(Cow::Borrowed(q)) if *q == out.as_ref()),
                    "{p} gave {out}, then {again:?}"
                );
            }
        }

        /// The one-pass check only ever answers "unchanged" where the full rule does.
        #[test]
        fn the_fast_path_agrees_with_the_full_rule(p in any_path()) {
            if plainly_normal(p.as_bytes()) {
                let full = by_segments(&p);
                prop_assert!(
                    matches!(&full, Ok(Cow::Borrowed(q)) if *q == p),
                    "{p}: {full:?}"
                );
            }
        }

        #[test]
        fn plain_segments_follow_rfc_3986(
            segs in prop::collection::vec(prop::sample::select(vec![".", "..", "a", "b"]), 1..10)
        ) {
            let path = format!("/{}", segs.join("/"));
            let want = model(&segs);
            let got = normalize(&path).ok().map(Cow::into_owned);
            prop_assert_eq!(got, want, "{}", path);
        }
    }
}
