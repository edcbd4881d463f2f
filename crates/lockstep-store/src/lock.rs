//! The data directory of the SQLite store belongs to one `lockstep serve` at a time: two
//! registries on one file would each keep their own projection and both run the leader's
//! work. [`DataDirLock`] is an exclusive lock on `<dir>/lockstep.lock`, held for as long as
//! the value lives (the operating system drops it when the process dies, even by
//! `kill -9`, so a crash never leaves a stale lock behind).
//!
//! The stores themselves do not take it: tests open one database through two handles on
//! purpose. Replicas share state through PostgreSQL instead.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "lockstep.lock";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another lockstep serve is already using {dir} (it holds {lock}); stop it first, or \
         give this one its own --data-dir (registries that share state use --store \
         postgres://…)"
    )]
    Busy {
        /// The data directory.
        dir: String,
        /// The lock file.
        lock: String,
    },
    /// The directory or the lock file cannot be created or locked.
    #[error("cannot lock the data directory {dir}: {source}")]
    Io {
        /// The data directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive lock on a data directory, released on drop.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Creates `dir` if needed and locks it, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(LockError::Busy {
                dir: dir.display().to_string(),
                lock: path.display().to_string(),
            }),
            Err(TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The directory a store URL keeps its SQLite file in (`sqlite:///path` or a plain path),
/// or `None` for PostgreSQL.
pub fn sqlite_dir(url: &str) -> Option<&Path> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return None;
    }
    match url.strip_prefix("sqlite://") {
        Some(rest) => Some(Path::new(rest)),
        None if url.contains("://") => None,
        None => Some(Path::new(url)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_locked_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path()).expect("first");
        let err = DataDirLock::acquire(dir.path()).expect_err("second");
        assert!(matches!(err, LockError::Busy { .. }), "{err:?}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again after drop");
    }

    #[test]
    fn store_urls_name_their_sqlite_directory() {
        assert_eq!(sqlite_dir("./data"), Some(Path::new("./data")));
        assert_eq!(
            sqlite_dir("sqlite:///var/lib/x"),
            Some(Path::new("/var/lib/x"))
        );
        assert_eq!(sqlite_dir("postgres://u@h/db"), None);
        assert_eq!(sqlite_dir("redis://h"), None);
    }
}
