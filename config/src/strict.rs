//! A first pass over the YAML for what the typed pass would accept silently: a key written twice
//! in one mapping (serde_yaml keeps the last one for a map such as `providers`, so a second
//! `main:` would quietly replace the first), custom tags (`!secret x`, which serde_yaml would read
//! as the plain value) and a document with nothing in it (which would read as "all defaults": no
//! routes). Its errors carry the line and column of the offending node.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// What the top of the document is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Top {
    /// No document, or `~`/`null`: nothing configured.
    Nothing,
    /// Anything else (the typed pass says whether it is a config).
    Something,
}

/// Walks the whole document; errors on duplicate keys and custom tags.
pub(crate) fn check(text: &str) -> Result<Top, serde_yaml::Error> {
    Node::deserialize(serde_yaml::Deserializer::from_str(text)).map(|n| match n {
        Node::Nothing => Top::Nothing,
        Node::Something => Top::Something,
    })
}

/// A node, reduced to whether it holds anything.
enum Node {
    Nothing,
    Something,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("YAML")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Something)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Something)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Something)
    }
    fn visit_i128<E>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Something)
    }
    fn visit_u128<E>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Something)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Something)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Something)
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Nothing)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Nothing)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        while seq.next_element::<Node>()?.is_some() {}
        Ok(Node::Something)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut seen = HashSet::new();
        while map.next_key_seed(KeySeed(&mut seen))?.is_some() {
            map.next_value::<Node>()?;
        }
        Ok(Node::Something)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Node, A::Error> {
        // serde_yaml hands a node with a custom tag over as an enum named by the tag.
        let (tag, _) = data.variant::<String>()?;
        Err(de::Error::custom(format!(
            "custom YAML tags such as !{tag} are not supported; write the plain value, and \
             ${{env:NAME}} or ${{file:/path}} for a secret"
        )))
    }
}

/// Reads one key and refuses it if the mapping had it already; the error is placed at the key.
/// Scalars are compared by their text, so `1:` and `"1":` (the same key once read into a map of
/// strings) are duplicates.
struct KeySeed<'a>(&'a mut HashSet<String>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(KeyVisitor(self.0))
    }
}

struct KeyVisitor<'a>(&'a mut HashSet<String>);

impl KeyVisitor<'_> {
    fn scalar<E: de::Error>(self, key: String) -> Result<(), E> {
        if self.0.insert(key.clone()) {
            return Ok(());
        }
        let shown: String = key.chars().take(64).collect();
        Err(E::custom(format!(
            "duplicate key {shown:?} in one mapping; each key may appear once (the later one \
             would silently replace the earlier)"
        )))
    }
}

impl<'de> Visitor<'de> for KeyVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(v.to_string())
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<(), E> {
        self.scalar(v.to_string())
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<(), E> {
        self.scalar(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(v.to_string())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar("null".into())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar("null".into())
    }
    // Complex keys are walked for tags and duplicates inside them; the typed pass refuses them.
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        NodeVisitor.visit_seq(seq).map(drop)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        NodeVisitor.visit_map(map).map(drop)
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        NodeVisitor.visit_enum(data).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn located(text: &str) -> (usize, usize, String) {
        let e = check(text).unwrap_err();
        let loc = e.location().expect("located");
        (loc.line(), loc.column(), e.to_string())
    }

    #[test]
    fn duplicate_keys_are_refused_at_the_second() {
        let (line, col, msg) = located(
            "providers:\n  main: { type: static, token: a }\n  main: { type: static, token: b }\n",
        );
        assert_eq!((line, col), (3, 3), "{msg}");
        assert!(msg.contains("duplicate key \"main\""), "{msg}");
        // Also in flow style, nested, and when one spelling is quoted.
        assert!(check("a: { b: 1, b: 2 }\n").is_err());
        assert!(check("l:\n  - { x: 1 }\n  - { y: 1, y: 1 }\n").is_err());
        assert!(check("m: { 1: a, \"1\": b }\n").is_err());
        // The same key in different mappings is fine.
        assert!(check("a: { x: 1 }\nb: { x: 1 }\n").is_ok());
    }

    #[test]
    fn custom_tags_are_refused_where_they_are() {
        let (line, _, msg) =
            located("upstreams: []\nproviders:\n  s: { type: static, token: !secret abc }\n");
        assert_eq!(line, 3, "{msg}");
        assert!(msg.contains("!secret"), "{msg}");
        assert!(check("a: !map { b: 1 }\n").is_err());
        assert!(check("a: !seq [1]\n").is_err());
        // Core schema tags are the plain values.
        assert!(check("a: !!str 123\nb: !!int 5\n").is_ok());
    }

    #[test]
    fn empty_documents_are_nothing() {
        for text in ["", "\n\n", "# only a comment\n", "~\n", "null\n", "---\n"] {
            assert_eq!(check(text).unwrap(), Top::Nothing, "{text:?}");
        }
        assert_eq!(check("upstreams: []\n").unwrap(), Top::Something);
        assert_eq!(check("{}\n").unwrap(), Top::Something);
    }
}
