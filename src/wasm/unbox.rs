//! Unboxing module bodies: gzip, tar and tar.gz around a `.wasm`, streaming from one temp file
//! to the next, with every step capped so a small compressed body cannot expand past the size
//! limit (no silent truncation: too big is an error). Memory stays at a 64 KiB buffer whatever
//! the size; each step reads the previous file and writes a new one under the cache's `tmp/`.
//!
//! Blocking I/O only; callers run it on the blocking pool.

use std::fs::File;
use std::io::{BufReader, Read, Write};

use super::store::{Store, TempFile};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How a body is boxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boxing {
    /// Whatever the bytes say (HTTP): gzip and tar layers are stripped, up to four deep; a tar
    /// without a `.wasm` gives its first regular file (Istio's rule).
    Detect,
    /// An OCI image layer: tar.gz holding `plugin.wasm` (or the only `*.wasm`).
    TarGz,
    /// An OCI image layer: tar holding `plugin.wasm` (or the only `*.wasm`).
    Tar,
    /// The body is the module.
    Raw,
    /// An image layer, tar or tar+gzip by its content: `plugin.wasm` or the only `*.wasm`.
    Image,
}

fn open(t: &TempFile) -> Result<BufReader<File>, String> {
    File::open(&t.path)
        .map(|f| BufReader::with_capacity(64 << 10, f))
        .map_err(|e| format!("cannot read {}: {e}", t.path.display()))
}

fn head(t: &TempFile) -> Result<Vec<u8>, String> {
    let mut h = Vec::with_capacity(512);
    open(t)?
        .take(512)
        .read_to_end(&mut h)
        .map_err(|e| format!("cannot read {}: {e}", t.path.display()))?;
    Ok(h)
}

fn is_tar(head: &[u8]) -> bool {
    head.len() >= 262 && &head[257..262] == b"ustar"
}

/// Copies `r` into a new temp file, failing once more than `limit` bytes arrive.
fn copy_capped(
    store: &Store,
    mut r: impl Read,
    limit: u64,
    what: &str,
) -> Result<TempFile, String> {
    let mut out = store.temp("unboxed", 0o644)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut n: u64 = 0;
    loop {
        let k = r.read(&mut buf).map_err(|e| format!("{what}: {e}"))?;
        if k == 0 {
            return Ok(out);
        }
        n += k as u64;
        if n > limit {
            return Err(format!("{what}: decompresses to more than {limit} bytes"));
        }
        out.file.write_all(&buf[..k]).map_err(|e| {
            format!(
                "cannot write {}: {}",
                out.path.display(),
                crate::errors::io_text(&e)
            )
        })?;
    }
}

/// Gunzips `src` into a new temp file.
pub fn gunzip(store: &Store, src: &TempFile, limit: u64) -> Result<TempFile, String> {
    let dec = flate2::read::MultiGzDecoder::new(open(src)?);
    copy_capped(store, dec, limit, "gzip")
}

