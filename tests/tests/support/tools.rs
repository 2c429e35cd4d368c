//! Finds the real components (Debian packages, npm and PyPI packages) that a test starts.
//! `./dev test` installs them (tests/tools/install); a missing one fails the test by name.

use std::path::{Path, PathBuf};

/// The path of `command` (looked up in PATH, then /usr/sbin and /sbin), or a panic naming the
/// Debian `package` that provides it.
pub fn require(command: &str, package: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let dirs = from_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]);
    for dir in dirs {
        let candidate = dir.join(command);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{command}` is not installed: this test needs Debian's `{package}` \
         (./dev test installs it when run as root; tests/tools/apt.txt lists it)"
    )
}

/// The tests' tool directory (tests/tools).
pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tools")
}

/// The installed npm packages (tests/tools/node/node_modules), or a panic saying how to get them.
pub fn node_modules() -> PathBuf {
    let dir = tools_dir().join("node/node_modules");
    assert!(
        dir.is_dir(),
        "tests/tools/node/node_modules is missing: run tests/tools/install (npm ci from the committed lockfile)"
    );
    dir
}

/// The Python of the tests' virtualenv (tests/tools/python/.venv), or a panic saying how to get it.
pub fn python() -> PathBuf {
    let py = tools_dir().join("python/.venv/bin/python");
    assert!(
        py.is_file(),
        "tests/tools/python/.venv is missing: run tests/tools/install (pip install -r tests/tools/python/requirements.txt)"
    );
    py
}
