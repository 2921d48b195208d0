//! `make bench`: ecds-agent against the physical limit and real peers, each figure a ratio
//! measured in one run, printed as a table and written to BENCHMARKS.md (+ SVG charts in
//! `docs/bench/`).
//!
//! Every party is a separate process over real sockets: the agent is the release binary, the
//! control plane is this binary re-executed (`ECDS_BENCH_ROLE=cp`), the Envoy-side client is
//! this process, the peers are curl, sha256sum, skopeo, tar and Envoy 1.40 itself.
//!
//! `cargo bench --bench suite` runs the full set; without `--bench` (as `cargo test --benches`
//! runs it in `make test`) it runs a smoke pass with tiny sizes that only proves every
//! benchmark works, and writes its report to `target/BENCHMARKS.smoke.md`.

#[path = "../../tests/support/mod.rs"]
mod support;

mod convert;
mod envoy;
mod fetch;
mod flight;
mod passthrough;
mod report;
mod wire;

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Full,
    Smoke,
}

fn main() {
    if std::env::var("ECDS_BENCH_ROLE").as_deref() == Ok("cp") {
        wire::run_cp();
        return;
    }
    let mode = if std::env::args().any(|a| a == "--bench") {
        Mode::Full
    } else {
        Mode::Smoke
    };
    // Select sections: ECDS_BENCH_ONLY=passthrough,fetch,...
    let only = std::env::var("ECDS_BENCH_ONLY").unwrap_or_default();
    let sections: Vec<String> = only
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let want = move |s: &str| sections.is_empty() || sections.iter().any(|o| o == s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    rt.block_on(async move {
        let mut samples = vec![];
        let mut charts = vec![];
        if want("passthrough") {
            let (cases, s) = passthrough::run(mode).await;
            print!("{}", report::table(&s));
            charts.push(("passthrough.svg", passthrough_chart(&cases)));
            samples.extend(s);
        }
        if want("convert") {
            let s = convert::run(mode).await;
            print!("{}", report::table(&s));
            samples.extend(s);
        }
        if want("fetch") {
            let (s, chart) = fetch::run(mode).await;
            print!("{}", report::table(&s));
            charts.push(("fetch.svg", chart));
            samples.extend(s);
        }
        if want("envoy") {
            let s = envoy::run(mode).await;
            print!("{}", report::table(&s));
            samples.extend(s);
        }
        if want("flight") {
            let s = flight::run(mode).await;
            print!("{}", report::table(&s));
            samples.extend(s);
        }
        // Only a full run of every section replaces the published BENCHMARKS.md.
        let (md, dir) = match mode {
            Mode::Full if !only.is_empty() => (
                root.join(format!("target/BENCHMARKS.{}.md", only.replace(',', "+"))),
                root.join("target/bench"),
            ),
            Mode::Full => (root.join("BENCHMARKS.md"), root.join("docs/bench")),
            Mode::Smoke => (
                root.join("target/BENCHMARKS.smoke.md"),
                root.join("target/bench-smoke"),
            ),
        };
        std::fs::create_dir_all(&dir).expect("chart dir");
        for (name, svg) in &charts {
            std::fs::write(dir.join(name), svg).expect("write chart");
        }
        let text = benchmarks_md(mode, &samples, &charts, &dir, root);
        std::fs::write(&md, text).expect("write BENCHMARKS.md");
        println!("wrote {}", md.display());
    });
}

fn passthrough_chart(cases: &[passthrough::CaseResult]) -> String {
    let mut series = vec![];
    for (flavor, c_direct, c_via) in [
        ("SotW", "#1f77b4", "#d62728"),
        ("Delta", "#2ca02c", "#ff7f0e"),
    ] {
        let pick = |via: bool| -> Vec<(f64, f64)> {
            cases
                .iter()
                .filter(|c| c.flavor == flavor)
                .map(|c| {
                    let v = if via { &c.via } else { &c.direct };
                    (
                        c.bytes as f64 / 1e6,
                        report::pct(v, 0.5).as_secs_f64() * 1e3,
                    )
                })
                .collect()
        };
        series.push((format!("{flavor} direct"), c_direct, pick(false)));
        series.push((format!("{flavor} via agent"), c_via, pick(true)));
    }
    report::line_chart(
        "CDS round trip, p50",
        "response size (MB, log scale)",
        "ms",
        &series,
        true,
    )
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn benchmarks_md(
    mode: Mode,
    samples: &[report::Sample],
    charts: &[(&str, String)],
    dir: &Path,
    root: &Path,
) -> String {
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    let commit = sh(&format!(
        "cd {} && git rev-parse --short HEAD && git status --porcelain --untracked-files=no -- . ':!BENCHMARKS.md' ':!docs/bench' | head -1",
        root.display()
    ));
    let dirty = if commit.lines().count() > 1 {
        " (with uncommitted changes)"
    } else {
        ""
    };
    let envoy = sh(&format!(
        "{} --version 2>/dev/null | grep -o 'version: [^ ]*'",
        support::envoy::path().display()
    ));
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str(
        "Written by `make bench` (`cargo bench --bench suite`, release build); every figure of a \
         row is from the same run. The agent, the control plane, the Envoy-side client and every \
         peer are separate processes over loopback sockets on one machine.\n\n",
    );
    md.push_str(&format!(
        "- mode: {}\n- machine: {} cores, {}\n- date: {}\n- commit: {}{}\n- Envoy: {}\n- peers: {}\n\n",
        if mode == Mode::Full { "full" } else { "smoke (tiny sizes; not figures)" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu.trim(),
        sh("date -u '+%Y-%m-%d %H:%M UTC'"),
        commit.lines().next().unwrap_or("?"),
        dirty,
        envoy,
        sh("curl --version | head -1 | cut -d' ' -f1-2; skopeo --version")
            .lines()
            .collect::<Vec<_>>()
            .join(", "),
    ));
    md.push_str(
        "Reproduce: `make bench` (all), or one section with `make bench BENCH=passthrough` \
         (or `convert`, `fetch`, `envoy`, `flight`; written to target/, not here).\n\n",
    );
    md.push_str("Ratio = ecds-agent ÷ peer (time): below 1.00 the agent is faster.\n\n");
    md.push_str(&report::table(samples));
    md.push('\n');
    md.push_str(crate::NOTES);
    for (name, _) in charts {
        let rel = dir.strip_prefix(root).unwrap_or(dir).join(name);
        md.push_str(&format!("\n![{name}]({})\n", rel.display()));
    }
    md
}

/// How each figure is taken (goes into BENCHMARKS.md under the table).
const NOTES: &str = include_str!("notes.md");

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// The agent as every section runs it: logging at `warn`, or at `ECDS_BENCH_AGENT_LOG` when
/// set (e.g. `ecds_agent=debug` to see where a section's time goes).
pub fn agent(upstream_url: &str) -> support::agent::AgentBuilder {
    support::Agent::builder(upstream_url).env(
        "RUST_LOG",
        &std::env::var("ECDS_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
    )
}

pub fn bin() -> PathBuf {
    PathBuf::from(support::agent::BIN)
}
