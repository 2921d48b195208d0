//! Replays the fuzz targets' seed corpora and every committed crasher (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the same entry points the fuzzer drives
//! (`ecds_agent::fuzzing`), so `make test` keeps every fixed crash fixed without libFuzzer.

use std::path::Path;

#[test]
fn every_corpus_and_regression_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for (name, target) in ecds_agent::fuzzing::TARGETS {
        for dir in ["corpus", "regressions"] {
            let Ok(rd) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for e in rd.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                target(&data);
                ran += 1;
            }
        }
    }
    assert!(ran >= 7, "the seed corpus is missing ({ran} inputs)");
}

/// The short, bounded fuzz run of `make test` (and so of CI): each target gets
/// `FUZZ_SMOKE_SECONDS` (default 2) of random mutations of its corpus — bit flips, byte
/// inserts, deletes, truncation, splices, boundary values. It is not coverage-guided (that is
/// `make fuzz`, libFuzzer, which needs an instrumented build of ~7 minutes); it runs on the test
/// build that already exists. A panicking input is written to `target/fuzz-smoke/<target>` and
/// fails the test.
#[test]
fn bounded_mutation_fuzz_of_every_target() {
    let secs: f64 = std::env::var("FUZZ_SMOKE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ std::process::id() as u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (name, target) in ecds_agent::fuzzing::TARGETS {
        let mut seeds: Vec<Vec<u8>> = ["corpus", "regressions"]
            .iter()
            .filter_map(|d| std::fs::read_dir(root.join("fuzz").join(d).join(name)).ok())
            .flat_map(|rd| rd.flatten())
            .filter_map(|e| std::fs::read(e.path()).ok())
            .collect();
        seeds.push(vec![]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        let mut runs = 0u64;
        while std::time::Instant::now() < deadline {
            let mut input = seeds[(next() as usize) % seeds.len()].clone();
            for _ in 0..1 + next() % 8 {
                mutate(&mut input, &seeds, &mut next);
            }
            input.truncate(1 << 16);
            let r = std::panic::catch_unwind(|| target(&input));
            if r.is_err() {
                let dir = root.join("target/fuzz-smoke");
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(name);
                let _ = std::fs::write(&path, &input);
                panic!(
                    "fuzz target {name} panicked; input saved to {}",
                    path.display()
                );
            }
            runs += 1;
        }
        eprintln!("fuzz smoke: {name}: {runs} inputs in {secs} s");
        assert!(runs > 0, "{name}: no input ran");
    }
}

fn mutate(v: &mut Vec<u8>, seeds: &[Vec<u8>], next: &mut impl FnMut() -> u64) {
    const INTERESTING: &[u8] = &[
        0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b']', b':', b'/',
    ];
    let r = next();
    let pos = |v: &Vec<u8>, r: u64| {
        if v.is_empty() {
            0
        } else {
            (r as usize) % v.len()
        }
    };
    match r % 7 {
        0 if !v.is_empty() => {
            let i = pos(v, next());
            v[i] ^= 1 << (next() % 8);
        }
        1 => {
            let i = if v.is_empty() { 0 } else { pos(v, next()) };
            v.insert(i, INTERESTING[(next() as usize) % INTERESTING.len()]);
        }
        2 if !v.is_empty() => {
            let i = pos(v, next());
            let n = (1 + next() as usize % 16).min(v.len() - i);
            v.drain(i..i + n);
        }
        3 if !v.is_empty() => {
            let i = pos(v, next());
            v.truncate(i);
        }
        4 => {
            let other = &seeds[(next() as usize) % seeds.len()];
            if !other.is_empty() {
                let a = (next() as usize) % other.len();
                let b = a + (next() as usize) % (other.len() - a);
                let i = if v.is_empty() { 0 } else { pos(v, next()) };
                v.splice(i..i, other[a..=b.min(other.len() - 1)].iter().copied());
            }
        }
        5 if !v.is_empty() => {
            let i = pos(v, next());
            v[i] = INTERESTING[(next() as usize) % INTERESTING.len()];
        }
        _ if v.len() >= 2 => {
            let (i, j) = (pos(v, next()), pos(v, next()));
            v.swap(i, j);
        }
        _ => v.push(next() as u8),
    }
}
