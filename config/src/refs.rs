//! `${env:NAME}` and `${file:/path}` references, resolved while the config is read.
//!
//! Each `${file:}` read is bounded like the config file itself ([`crate::read`]). One load of a
//! config also has a budget for all its references together — bytes they expand to and time spent
//! reading files — because a 4 MiB config could otherwise name a 4 MiB file a hundred thousand
//! times. The budget lives in a thread-local for the duration of [`Config::parse`] (serde's
//! `Deserialize` impls that resolve references take no context); a reference resolved outside a
//! load gets a fresh budget of its own.
//!
//! [`Config::parse`]: crate::Config::parse

use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::read::{read_within, MAX_FILE};

/// The most all references of one config may expand to, together.
pub const MAX_REFERENCED: u64 = 16 << 20;

/// The longest all `${file:}` reads of one config may take, together.
pub const REFERENCES_TIME: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
struct Budget {
    bytes_left: u64,
    deadline: Instant,
}

impl Budget {
    fn fresh() -> Budget {
        Budget {
            bytes_left: MAX_REFERENCED,
            deadline: Instant::now() + REFERENCES_TIME,
        }
    }
}

thread_local! {
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// Runs `f` (one config load) under a fresh reference budget.
pub(crate) fn with_budget<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Budget>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUDGET.with(|b| b.set(self.0));
        }
    }
    let _restore = Restore(BUDGET.with(|b| b.replace(Some(Budget::fresh()))));
    f()
}

/// The current budget (a fresh one outside a load), updated by `f`.
fn with_current<T>(f: impl FnOnce(&mut Budget) -> T) -> T {
    BUDGET.with(|b| match b.get() {
        Some(mut budget) => {
            let out = f(&mut budget);
            b.set(Some(budget));
            out
        }
        None => f(&mut Budget::fresh()),
    })
}

fn charge(len: usize) -> Result<(), String> {
    with_current(|b| {
        let len = len as u64;
        if len > b.bytes_left {
            return Err(format!(
                "the ${{...}} references of this config expand to more than {} MiB in all",
                MAX_REFERENCED >> 20
            ));
        }
        b.bytes_left -= len;
        Ok(())
    })
}

fn time_left() -> Duration {
    with_current(|b| b.deadline.saturating_duration_since(Instant::now()))
}

fn read_reference(path: &str) -> Result<String, String> {
    let why = |e: String| format!("cannot read {path} (from ${{file:{path}}}): {e}");
    let left = time_left();
    if left.is_zero() {
        return Err(why(format!(
            "reading the ${{file:}} references of this config took more than {} s in all",
            REFERENCES_TIME.as_secs()
        )));
    }
    let bytes = read_within(Path::new(path), MAX_FILE, left).map_err(|e| why(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| why("it is not UTF-8 text".into()))?;
    let text = match text.strip_suffix('\n') {
        Some(t) => t.strip_suffix('\r').unwrap_or(t).to_string(),
        None => text,
    };
    Ok(text)
}

/// Replaces every `${env:NAME}` and `${file:/path}` in `s`. A file's trailing newline is dropped.
/// Errors name the reference, never its value.
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
            read_reference(path)?
        } else {
            return Err(format!(
                "unknown reference ${{{reference}}}; use ${{env:NAME}} or ${{file:/path}}"
            ));
        };
        charge(value.len())?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sidecar-refs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn file_references_are_regular_files_of_at_most_4_mib() {
        let e = resolve_references("${file:/dev/zero}").unwrap_err();
        assert!(
            e.contains("/dev/zero") && e.contains("not a regular file"),
            "{e}"
        );
        let dir = scratch("cap");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; MAX_FILE as usize + 1]).unwrap();
        let e = resolve_references(&format!("${{file:{}}}", big.display())).unwrap_err();
        assert!(e.contains("larger than 4 MiB"), "{e}");
        let binary = dir.join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let e = resolve_references(&format!("${{file:{}}}", binary.display())).unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_load_has_one_budget_for_all_references() {
        let dir = scratch("budget");
        let file = dir.join("three-mib");
        std::fs::write(&file, vec![b'k'; 3 << 20]).unwrap();
        let reference = format!("${{file:{}}}", file.display());
        // Each alone is fine; six of them in one load are 18 MiB.
        assert_eq!(resolve_references(&reference).unwrap().len(), 3 << 20);
        let e = with_budget(|| {
            (0..6)
                .map(|_| resolve_references(&reference).map(|v| v.len()))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_err();
        assert!(e.contains("more than 16 MiB in all"), "{e}");
        // The next load starts afresh.
        assert!(with_budget(|| resolve_references(&reference)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
