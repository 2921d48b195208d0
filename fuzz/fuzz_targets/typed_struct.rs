//! Fuzz target: see `ecds_agent::fuzzing::typed_struct`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ecds_agent::fuzzing::typed_struct(data));
