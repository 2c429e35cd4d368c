use std::path::PathBuf;

use super::*;

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes, base64
const OTHER_KEY: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

/// A fresh directory, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "sidecar-store-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn record() -> Record {
    Record {
        access_token: "access-SECRET-1".into(),
        refresh_token: Some("refresh-SECRET-1".into()),
        generation: 7,
        issued_at_ms: 1_700_000_000_000,
        expires_at_ms: 1_700_003_600_000,
    }
}

#[test]
fn round_trip_with_a_raw_key() {
    let d = dir();
    let s = Store::new(d.join("main.tok"), KEY, "main");
    assert_eq!(s.load().unwrap(), None, "no file yet");
    s.save(&record()).unwrap();
    let again = Store::new(d.join("main.tok"), KEY, "main");
    assert_eq!(again.load().unwrap(), Some(record()));
    let bytes = std::fs::read(d.join("main.tok")).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("SECRET"), "stored in clear");
    assert_eq!(bytes[5], KDF_RAW);
}

#[test]
fn round_trip_with_a_passphrase_and_a_stored_salt() {
    let d = dir();
    let s = Store::with_iterations(d.join("p.tok"), "correct horse battery", "main", 1000);
    s.save(&record()).unwrap();
    let bytes = std::fs::read(d.join("p.tok")).unwrap();
    assert_eq!(bytes[5], KDF_PBKDF2);
    assert_ne!(&bytes[6..22], &[0u8; 16], "salt is random");
    // A fresh store (no cached key) derives the key from the salt in the file.
    let fresh = Store::new(d.join("p.tok"), "correct horse battery", "main");
    assert_eq!(fresh.load().unwrap(), Some(record()));
    let wrong = Store::new(d.join("p.tok"), "wrong horse", "main");
    assert!(matches!(wrong.load(), Err(StoreError::Decrypt { .. })));
}

#[test]
fn every_write_uses_a_new_nonce() {
    let d = dir();
    let s = Store::new(d.join("n.tok"), KEY, "main");
    s.save(&record()).unwrap();
    let a = std::fs::read(d.join("n.tok")).unwrap();
    s.save(&record()).unwrap();
    let b = std::fs::read(d.join("n.tok")).unwrap();
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b, "same record, same key: only the nonce differs");
}

#[test]
fn wrong_key_is_an_error_not_a_token() {
    let d = dir();
    Store::new(d.join("w.tok"), KEY, "main")
        .save(&record())
        .unwrap();
    let err = Store::new(d.join("w.tok"), OTHER_KEY, "main")
        .load()
        .unwrap_err();
    assert!(matches!(err, StoreError::Decrypt { .. }), "{err}");
    // A passphrase store cannot open a raw-key file either.
    let err = Store::new(d.join("w.tok"), "a passphrase", "main")
        .load()
        .unwrap_err();
    assert!(matches!(err, StoreError::Decrypt { .. }), "{err}");
}

#[test]
fn every_truncation_is_rejected() {
    let d = dir();
    let path = d.join("t.tok");
    let s = Store::new(&path, KEY, "main");
    s.save(&record()).unwrap();
    let full = std::fs::read(&path).unwrap();
    for len in 0..full.len() {
        std::fs::write(&path, &full[..len]).unwrap();
        let r = Store::new(&path, KEY, "main").load();
        assert!(r.is_err(), "truncated to {len} bytes was accepted");
    }
}

#[test]
fn every_bit_flip_is_rejected() {
    let d = dir();
    let path = d.join("b.tok");
    Store::new(&path, KEY, "main").save(&record()).unwrap();
    let full = std::fs::read(&path).unwrap();
    let s = Store::new(&path, KEY, "main");
    for i in 0..full.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = full.clone();
            bad[i] ^= bit;
            std::fs::write(&path, &bad).unwrap();
            assert!(
                s.load().is_err(),
                "flip of bit {bit:#x} in byte {i} accepted"
            );
        }
    }
    std::fs::write(&path, &full).unwrap();
    assert_eq!(
        s.load().unwrap(),
        Some(record()),
        "the key cache did not go stale"
    );
}