/// Picks the module out of the tar in `src`: an entry named `plugin.wasm` (any directory),
/// else the only `*.wasm`, else the first regular file when `fallback_first` is set. Two passes
/// over the file: one to choose by name, one to copy the entry.
pub fn untar(
    store: &Store,
    src: &TempFile,
    limit: u64,
    fallback_first: bool,
) -> Result<TempFile, String> {
    let tar_err = |e: std::io::Error| format!("tar: {e}");
    // How many `*.wasm` entries, and the first few (a hostile tar may hold millions: memory
    // and the error message stay bounded).
    const NAMES_KEPT: usize = 5;
    let mut wasm: Vec<(usize, String)> = Vec::new();
    let mut wasm_count = 0usize;
    let mut plugin = None;
    let mut first = None;
    let mut archive = tar::Archive::new(open(src)?);
    for (i, entry) in archive.entries().map_err(tar_err)?.enumerate() {
        let entry = entry.map_err(tar_err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(tar_err)?
            .to_string_lossy()
            .into_owned();
        let base = path.rsplit('/').next().unwrap_or(&path).to_owned();
        if base == "plugin.wasm" {
            plugin = Some((i, path));
            break;
        }
        if base.ends_with(".wasm") {
            wasm_count += 1;
            if wasm.len() < NAMES_KEPT {
                wasm.push((i, super::error::clip(&path, 128)));
            }
        } else if first.is_none() {
            first = Some((i, path));
        }
    }
    let (index, path) = match (plugin, wasm_count) {
        (Some(p), _) => p,
        (None, 1) => wasm.remove(0),
        (None, 0) => match first {
            Some(f) if fallback_first => f,
            _ => return Err("tar holds no plugin.wasm".into()),
        },
        (None, _) => {
            let names: Vec<&str> = wasm.iter().map(|(_, p)| p.as_str()).collect();
            let more = wasm_count - names.len();
            return Err(format!(
                "tar holds {wasm_count} .wasm files and no plugin.wasm: {}{}",
                names.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
    };
    let mut archive = tar::Archive::new(open(src)?);
    let entry = archive
        .entries()
        .map_err(tar_err)?
        .nth(index)
        .ok_or("tar: the archive changed while it was read")?
        .map_err(tar_err)?;
    let size = entry.size();
    if size > limit {
        return Err(format!(
            "tar entry {path} is {size} bytes, over the {limit}-byte limit"
        ));
    }
    copy_capped(store, entry, limit, &format!("tar entry {path}"))
}

/// Unboxes `raw` as `boxing` says; returns the file that holds the module (or, for unknown
/// bytes, the bytes as they are: validation then says what is wrong).
pub fn unbox(store: &Store, raw: TempFile, boxing: Boxing, limit: u64) -> Result<TempFile, String> {
    match boxing {
        Boxing::Raw => Ok(raw),
        Boxing::Tar => untar(store, &raw, limit, false),
        Boxing::TarGz => {
            let tar = gunzip(store, &raw, limit)?;
            untar(store, &tar, limit, false)
        }
        Boxing::Image => {
            let h = head(&raw)?;
            if h.starts_with(&GZIP_MAGIC) {
                let tar = gunzip(store, &raw, limit)?;
                untar(store, &tar, limit, false)
            } else if is_tar(&h) {
                untar(store, &raw, limit, false)
            } else {
                Err("the layer is neither tar nor gzip".into())
            }
        }
        Boxing::Detect => {
            let mut cur = raw;
            for _ in 0..4 {
                let h = head(&cur)?;
                if super::verify::has_wasm_magic(&h) {
                    break;
                }
                cur = if h.starts_with(&GZIP_MAGIC) {
                    gunzip(store, &cur, limit)?
                } else if is_tar(&h) {
                    untar(store, &cur, limit, true)?
                } else {
                    break;
                };
            }
            Ok(cur)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn tarball(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn temp(store: &Store, bytes: &[u8]) -> TempFile {
        let mut t = store.temp("test", 0o644).unwrap();
        t.file.write_all(bytes).unwrap();
        t
    }

    fn run(store: &Store, bytes: &[u8], boxing: Boxing, limit: u64) -> Result<Vec<u8>, String> {
        let out = unbox(store, temp(store, bytes), boxing, limit)?;
        Ok(std::fs::read(&out.path).unwrap())
    }

    #[test]
    fn all_boxes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Store::open(dir.path()).unwrap();
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        // A tar is at least three 512-byte blocks, so the limit must leave room for that.
        let limit = 10_000;
        let d = Boxing::Detect;
        assert_eq!(run(&store, &wasm, d, limit).unwrap(), wasm);
        assert_eq!(run(&store, &gz(&wasm), d, limit).unwrap(), wasm);
        let t = tarball(&[("README", b"hi"), ("plugin.wasm", &wasm)]);
        assert_eq!(run(&store, &t, d, limit).unwrap(), wasm);
        assert_eq!(run(&store, &t, Boxing::Tar, limit).unwrap(), wasm);
        let tgz = gz(&tarball(&[("./x/plugin.wasm", &wasm)]));
        assert_eq!(run(&store, &tgz, d, limit).unwrap(), wasm);
        assert_eq!(run(&store, &tgz, Boxing::TarGz, limit).unwrap(), wasm);
        // Istio's rule for HTTP tars: the first regular file; OCI layers need a .wasm.
        let other = tarball(&[("filter", &wasm)]);
        assert_eq!(run(&store, &other, d, limit).unwrap(), wasm);
        assert!(run(&store, &other, Boxing::Tar, limit).is_err());
        let two = tarball(&[("a.wasm", &wasm), ("b.wasm", &wasm)]);
        assert!(run(&store, &two, d, limit)
            .unwrap_err()
            .contains("2 .wasm files"));
        // Only the result is left in tmp/.
        drop(store);
        let left = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        assert_eq!(left, 0);
    }

    #[test]
    fn bombs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Store::open(dir.path()).unwrap();
        let big = vec![0u8; 10_000];
        let e = run(&store, &gz(&big), Boxing::Detect, 1000).unwrap_err();
        assert!(e.contains("more than 1000"), "{e}");
        let e = run(
            &store,
            &tarball(&[("plugin.wasm", &big)]),
            Boxing::Tar,
            1000,
        )
        .unwrap_err();
        assert!(e.contains("over the 1000-byte limit"), "{e}");
    }
}
