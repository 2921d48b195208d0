//! Checks a module must pass before it enters the cache: hashes, the Wasm header and a full
//! `wasmparser` validation (so Envoy never receives bytes it would fail to compile).
//!
//! Validation streams: the module is read in 64 KiB pieces and handed to wasmparser's
//! incremental parser, which holds one section (the code section: one function) at a time.
//! Large custom sections and the bytes of data segments carry nothing validation looks at, so
//! they are skipped on the way in (a custom section keeps its name; a data segment keeps its
//! mode, memory and offset expression, with its bytes left out). Memory therefore stays at a
//! few hundred KiB plus the largest function or non-data section, whatever the module's size.

use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};
use wasmparser::{Chunk, Parser, ValidPayload, Validator};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_bytes(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

const MAGIC: &[u8; 4] = b"\0asm";
const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
const PIECE: usize = 64 << 10;
/// Custom and data sections up to this size are passed to the parser as they are.
const SHRINK_ABOVE: u32 = 64 << 10;

pub fn has_wasm_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Validates a core Wasm module held in memory.
pub fn validate(bytes: &[u8]) -> Result<(), String> {
    validate_reader(Cursor::new(bytes), bytes.len() as u64)
}

/// Validates the core Wasm module in file `path`, streaming.
pub fn validate_file(path: &Path) -> Result<(), String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    validate_reader(BufReader::with_capacity(PIECE, f), len)
}

fn validate_reader<R: Read + Seek>(mut r: R, len: u64) -> Result<(), String> {
    let mut head = [0u8; 8];
    let got = read_full(&mut r, &mut head).map_err(|e| format!("cannot read: {e}"))?;
    let head = &head[..got];
    if got < 8 || !has_wasm_magic(head) {
        let shown: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "missing the \\0asm magic (first bytes: {}, {len} bytes total)",
            shown.join(" ")
        ));
    }
    if head[4..8] != CORE_VERSION {
        return Err(format!(
            "unsupported Wasm binary version {:02x?} (a component or future format; Envoy needs a core module, version 1)",
            &head[4..8]
        ));
    }
    let failed = |e: wasmparser::BinaryReaderError| format!("validation failed: {e}");
    let mut src = Shrink::new(r).map_err(|e| format!("cannot read: {e}"))?;
    let mut parser = Parser::new(0);
    let mut validator = Validator::new();
    let mut buf: Vec<u8> = head.to_vec();
    let mut eof = false;
    loop {
        let parsed = match parser.parse(&buf, eof).map_err(failed)? {
            Chunk::NeedMoreData(_) => None,
            Chunk::Parsed { consumed, payload } => {
                let end = matches!(payload, wasmparser::Payload::End(_));
                if let ValidPayload::Func(func, body) =
                    validator.payload(&payload).map_err(failed)?
                {
                    func.into_validator(Default::default())
                        .validate(&body)
                        .map_err(failed)?;
                }
                Some((consumed, end))
            }
        };
        match parsed {
            Some((_, true)) => return Ok(()),
            Some((consumed, false)) => {
                buf.drain(..consumed);
            }
            None => {
                let start = buf.len();
                buf.resize(start + PIECE, 0);
                let n = src
                    .read(&mut buf[start..])
                    .map_err(|e| format!("cannot read: {e}"))?;
                buf.truncate(start + n);
                eof = n == 0;
            }
        }
    }
}

