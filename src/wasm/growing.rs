//! A module still being downloaded, readable while it grows: what lets Envoy's own fetch of a
//! module from the agent (the `serve` module) overlap the agent's download instead of following
//! it.
//!
//! A fetcher that knows, before the body arrives, the sha256 and size the module's bytes must
//! have (an HTTP download with the expected sha256 and a `Content-Length`, an OCI layer whose
//! digest is the module's) announces a [`Growing`] through its flight's [`Announcer`] and
//! signals each write that reaches the file. Readers get the bytes written so far and wait
//! for more. The last byte, and the end, are only given once the flight that owns the download
//! has finished with a module of exactly that sha256 and size — validated, checked against the
//! policy and in place ([`Announcer::finish`]); any other end is an error for every reader. A
//! reader never holds an unverified module whole, whatever it trusts (the length, the end).
//!
//! Owns the view of the bytes so far and its end; it does not decide what is verified (the
//! cache's flight does) nor who may read (the cache's modules in use).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::watch;

/// How a growing module ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Still being written.
    Open,
    /// The flight finished with exactly these bytes as the module.
    Verified,
    /// Anything else: a failed or retried download, another module, a refusal.
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// Bumped on every write that reached the file (wakes readers).
    writes: u64,
    /// The fetcher checked that the bytes written hash to the sha256 (the HTTP body's hash,
    /// the OCI client's digest check): only then can the end be `Verified`.
    confirmed: bool,
    end: End,
}

/// How long a reader waits for the next write before giving up (a stalled download).
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// A module being downloaded (see the module docs).
pub struct Growing {
    /// The sha256 (hex) the bytes must hash to.
    pub sha256: String,
    /// An unguessable name of this download: the URL handed out for it carries it, so a
    /// request gets exactly the download its resource was given, never another flight's
    /// with the same claimed sha256.
    pub token: String,
    /// The number of bytes.
    pub size: u64,
    /// The download file (a duplicate of the writer's descriptor: renames do not matter).
    file: std::fs::File,
    state: watch::Sender<State>,
}

impl std::fmt::Debug for Growing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Growing")
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .field("end", &self.state.borrow().end)
            .finish()
    }
}

/// A failed growing module, as a reader sees it.
fn failed() -> std::io::Error {
    std::io::Error::other("the download of the module failed or was not verified")
}

impl Growing {
    /// A module already whole and verified in `file` (`size` bytes), read the same way.
    pub fn complete(sha256: &str, file: std::fs::File, size: u64) -> Arc<Self> {
        let (state, _) = watch::channel(State {
            writes: 0,
            confirmed: true,
            end: End::Verified,
        });
        Arc::new(Growing {
            sha256: sha256.to_owned(),
            token: String::new(),
            size,
            file,
            state,
        })
    }

    /// Whether it ended verified.
    pub fn is_verified(&self) -> bool {
        self.state.borrow().end == End::Verified
    }

    fn end(&self, end: End) {
        self.state.send_if_modified(|s| {
            if s.end == End::Open {
                s.end = end;
                true
            } else {
                false
            }
        });
    }

    /// Whether it can still end verified.
    pub fn is_live(&self) -> bool {
        self.state.borrow().end != End::Failed
    }

