//! Reading what the sidecar logged: JSON lines, access lines, located config errors.

use serde_json::{Map, Value};

/// Parses every non-empty line of `logs` as a JSON object.
pub fn json_lines(logs: &str) -> Vec<Map<String, Value>> {
    logs.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(o)) => o,
            _ => panic!("not a JSON object: {l:?}\n{logs}"),
        })
        .collect()
}

/// The access lines (target `access`) among `lines`.
pub fn access_lines(lines: &[Map<String, Value>]) -> Vec<&Map<String, Value>> {
    lines
        .iter()
        .filter(|l| l.get("target").and_then(|t| t.as_str()) == Some("access"))
        .collect()
}

/// `file:line:col:` for `path` somewhere in `logs`; returns (line, col).
pub fn located(logs: &str, path: &std::path::Path) -> Vec<(usize, usize)> {
    let needle = format!("{}:", path.display());
    let mut found = Vec::new();
    let mut rest = logs;
    while let Some(i) = rest.find(&needle) {
        rest = &rest[i + needle.len()..];
        let mut parts = rest.splitn(3, ':');
        if let (Some(l), Some(c), Some(_)) = (parts.next(), parts.next(), parts.next()) {
            if let (Ok(l), Ok(c)) = (l.parse(), c.parse()) {
                found.push((l, c));
            }
        }
    }
    found
}
