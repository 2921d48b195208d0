//! Unboxing module bodies: gzip, tar and tar.gz around a `.wasm`, with every step capped so a
//! small compressed body cannot expand past the size limit (no silent truncation: too big is
//! an error).

use std::io::Read;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

fn is_tar(bytes: &[u8]) -> bool {
    bytes.len() >= 262 && &bytes[257..262] == b"ustar"
}

/// Gunzips `bytes`, failing once the output would exceed `limit`.
pub fn gunzip(bytes: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip: {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("decompresses to more than {limit} bytes"));
    }
    Ok(out)
}

/// Picks the module out of a tar: an entry named `plugin.wasm` (any directory), else the only
/// `*.wasm`, else the first regular file (Istio's rule) when `fallback_first` is set.
pub fn from_tar(bytes: &[u8], limit: u64, fallback_first: bool) -> Result<Vec<u8>, String> {
    let mut archive = tar::Archive::new(bytes);
    let entries = archive.entries().map_err(|e| format!("tar: {e}"))?;
    let mut wasm_entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut first: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("tar: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| format!("tar: {e}"))?
            .to_string_lossy()
            .into_owned();
        let size = entry.size();
        let base = path.rsplit('/').next().unwrap_or(&path).to_owned();
        let wanted = base == "plugin.wasm" || base.ends_with(".wasm") || first.is_none();
        if !wanted {
            continue;
        }
        if size > limit {
            return Err(format!(
                "tar entry {path} is {size} bytes, over the {limit}-byte limit"
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| format!("tar entry {path}: {e}"))?;
        if base == "plugin.wasm" {
            return Ok(data);
        }
        if base.ends_with(".wasm") {
            wasm_entries.push((path, data));
        } else if first.is_none() {
            first = Some(data);
        }
    }
    match wasm_entries.len() {
        1 => Ok(wasm_entries.remove(0).1),
        0 => match first {
            Some(d) if fallback_first => Ok(d),
            _ => Err("tar holds no plugin.wasm".into()),
        },
        _ => Err(format!(
            "tar holds several .wasm files and no plugin.wasm: {}",
            wasm_entries
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Strips gzip/tar layers until a Wasm module (or unknown bytes) remains.
pub fn unbox(mut bytes: Vec<u8>, limit: u64) -> Result<Vec<u8>, String> {
    for _ in 0..4 {
        if super::verify::has_wasm_magic(&bytes) {
            return Ok(bytes);
        }
        if bytes.starts_with(&GZIP_MAGIC) {
            bytes = gunzip(&bytes, limit)?;
        } else if is_tar(&bytes) {
            bytes = from_tar(&bytes, limit, true)?;
        } else {
            return Ok(bytes);
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn tarball(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn all_boxes() {
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        // A tar is at least three 512-byte blocks, so the limit must leave room for that.
        let limit = 10_000;
        assert_eq!(unbox(wasm.clone(), limit).unwrap(), wasm);
        assert_eq!(unbox(gz(&wasm), limit).unwrap(), wasm);
        assert_eq!(unbox(tarball("plugin.wasm", &wasm), limit).unwrap(), wasm);
        assert_eq!(
            unbox(gz(&tarball("./x/plugin.wasm", &wasm)), limit).unwrap(),
            wasm
        );
    }

    #[test]
    fn bombs_are_errors() {
        let big = vec![0u8; 10_000];
        assert!(unbox(gz(&big), 1000)
            .unwrap_err()
            .contains("more than 1000"));
        assert!(from_tar(&tarball("plugin.wasm", &big), 1000, true).is_err());
    }
}