fn read_full<R: Read>(r: &mut R, out: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < out.len() {
        match r.read(&mut out[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The module's sections after the header, with large custom sections reduced to their name and
/// the bytes of data segments left out (see the module docs). Anything it cannot read as
/// expected is passed through unchanged, so the parser reports it.
struct Shrink<R> {
    r: R,
    out: Vec<u8>,
    pos: usize,
    /// Payload bytes of the current section still to pass through.
    passthrough: u64,
    /// Where the source ends (a section may not be skipped past it).
    len: u64,
}

/// An unsigned LEB128 u32 read from `r`, with its encoded bytes.
fn leb_u32<R: Read>(r: &mut R) -> std::io::Result<Option<(u32, Vec<u8>)>> {
    let mut raw = Vec::with_capacity(5);
    let mut value: u64 = 0;
    for shift in (0..35).step_by(7) {
        let mut b = [0u8; 1];
        if r.read(&mut b)? == 0 {
            return Ok(if raw.is_empty() {
                None
            } else {
                Some((u32::MAX, raw))
            });
        }
        raw.push(b[0]);
        value |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(Some((u32::try_from(value).unwrap_or(u32::MAX), raw)));
        }
    }
    Ok(Some((u32::MAX, raw)))
}

fn put_leb(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A cursor over a section being rewritten: reads go to the source and count against `left`.
struct Limited<'a, R> {
    r: &'a mut R,
    left: u64,
}

impl<R: Read> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.r.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

fn byte<R: Read>(r: &mut R) -> Option<u8> {
    let mut b = [0u8; 1];
    (r.read(&mut b).ok()? == 1).then_some(b[0])
}

fn leb<R: Read>(r: &mut R, out: &mut Vec<u8>) -> Option<u32> {
    let (v, raw) = leb_u32(r).ok()??;
    out.extend_from_slice(&raw);
    (v != u32::MAX).then_some(v)
}

fn skip<R: Read>(r: &mut R, mut n: u64) -> Option<()> {
    let mut sink = [0u8; 4096];
    while n > 0 {
        let k = r.read(&mut sink[..n.min(4096) as usize]).ok()?;
        if k == 0 {
            return None;
        }
        n -= k as u64;
    }
    Some(())
}

/// A constant expression, copied to `out`, up to and including its `end` (0x0b).
fn const_expr<R: Read>(r: &mut R, out: &mut Vec<u8>) -> Option<()> {
    loop {
        let op = byte(r)?;
        out.push(op);
        match op {
            0x0b => return Some(()),
            0x41 | 0x42 | 0x23 | 0xd2 => {
                // i32.const, i64.const (signed LEB, up to 10 bytes), global.get, ref.func
                loop {
                    let b = byte(r)?;
                    out.push(b);
                    if b & 0x80 == 0 {
                        break;
                    }
                }
            }
            0x43 | 0x44 => {
                let n = if op == 0x43 { 4 } else { 8 };
                for _ in 0..n {
                    out.push(byte(r)?);
                }
            }
            0xd0 => out.push(byte(r)?), // ref.null heaptype (abstract)
            0x6a | 0x6b | 0x6c | 0x7c | 0x7d | 0x7e => {} // extended-const arithmetic
            _ => return None,
        }
    }
}

/// The data section without segment bytes; `None` if it is not in the expected shape.
fn shrink_data<R: Read>(r: &mut R) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let count = leb(r, &mut out)?;
    for _ in 0..count {
        let flags = leb(r, &mut out)?;
        match flags {
            0 => const_expr(r, &mut out)?,
            1 => {}
            2 => {
                leb(r, &mut out)?;
                const_expr(r, &mut out)?;
            }
            _ => return None,
        }
        let (len, _) = leb_u32(r).ok()??;
        out.push(0); // the segment's bytes: left out
        skip(r, u64::from(len))?;
    }
    Some(out)
}

/// A custom section reduced to its name; `None` if the name is not readable.
fn shrink_custom<R: Read>(r: &mut R) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let len = leb(r, &mut out)?;
    if len > 4096 {
        return None;
    }
    for _ in 0..len {
        out.push(byte(r)?);
    }
    Some(out)
}

impl<R: Read + Seek> Shrink<R> {
    fn new(mut r: R) -> std::io::Result<Self> {
        let here = r.stream_position()?;
        let len = r.seek(SeekFrom::End(0))?;
        r.seek(SeekFrom::Start(here))?;
        Ok(Self {
            r,
            out: Vec::new(),
            pos: 0,
            passthrough: 0,
            len,
        })
    }

    /// Fills `out` with the next piece of the stream; `false` at the end.
    fn next_piece(&mut self) -> std::io::Result<bool> {
        self.out.clear();
        self.pos = 0;
        if self.passthrough > 0 {
            let n = self.passthrough.min(PIECE as u64) as usize;
            self.out.resize(n, 0);
            let got = read_full(&mut self.r, &mut self.out)?;
            self.out.truncate(got);
            self.passthrough = if got < n {
                0
            } else {
                self.passthrough - n as u64
            };
            return Ok(got > 0);
        }
        let mut id = [0u8; 1];
        if self.r.read(&mut id)? == 0 {
            return Ok(false);
        }
        let Some((size, raw)) = leb_u32(&mut self.r)? else {
            self.out.push(id[0]);
            return Ok(true);
        };
        let start = self.r.stream_position()?;
        let shrunk = match id[0] {
            0 | 11
                if size > SHRINK_ABOVE
                    && size != u32::MAX
                    && start + u64::from(size) <= self.len =>
            {
                let mut section = Limited {
                    r: &mut self.r,
                    left: u64::from(size),
                };
                let body = if id[0] == 0 {
                    shrink_custom(&mut section)
                } else {
                    shrink_data(&mut section)
                };
                // A data section must be consumed exactly; a custom one is skipped to its end.
                match body {
                    Some(b) if id[0] == 0 || section.left == 0 => {
                        self.r.seek(SeekFrom::Start(start + u64::from(size)))?;
                        Some(b)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        self.out.push(id[0]);
        match shrunk {
            Some(body) => {
                put_leb(&mut self.out, body.len() as u32);
                self.out.extend_from_slice(&body);
            }
            None => {
                // As it is: rewind to the payload and pass it through.
                self.r.seek(SeekFrom::Start(start))?;
                self.out.extend_from_slice(&raw);
                self.passthrough = u64::from(size);
            }
        }
        Ok(true)
    }
}

impl<R: Read + Seek> Read for Shrink<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.out.len() {
            if !self.next_piece()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
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

    /// Appends a custom section `name` with `n` bytes of payload.
    fn with_custom(mut m: Vec<u8>, name: &str, n: usize) -> Vec<u8> {
        let mut body = Vec::new();
        put_leb(&mut body, name.len() as u32);
        body.extend_from_slice(name.as_bytes());
        body.resize(body.len() + n, 0xab);
        m.push(0);
        put_leb(&mut m, body.len() as u32);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn large_sections_are_skipped_and_still_checked() {
        let data = "x".repeat(300_000);
        let m = wat::parse_str(format!(
            "(module (memory 8) (data (i32.const 16) \"{data}\") (data \"{data}\") (func (export \"f\")))"
        ))
        .unwrap();
        assert!(validate(&m).is_ok());
        let big = with_custom(m.clone(), "name-ish", 1 << 20);
        assert!(validate(&big).is_ok());
        // A data segment naming a memory that does not exist still fails.
        let bad = wat::parse_str(format!("(module (data (i32.const 0) \"{data}\"))")).unwrap();
        assert!(validate(&bad).unwrap_err().contains("validation failed"));
        // A custom section whose size runs past the end fails too.
        let mut cut = big.clone();
        cut.truncate(big.len() - 10);
        assert!(validate(&cut).is_err());
        // So does trailing garbage after a valid module.
        let mut junk = m.clone();
        junk.extend_from_slice(&[0x7f, 0x01, 0x02]);
        assert!(validate(&junk).is_err());
    }
}
