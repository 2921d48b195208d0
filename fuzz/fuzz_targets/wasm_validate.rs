//! Fuzz target: see `ecds_agent::fuzzing::wasm_validate`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ecds_agent::fuzzing::wasm_validate(data));
