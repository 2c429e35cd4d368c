//! `listen: "unix:/path"`: the socket file's life. Pingora binds it (removing whatever is at
//! the path first) with the mode given; this makes sure that what it removes is a stale socket
//! and not somebody's file, and removes the socket when the sidecar exits.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Owner and group read and write: the applications that share the socket are in its group.
pub(crate) const SOCKET_MODE: u32 = 0o660;

/// Checks the path before Pingora binds it: a stale socket file is fine (Pingora removes it),
/// anything else at the path, or a missing directory, stops the start with a clear error. On a
/// hand-over (`--upgrade`) the socket comes from the old process and is left alone.
pub(crate) fn prepare(path: &Path, upgrade: bool) -> Result<(), String> {
    if upgrade {
        return Ok(());
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            tracing::info!(path = %path.display(), "removing a stale socket file");
            Ok(())
        }
        Ok(_) => Err(format!(
            "listen unix:{}: something other than a socket is at that path; not removing it",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match path.parent() {
            Some(dir) if !dir.is_dir() => Err(format!(
                "listen unix:{}: directory {} does not exist",
                path.display(),
                dir.display()
            )),
            _ => Ok(()),
        },
        Err(e) => Err(format!("listen unix:{}: {e}", path.display())),
    }
}

/// Removes the socket file at exit (only a socket: a file someone put there since stays).
pub(crate) fn remove(path: &Path) {
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the socket file");
        }
    }
}
