//! One coordinator per data directory. Two coordinators on one catalog would
//! each "repair" the other's running backups at start-up (fail their rows,
//! remove their temp files) and race on every write, so the data directory
//! holds an exclusive `flock` on `coordinator.lock` for the whole life of the
//! process; the file says which PID holds it. The kernel drops the lock when
//! the process dies, however it dies, so a file left by a dead coordinator is
//! simply taken over.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "coordinator.lock";

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("DATASAVER_DATA_DIR {dir} is in use by another coordinator (PID {pid}, lock file {file}); stop it first, or give this one its own DATASAVER_DATA_DIR")]
    Held {
        dir: String,
        pid: String,
        file: String,
    },
    #[error("DATASAVER_DATA_DIR {dir}: cannot lock {file}: {source}")]
    Io {
        dir: String,
        file: String,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: Flock<std::fs::File>,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock of `data_dir` (which must exist) without waiting, and
    /// writes this process's PID into it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        let path = data_dir.join(LOCK_FILE);
        let io = |source: std::io::Error| LockError::Io {
            dir: data_dir.display().to_string(),
            file: path.display().to_string(),
            source,
        };
        use std::os::unix::fs::OpenOptionsExt;
        // Not truncated on open: until we hold the lock, the PID in it is
        // the holder's, and the refusal names it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = text.trim();
                let pid = if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                    pid.to_string()
                } else {
                    "unknown".to_string()
                };
                return Err(LockError::Held {
                    dir: data_dir.display().to_string(),
                    pid,
                    file: path.display().to_string(),
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(*file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(DataDirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_a_released_one_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let pid = std::process::id().to_string();
        assert_eq!(std::fs::read_to_string(first.path()).unwrap().trim(), pid);
        // flock locks belong to the open file, so a second open in the same
        // process conflicts just as another process would.
        let e = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("PID {pid}")), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
        assert!(e.contains("DATASAVER_DATA_DIR"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        drop(first);
        // a stale file (its holder gone) is taken over
        std::fs::write(dir.path().join(LOCK_FILE), "999999\n").unwrap();
        let again = DataDirLock::acquire(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(again.path()).unwrap().trim(), pid);
    }
}
