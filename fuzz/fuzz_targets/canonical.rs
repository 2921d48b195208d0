//! Fuzz target: see `ecds_agent::fuzzing::canonical`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ecds_agent::fuzzing::canonical(data));
