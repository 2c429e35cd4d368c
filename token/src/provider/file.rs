//! `file`: a token file written by someone else (a Kubernetes projected service-account token,
//! a vault agent). It is re-read when it changes; replacement by rename (how both write it) is
//! seen because the path is checked, not an open handle.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use super::{Fetched, Held, Provider, ProviderError};
use sidecar_config::read_within;

/// How often the file's metadata is checked. A `stat` per second is negligible and, unlike
/// inotify, follows symlink swaps (`..data` in Kubernetes volumes) and files on any filesystem.
const POLL: Duration = Duration::from_secs(1);

/// Larger files are not token files.
const MAX_SIZE: u64 = 1 << 20;

/// A token file is on a local or projected volume; a read that takes longer hangs (a stuck
/// network filesystem, a path swapped for a FIFO between the type check and the open).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What identifies one version of the file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Version {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

pub(super) struct TokenFile {
    path: PathBuf,
    /// The version last read.
    seen: Mutex<Option<Version>>,
}

impl TokenFile {
    pub(super) fn new(path: PathBuf) -> TokenFile {
        TokenFile {
            path,
            seen: Mutex::new(None),
        }
    }

    fn version(&self) -> Option<Version> {
        let m = std::fs::metadata(&self.path).ok()?;
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let ino = 0;
        Some(Version {
            modified: m.modified().ok(),
            len: m.len(),
            ino,
        })
    }

    fn seen(&self) -> Option<Version> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn read(&self) -> Result<Fetched, ProviderError> {
        // Marked seen before reading, so an unreadable version is not retried every poll.
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = self.version();
        let path = self.path.clone();
        let reading =
            tokio::task::spawn_blocking(move || read_within(&path, MAX_SIZE, READ_TIMEOUT));
        let bytes = match reading.await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                return Err(ProviderError::Setup(format!(
                    "cannot read token file {}: {e}",
                    self.path.display()
                )))
            }
            Err(_) => return Err(ProviderError::Setup("token file read was cancelled".into())),
        };
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ProviderError::Malformed("token file is not UTF-8".into()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(ProviderError::Malformed(format!(
                "token file {} is empty",
                self.path.display()
            )));
        }
        Ok(Fetched::token(token.to_string(), None))
    }
}

impl Provider for TokenFile {
    fn fetch<'a>(&'a self, _held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(self.read())
    }

    fn changed(&self) -> Option<BoxFuture<'_, ()>> {
        Some(Box::pin(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let now = self.version();
                if now.is_some() && now != self.seen() {
                    return;
                }
            }
        }))
    }

    fn local(&self) -> bool {
        true
    }
}