    /// Up to `max` bytes at `offset`, waiting until they are written; `None` once all `size`
    /// bytes were read and the module is verified; an error when it cannot be.
    pub async fn read(self: &Arc<Self>, offset: u64, max: usize) -> std::io::Result<Option<Bytes>> {
        let mut rx = self.state.subscribe();
        loop {
            let end = rx.borrow_and_update().end;
            if end == End::Failed {
                return Err(failed());
            }
            // The last byte waits for the verdict: a client that trusts the length alone
            // (curl does) never has the whole module before it is verified.
            let readable = if end == End::Verified {
                self.size
            } else {
                self.size.saturating_sub(1)
            };
            if offset >= readable {
                if end == End::Verified {
                    return Ok(None);
                }
            } else {
                let want = max.min(usize::try_from(readable - offset).unwrap_or(max));
                let me = self.clone();
                let got = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; want];
                    let n = me.file.read_at(&mut buf, offset)?;
                    buf.truncate(n);
                    Ok::<_, std::io::Error>(buf)
                })
                .await
                .map_err(|e| std::io::Error::other(format!("read task failed: {e}")))??;
                if !got.is_empty() {
                    return Ok(Some(Bytes::from(got)));
                }
                if end == End::Verified {
                    // Verified with fewer bytes in the file than announced: never complete.
                    return Err(failed());
                }
            }
            match tokio::time::timeout(IDLE, rx.changed()).await {
                Ok(Ok(())) => {}
                // The flight is gone without an end, or stalled: not verified.
                _ => return Err(failed()),
            }
        }
    }
}

/// A flight's side of its growing module: announce, signal writes, finish. Cheap to clone;
/// a disabled one (no sha256 known up front) does nothing.
#[derive(Clone, Default)]
pub struct Announcer {
    slot: Option<Arc<watch::Sender<Option<Arc<Growing>>>>>,
    /// The sha256 an HTTP body must have (the expected checksum), if known.
    sha256: Option<String>,
}

/// Where a flight's announcements are watched.
pub type Announced = watch::Receiver<Option<Arc<Growing>>>;

impl Announcer {
    /// An announcer for one flight, and where to watch it.
    pub fn new() -> (Self, Announced) {
        let (tx, rx) = watch::channel(None);
        (
            Self {
                slot: Some(Arc::new(tx)),
                sha256: None,
            },
            rx,
        )
    }

    /// The same announcer, for a body that must hash to `sha256` (hex).
    pub fn expecting(&self, sha256: Option<&str>) -> Self {
        Self {
            slot: self.slot.clone(),
            sha256: sha256.map(str::to_owned),
        }
    }

    /// The bytes of `file` (opened for reading and writing, being written from the start)
    /// are to be the module with the expected sha256, `size` bytes long. An earlier
    /// announcement fails.
    pub fn announce_expected(&self, size: u64, file: &std::fs::File) {
        if let Some(sha) = self.sha256.clone() {
            self.announce(&sha, size, file);
        }
    }

    /// The bytes of `file` (opened for reading and writing, being written from the start)
    /// are to be the module `sha256`, `size` bytes long. An earlier announcement fails.
    pub fn announce(&self, sha256: &str, size: u64, file: &std::fs::File) {
        let Some(slot) = &self.slot else { return };
        let file = match file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "cannot share a download to stream it");
                return;
            }
        };
        let (state, _) = watch::channel(State {
            writes: 0,
            confirmed: false,
            end: End::Open,
        });
        let g = Arc::new(Growing {
            sha256: sha256.to_owned(),
            token: format!("{:032x}", rand::random::<u128>()),
            size,
            file,
            state,
        });
        if let Some(old) = slot.send_replace(Some(g)) {
            old.end(End::Failed);
        }
    }

    /// Bytes reached the file.
    pub fn wrote(&self) {
        if let Some(g) = self.current() {
            g.state.send_modify(|s| s.writes += 1);
        }
    }

    /// The announced bytes will not be the module (a failed attempt about to be retried).
    pub fn withdraw(&self) {
        if let Some(g) = self.current() {
            g.end(End::Failed);
        }
    }

    /// The fetcher hashed (or had checked) the announced bytes: they hash to `sha256`.
    pub fn confirm(&self, sha256: &str) {
        if let Some(g) = self.current() {
            if g.sha256 == sha256 {
                g.state.send_modify(|s| s.confirmed = true);
            } else {
                g.end(End::Failed);
            }
        }
    }

    /// The flight ended, with the module `(sha256, size)` or none: its growing module is
    /// verified if its bytes were confirmed and the flight gave exactly that module.
    pub fn finish(&self, module: Option<(&str, u64)>) {
        if let Some(g) = self.current() {
            let confirmed = g.state.borrow().confirmed;
            let same = module.is_some_and(|(sha, size)| sha == g.sha256 && size == g.size);
            g.end(if same && confirmed {
                End::Verified
            } else {
                End::Failed
            });
        }
    }

    fn current(&self) -> Option<Arc<Growing>> {
        self.slot.as_ref()?.borrow().clone()
    }
}

