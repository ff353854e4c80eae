//! `DATASAVER_TLS_AUTO`: a standalone coordinator makes its own fleet CA,
//! its certificate, an admin operator's and the enrollment CA (for its
//! embedded agent) in `<data dir>/pki/` at the first start, so a
//! one-container setup needs no certificate steps. Made whole or not at all:
//! written into a temporary directory renamed into place.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The files the coordinator expects there.
pub const FILES: [&str; 8] = [
    "ca.crt",
    "ca.key",
    "coordinator.crt",
    "coordinator.key",
    "operator.crt",
    "operator.key",
    "enrollment-ca.crt",
    "enrollment-ca.key",
];

/// Validity of what it makes: long, since nobody renews a standalone
/// container's certificates by hand and they serve loopback.
const DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
#[error("DATASAVER_TLS_AUTO: {dir}: {message}")]
pub struct AutoError {
    pub dir: String,
    pub message: String,
}

/// Creates the files in `dir` unless they are all there already.
pub fn ensure(dir: &Path) -> Result<bool, AutoError> {
    let err = |message: String| AutoError {
        dir: dir.display().to_string(),
        message,
    };
    let present: Vec<&str> = FILES
        .iter()
        .copied()
        .filter(|f| dir.join(f).exists())
        .collect();
    if present.len() == FILES.len() {
        return Ok(false);
    }
    if dir.exists() {
        return Err(err(format!(
            "holds only {} of the certificate files ({}); restore the rest from a copy, or move the directory away to start a new fleet (agents joined to the old one must join again)",
            present.len(),
            FILES.join(", ")
        )));
    }
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h != "localhost" {
            sans.push(h.to_string());
        }
    }
    let (fleet, issuer) =
        datasaver_common::pki::new_fleet(&sans, "admin", DAYS).map_err(|e| err(e.to_string()))?;
    let (enroll_cert, enroll_key) =
        datasaver_common::pki::enrollment_ca(&issuer).map_err(|e| err(e.to_string()))?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| err(format!("cannot create it: {e}")))?;
    let tmp = parent.join(format!(".pki.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
    let files: [(&str, &str); 8] = [
        ("ca.crt", &fleet.ca_cert),
        ("ca.key", &fleet.ca_key),
        ("coordinator.crt", &fleet.coordinator_cert),
        ("coordinator.key", &fleet.coordinator_key),
        ("operator.crt", &fleet.operator_cert),
        ("operator.key", &fleet.operator_key),
        ("enrollment-ca.crt", &enroll_cert),
        ("enrollment-ca.key", &enroll_key),
    ];
    for (name, pem) in files {
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(tmp.join(name))?;
            f.write_all(pem.as_bytes())?;
            f.sync_all()
        };
        write().map_err(|e| err(format!("cannot write {name}: {e}")))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| err(format!("cannot put it in place: {e}")))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_whole_and_never_over_a_partial_one() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("pki");
        assert!(ensure(&dir).unwrap());
        for f in FILES {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let first = std::fs::read(dir.join("ca.crt")).unwrap();
        assert!(!ensure(&dir).unwrap());
        assert_eq!(std::fs::read(dir.join("ca.crt")).unwrap(), first);
        std::fs::remove_file(dir.join("ca.key")).unwrap();
        let e = ensure(&dir).unwrap_err().to_string();
        assert!(e.contains("holds only 7 of the certificate files"), "{e}");
        assert_eq!(std::fs::read(dir.join("ca.crt")).unwrap(), first);
    }
}