#[test]
fn another_providers_file_is_rejected() {
    let d = dir();
    let path = d.join("o.tok");
    Store::new(&path, KEY, "other").save(&record()).unwrap();
    let err = Store::new(&path, KEY, "main").load().unwrap_err();
    assert!(
        matches!(&err, StoreError::OtherProvider { found, .. } if found == "other"),
        "{err}"
    );
    // Renaming the provider in the header does not help: the name is authenticated.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(5).position(|w| w == b"other").unwrap();
    bytes.splice(at..at + 5, b"main!".iter().copied());
    let at = bytes.windows(5).position(|w| w == b"main!").unwrap();
    bytes.remove(at + 4);
    bytes[at - 1] = 4; // name length (low byte)
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::new(&path, KEY, "main").load().unwrap_err();
    assert!(matches!(err, StoreError::Decrypt { .. }), "{err}");
}

#[test]
fn garbage_and_huge_files_are_rejected() {
    let d = dir();
    let path = d.join("g.tok");
    let s = Store::new(&path, KEY, "main");
    std::fs::write(&path, b"hello, not a store").unwrap();
    assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
    std::fs::write(&path, vec![b'x'; 1 << 20]).unwrap();
    assert!(matches!(s.load(), Err(StoreError::Io { .. })));
    // A header claiming an absurd work factor does not stall the start.
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&[VERSION, KDF_PBKDF2]);
    bytes.extend_from_slice(&[1u8; SALT_LEN]);
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    bytes.extend_from_slice(&4u16.to_be_bytes());
    bytes.extend_from_slice(b"main");
    bytes.extend_from_slice(&[0u8; NONCE_LEN + 40]);
    std::fs::write(&path, &bytes).unwrap();
    let p = Store::new(&path, "passphrase", "main");
    assert!(matches!(p.load(), Err(StoreError::Corrupt { .. })));
}

#[cfg(unix)]
#[test]
fn file_mode_is_0600() {
    use std::os::unix::fs::PermissionsExt;
    let d = dir();
    let path = d.join("m.tok");
    // Even replacing a world-readable file.
    std::fs::write(&path, b"old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    Store::new(&path, KEY, "main").save(&record()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// A pid no process has now: a child that ran and was reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn writes_are_atomic_and_temp_files_of_dead_writers_are_removed_on_load() {
    let d = dir();
    let path = d.join("a.tok");
    let s = Store::new(&path, KEY, "main");
    s.save(&record()).unwrap();
    // A crash mid-write leaves a temp file behind; the real file is untouched and still read,
    // and the leftover is removed. A temp file of a live process (pid 1, a write in progress)
    // and files of other names are not touched.
    let stale = d.join(&format!(".a.tok.tmp-{}-00aa11", dead_pid()));
    let live = d.join(".a.tok.tmp-1-00bb22");
    let other = d.join(".b.tok.tmp-999999999-00cc33");
    for f in [&stale, &live, &other] {
        std::fs::write(f, b"half a reco").unwrap();
    }
    assert_eq!(s.load().unwrap(), Some(record()));
    assert!(!stale.exists(), "the stale temp file is still there");
    assert!(live.exists() && other.exists());
    let mut next = record();
    next.generation = 8;
    next.refresh_token = Some("refresh-SECRET-2".into());
    s.save(&next).unwrap();
    assert_eq!(s.load().unwrap(), Some(next.clone()));
    let names: Vec<String> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.contains(".tmp-")).count(),
        2,
        "only the two kept on purpose: {names:?}"
    );
    // A write that cannot complete (directory gone) keeps nothing half-written.
    let gone = d.join("missing-dir").join("x.tok");
    let err = Store::new(&gone, KEY, "main").save(&record()).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }));
    assert!(!gone.exists());
}

