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

#[test]
fn writes_are_atomic_and_leave_no_temp_files() {
    let d = dir();
    let path = d.join("a.tok");
    let s = Store::new(&path, KEY, "main");
    s.save(&record()).unwrap();
    // A crash mid-write leaves a temp file behind; the real file is untouched and still read.
    std::fs::write(d.join(".a.tok.tmp-1-000000"), b"half a reco").unwrap();
    assert_eq!(s.load().unwrap(), Some(record()));
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
        1,
        "only the simulated leftover: {names:?}"
    );
    // A write that cannot complete (directory gone) keeps nothing half-written.
    let gone = d.join("missing-dir").join("x.tok");
    let err = Store::new(&gone, KEY, "main").save(&record()).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }));
    assert!(!gone.exists());
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
