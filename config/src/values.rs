//! Scalar value types that parse while the YAML is deserialized, so a bad value is reported with
//! the line and column serde_yaml knows.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Deserializes a string through `parse` inside serde_yaml's own call for the scalar, so that an
/// error carries the scalar's line and column (an error made after `String::deserialize` returned
/// would be placed at the enclosing mapping instead).
fn parsed_str<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V { expecting, parse })
}

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
        parsed_str(d, "a duration like 30s", parse_duration).map(Dur)
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
/// A year is 365.25 days here, as humantime counts `1y`, so that `100y` itself is accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

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
                bounded_size(v, &v.to_string()).map(Size).map_err(E::custom)
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

/// The largest size anything accepts. Sizes bound memory the sidecar holds (a buffered body),
/// so nothing sensible comes near it; with it, sums and products of a few sizes cannot overflow.
pub const MAX_SIZE: u64 = 1 << 40;

fn bounded_size(n: u64, written: &str) -> Result<u64, String> {
    if n > MAX_SIZE {
        return Err(format!("size {written:?} is too large (at most 1TiB)"));
    }
    Ok(n)
}

/// Parses `64KiB`, `1MiB`, `2GiB`, `10KB`, `100B` or `4096`. At most [`MAX_SIZE`].
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
    let n = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {t:?} is too large (at most 1TiB)"))?;
    bounded_size(n, t)
}

/// A fraction written as a percentage, `10%`.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed_str(d, "a percentage like 10%", parse_percent).map(Percent)
    }
}

/// Parses `10%`, `2.5%` into a fraction in `[0, 1]`.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v: f64 = t
        .strip_suffix('%')
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("invalid percentage {t:?}; write it like 10%"))?;
    // Also refuses NaN, which no range contains.
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("percentage {t:?} must be between 0% and 100%"));
    }
    Ok(v / 100.0)
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
        parsed_str(d, "a rate like 50/30s", parse_rate)
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

/// Why a number or a boolean is refused as a secret; the value itself is never repeated.
const SECRET_NOT_TEXT: &str = "a secret must be a string: this value reads as a number or a \
    boolean, which YAML may rewrite (0123, 1e3, 0x1F); quote it (\"...\") or use ${env:NAME}";

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Takes text only. serde's own "invalid type" errors would print the value, so every
        /// scalar that is not text gets an error of its own that does not.
        struct V;
        impl Visitor<'_> for V {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, or an ${env:NAME} or ${file:/path} reference")
            }
            // References are resolved here, inside serde_yaml's call for the scalar, so that
            // a missing one is reported at the scalar's line and column.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                resolve_references(v).map_err(E::custom)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
                Err(E::custom(SECRET_NOT_TEXT))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
                Err(E::custom(SECRET_NOT_TEXT))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
                Err(E::custom(SECRET_NOT_TEXT))
            }
            fn visit_i128<E: de::Error>(self, _: i128) -> Result<String, E> {
                Err(E::custom(SECRET_NOT_TEXT))
            }
            fn visit_u128<E: de::Error>(self, _: u128) -> Result<String, E> {
                Err(E::custom(SECRET_NOT_TEXT))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
                Err(E::custom(SECRET_NOT_TEXT))
            }
            fn visit_char<E: de::Error>(self, _: char) -> Result<String, E> {
                Err(E::custom(SECRET_NOT_TEXT))
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<String, E> {
                Err(E::custom("a secret must be a string"))
            }
        }
        d.deserialize_any(V).map(Secret)
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

