//! The encrypted token store: one file per provider holding its access token, refresh
//! token and generation, sealed with AES-256-GCM.
//!
//! File layout (all of it before the ciphertext is authenticated as associated data, so a
//! changed header, a file of another provider or a flipped bit is rejected):
//!
//! ```text
//! "TSK1" | version u8 = 1 | kdf u8 (0 raw key, 1 PBKDF2-HMAC-SHA256) | salt [16]
//!        | iterations u32 BE | name length u16 BE | provider name | nonce [12] | ciphertext+tag
//! ```
//!
//! Writes go to a temp file in the same directory (mode 0600), are fsynced, renamed over the old
//! file and the directory is fsynced: a crash leaves either the old or the new file, whole (and
//! maybe a temp file, which the next start removes).

use std::fmt;
use std::io::Write;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sidecar_config::MAX_DURATION;
use sidecar_config::{read_within, READ_TIMEOUT};

const MAGIC: &[u8; 4] = b"TSK1";
const VERSION: u8 = 1;
const KDF_RAW: u8 = 0;
const KDF_PBKDF2: u8 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// PBKDF2-HMAC-SHA256 work factor for passphrases (OWASP's 2023 recommendation).
pub(crate) const PBKDF2_ITERATIONS: u32 = 600_000;
/// Iteration counts read from a file are capped so a crafted file cannot stall the start.
const MAX_ITERATIONS: u32 = 10_000_000;
/// A store file is a few hundred bytes; anything this large is not one.
const MAX_FILE: u64 = 256 * 1024;
/// A temp file of a running process older than this is not a write in progress.
const STALE_TEMP_AGE: Duration = Duration::from_secs(600);

/// Why a store file could not be used. Never carries file contents or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("token store {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        message: String,
    },
    /// Not a store file, or cut short.
    #[error("token store {path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong with its structure.
        reason: &'static str,
    },
    /// Written for another provider (the name is part of the authenticated header).
    #[error("token store {path}: written for provider {found:?}, not {expected:?}")]
    OtherProvider {
        /// The file.
        path: String,
        /// The provider reading it.
        expected: String,
        /// The provider named in the file.
        found: String,
    },
    /// Authentication failed: a different key, or the file was modified.
    #[error("token store {path}: cannot decrypt (wrong key, or the file was modified)")]
    Decrypt {
        /// The file.
        path: String,
    },
}

/// What is persisted for a provider. `Debug` never shows a token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The access token.
    pub access_token: String,
    /// The refresh token to use next, if the provider has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// The access token's generation.
    pub generation: u64,
    /// When it was issued, Unix milliseconds.
    pub issued_at_ms: u64,
    /// When it expires, Unix milliseconds.
    pub expires_at_ms: u64,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("generation", &self.generation)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

impl Record {
    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
    }

    /// Time left until the access token expires, on the wall clock; at most
    /// [`MAX_DURATION`], whatever the file says.
    pub fn ttl_left(&self, now: SystemTime) -> Duration {
        let exp = UNIX_EPOCH + Duration::from_millis(self.expires_at_ms);
        exp.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_DURATION)
    }

    /// How long ago it was issued, on the wall clock.
    pub fn age(&self, now: SystemTime) -> Duration {
        let iat = UNIX_EPOCH + Duration::from_millis(self.issued_at_ms);
        now.duration_since(iat).unwrap_or(Duration::ZERO)
    }
}

enum KeySource {
    /// 32 bytes from `token-sidecar keygen`.
    Raw([u8; 32]),
    /// A passphrase, stretched per salt.
    Passphrase(String),
}

/// A derived key and the header parameters that produced it.
#[derive(Clone, Copy)]
struct Derived {
    kdf: u8,
    salt: [u8; SALT_LEN],
    iterations: u32,
    key: [u8; 32],
}

/// One provider's store file. Its methods block (file I/O, fsync, the KDF): call them from
/// `spawn_blocking`.
pub struct Store {
    path: PathBuf,
    provider: String,
    source: KeySource,
    iterations: u32,
    /// The key last derived, reused while the salt stays the same (PBKDF2 is slow on purpose).
    derived: Mutex<Option<Derived>>,
    rng: SystemRandom,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store for `provider` at `path`. `key` is a base64 32-byte key or else a passphrase.
    pub fn new(path: impl Into<PathBuf>, key: &str, provider: &str) -> Store {
        Store::with_iterations(path, key, provider, PBKDF2_ITERATIONS)
    }

