//! The cache on disk: content-addressed module files plus an `index.json` that survives
//! restarts. All writes go to a temporary file that is fsynced and then renamed into place, so
//! no reader ever sees a partial module and a crash leaves no corrupt entry.
//!
//! Layout under the cache directory:
//! * `modules/<sha256>.wasm` — the module, named by the sha256 of its bytes (mode 0644);
//! * `index.json` — which URLs (keyed by their sha256, kept only redacted) and OCI digests map
//!   to which module, last use, resource versions (mode 0600);
//! * `tmp/` — in-flight writes, each `flock`ed by its writer until it is renamed into place. A
//!   process that opens the cache removes only temp files whose lock is free *and* that are older
//!   than [`ORPHAN_AGE`]: another process's download in progress is never touched;
//! * `leases/` — which modules each live process pins (see `lease`);
//! * `locks/` — one lock file per download key, so agents (or `ecds-agent fetch` runs) sharing
//!   the directory download a module once; `index.lock` serialises index writes, which merge
//!   what other processes recorded instead of overwriting it.
//!
//! Blocking I/O only; callers run it on the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use super::index::{valid_key, Index, ModuleEntry, UrlEntry};

/// A temp file whose writer's lock is free is removed only once it is this old (covers the
/// instant between creating a temp file and locking it).
pub const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// sha256 (hex) and length of a file, read in 64 KiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok((hex::encode(h.finalize()), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// Whether a file hashes to `sha` (and so may stay under that name).
fn file_matches(path: &Path, sha: &str) -> Option<u64> {
    match sha256_file(path) {
        Ok((h, len)) if h == sha => Some(len),
        _ => None,
    }
}

/// Result of opening the store: what was found and what was cleaned.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub kept: usize,
    pub dropped_corrupt: usize,
    pub adopted: usize,
    pub removed_partials: usize,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// What a write waits for: the disk (fsync of the file and its directory: it survives a
/// power loss) or only the page cache (it survives the process, and every reader sees it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Disk,
    PageCache,
}

/// A file being written under `tmp/`: locked by this process, removed when dropped unless it
/// was persisted (renamed into place).
#[derive(Debug)]
pub struct TempFile {
    pub path: PathBuf,
    pub file: File,
    done: bool,
}

impl TempFile {
    /// fsync, set `mode`, rename to `final_path`, fsync the directory.
    fn persist(self, final_path: &Path, mode: u32) -> Result<(), String> {
        self.file
            .sync_all()
            .map_err(|e| io_ctx("cannot fsync", &self.path, e))?;
        self.rename_into(final_path, mode, true)
    }

    /// Sets `mode` and renames the (complete) file to `final_path`; with `durable`, fsyncs the
    /// directory afterwards (the caller fsynced the file).
    fn rename_into(mut self, final_path: &Path, mode: u32, durable: bool) -> Result<(), String> {
        let tmp = &self.path;
        // The umask may have narrowed the mode; Envoy (another user) must read modules.
        fs::set_permissions(tmp, fs::Permissions::from_mode(mode))
            .map_err(|e| io_ctx("cannot chmod", tmp, e))?;
        fs::rename(tmp, final_path).map_err(|e| io_ctx("cannot rename into", final_path, e))?;
        self.done = true;
        if durable {
            sync_dir_of(final_path);
        }
        Ok(())
    }
}