pub use crate::refs::resolve_references;

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
    fn sizes_are_bounded_where_they_enter() {
        assert_eq!(parse_size("1024GiB").unwrap(), MAX_SIZE);
        for big in ["1025GiB", "2000GB", "1099511627777"] {
            let e = parse_size(big).unwrap_err();
            assert!(e.contains("at most 1TiB"), "{big}: {e}");
        }
        // A bare YAML number takes the same bound.
        assert!(serde_yaml::from_str::<Size>("1099511627776").is_ok());
        let e = serde_yaml::from_str::<Size>("1099511627777").unwrap_err();
        assert!(e.to_string().contains("at most 1TiB"), "{e}");
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10%").unwrap(), 0.10);
        assert_eq!(parse_percent(" 2.5 % ").unwrap(), 0.025);
        assert_eq!(parse_percent("100%").unwrap(), 1.0);
        for bad in ["10", "101%", "-1%", "NaN%", "inf%", "%", "ten%"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_must_be_text_and_the_refusal_does_not_repeat_them() {
        for (yaml, value) in [
            ("98765432", "98765432"),
            ("0x7B", "7B"),
            ("2e9", "2e9"),
            ("true", "true"),
            ("-42", "42"),
            (".inf", "inf"),
        ] {
            let e = serde_yaml::from_str::<Secret>(yaml)
                .unwrap_err()
                .to_string();
            assert!(e.contains("quote it"), "{yaml}: {e}");
            assert!(!e.contains(value), "{yaml}: the value is in {e}");
        }
        assert_eq!(
            serde_yaml::from_str::<Secret>("\"12345678\"")
                .unwrap()
                .expose(),
            "12345678"
        );
        assert_eq!(
            serde_yaml::from_str::<Secret>("abc").unwrap().expose(),
            "abc"
        );
        assert!(serde_yaml::from_str::<Secret>("[a]").is_err());
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_yaml::to_string(&s).unwrap().trim(), "<redacted>");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Text shaped like the values users write, plus anything at all.
        fn valueish() -> impl Strategy<Value = String> {
            prop_oneof![
                "[0-9 ]{0,25}(ns|us|ms|s|m|h|d|w|y|M|B|KiB|MiB|GiB|KB|MB|GB|%|/s|/1m)?",
                "[0-9]{0,12}/[0-9]{0,25}[a-zA-Z]{0,3}",
                "[-+0-9.eEnaNif%/ ]{0,20}",
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn durations_never_panic_and_stay_bounded(s in valueish()) {
                if let Ok(d) = parse_duration(&s) {
                    prop_assert!(d <= MAX_DURATION);
                    // What the rest of the code may do with any config duration.
                    let now = std::time::Instant::now();
                    prop_assert!(now.checked_add(d.mul_f64(1.5)).is_some());
                    prop_assert!(std::time::SystemTime::now().checked_add(d * 2).is_some());
                } else {
                    let e = parse_duration(&s).unwrap_err();
                    prop_assert!(e.contains("duration"), "{}", e);
                }
            }

            #[test]
            fn durations_in_range_round_trip(secs in 0u64..=MAX_DURATION.as_secs()) {
                let d = Duration::from_secs(secs);
                let written = humantime::format_duration(d).to_string();
                prop_assert_eq!(parse_duration(&written).unwrap(), d);
            }

            #[test]
            fn sizes_never_panic_and_stay_bounded(s in valueish()) {
                match parse_size(&s) {
                    Ok(n) => prop_assert!(n <= MAX_SIZE),
                    Err(e) => prop_assert!(e.contains("size"), "{}", e),
                }
            }

            #[test]
            fn percentages_are_fractions_or_errors(s in valueish()) {
                match parse_percent(&s) {
                    Ok(f) => prop_assert!((0.0..=1.0).contains(&f)),
                    Err(e) => prop_assert!(e.contains("percentage"), "{}", e),
                }
            }

            #[test]
            fn rates_never_panic_and_have_a_positive_bounded_period(s in valueish()) {
                match parse_rate(&s) {
                    Ok(r) => {
                        prop_assert!(r.count >= 1);
                        prop_assert!(!r.per.is_zero() && r.per <= MAX_DURATION);
                    }
                    Err(e) => prop_assert!(e.contains("rate") || e.contains("duration"), "{}", e),
                }
            }

            #[test]
            fn references_never_panic(s in "[a-z${}:/._ -]{0,40}") {
                // Only unset variables and missing files can come out of this alphabet.
                let _ = resolve_references(&s);
            }
        }
    }
}
