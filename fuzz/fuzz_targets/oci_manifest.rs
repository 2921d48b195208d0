//! Fuzz target: see `ecds_agent::fuzzing::oci_manifest`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ecds_agent::fuzzing::oci_manifest(data));