fn sync_dir_of(path: &Path) {
    if let Some(parent) = path.parent() {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

/// Makes a file already in place durable (a module [`Store::place_module`] renamed, an index
/// written to the page cache): fsync of the file, then of its directory.
pub fn sync_file(path: &Path) -> Result<(), String> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_ctx("cannot fsync", path, e))?;
    sync_dir_of(path);
    Ok(())
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn io_ctx(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {}", path.display(), crate::errors::io_text(&e))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_secs() -> u64 {
    now_ms() / 1000
}

impl Store {
    pub fn module_path(&self, sha: &str) -> PathBuf {
        self.dir.join("modules").join(format!("{sha}.wasm"))
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn tmp_path(&self, label: &str) -> PathBuf {
        let n: u64 = rand::random();
        self.dir.join("tmp").join(format!("{label}.{n:016x}.part"))
    }

    /// Opens (creating) the cache directory, loads the index, drops entries whose file is gone
    /// or does not hash to its name, adopts valid module files the index lost, and removes
    /// temp files their writers left behind (never one still being written).
    pub fn open(dir: &Path) -> Result<(Store, Index, OpenReport), String> {
        for sub in ["modules", "tmp", "locks", "leases"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| io_ctx("cannot create", &p, e))?;
        }
        let store = Store {
            dir: dir.to_owned(),
        };
        let mut report = OpenReport::default();
        if let Ok(rd) = fs::read_dir(dir.join("tmp")) {
            for e in rd.flatten() {
                if orphaned(&e.path()) && fs::remove_file(e.path()).is_ok() {
                    report.removed_partials += 1;
                }
            }
        }
        let mut index: Index = match fs::read(store.index_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cache index unreadable; rebuilding it from the module files");
                Index::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(io_ctx("cannot read", &store.index_path(), e)),
        };
        index.sanitize();
        index.modules.retain(|sha, _| valid_key(sha));
        // Verify every indexed module.
        let shas: Vec<String> = index.modules.keys().cloned().collect();
        for sha in shas {
            if file_matches(&store.module_path(&sha), &sha).is_some() {
                report.kept += 1;
            } else {
                index.modules.remove(&sha);
                let _ = fs::remove_file(store.module_path(&sha));
                report.dropped_corrupt += 1;
            }
        }
        index
            .urls
            .retain(|_, u| index.modules.contains_key(&u.sha256));
        // Adopt module files the index does not know (e.g. a crash between rename and index write).
        let mdir = dir.join("modules");
        let rd = fs::read_dir(&mdir).map_err(|e| io_ctx("cannot list", &mdir, e))?;
        for e in rd.flatten() {
            let path = e.path();
            let Some(sha) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".wasm"))
                .map(str::to_owned)
            else {
                continue;
            };
            if index.modules.contains_key(&sha) || !valid_key(&sha) {
                continue;
            }
            match file_matches(&path, &sha) {
                Some(size) => {
                    let now = now_secs();
                    index.modules.insert(
                        sha,
                        ModuleEntry {
                            size,
                            last_used: now,
                            fetched_at: now,
                            ..Default::default()
                        },
                    );
                    report.adopted += 1;
                }
                None => {
                    let _ = fs::remove_file(&path);
                    report.dropped_corrupt += 1;
                }
            }
        }
        Ok((store, index, report))
    }

    fn write_atomic(
        &self,
        final_path: &Path,
        bytes: &[u8],
        mode: u32,
        durability: Durability,
    ) -> Result<(), String> {
        let label = final_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file")
            .to_owned();
        let mut tmp = self.temp(&label, mode)?;
        tmp.file
            .write_all(bytes)
            .map_err(|e| io_ctx("cannot write", &tmp.path, e))?;
        match durability {
            Durability::Disk => tmp.persist(final_path, mode),
            Durability::PageCache => tmp.rename_into(final_path, mode, false),
        }
    }

    /// A new temp file under `tmp/`, locked until it is persisted or dropped (then removed).
    pub fn temp(&self, label: &str, mode: u32) -> Result<TempFile, String> {
        let path = self.tmp_path(label);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| io_ctx("cannot create", &path, e))?;
        // Held until the file is renamed and closed: no other process removes it meanwhile.
        if let Err(e) = file.lock() {
            let _ = fs::remove_file(&path);
            return Err(io_ctx("cannot lock", &path, e));
        }
        Ok(TempFile {
            path,
            file,
            done: false,
        })
    }

    /// Moves a complete, verified module file into place under its sha256, without waiting for
    /// the disk: the bytes are whole in the page cache, which is all a reader (Envoy) needs.
    /// `Ok((path, true))` when it was renamed into place and still needs [`sync_file`];
    /// `false` when the same module was already there
    /// (the temp file is dropped).
    pub fn place_module(&self, tmp: TempFile, sha: &str) -> Result<(PathBuf, bool), String> {
        let path = self.module_path(sha);
        let len = tmp
            .file
            .metadata()
            .map_err(|e| io_ctx("cannot stat", &tmp.path, e))?
            .len();
        if fs::metadata(&path).is_ok_and(|m| m.len() == len) {
            return Ok((path, false));
        }
        tmp.rename_into(&path, 0o644, false)?;
        Ok((path, true))
    }

    /// Writes a verified module under its sha256 (no-op if it is already there).
    pub fn put_module(&self, sha: &str, bytes: &[u8]) -> Result<PathBuf, String> {
        let path = self.module_path(sha);
        if fs::metadata(&path)
            .map(|m| m.len() == bytes.len() as u64)
            .unwrap_or(false)
        {
            return Ok(path);
        }
        self.write_atomic(&path, bytes, 0o644, Durability::Disk)?;
        Ok(path)
    }

    pub fn remove_module(&self, sha: &str) -> Result<(), String> {
        let p = self.module_path(sha);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_ctx("cannot remove", &p, e)),
        }
    }

    /// Makes the index file written with [`Durability::PageCache`] durable.
    pub fn sync_index(&self) -> Result<(), String> {
        sync_file(&self.index_path())
    }

    pub fn save_index(&self, index: &Index, durability: Durability) -> Result<(), String> {
        let bytes =
            serde_json::to_vec_pretty(index).map_err(|e| format!("cannot encode index: {e}"))?;
        self.write_atomic(&self.index_path(), &bytes, 0o600, durability)
    }

    /// The index as it is on disk now (empty if missing or unreadable), without modules whose
    /// file is gone or has another size.
    pub fn read_index(&self) -> Index {
        let mut index: Index = fs::read(self.index_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        index.sanitize();
        index.modules.retain(|sha, e| {
            valid_key(sha) && fs::metadata(self.module_path(sha)).is_ok_and(|m| m.len() == e.size)
        });
        index
    }

    /// Writes `index` merged with what other processes recorded on disk meanwhile (see
    /// [`Index::absorb`]) under `locks/index.lock`; returns the merged index. Entries whose file
    /// another process removed (purge, eviction) are dropped, never written back.
    pub fn merge_save(&self, index: &Index, durability: Durability) -> Result<Index, String> {
        let (lock, path) = self.lock_file("index")?;
        lock_within(&lock, &path, INDEX_LOCK_DEADLINE)?;
        let mut merged = index.clone();
        merged.absorb(self.read_index());
        merged.modules.retain(|sha, e| {
            valid_key(sha) && fs::metadata(self.module_path(sha)).is_ok_and(|m| m.len() == e.size)
        });
        merged
            .urls
            .retain(|_, u| merged.modules.contains_key(&u.sha256));
        self.save_index(&merged, durability)?;
        Ok(merged)
    }

    /// Takes the lock of download `key` if free (`None`: another process holds it).
    pub fn try_lock_download(&self, key: &str) -> Result<Option<File>, String> {
        let (f, path) = self.lock_file(key)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(io_ctx("cannot lock", &path, e)),
        }
    }

    /// Opens (creating) `locks/<name>.lock`; locking it is the caller's.
    fn lock_file(&self, name: &str) -> Result<(File, PathBuf), String> {
        let path = self.dir.join("locks").join(format!("{name}.lock"));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_ctx("cannot open", &path, e))?;
        Ok((f, path))
    }
}

