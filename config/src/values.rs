//! Scalar value types that parse while the YAML is deserialized, so a bad value is reported with
//! the line and column serde_yaml knows.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written as `250ms`, `30s`, `5m`, `24h`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// The longest duration anything accepts: a config value, a client header, an identity
/// provider's `expires_in` or JWT `exp`. Values past it are errors where they enter, so the rest
/// of the code can add any of them to an `Instant` or a `SystemTime` without overflow.
/// (100 years of 365.25 days, as humantime counts a `y`.)
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000);

/// Parses `250ms`, `30s`, `1h 30m`; a bare `0` means zero. At most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration {t:?} ({e}); write it like 250ms, 30s, 5m or 24h")
    })?;
    if d > MAX_DURATION {
        return Err(format!("duration {t:?} is too long (at most 100 years)"));
    }
    Ok(d)
}

/// A byte size written as `64KiB`, `1MiB`, `10MB` or a plain number of bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 64KiB or 1MiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, n) in UNITS {
            if self.0 >= n && self.0.is_multiple_of(n) {
                return s.serialize_str(&format!("{}{unit}", self.0 / n));
            }
        }
        s.serialize_str(&self.0.to_string())
    }
}

/// Parses `64KiB`, `1MiB`, `2GiB`, `10KB`, `100B` or `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {t:?}; write it like 64KiB or 1MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {t:?}; use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {t:?} is too large"))
}

/// A fraction written as a percentage, `10%`.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        let v: f64 = t
            .strip_suffix('%')
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| {
                de::Error::custom(format!("invalid percentage {t:?}; write it like 10%"))
            })?;
        if !(0.0..=100.0).contains(&v) {
            return Err(de::Error::custom(format!(
                "percentage {t:?} must be between 0% and 100%"
            )));
        }
        Ok(Percent(v / 100.0))
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}%", self.0 * 100.0))
    }
}

/// A rate written as `count/period`, `50/30s`: at most `count` requests per `period`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Rate {
    /// Requests per period; at least 1.
    pub count: u32,
    /// The period; more than zero.
    pub per: Duration,
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_rate(&s).map_err(de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!(
            "{}/{}",
            self.count,
            humantime::format_duration(self.per)
        ))
    }
}

/// Parses `50/30s`, `200/1m`, `5/250ms`; a bare unit (`10/s`) means one of it.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    let hint = "write it like 50/30s (requests per period)";
    let (count, per) = t
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {t:?}; {hint}"))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {t:?}: {count:?} is not a count; {hint}"))?;
    if count == 0 {
        return Err(format!("invalid rate {t:?}: the count must be at least 1"));
    }
    let per = per.trim();
    let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(per)?
    } else {
        parse_duration(&format!("1{per}"))?
    };
    if per.is_zero() {
        return Err(format!(
            "invalid rate {t:?}: the period must be more than 0"
        ));
    }
    Ok(Rate { count, per })
}

/// A secret value. References `${env:NAME}` and `${file:/path}` are resolved while the config is
/// read, so a missing one is a config error with its location. It never prints: `Debug` and the
/// `check` output show `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value that is already resolved (tests, the demo).
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        resolve_references(&s)
            .map(Secret)
            .map_err(de::Error::custom)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// A JSON template (the `body` of a `json_login` call) whose string values may hold secrets.
/// References in every string value are resolved while the config is read; `Debug` and `check`
/// keep the keys and print every value as `<redacted>`.
#[derive(Clone, PartialEq)]
pub struct SecretJson(serde_yaml::Value);

impl SecretJson {
    /// Wraps a value that is already resolved (tests).
    pub fn new(value: serde_yaml::Value) -> Self {
        SecretJson(value)
    }

    /// The template itself, for the one place that sends it.
    pub fn expose(&self) -> &serde_yaml::Value {
        &self.0
    }
}

