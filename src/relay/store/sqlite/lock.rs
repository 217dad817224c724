//! The SQLite lane lock: an open-file-description lock (Linux `F_OFD_SETLK`) on one byte
//! of the database file itself, far past anything SQLite locks, one byte per table. It
//! belongs to the file, not to a path: every path that reaches the file (a symlink, a
//! relative path, a hard link) meets the same lock, and there is no side file to delete.
//!
//! Each database file is opened once for its locks and never closed: closing any
//! descriptor of a file drops every POSIX lock the process holds on it, SQLite's own
//! included. A lock is released by unlocking its byte. Network filesystems, whose locks
//! other hosts may not see, are refused.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::super::{stable_hash, StoreError};

/// Where the lock bytes start: far beyond SQLite's lock bytes (at 1 GiB) and any real
/// file size; a lock on bytes past the end of a file is allowed and changes nothing.
const LOCK_REGION: i64 = 1 << 62;

/// Filesystems whose locks are not reliably seen by other hosts (statfs magic numbers).
const NETWORK_FILESYSTEMS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x5346_414F, "AFS"),
    (0x00C3_6400, "Ceph"),
    (0x0102_1997, "9P"),
];

/// The descriptors opened for locks, by (device, inode), and the lock bytes this process
/// holds.
#[derive(Default)]
struct Registry {
    files: HashMap<(u64, u64), Arc<File>>,
    held: HashSet<((u64, u64), i64)>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// A held lane lock; dropping it unlocks the byte.
#[derive(Debug)]
pub struct LaneLock {
    file: Arc<File>,
    identity: (u64, u64),
    byte: i64,
}

/// The lock byte of `table` in the database file at `path`, taken without waiting:
/// `None` when another relay (another process, or another lane of this one) holds it.
pub fn try_lock(path: &Path, table: &str) -> Result<Option<LaneLock>, StoreError> {
    let failed = |source| StoreError::LockFile {
        path: path.to_owned(),
        source,
    };
    refuse_network_filesystem(path).map_err(failed)?;
    let byte = LOCK_REGION + i64::from(stable_hash(table));
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let registry = registry.get_or_insert_with(Registry::default);
    let meta = std::fs::metadata(path).map_err(failed)?;
    let identity = (meta.dev(), meta.ino());
    if registry.held.contains(&(identity, byte)) {
        return Ok(None);
    }
    let file = match registry.files.get(&identity) {
        Some(file) => file.clone(),
        None => {
            let file = Arc::new(
                File::options()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(failed)?,
            );
            registry.files.insert(identity, file.clone());
            file
        }
    };
    if !set_lock(&file, byte, libc::F_WRLCK).map_err(failed)? {
        return Ok(None);
    }
    registry.held.insert((identity, byte));
    Ok(Some(LaneLock {
        file,
        identity,
        byte,
    }))
}

impl Drop for LaneLock {
    fn drop(&mut self) {
        if let Err(e) = set_lock(&self.file, self.byte, libc::F_UNLCK) {
            tracing::error!(error = %e, "cannot release the SQLite lane lock");
        }
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(registry) = registry.as_mut() {
            registry.held.remove(&(self.identity, self.byte));
        }
    }
}

/// Sets (`F_WRLCK`) or clears (`F_UNLCK`) the open-file-description lock on `byte`;
/// false when another description holds it.
fn set_lock(file: &File, byte: i64, kind: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: an all-zero `flock` is a valid value; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    // l_pid must be 0 for OFD locks (zeroed above).
    // SAFETY: the descriptor is open for as long as `file` lives; `lock` is a valid flock.
    let done = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if done == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Refuses a database on a network filesystem, where the lane lock could not keep a
/// relay on another host away.
fn refuse_network_filesystem(path: &Path) -> std::io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero statfs is valid; statfs fills it for a NUL-terminated path.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match network_filesystem(fs.f_type as i64) {
        Some(name) => Err(std::io::Error::other(format!(
            "the database is on {name}, a network filesystem whose locks other hosts may not see: \
             two relays could both own the lane; keep the SQLite file on a local filesystem"
        ))),
        None => Ok(()),
    }
}

fn network_filesystem(magic: i64) -> Option<&'static str> {
    NETWORK_FILESYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// The database file of a SQLite URL's filename; `None` for an in-memory database (one
/// process by nature, nothing to lock).
pub fn database_file(filename: &Path) -> Option<PathBuf> {
    let memory = filename.as_os_str().is_empty() || filename.to_str() == Some(":memory:");
    (!memory).then(|| filename.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_file_and_table_whatever_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        std::fs::write(&db, b"").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        let first = try_lock(&db, "outbox").unwrap().expect("free");
        assert!(
            try_lock(&link, "outbox").unwrap().is_none(),
            "held, by another path"
        );
        let other = try_lock(&link, "audit")
            .unwrap()
            .expect("another table's lock");
        drop(first);
        assert!(try_lock(&link, "outbox").unwrap().is_some(), "released");
        drop(other);
    }

    #[test]
    fn network_filesystems_are_named() {
        assert_eq!(network_filesystem(0x6969), Some("NFS"));
        assert_eq!(network_filesystem(0xEF53), None, "ext4 is local");
    }
}
