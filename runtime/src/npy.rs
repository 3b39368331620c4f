//! Reading and writing NumPy `.npy` files (format versions 1.0, 2.0 and 3.0, little-endian,
//! C order).

use std::path::Path;

use kiln_ir::{DType, Tensor};

/// Why a `.npy` file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The contents are not a valid `.npy` file kiln can use.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong, and what was expected.
        msg: String,
    },
}

fn descr_dtype(descr: &str) -> Result<DType, String> {
    Ok(match descr {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "|i1" => DType::I8,
        "|u1" => DType::U8,
        "|b1" => DType::Bool,
        "<f8" => {
            return Err("dtype float64 is not supported; save the array as float32 (`a.astype(np.float32)`)".into())
        }
        other => {
            return Err(format!(
                "unsupported dtype descriptor {other:?} (expected one of <f4, <f2, <i8, <i4, |i1, |u1, |b1)"
            ))
        }
    })
}

fn dtype_descr(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::Bool => "|b1",
        DType::BF16 => return None,
    })
}

/// Finds the value text of `'key':` in a Python dict literal.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}':");
    let start = header.find(&pat)? + pat.len();
    let rest = header[start..].trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else if let Some(q) = rest.strip_prefix('\'') {
        q.find('\'')? + 2
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// Decodes a `.npy` file's bytes. `path` only labels errors.
pub fn decode(bytes: &[u8], path: &str) -> Result<Tensor, NpyError> {
    let bad = |msg: String| NpyError::Format {
        path: path.to_string(),
        msg,
    };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (missing the \\x93NUMPY magic)".into()));
    }
    let (hlen, hstart): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported .npy format version {v}"))),
    };
    let hend = hstart
        .checked_add(hlen)
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| bad("header runs past the end of the file".into()))?;
    let header = std::str::from_utf8(&bytes[hstart..hend]).map_err(|_| bad("header is not text".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    let dtype = descr_dtype(descr.trim_matches('\'')).map_err(bad)?;
    match dict_value(header, "fortran_order") {
        Some("False") => {}
        Some("True") => {
            return Err(bad(
                "Fortran-order arrays are not supported; save with np.ascontiguousarray".into(),
            ))
        }
        _ => return Err(bad("header has no valid 'fortran_order'".into())),
    }
    let shape_txt = dict_value(header, "shape").ok_or_else(|| bad("header has no 'shape'".into()))?;
    let inner = shape_txt.trim_start_matches('(').trim_end_matches(')');
    let mut shape = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        shape.push(
            part.parse::<usize>()
                .map_err(|_| bad(format!("bad shape {shape_txt}")))?,
        );
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let need = count
        .checked_mul(dtype.size_bytes())
        .ok_or_else(|| bad("shape overflows".into()))?;
    let data = &bytes[hend..];
    if data.len() != need {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} needs {need} data bytes, the file has {}",
            data.len()
        )));
    }
    Tensor::from_le_bytes(dtype, shape, data).map_err(|e| bad(e.to_string()))
}

/// Encodes a tensor as a version 1.0 `.npy` file. bf16 has no NumPy dtype and is refused.
pub fn encode(t: &Tensor) -> Result<Vec<u8>, String> {
    let descr = dtype_descr(t.dtype()).ok_or("bf16 has no .npy representation; cast to f32 first")?;
    let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // The header plus its 10-byte preamble is padded with spaces to a multiple of 64, ending in '\n'.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    while 10 + header.len() + 1 < total {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(total + t.len() * t.dtype().size_bytes());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.to_le_bytes());
    Ok(out)
}

/// Reads a `.npy` file.
pub fn read(path: impl AsRef<Path>) -> Result<Tensor, NpyError> {
    let p = path.as_ref().display().to_string();
    let bytes = std::fs::read(path.as_ref()).map_err(|source| NpyError::Io {
        path: p.clone(),
        source,
    })?;
    decode(&bytes, &p)
}

/// Writes a `.npy` file.
pub fn write(path: impl AsRef<Path>, t: &Tensor) -> Result<(), NpyError> {
    let p = path.as_ref().display().to_string();
    let bytes = encode(t).map_err(|msg| NpyError::Format { path: p.clone(), msg })?;
    std::fs::write(path.as_ref(), bytes).map_err(|source| NpyError::Io { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = encode(&t).unwrap();
        assert_eq!((b.len() - t.len() * 4) % 64, 0);
        assert_eq!(decode(&b, "x").unwrap(), t);
        let s = Tensor::from_i64(vec![3], vec![1, -2, 3]).unwrap();
        assert_eq!(decode(&encode(&s).unwrap(), "x").unwrap(), s);
    }

    #[test]
    fn reads_numpy_written_file() {
        let t = read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/gpt2_tiny/input_ids.npy"
        ))
        .unwrap();
        assert_eq!(t.shape(), &[2, 10]);
        assert_eq!(t.dtype(), DType::I64);
    }

    #[test]
    fn corrupt_files_are_errors() {
        let t = Tensor::from_f32(vec![4], vec![0.0; 4]).unwrap();
        let b = encode(&t).unwrap();
        for cut in [0, 5, 9, 20, b.len() - 1] {
            assert!(decode(&b[..cut], "x").is_err(), "truncated at {cut}");
        }
        let mut f8 = b.clone();
        let pos = f8.windows(3).position(|w| w == b"<f4").unwrap();
        f8[pos + 2] = b'8';
        let e = decode(&f8, "x.npy").unwrap_err().to_string();
        assert!(e.contains("float64"), "{e}");
    }
}
