//! Checks a module must pass before it enters the cache: hashes, the Wasm header and a full
//! `wasmparser` validation (so Envoy never receives bytes it would fail to compile).

use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

const MAGIC: &[u8; 4] = b"\0asm";
const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];

pub fn has_wasm_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Validates a core Wasm module.
pub fn validate(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || !has_wasm_magic(bytes) {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "missing the \\0asm magic (first bytes: {}, {} bytes total)",
            head.join(" "),
            bytes.len()
        ));
    }
    if bytes[4..8] != CORE_VERSION {
        return Err(format!(
            "unsupported Wasm binary version {:02x?} (a component or future format; Envoy needs a core module, version 1)",
            &bytes[4..8]
        ));
    }
    wasmparser::Validator::new()
        .validate_all(bytes)
        .map(|_| ())
        .map_err(|e| format!("validation failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        let ok = wat::parse_str("(module (func (export \"f\")))").unwrap();
        assert!(validate(&ok).is_ok());
        assert!(validate(b"hello world").unwrap_err().contains("magic"));
        let mut bad = ok.clone();
        bad.truncate(10);
        assert!(validate(&bad).unwrap_err().contains("validation failed"));
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
