//! Pins that other processes can see: which modules the live ECDS resources of *this* process
//! use, published for every agent and `ecds-agent fetch` sharing the cache directory, so that
//! no process purges or evicts a module another process's Envoy is running.
//!
//! Each process holds `leases/<id>.lock` with an exclusive `flock` for as long as it lives and
//! keeps the sha256s it pins in `leases/<id>.pins` (replaced atomically). The kernel drops the
//! lock when the process dies, however it dies (SIGKILL included), and `flock` works across PID
//! namespaces on one filesystem, so pods sharing a `hostPath` see each other. A lease whose lock
//! can be taken belongs to a dead process: the reader removes it and ignores its pins.
//!
//! Blocking I/O only; callers run it on the blocking pool.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// This process's lease (dropping it releases the lock).
#[derive(Debug)]
pub struct Lease {
    dir: PathBuf,
    id: String,
    _lock: File,
    /// Serialises writes of the pins file; holds the generation last written.
    write: Mutex<u64>,
}

fn io_ctx(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

impl Lease {
    /// Creates and locks a new lease under `cache_dir/leases`.
    pub fn create(cache_dir: &Path) -> Result<Lease, String> {
        let dir = cache_dir.join("leases");
        fs::create_dir_all(&dir).map_err(|e| io_ctx("cannot create", &dir, e))?;
        let id = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        let path = dir.join(format!("{id}.lock"));
        // Locked under a name readers skip, then renamed into place: a reader never sees the
        // lease unlocked (and so never takes it for a dead process's and removes it).
        let fresh = dir.join(format!("{id}.lock.new"));
        let lock = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&fresh)
            .map_err(|e| io_ctx("cannot create", &fresh, e))?;
        lock.lock().map_err(|e| io_ctx("cannot lock", &fresh, e))?;
        fs::rename(&fresh, &path).map_err(|e| io_ctx("cannot rename into", &path, e))?;
        Ok(Lease {
            dir,
            id,
            _lock: lock,
            write: Mutex::new(0),
        })
    }

    /// Publishes the set of modules this process pins, as of change number `generation`
    /// (writes that arrive out of order never replace a newer set).
    pub fn publish(&self, generation: u64, shas: &BTreeSet<String>) -> Result<(), String> {
        let mut written = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if generation < *written {
            return Ok(());
        }
        *written = generation;
        let path = self.dir.join(format!("{}.pins", self.id));
        let tmp = self.dir.join(format!("{}.pins.new", self.id));
        let body = serde_json::to_vec(shas).map_err(|e| e.to_string())?;
        fs::write(&tmp, body).map_err(|e| io_ctx("cannot write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io_ctx("cannot rename into", &path, e))
    }

    /// The modules other live processes pin; leases of dead processes are removed.
    pub fn foreign_pins(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in rd.flatten() {
            let path = entry.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".lock"))
            else {
                continue;
            };
            if id == self.id {
                continue;
            }
            let pins = self.dir.join(format!("{id}.pins"));
            match owner_alive(&path) {
                Some(true) => {
                    if let Ok(bytes) = fs::read(&pins) {
                        if let Ok(set) = serde_json::from_slice::<BTreeSet<String>>(&bytes) {
                            out.extend(set.into_iter().filter(|s| super::store::valid_key(s)));
                        }
                    }
                }
                Some(false) => {
                    let _ = fs::remove_file(&pins);
                    let _ = fs::remove_file(&path);
                }
                None => {}
            }
        }
        out
    }
}

/// Whether the process holding lock file `path` is alive (`None`: cannot tell).
fn owner_alive(path: &Path) -> Option<bool> {
    let f = File::open(path).ok()?;
    match f.try_lock() {
        Ok(()) => Some(false),
        Err(fs::TryLockError::WouldBlock) => Some(true),
        Err(fs::TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_leases_count_and_dead_ones_are_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let a = Lease::create(dir.path()).unwrap();
        let b = Lease::create(dir.path()).unwrap();
        let sha = "a".repeat(64);
        b.publish(2, &BTreeSet::from([sha.clone(), "../../etc".into()]))
            .unwrap();
        b.publish(1, &BTreeSet::new()).unwrap(); // an older set arriving late is ignored
        assert_eq!(a.foreign_pins(), BTreeSet::from([sha.clone()]));
        assert!(b.foreign_pins().is_empty());
        drop(b); // its process "dies": the lock goes with it
        assert!(a.foreign_pins().is_empty());
        let left: Vec<_> = fs::read_dir(dir.path().join("leases")).unwrap().collect();
        assert_eq!(left.len(), 1, "only a's lock file is left");
    }

    /// A lease is never visible unlocked: a reaper running all the while never takes a new
    /// lease for a dead process's and removes it.
    #[test]
    fn a_reaper_never_removes_a_lease_being_created() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Lease::create(dir.path()).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                reaper.foreign_pins();
            }
        });
        let leases: Vec<Lease> = (0..300)
            .map(|_| Lease::create(dir.path()).unwrap())
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        for l in &leases {
            assert!(
                l.dir.join(format!("{}.lock", l.id)).exists(),
                "lease {} was reaped while alive",
                l.id
            );
        }
    }
}