#[cfg(unix)]
#[test]
fn a_fifo_or_a_device_at_the_path_is_an_error_not_a_hang() {
    let d = dir();
    let path = d.join("f.tok");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    // On a thread, so that a hang fails the test instead of stalling it.
    let s = Store::new(&path, KEY, "main");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(s.load());
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("loading a FIFO hung");
    let err = got.unwrap_err();
    assert!(
        matches!(&err, StoreError::Io { message, .. } if message.starts_with("is a FIFO, not a regular file")),
        "{err}"
    );
    // Saving replaces it with a regular file.
    let s = Store::new(&path, KEY, "main");
    s.save(&record()).unwrap();
    assert_eq!(s.load().unwrap(), Some(record()));
    let err = Store::new("/dev/zero", KEY, "main").load().unwrap_err();
    assert!(err.to_string().contains("a character device"), "{err}");
}

mod props {
    use proptest::prelude::*;

    use super::*;

    fn any_record() -> impl Strategy<Value = Record> {
        (
            proptest::collection::vec(any::<char>(), 0..64),
            proptest::option::of(proptest::collection::vec(any::<char>(), 0..64)),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(at, rt, generation, issued_at_ms, expires_at_ms)| Record {
                access_token: at.into_iter().collect(),
                refresh_token: rt.map(|r| r.into_iter().collect()),
                generation,
                issued_at_ms,
                expires_at_ms,
            })
    }

    /// A well-formed header for "main" followed by arbitrary bytes, or arbitrary bytes alone.
    fn any_file() -> impl Strategy<Value = Vec<u8>> {
        let header = (any::<u8>(), any::<[u8; SALT_LEN]>(), any::<u32>(), 0u16..8).prop_map(
            |(kdf, salt, iterations, name_len)| {
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&[VERSION, kdf % 3]);
                b.extend_from_slice(&salt);
                b.extend_from_slice(&iterations.min(1000).to_be_bytes());
                b.extend_from_slice(&name_len.to_be_bytes());
                b.extend_from_slice(&b"main0123"[..usize::from(name_len)]);
                b
            },
        );
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            (header, proptest::collection::vec(any::<u8>(), 0..128)).prop_map(|(mut h, t)| {
                h.extend_from_slice(&t);
                h
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary file contents: an error (never a record, never a panic).
        #[test]
        fn arbitrary_bytes_are_an_error_never_a_panic(bytes in any_file()) {
            let s = Store::with_iterations("/nonexistent/p.tok", KEY, "main", 1);
            prop_assert!(s.open(&bytes).is_err());
            let p = Store::with_iterations("/nonexistent/p.tok", "a passphrase", "main", 1);
            prop_assert!(p.open(&bytes).is_err());
        }

        /// Every record survives sealing and opening, and the ttl and age computed from it
        /// never panic.
        #[test]
        fn seal_then_open_round_trips(r in any_record()) {
            let s = Store::new("/nonexistent/r.tok", KEY, "main");
            let sealed = s.seal(&r).unwrap();
            prop_assert_eq!(s.open(&sealed).unwrap(), r.clone());
            prop_assert!(r.ttl_left(SystemTime::now()) <= MAX_DURATION);
            let _ = r.age(SystemTime::now());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The same through the file: save then load (fewer cases: each write is fsynced).
        #[test]
        fn save_then_load_round_trips(r in any_record()) {
            let d = dir();
            let s = Store::new(d.join("r.tok"), KEY, "main");
            s.save(&r).unwrap();
            prop_assert_eq!(Store::new(d.join("r.tok"), KEY, "main").load().unwrap(), Some(r));
        }
    }
}

#[test]
fn errors_and_debug_never_show_secrets() {
    let d = dir();
    let path = d.join("s.tok");
    let s = Store::new(&path, "my-passphrase-SECRET", "main");
    assert!(!format!("{s:?}").contains("SECRET"));
    assert!(!format!("{:?}", record()).contains("SECRET"));
    Store::new(&path, KEY, "main").save(&record()).unwrap();
    let err = s.load().unwrap_err();
    assert!(!err.to_string().contains("SECRET"), "{err}");
}
