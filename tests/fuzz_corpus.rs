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
