//! Bounded reads of files that someone else writes (token files, the store file): regular files
//! only, at most a given size. Opening a FIFO for reading blocks until a writer shows up, and a
//! character device such as `/dev/zero` never ends, so the file type is checked before the file
//! is opened, and again on the open handle in case the path was swapped in between.

use std::fmt;
use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

/// Why a file was not read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The OS refused (missing file, no permission).
    Io(std::io::Error),
    /// Not a regular file: what it is instead.
    NotRegular(&'static str),
    /// Larger than the limit, in bytes.
    TooLarge(u64),
}

impl ReadError {
    /// Whether the file does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::NotRegular(kind) => write!(f, "not a regular file ({kind})"),
            ReadError::TooLarge(max) => write!(f, "larger than {}", size(*max)),
        }
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

/// What a non-regular file is, for error messages.
fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a file"
}

fn regular(m: &Metadata) -> Result<(), ReadError> {
    if m.is_file() {
        Ok(())
    } else {
        Err(ReadError::NotRegular(kind(m)))
    }
}

/// Reads a regular file (symlinks followed) of at most `max` bytes. Blocks: call it from
/// `spawn_blocking`.
pub(crate) fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    regular(&std::fs::metadata(path).map_err(ReadError::Io)?)?;
    let f = File::open(path).map_err(ReadError::Io)?;
    let meta = f.metadata().map_err(ReadError::Io)?;
    regular(&meta)?;
    if meta.len() > max {
        return Err(ReadError::TooLarge(max));
    }
    let mut buf = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    if buf.len() as u64 > max {
        return Err(ReadError::TooLarge(max));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(1 << 20), "1 MiB");
        assert_eq!(size(256 * 1024), "256 KiB");
        assert_eq!(size(100), "100 bytes");
    }

    #[cfg(unix)]
    #[test]
    fn devices_and_directories_are_refused_before_reading() {
        let err = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file (a character device)");
        let err = read_regular(Path::new("/"), 1 << 20).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file (a directory)");
        assert!(read_regular(Path::new("/nonexistent/x"), 10)
            .unwrap_err()
            .is_not_found());
    }
}