/// An `AsyncWrite` that tells the announcer of every write that completed (put it under any
/// buffering, so that what it signals is in the file).
pub struct Signalling<W> {
    pub inner: W,
    pub announcer: Announcer,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Signalling<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.announcer.wrote();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.announcer.wrote();
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn module(sha: &str, size: u64) -> (&str, u64) {
        (sha, size)
    }

    async fn read_all(g: &Arc<Growing>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = g.read(out.len() as u64, 3).await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn readers_get_the_end_only_once_the_flight_verified_the_same_module() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download");
        let rw = |p: &std::path::Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .unwrap()
        };
        for (gave, verified) in [
            (Some(module("aa", 8)), true),
            (Some(module("bb", 8)), false),
            (Some(module("aa", 7)), false),
            (None, false),
        ] {
            let mut f = rw(&path);
            let (a, rx) = Announcer::new();
            a.announce("aa", 8, &f);
            let g = rx.borrow().clone().unwrap();
            let reader = tokio::spawn({
                let g = g.clone();
                async move { read_all(&g).await }
            });
            f.write_all(b"0123").unwrap();
            a.wrote();
            tokio::task::yield_now().await;
            f.write_all(b"4567").unwrap();
            a.wrote();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(!reader.is_finished(), "no end before the flight ends");
            a.confirm("aa");
            assert_eq!(&g.read(0, 100).await.unwrap().unwrap()[..], b"0123456");
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(20), g.read(7, 1))
                    .await
                    .is_err(),
                "the last byte waits for the verdict"
            );
            a.finish(gave);
            let got = reader.await.unwrap();
            assert_eq!(got.is_ok(), verified, "{gave:?}");
            if verified {
                assert_eq!(got.unwrap(), b"01234567");
            }
        }
    }

    #[tokio::test]
    async fn a_new_announcement_or_a_withdrawal_fails_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download");
        std::fs::write(&path, b"0123").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let (a, rx) = Announcer::new();
        let a = a.expecting(Some("aa"));
        a.announce_expected(8, &f);
        let first = rx.borrow().clone().unwrap();
        a.announce_expected(8, &f);
        assert!(read_all(&first).await.is_err());
        let second = rx.borrow().clone().unwrap();
        assert!(second.is_live());
        a.withdraw();
        assert!(!second.is_live());
        assert!(read_all(&second).await.is_err());
        // Verified with bytes missing from the file: never a complete module.
        a.announce("aa", 8, &f);
        let third = rx.borrow().clone().unwrap();
        a.confirm("aa");
        a.finish(Some(module("aa", 8)));
        assert!(read_all(&third).await.is_err());
        // Bytes never confirmed to hash to the sha256 (a boxed body): not verified, even
        // when the flight gave that very module.
        std::fs::write(&path, b"01234567").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        a.announce("aa", 8, &f);
        let fourth = rx.borrow().clone().unwrap();
        a.finish(Some(module("aa", 8)));
        assert!(read_all(&fourth).await.is_err() && !fourth.is_verified());
        // Bytes that hash to something else fail at once.
        a.announce("aa", 8, &f);
        let fifth = rx.borrow().clone().unwrap();
        a.confirm("bb");
        assert!(!fifth.is_live());
        assert_ne!(fourth.token, fifth.token);
        // Disabled: nothing announced.
        let off = Announcer::default();
        off.announce("aa", 8, &f);
        off.finish(None);
        Announcer::new().0.announce_expected(8, &f);
    }
}
