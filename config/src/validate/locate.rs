//! Pointing an error at the key it is about, by key path (`upstreams[1].timeouts.read`).
//!
//! The marks come from the parser that read the config (serde_yaml's libyaml events), so the
//! place shown is always the one the typed pass read: the text is walked once more along the path
//! and stopped at the wanted node, and serde_yaml puts that node's mark on the stop. Nothing is
//! searched for in the text, so an error in upstream `a` can never land on upstream `api`.
//! Walks happen only for errors and warnings, never on a valid config's way in.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::ConfigError;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index (0-based).
    Index(usize),
}

/// A path from the top of the document to a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(pub(crate) Vec<Seg>);

impl KeyPath {
    /// The path of a top-level key.
    pub(crate) fn top(key: &str) -> KeyPath {
        KeyPath(vec![Seg::Key(key.to_string())])
    }

    /// This path, then `key`.
    pub(crate) fn key(&self, key: &str) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_string()));
        p
    }

    /// This path, then element `i`.
    pub(crate) fn index(&self, i: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    /// This path, then a relative path written like `timeouts.read` or `expiry.statuses[1]`
    /// (for the fixed key names of the schema, never for names users chose).
    pub(crate) fn then(&self, rel: &str) -> KeyPath {
        let mut p = self.clone();
        for part in rel.split('.').filter(|s| !s.is_empty()) {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                p.0.push(Seg::Key(key.to_string()));
            }
            while let Some(inner) = rest.strip_prefix('[') {
                let Some(end) = inner.find(']') else { break };
                if let Ok(i) = inner[..end].parse() {
                    p.0.push(Seg::Index(i));
                }
                rest = &inner[end + 1..];
            }
        }
        p
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The line and column (1-based) of the node at `path`: of the key for a path that ends in a
/// key, of the element for one that ends in an index. When the path does not exist in full (a
/// key left to its default), the deepest part of it that does; `None` when not even its first
/// step does, or the text is not YAML.
pub(crate) fn find(text: &str, path: &KeyPath) -> Option<(usize, usize)> {
    (1..=path.0.len())
        .rev()
        .find_map(|n| exact(text, &path.0[..n]))
}

/// Marks the stop; nothing a user writes produces it.
const FOUND: &str = "\u{0}sidecar-located\u{0}";

fn exact(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    match (Walk { path }).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(()) => None,
        Err(e) if e.to_string().contains(FOUND) => {
            e.location().map(|loc| (loc.line(), loc.column()))
        }
        Err(_) => None,
    }
}

/// Walks to the node at `path`; an empty path stops at the node itself.
struct Walk<'p> {
    path: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            // Stopped inside the node's own visit, so that the mark is the node's.
            return d.deserialize_any(Stop);
        }
        d.deserialize_any(self)
    }
}

/// Stops at whatever node it is given.
struct Stop;

impl<'de> Visitor<'de> for Stop {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("YAML")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("YAML")
    }

    // A scalar where the path goes on: the path is not there.
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(want), rest)) = self.path.split_first() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut i = 0;
        loop {
            if i == *want {
                seq.next_element_seed(Walk { path: rest })?;
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(want), rest)) = self.path.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        while let Some(hit) = map.next_key_seed(KeyIs {
            want,
            last: rest.is_empty(),
        })? {
            if hit {
                map.next_value_seed(Walk { path: rest })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Reads a key: whether it is the wanted one; stops on it when it is the path's last step.
struct KeyIs<'a> {
    want: &'a str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.is(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.is(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.is(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.is(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.is(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.is("null")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

impl KeyIs<'_> {
    fn is<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        if key != self.want {
            return Ok(false);
        }
        if self.last {
            return Err(E::custom(FOUND));
        }
        Ok(true)
    }
}

/// Builds errors and warnings placed at a key path of one file.
pub(crate) struct Locator<'a> {
    pub(crate) text: &'a str,
    pub(crate) file: &'a str,
}

impl Locator<'_> {
    /// An error at `path` (or the deepest part of it that is in the file).
    pub(crate) fn error(&self, path: &KeyPath, message: String) -> ConfigError {
        match find(self.text, path) {
            Some((line, col)) => ConfigError::At {
                file: self.file.to_string(),
                line,
                col,
                message,
            },
            None => ConfigError::Invalid {
                file: self.file.to_string(),
                message,
            },
        }
    }

    /// A warning at `path`, shown like an error but without failing the config.
    pub(crate) fn warning(&self, path: &KeyPath, message: String) -> crate::Warning {
        let place = find(self.text, path);
        crate::Warning {
            file: self.file.to_string(),
            place,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
upstreams:
  - name: api
    url: http://127.0.0.1:1
    timeouts: { connect: 1s, read: 2s }
  - name: a
    url: ftp://x
    timeouts:
      read: 0s
providers:
  main: { type: static, token: x }
";

    #[test]
    fn paths_land_on_their_key() {
        let cases: &[(&str, Option<(usize, usize)>)] = &[
            ("upstreams", Some((1, 1))),
            ("upstreams[0]", Some((2, 5))),
            ("upstreams[0].name", Some((2, 5))),
            ("upstreams[1].name", Some((5, 5))),
            ("upstreams[1].url", Some((6, 5))),
            ("upstreams[0].timeouts.read", Some((4, 30))),
            ("upstreams[1].timeouts.read", Some((8, 7))),
            ("providers.main.token", Some((10, 25))),
            // Absent keys: the deepest part that is there.
            ("upstreams[1].timeouts.idle", Some((7, 5))),
            ("upstreams[7].url", Some((1, 1))),
            ("providers.other", Some((9, 1))),
            ("nothing.here", None),
        ];
        for (path, want) in cases {
            let got = find(TEXT, &KeyPath::default().then(path));
            assert_eq!(got, *want, "{path}");
        }
    }

    #[test]
    fn a_name_that_starts_another_name_is_not_taken_for_it() {
        // `name: a` is a prefix of `name: api`: located by position in the list, not by text.
        let path = KeyPath::top("upstreams").index(1).key("url");
        assert_eq!(find(TEXT, &path), Some((6, 5)));
    }

    #[test]
    fn paths_print_as_written() {
        let p = KeyPath::top("upstreams").index(1).then("timeouts.read");
        assert_eq!(p.to_string(), "upstreams[1].timeouts.read");
        assert_eq!(
            KeyPath::default().then("a[2][3].b").to_string(),
            "a[2][3].b"
        );
    }

    #[test]
    fn broken_yaml_locates_nothing_and_does_not_panic() {
        assert_eq!(find("x: [\n", &KeyPath::top("a")), None);
        assert_eq!(find("", &KeyPath::top("a")), None);
        assert_eq!(find("- 1\n", &KeyPath::top("a")), None);
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]
            #[test]
            fn any_text_and_path_never_panics(text in any::<String>(), rel in "[a-z\\[\\]0-9.]{0,12}") {
                let _ = find(&text, &KeyPath::default().then(&rel));
            }
        }
    }
}
