//! Pointing a cross-field error at file:line:col.

use crate::ConfigError;

/// Builds errors that point at the first line mentioning a key or value; cross-field problems
/// have no serde location, so the text is searched instead.
pub(super) struct Locator<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a str,
}

impl Locator<'_> {
    pub(super) fn error(&self, needles: &[&str], message: String) -> ConfigError {
        let mut from = 0;
        let mut found = None;
        for needle in needles {
            match self.text[from..].find(needle) {
                Some(i) => {
                    found = Some(from + i);
                    from += i;
                }
                None => break,
            }
        }
        match found {
            Some(offset) => {
                let before = &self.text[..offset];
                let line = before.matches('\n').count() + 1;
                let col = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                ConfigError::At {
                    file: self.file.to_string(),
                    line,
                    col,
                    message,
                }
            }
            None => ConfigError::Invalid {
                file: self.file.to_string(),
                message,
            },
        }
    }
}
