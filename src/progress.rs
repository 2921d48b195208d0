//! Download progress, reported to whoever installed a reporter: the CLI commands that download
//! on a person's behalf (`fetch`, `import`, `prefetch`) show a bar on a terminal or plain lines
//! otherwise; the agent (`run`) installs none, so reporting costs a check of one static. A leaf:
//! the fetchers call it, it calls nothing of the crate.

use std::sync::OnceLock;

/// Shows downloads.
pub trait Reporter: Send + Sync {
    /// A download of `label` begins; `total` bytes when the server said.
    fn start(&self, label: &str, total: Option<u64>) -> Box<dyn Bar>;
}

/// One download's display.
pub trait Bar: Send + Sync {
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

static REPORTER: OnceLock<Box<dyn Reporter>> = OnceLock::new();

/// Installs the process's reporter (the first one wins).
pub fn install(r: Box<dyn Reporter>) {
    let _ = REPORTER.set(r);
}

/// One download in progress; finished when dropped.
pub struct Progress(Option<Box<dyn Bar>>);

/// Starts reporting a download (a no-op without a reporter).
pub fn start(label: &str, total: Option<u64>) -> Progress {
    Progress(REPORTER.get().map(|r| r.start(label, total)))
}

impl Progress {
    pub fn advance(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.advance(bytes);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish();
        }
    }
}