/// The longest a process waits for another's index write (a suspended `ecds-agent fetch` holding
/// the lock must not wedge every agent on the node): past it the save fails, is logged, and the
/// next save tries again.
pub const INDEX_LOCK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes `f`'s exclusive `flock`, waiting at most `deadline` (polling; `flock` has no timeout).
pub fn lock_within(f: &File, path: &Path, deadline: std::time::Duration) -> Result<(), String> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(io_ctx("cannot lock", path, e)),
        }
        if start.elapsed() >= deadline {
            return Err(format!(
                "{} is held by another process for over {deadline:?}",
                path.display()
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

/// Whether a temp file was left by a writer that is gone: its lock is free and it is older than
/// [`ORPHAN_AGE`].
fn orphaned(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let old = f
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= ORPHAN_AGE);
    old && f.try_lock().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::verify::sha256_hex;

    #[test]
    fn reopen_verifies_and_adopts() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut index, _) = Store::open(dir.path()).unwrap();
        let a = b"module-a".to_vec();
        let sha_a = sha256_hex(&a);
        store.put_module(&sha_a, &a).unwrap();
        index.modules.insert(
            sha_a.clone(),
            ModuleEntry {
                size: 8,
                ..Default::default()
            },
        );
        store.save_index(&index, Durability::Disk).unwrap();
        // A file the index lost, a corrupt file, and a leftover partial write.
        let b = b"module-b".to_vec();
        let sha_b = sha256_hex(&b);
        store.put_module(&sha_b, &b).unwrap();
        fs::write(store.module_path(&"0".repeat(64)), b"garbage").unwrap();
        let partial = dir.path().join("tmp/x.part");
        fs::write(&partial, b"half").unwrap();
        let old = std::time::SystemTime::now() - ORPHAN_AGE * 2;
        File::options()
            .write(true)
            .open(&partial)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // A download in progress elsewhere: locked by its writer, and fresh.
        let busy = dir.path().join("tmp/busy.part");
        let writer = File::create(&busy).unwrap();
        writer.lock().unwrap();

        let (_, index, report) = Store::open(dir.path()).unwrap();
        assert!(index.modules.contains_key(&sha_a) && index.modules.contains_key(&sha_b));
        assert_eq!(
            (
                report.kept,
                report.adopted,
                report.dropped_corrupt,
                report.removed_partials
            ),
            (1, 1, 1, 1)
        );
        assert!(!store.module_path(&"0".repeat(64)).exists());
        assert!(busy.exists(), "another writer's temp file survives");
        drop(writer);
        let mode = fs::metadata(store.module_path(&sha_a))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;
    use crate::wasm::verify::sha256_hex;

    #[test]
    fn index_keys_are_checked_before_they_become_paths() {
        assert!(valid_key(&"ab".repeat(32)));
        for bad in [
            "../../../../etc/passwd",
            "",
            &"A".repeat(64),
            &"a".repeat(63),
            &"g".repeat(64),
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Store::open(dir.path()).unwrap();
        let evil = r#"{"modules":{"../../x":{"size":1,"last_used":0,"fetched_at":0}},"urls":{}}"#;
        fs::write(dir.path().join("index.json"), evil).unwrap();
        assert!(store.read_index().modules.is_empty());
        let (_, index, _) = Store::open(dir.path()).unwrap();
        assert!(index.modules.is_empty());
    }

    #[test]
    fn a_merge_does_not_bring_back_what_another_process_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut index, _) = Store::open(dir.path()).unwrap();
        let m = b"module".to_vec();
        let sha = sha256_hex(&m);
        store.put_module(&sha, &m).unwrap();
        index.modules.insert(
            sha.clone(),
            ModuleEntry {
                size: 6,
                ..Default::default()
            },
        );
        store.merge_save(&index, Durability::Disk).unwrap();
        // Another process purges it; this one still has it in memory and saves.
        store.remove_module(&sha).unwrap();
        let merged = store.merge_save(&index, Durability::Disk).unwrap();
        assert!(!merged.modules.contains_key(&sha));
        assert!(!store.read_index().modules.contains_key(&sha));
    }
}
