//! The artifact file: one file holding the manifest, the weights and the machine code.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0   magic "KILNART\0"          8 bytes
//! 8   format version (u32)       currently 1
//! 12  reserved (u32)             0
//! 16  manifest offset, length    u64, u64   (RON text)
//! 32  weights offset, length     u64, u64   (64-byte aligned; each tensor 64-byte aligned)
//! 48  code offset, length        u64, u64   (raw position-independent machine code)
//! 64  sections…
//! end-8  CRC-32 of every byte before it (u32), then "KEND"
//! ```
//!
//! Reading validates the magic, version, section bounds and checksum before parsing the manifest,
//! so truncated or corrupted files are refused with an error, never read out of bounds.

use std::path::Path;

use crate::plan::Manifest;
use crate::LoadError;

/// File magic.
pub const MAGIC: &[u8; 8] = b"KILNART\0";
/// The format version this runtime reads and writes.
pub const VERSION: u32 = 2;
const HEADER: usize = 64;
const TRAILER: usize = 8;
/// Alignment of the weight and code sections and of each weight tensor.
pub const ALIGN: usize = 64;

fn pad_to(buf: &mut Vec<u8>, align: usize) {
    while !buf.len().is_multiple_of(align) {
        buf.push(0);
    }
}

/// Serialises an artifact. `weights` must already be laid out as the manifest's `Storage::Weight`
/// offsets say.
pub fn encode(manifest: &Manifest, weights: &[u8], code: &[u8]) -> Result<Vec<u8>, String> {
    let text = ron::ser::to_string(manifest).map_err(|e| format!("serialising the manifest: {e}"))?;
    let mut out = vec![0u8; HEADER];
    let m_off = out.len();
    out.extend_from_slice(text.as_bytes());
    pad_to(&mut out, ALIGN);
    let w_off = out.len();
    out.extend_from_slice(weights);
    pad_to(&mut out, ALIGN);
    let c_off = out.len();
    out.extend_from_slice(code);
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    for (i, v) in [m_off, text.len(), w_off, weights.len(), c_off, code.len()]
        .into_iter()
        .enumerate()
    {
        out[16 + 8 * i..24 + 8 * i].copy_from_slice(&(v as u64).to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(b"KEND");
    Ok(out)
}

/// Writes an artifact file.
pub fn write(path: &Path, manifest: &Manifest, weights: &[u8], code: &[u8]) -> Result<(), LoadError> {
    let bytes = encode(manifest, weights, code).map_err(LoadError::Corrupt)?;
    std::fs::write(path, bytes).map_err(|source| LoadError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Byte ranges of an artifact's sections, after the checks.
#[derive(Clone, Debug)]
pub struct Sections {
    /// The parsed manifest.
    pub manifest: Manifest,
    /// Weight section.
    pub weights: std::ops::Range<usize>,
    /// Code section.
    pub code: std::ops::Range<usize>,
}

/// Checks the container and parses the manifest (the manifest's contents are validated by the
/// caller).
pub fn decode(bytes: &[u8]) -> Result<Sections, LoadError> {
    let bad = |m: String| Err(LoadError::Corrupt(m));
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return bad("not a kiln artifact (bad magic)".into());
    }
    if bytes.len() < HEADER + TRAILER {
        return bad(format!("truncated: {} bytes is shorter than the header", bytes.len()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(LoadError::Version {
            found: version,
            supported: VERSION,
        });
    }
    let end = bytes.len() - TRAILER;
    if &bytes[end + 4..] != b"KEND" {
        return bad("truncated or damaged: the end marker is missing".into());
    }
    let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
    let actual = crc32fast::hash(&bytes[..end]);
    if crc != actual {
        return bad(format!(
            "checksum mismatch (stored {crc:08x}, computed {actual:08x}): the file is damaged"
        ));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[16 + 8 * i..24 + 8 * i].try_into().expect("8 bytes"));
    let mut ranges = Vec::new();
    let mut prev_end = HEADER as u64;
    for (i, what) in ["manifest", "weights", "code"].iter().enumerate() {
        let (off, len) = (word(2 * i), word(2 * i + 1));
        let stop = off.checked_add(len).filter(|s| *s <= end as u64 && off >= prev_end);
        let Some(stop) = stop else {
            return bad(format!(
                "{what} section {off}+{len} lies outside the file or overlaps another section"
            ));
        };
        if i > 0 && off % ALIGN as u64 != 0 {
            return bad(format!("{what} section is not {ALIGN}-byte aligned"));
        }
        prev_end = stop;
        ranges.push(off as usize..stop as usize);
    }
    let text = std::str::from_utf8(&bytes[ranges[0].clone()])
        .map_err(|_| LoadError::Corrupt("manifest is not UTF-8".into()))?;
    let manifest: Manifest =
        ron::from_str(text).map_err(|e| LoadError::Corrupt(format!("manifest does not parse: {e}")))?;
    Ok(Sections {
        manifest,
        weights: ranges[1].clone(),
        code: ranges[2].clone(),
    })
}

/// Reads the whole file into memory-mapped form.
pub fn map(path: &Path) -> Result<memmap2::Mmap, LoadError> {
    let p = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: p.clone(),
        source,
    })?;
    // SAFETY: mapped read-only; the checksum is verified before any use. Modifying the file while
    // a model is loaded is unsupported, as for shared libraries.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|source| LoadError::Io { path: p, source })
}