    /// Like [`Store::new`] with another PBKDF2 work factor for new files (tests).
    pub fn with_iterations(
        path: impl Into<PathBuf>,
        key: &str,
        provider: &str,
        iterations: u32,
    ) -> Store {
        process_start();
        let trimmed = key.trim();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
        let source = match raw {
            Some(k) => KeySource::Raw(k),
            None => KeySource::Passphrase(key.to_string()),
        };
        Store {
            path: path.into(),
            provider: provider.to_string(),
            source,
            iterations: iterations.clamp(1, MAX_ITERATIONS),
            derived: Mutex::new(None),
            rng: SystemRandom::new(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn corrupt(&self, reason: &'static str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            reason,
        }
    }

    fn key_for(&self, kdf: u8, salt: [u8; SALT_LEN], iterations: u32) -> Option<Derived> {
        let mut cache = self.derived.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = *cache {
            if d.kdf == kdf && d.salt == salt && d.iterations == iterations {
                return Some(d);
            }
        }
        let key = match (&self.source, kdf) {
            (KeySource::Raw(k), KDF_RAW) => *k,
            (KeySource::Passphrase(p), KDF_PBKDF2) => {
                let n = NonZeroU32::new(iterations.min(MAX_ITERATIONS))?;
                let mut out = [0u8; 32];
                ring::pbkdf2::derive(
                    ring::pbkdf2::PBKDF2_HMAC_SHA256,
                    n,
                    &salt,
                    p.as_bytes(),
                    &mut out,
                );
                out
            }
            // The file was sealed with the other kind of key: it cannot be ours.
            _ => return None,
        };
        let d = Derived {
            kdf,
            salt,
            iterations,
            key,
        };
        *cache = Some(d);
        Some(d)
    }

    /// The key for a new file: the cached one, or a fresh salt for a passphrase.
    fn key_for_write(&self) -> Result<Derived, StoreError> {
        let cached = *self.derived.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = cached {
            return Ok(d);
        }
        match &self.source {
            KeySource::Raw(_) => self.key_for(KDF_RAW, [0; SALT_LEN], 0),
            KeySource::Passphrase(_) => {
                let mut salt = [0u8; SALT_LEN];
                self.rng
                    .fill(&mut salt)
                    .map_err(|_| self.corrupt("no randomness for the salt"))?;
                self.key_for(KDF_PBKDF2, salt, self.iterations)
            }
        }
        .ok_or_else(|| self.corrupt("cannot derive a key"))
    }

    /// Reads the stored record. `Ok(None)`: no file yet. Something at the path that is not a
    /// regular file (a FIFO would block the read for ever) is an error, never read. Temp files
    /// that an interrupted write left behind are removed first (the process runs this once, at
    /// its start, before it writes).
    pub fn load(&self) -> Result<Option<Record>, StoreError> {
        self.remove_stale_temp_files();
        let bytes = match read_within(&self.path, MAX_FILE, READ_TIMEOUT) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io {
                    path: self.path.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        self.open(&bytes).map(Some)
    }

    /// The directory of the file and the prefix of its temp files.
    fn temp_prefix(&self) -> (PathBuf, String) {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "store".into());
        (dir, format!(".{file_name}.tmp-"))
    }

    /// Removes `.<name>.tmp-<pid>-<hex>` files of writes that can no longer finish: their writer
    /// is gone (a kill -9 or power loss between create and rename). A temp file of a live
    /// process is kept unless it is old: a write takes milliseconds.
    fn remove_stale_temp_files(&self) {
        let (dir, prefix) = self.temp_prefix();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let own = std::process::id();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().ok();
            let stale = if pid == own {
                // Ours only if written since this process started; else a previous life of
                // the same pid (pid 1 in a container) left it.
                modified.is_none_or(|m| m < *process_start())
            } else {
                !process_alive(pid)
                    || modified.is_none_or(|m| {
                        SystemTime::now()
                            .duration_since(m)
                            .is_ok_and(|age| age > STALE_TEMP_AGE)
                    })
            };
            if stale {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => tracing::info!(
                        file = %entry.path().display(),
                        "removed a temp file of an interrupted token store write"
                    ),
                    Err(e) => tracing::warn!(
                        file = %entry.path().display(),
                        error = %e,
                        "cannot remove a temp file of an interrupted token store write"
                    ),
                }
            }
        }
    }