fn resolve_tree(v: serde_yaml::Value) -> Result<serde_yaml::Value, String> {
    use serde_yaml::Value;
    Ok(match v {
        Value::String(s) => Value::String(resolve_references(&s)?),
        Value::Sequence(items) => Value::Sequence(
            items
                .into_iter()
                .map(resolve_tree)
                .collect::<Result<_, _>>()?,
        ),
        Value::Mapping(map) => Value::Mapping(
            map.into_iter()
                .map(|(k, v)| Ok((k, resolve_tree(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        Value::Tagged(t) => resolve_tree(t.value)?,
        other => other,
    })
}

fn redact_tree(v: &serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Sequence(items) => Value::Sequence(items.iter().map(redact_tree).collect()),
        Value::Mapping(map) => Value::Mapping(
            map.iter()
                .map(|(k, v)| (k.clone(), redact_tree(v)))
                .collect(),
        ),
        _ => Value::String("<redacted>".into()),
    }
}

impl fmt::Debug for SecretJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json_like(&redact_tree(&self.0)) {
            Some(s) => f.write_str(&s),
            None => f.write_str("<redacted>"),
        }
    }
}

/// One-line rendering of a redacted template for `Debug`.
fn serde_json_like(v: &serde_yaml::Value) -> Option<String> {
    serde_yaml::to_string(v)
        .ok()
        .map(|s| s.trim_end().replace('\n', "; "))
}

impl<'de> Deserialize<'de> for SecretJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        resolve_tree(v).map(SecretJson).map_err(de::Error::custom)
    }
}

impl Serialize for SecretJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        redact_tree(&self.0).serialize(s)
    }
}

/// Replaces every `${env:NAME}` and `${file:/path}` in `s`. A file's trailing newline is dropped.
pub fn resolve_references(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${...} reference".to_string())?;
        let reference = &after[..end];
        let value = if let Some(name) = reference.strip_prefix("env:") {
            std::env::var(name).map_err(|_| {
                format!("environment variable {name} (from ${{env:{name}}}) is not set")
            })?
        } else if let Some(path) = reference.strip_prefix("file:") {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {path} (from ${{file:{path}}}): {e}"))?;
            text.strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string()
        } else {
            return Err(format!(
                "unknown reference ${{{reference}}}; use ${{env:NAME}} or ${{file:/path}}"
            ));
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("100y").is_ok());
        assert!(parse_duration("101y").unwrap_err().contains("too long"));
        assert!(parse_duration("400000000000y").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10KB").unwrap(), 10_000);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn references_resolve_env_and_file() {
        std::env::set_var("SIDECAR_CONFIG_TEST_REF", "s3cr3t");
        assert_eq!(
            resolve_references("a-${env:SIDECAR_CONFIG_TEST_REF}-b").unwrap(),
            "a-s3cr3t-b"
        );
        let dir = std::env::temp_dir().join(format!("sidecar-ref-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let text = format!("${{file:{}}}", dir.display());
        assert_eq!(resolve_references(&text).unwrap(), "from-file");
        std::fs::remove_file(&dir).unwrap();
        let err = resolve_references("${env:SIDECAR_DEFINITELY_UNSET_VAR}").unwrap_err();
        assert!(err.contains("SIDECAR_DEFINITELY_UNSET_VAR"), "{err}");
        assert!(resolve_references("${vault:x}").is_err());
        assert!(resolve_references("${env:X").is_err());
    }

    #[test]
    fn secret_json_resolves_and_never_prints() {
        std::env::set_var("SIDECAR_CONFIG_TEST_APIKEY", "k3y-value");
        let v: SecretJson = serde_yaml::from_str(
            "{ userName: me, apiKey: \"${env:SIDECAR_CONFIG_TEST_APIKEY}\", n: [1, \"x\"] }",
        )
        .unwrap();
        assert_eq!(v.expose()["apiKey"].as_str(), Some("k3y-value"));
        assert_eq!(v.expose()["userName"].as_str(), Some("me"));
        let printed = serde_yaml::to_string(&v).unwrap();
        assert!(printed.contains("apiKey: <redacted>"), "{printed}");
        assert!(
            !printed.contains("k3y-value") && !printed.contains("me\n"),
            "{printed}"
        );
        let debug = format!("{v:?}");
        assert!(!debug.contains("k3y-value"), "{debug}");
        assert!(debug.contains("apiKey"), "{debug}");
        assert!(serde_yaml::from_str::<SecretJson>("{ k: \"${env:SIDECAR_UNSET_XYZ}\" }").is_err());
    }

    #[test]
    fn rates() {
        let r = parse_rate("50/30s").unwrap();
        assert_eq!((r.count, r.per), (50, Duration::from_secs(30)));
        assert_eq!(parse_rate("10/s").unwrap().per, Duration::from_secs(1));
        assert_eq!(
            parse_rate(" 5 / 250ms ").unwrap().per,
            Duration::from_millis(250)
        );
        for bad in ["50/0s", "x/1s", "0/1s", "50", "50/", "-1/1s", "50/1parsec"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(serde_yaml::to_string(&r).unwrap().trim(), "50/30s");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_yaml::to_string(&s).unwrap().trim(), "<redacted>");
    }
}
