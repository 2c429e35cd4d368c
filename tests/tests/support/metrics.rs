//! Prometheus text as `/metrics` serves it, parsed by hand (`# HELP`/`# TYPE` lines and
//! `name{labels} value [timestamp]`), and the reads the tests make of it. Every test that reads a
//! metric goes through `scrape`, so every such read also checks that the whole page parses.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{wait_until, Sidecar};

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// `# TYPE` of each family.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// Parses `{a="x",b="y\"z"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or_else(|| format!("no = in {rest:?}"))?;
        let name = rest[..eq].trim();
        if !is_metric_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated value of label {name}")),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
    }
}

pub fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), _) if is_metric_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind)) if is_metric_name(name) => {
                    let known = ["counter", "gauge", "histogram", "summary", "untyped"];
                    if !known.contains(&kind) {
                        return Err(err(format!("unknown type {kind}")));
                    }
                    if out.types.insert(name.into(), kind.into()).is_some() {
                        return Err(err(format!("second TYPE for {name}")));
                    }
                }
                (Some("HELP" | "TYPE"), _, _) => return Err(err("malformed HELP/TYPE".into())),
                _ => {} // a plain comment
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value =
            parse_value(fields.next().ok_or_else(|| err("no value".into()))?).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| err(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing text".into()));
        }
        out.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    // Every sample belongs to a declared family (histograms add _bucket/_sum/_count).
    for s in &out.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| s.name.strip_suffix(suffix))
            .filter(|base| out.types.get(*base).map(String::as_str) == Some("histogram"))
            .unwrap_or(&s.name);
        if !out.types.contains_key(family) {
            return Err(format!("{} has no # TYPE line", s.name));
        }
    }
    Ok(out)
}

impl Exposition {
    /// Sum of the samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .fold(0.0, |a, b| a + b)
    }
}

/// `GET /metrics`, parsed; panics (with the page) when it is not Prometheus text.
pub async fn scrape(sc: &Sidecar) -> Exposition {
    let text = sc.admin_text("/metrics").await;
    parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"))
}

/// `sidecar_config_reloads_total{result}` (0 before the first one).
pub async fn reloads(sc: &Sidecar, result: &str) -> u64 {
    scrape(sc)
        .await
        .sum("sidecar_config_reloads_total", &[("result", result)]) as u64
}

/// Polls `/metrics` until `sidecar_config_reloads_total{result}` reaches at least `n` (bounded:
/// fails only when it never does); returns the count seen.
pub async fn wait_reloads_at_least(sc: &Sidecar, result: &str, n: u64) -> u64 {
    let seen = std::cell::Cell::new(0);
    wait_until(
        Duration::from_secs(15),
        || async {
            seen.set(reloads(sc, result).await);
            seen.get() >= n
        },
        || {
            format!(
                "{} of {n} {result} reloads after 15 s\n{}",
                seen.get(),
                sc.logs()
            )
        },
    )
    .await;
    seen.get()
}

/// Polls `/metrics` until `sidecar_config_reloads_total{result}` reaches `n`, which it must not
/// pass (bounded).
pub async fn wait_reloads(sc: &Sidecar, result: &str, n: u64) {
    let now = wait_reloads_at_least(sc, result, n).await;
    assert_eq!(now, n, "more {result} reloads than expected\n{}", sc.logs());
}

/// The `sidecar_waiting_requests` gauge: requests waiting for a token.
pub async fn waiting_requests(sc: &Sidecar) -> f64 {
    scrape(sc).await.sum("sidecar_waiting_requests", &[])
}
