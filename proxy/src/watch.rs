//! Hot reload: watches the config file and reloads when its content changes.
//!
//! The directory is watched rather than the file, so editors that replace the file by rename and
//! Kubernetes ConfigMap updates (an atomic swap of the `..data` symlink) are seen too. Events are
//! debounced and a reload happens only when the bytes behind the path actually changed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};

use crate::app::App;

/// Whether `event` can mean that the config changed: something wrote, created, removed or renamed
/// the config file (`name`) or one of Kubernetes' `..data` entries. Not a busy neighbour (a log
/// file in the same directory must not keep resetting the debounce), and not opening or reading
/// the file: the watcher's own read after each event would otherwise wake it again, ten times a
/// second for ever. Attribute changes alone (chmod, atime) leave the content as it was.
fn relevant(event: &notify::Event, name: Option<&OsStr>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let may_change = match event.kind {
        // The end of a write.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    };
    may_change
        && event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| Some(n) == name || n.to_string_lossy().starts_with(".."))
        })
}

/// What the path holds now, as a digest: of its bytes, or of why it cannot be read (a file over
/// the size cap or not a regular file still gets one reload attempt, which logs and counts the
/// error). `None` while it is missing, as it briefly is during some editors' saves. The read is
/// the config's own bounded read: a config swapped for a FIFO or `/dev/zero` never hangs or
/// fills the watcher.
fn digest(path: &Path) -> Option<Vec<u8>> {
    match sidecar_config::read_bounded(path) {
        Ok(bytes) => Some(Sha256::digest(&bytes).to_vec()),
        Err(sidecar_config::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Sha256::digest(format!("unreadable: {e}")).to_vec()),
    }
}

/// Starts watching `path`; the returned watcher must be kept alive. `None` (logged) when the
/// platform cannot watch: SIGHUP and `POST /v1/reload` still work.
pub fn spawn(app: Arc<App>, path: PathBuf) -> Option<notify::RecommendedWatcher> {
    let (tx, rx) = mpsc::channel::<()>();
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = event.is_ok_and(|e| relevant(&e, name.as_deref()));
            if relevant {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
                return None;
            }
        };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP");
        return None;
    }
    let mut last = digest(&path);
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Debounce: an editor's save is several events; never wait more than 500 ms.
                let deadline = std::time::Instant::now() + Duration::from_millis(500);
                while rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                    if std::time::Instant::now() >= deadline {
                        break;
                    }
                }
                let now = digest(&path);
                if now.is_some() && now != last {
                    last = now;
                    app.reload(&path);
                }
            }
        })
        .ok()?;
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, MetadataKind, ModifyKind,
        RemoveKind, RenameMode,
    };
    use notify::Event;

    use super::*;

    fn on(kind: EventKind, file: &str) -> bool {
        let event = Event::new(kind).add_path(PathBuf::from("/etc/sidecar").join(file));
        relevant(&event, Some(OsStr::new("sidecar.yaml")))
    }

    #[test]
    fn writes_renames_and_configmap_swaps_count() {
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(on(data, "sidecar.yaml"));
        assert!(on(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "sidecar.yaml"
        ));
        assert!(on(EventKind::Create(CreateKind::File), "sidecar.yaml"));
        assert!(on(EventKind::Remove(RemoveKind::File), "sidecar.yaml"));
        assert!(on(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            "sidecar.yaml"
        ));
        assert!(on(EventKind::Create(CreateKind::Any), "..data_tmp"));
        assert!(on(EventKind::Any, "sidecar.yaml"));
    }

    #[test]
    fn reading_the_file_and_busy_neighbours_do_not() {
        // The watcher's own digest opens, reads and closes the file.
        for access in [
            AccessKind::Open(AccessMode::Read),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(!on(EventKind::Access(access), "sidecar.yaml"), "{access:?}");
        }
        assert!(!on(
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)),
            "sidecar.yaml"
        ));
        assert!(!on(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            "sidecar.log"
        ));
    }
}
