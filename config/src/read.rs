//! Bounded reads of files someone else writes: the config file itself, `${file:}` references, CA
//! bundles, token files, the token store. Every read has a size cap and a time cap, and
//! only regular files are read: `/dev/zero` would never end and a FIFO would block the reader
//! until someone writes to it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The largest config file or `${file:}` reference read.
pub const MAX_FILE: u64 = 4 << 20;

/// How long one read may take. A read that takes longer (a hung network mount, a file swapped for
/// a FIFO between the type check and the open) is given up; the thread doing it is left to finish
/// on its own, so the caller never waits longer than this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a file a config names could not be read. The message never contains the file's content.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The operating system refused (missing file, permissions).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A directory, device, FIFO or socket.
    #[error("is {0}, not a regular file; only regular files are read")]
    NotRegular(&'static str),
    /// Over the size cap (in bytes).
    #[error("is larger than {}, the most that is read", size(*.0))]
    TooLarge(u64),
    /// Over the time cap.
    #[error("could not be read within {} s", READ_TIMEOUT.as_secs())]
    TimedOut,
}

impl ReadError {
    /// Whether there is no file at the path.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.trailing_zeros() >= 20 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.trailing_zeros() >= 10 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// Reads `path`, at most [`MAX_FILE`] bytes in at most [`READ_TIMEOUT`].
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_within(path, MAX_FILE, READ_TIMEOUT)
}

/// [`read_bounded`] with the caps given; `timeout` is also capped at [`READ_TIMEOUT`]. Blocks the
/// calling thread (at most `timeout`): call it from `spawn_blocking` in async code.
pub fn read_within(path: &Path, max: u64, timeout: Duration) -> Result<Vec<u8>, ReadError> {
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    let meta = std::fs::metadata(path)?;
    regular(&meta)?;
    if meta.len() > max {
        return Err(ReadError::TooLarge(max));
    }
    let owned: PathBuf = path.to_path_buf();
    with_deadline(timeout.min(READ_TIMEOUT), move || read_open(&owned, max))
}

/// Runs `read` on a thread of its own and waits at most `timeout` for it.
pub(crate) fn with_deadline<F>(timeout: Duration, read: F) -> Result<Vec<u8>, ReadError>
where
    F: FnOnce() -> Result<Vec<u8>, ReadError> + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("config-read".into())
        .spawn(move || {
            let _ = tx.send(read());
        })?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(ReadError::TimedOut),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(ReadError::Io(std::io::Error::other(
            "the reading thread ended without an answer",
        ))),
    }
}

fn read_open(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path)?;
    // Again on what was opened: the path may have been replaced since the first check.
    regular(&file.metadata()?)?;
    let mut buf = Vec::new();
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(ReadError::TooLarge(max));
    }
    Ok(buf)
}

fn regular(meta: &std::fs::Metadata) -> Result<(), ReadError> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    Err(ReadError::NotRegular(kind(&t)))
}

#[cfg(unix)]
fn kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "something else"
    }
}

#[cfg(not(unix))]
fn kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else {
        "something else"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let n: u64 = std::process::id().into();
        let dir = std::env::temp_dir().join(format!("sidecar-read-{tag}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn regular_files_are_read_up_to_the_cap() {
        let dir = scratch("cap");
        let at_cap = dir.join("at-cap");
        std::fs::write(&at_cap, vec![b'a'; MAX_FILE as usize]).unwrap();
        assert_eq!(read_bounded(&at_cap).unwrap().len() as u64, MAX_FILE);
        let over = dir.join("over");
        std::fs::write(&over, vec![b'a'; MAX_FILE as usize + 1]).unwrap();
        assert!(matches!(read_bounded(&over), Err(ReadError::TooLarge(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_without_reading() {
        let e = read_bounded(Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(e, ReadError::NotRegular("a character device")),
            "{e}"
        );
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let dir = scratch("kinds");
        assert!(matches!(
            read_bounded(&dir),
            Err(ReadError::NotRegular("a directory"))
        ));
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // Opening it would block until a writer came: it is refused before that.
            assert!(matches!(
                read_bounded(&fifo),
                Err(ReadError::NotRegular("a FIFO"))
            ));
        }
        assert!(matches!(
            read_bounded(&dir.join("missing")),
            Err(ReadError::Io(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_read_that_never_ends_is_given_up() {
        // A reader that blocks until the test is over, standing for a hung mount.
        let (_keep, blocked) = mpsc::channel::<()>();
        let e = with_deadline(Duration::from_millis(50), move || {
            let _ = blocked.recv();
            Ok(Vec::new())
        })
        .unwrap_err();
        assert!(matches!(e, ReadError::TimedOut), "{e}");
    }
}