    /// Decrypts file contents (also the token blob replicas share through Redis).
    pub(crate) fn open(&self, bytes: &[u8]) -> Result<Record, StoreError> {
        let mut r = Reader { bytes, at: 0 };
        let too_short = || self.corrupt("file is truncated");
        if r.take(4).ok_or_else(too_short)? != MAGIC {
            return Err(self.corrupt("not a token-sidecar store file"));
        }
        if r.take(1).ok_or_else(too_short)? != [VERSION] {
            return Err(self.corrupt("unknown store file version"));
        }
        let kdf = r.take(1).ok_or_else(too_short)?[0];
        let salt: [u8; SALT_LEN] = r
            .take(SALT_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(too_short)?;
        let iterations = u32::from_be_bytes(
            r.take(4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(too_short)?,
        );
        let name_len = u16::from_be_bytes(
            r.take(2)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(too_short)?,
        );
        let name = r.take(usize::from(name_len)).ok_or_else(too_short)?;
        let nonce = r.take(NONCE_LEN).ok_or_else(too_short)?;
        let header_len = r.at;
        let ciphertext = &bytes[header_len..];
        if ciphertext.len() < TAG_LEN {
            return Err(too_short());
        }
        if name != self.provider.as_bytes() {
            return Err(StoreError::OtherProvider {
                path: self.path.display().to_string(),
                expected: self.provider.clone(),
                found: String::from_utf8_lossy(name).into_owned(),
            });
        }
        if !matches!(kdf, KDF_RAW | KDF_PBKDF2) || iterations > MAX_ITERATIONS {
            return Err(self.corrupt("unknown key derivation"));
        }
        let decrypt = || StoreError::Decrypt {
            path: self.path.display().to_string(),
        };
        let key = self.key_for(kdf, salt, iterations).ok_or_else(decrypt)?;
        let cipher = Aes256Gcm::new((&key.key).into());
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &bytes[..header_len],
                },
            )
            .map_err(|_| decrypt())?;
        serde_json::from_slice(&plain).map_err(|_| self.corrupt("record is not readable"))
    }

    /// Seals a record into file contents with a fresh nonce (also the token blob replicas share
    /// through Redis).
    pub(crate) fn seal(&self, record: &Record) -> Result<Vec<u8>, StoreError> {
        let key = self.key_for_write()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| self.corrupt("no randomness for the nonce"))?;
        let name = self.provider.as_bytes();
        let name_len =
            u16::try_from(name.len()).map_err(|_| self.corrupt("provider name too long"))?;
        let mut out = Vec::with_capacity(64 + name.len() + 256);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(key.kdf);
        out.extend_from_slice(&key.salt);
        out.extend_from_slice(&key.iterations.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&nonce);
        let plain = serde_json::to_vec(record).map_err(|_| self.corrupt("cannot encode record"))?;
        let cipher = Aes256Gcm::new((&key.key).into());
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &out,
                },
            )
            .map_err(|_| self.corrupt("encryption failed"))?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Writes a record durably: temp file (0600) + fsync + rename + directory fsync. When this
    /// returns `Ok`, the record survives a crash or power loss.
    pub fn save(&self, record: &Record) -> Result<(), StoreError> {
        let bytes = self.seal(record)?;
        self.replace_file(&bytes).map_err(|e| self.io(e))
    }

    fn replace_file(&self, bytes: &[u8]) -> std::io::Result<()> {
        let (dir, prefix) = self.temp_prefix();
        let mut suffix = [0u8; 6];
        let _ = self.rng.fill(&mut suffix);
        let tmp = dir.join(format!(
            "{prefix}{}-{}",
            std::process::id(),
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        let result = (|| {
            let mut f = create_private(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &self.path)?;
            sync_dir(&dir)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
}

/// When this process first made a store: temp files of its own pid older than this are from a
/// previous process with the same pid.
fn process_start() -> &'static SystemTime {
    static START: OnceLock<SystemTime> = OnceLock::new();
    START.get_or_init(SystemTime::now)
}

/// Whether a process with this pid runs. Without `/proc` nobody can tell: assume it does (the
/// age rule still removes its temp files eventually).
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Makes the rename itself durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests;
