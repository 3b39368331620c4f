//! Stage 3: binding weights to the graph's parameters.
//!
//! A safetensors checkpoint is memory-mapped; every parameter is looked up by its full name and
//! checked for dtype and shape; checkpoint tensors the graph does not use are an error unless the
//! spec's `ignore_weights` patterns cover them. All problems are reported together, each pointing
//! at the spec line that asked for the weight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_ir::{DType, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::diag::Diagnostic;
use crate::lower::{Lowered, ParamRole};
use crate::FrontendError;

/// Named weights, ready for the interpreter or a compiler.
pub type Weights = BTreeMap<String, Tensor>;

fn st_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::I8 => DType::I8,
        StDtype::U8 => DType::U8,
        StDtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// `*` matches any run of characters; everything else literally.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(p) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            match rest.find(p) {
                Some(k) => rest = &rest[k + p.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The safetensors files of a checkpoint path: the file itself, the shards a
/// `model.safetensors.index.json` lists (each once, in order), or a Hugging Face folder's.
fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>, FrontendError> {
    if path.is_dir() {
        return checkpoint_files(&crate::hf::Checkpoint::find(path)?.path);
    }
    if !path.to_string_lossy().ends_with(".index.json") {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for (_, f) in crate::hf::checkpoint::shard_map(path)? {
        if !files.contains(&f) {
            files.push(f);
        }
    }
    Ok(files)
}

/// Loads and checks every parameter of `lowered` from a safetensors checkpoint: one file, a
/// shard index (`model.safetensors.index.json`) or a Hugging Face folder. Float16 and bfloat16
/// tensors bind to f32 parameters, widened exactly.
pub fn load_safetensors(lowered: &Lowered, path: &Path) -> Result<Weights, FrontendError> {
    let files = checkpoint_files(path)?;
    let mut maps = Vec::with_capacity(files.len());
    for f in &files {
        let p = f.display().to_string();
        let file = std::fs::File::open(f).map_err(|source| FrontendError::Io {
            path: p.clone(),
            source,
        })?;
        // SAFETY: the map is read-only and lives only for this function; a checkpoint modified
        // while kiln reads it is outside what kiln can defend against, as for any mmap-based loader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| FrontendError::Io {
            path: p.clone(),
            source,
        })?;
        maps.push((p, map));
    }
    let mut shards = Vec::with_capacity(maps.len());
    for (p, map) in &maps {
        let st = SafeTensors::deserialize(map).map_err(|e| FrontendError::Checkpoint {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        shards.push((p.as_str(), st));
    }
    bind(lowered, &shards, &path.display().to_string())
}

/// `view`'s data as little-endian f32 when it is float16 or bfloat16.
fn widened(view: &safetensors::tensor::TensorView) -> Option<Vec<u8>> {
    let widen: fn([u8; 2]) -> f32 = match view.dtype() {
        StDtype::F16 => |b| half::f16::from_le_bytes(b).to_f32(),
        StDtype::BF16 => |b| half::bf16::from_le_bytes(b).to_f32(),
        _ => return None,
    };
    Some(
        view.data()
            .chunks_exact(2)
            .flat_map(|b| widen([b[0], b[1]]).to_le_bytes())
            .collect(),
    )
}

fn bind(lowered: &Lowered, shards: &[(&str, SafeTensors)], file: &str) -> Result<Weights, FrontendError> {
    let mut diags = Vec::new();
    let mut out = Weights::new();
    let names: Vec<&str> = shards.iter().flat_map(|(_, st)| st.names()).collect();
    for decl in &lowered.params {
        let want: Vec<usize> = decl
            .ty
            .shape
            .iter()
            .map(|d| d.as_known().unwrap_or(0) as usize)
            .collect();
        let view = match shards.iter().find_map(|(_, st)| st.tensor(&decl.name).ok()) {
            Some(v) => v,
            None => {
                let mut d = Diagnostic::at(
                    decl.path.clone(),
                    format!("weight `{}` is missing from {file}", decl.name),
                )
                .label(format!("expects {}", decl.ty));
                if let Some(s) = crate::suggest(&decl.name, names.iter().copied()) {
                    d = d.note(format!("the checkpoint has `{s}`"));
                } else if let Some(s) = names
                    .iter()
                    .find(|n| n.ends_with(&decl.name) || decl.name.ends_with(*n))
                {
                    d = d.note(format!(
                        "the checkpoint has `{s}`; set `weight_prefix` (or --weight-prefix) to match"
                    ));
                }
                diags.push(d);
                continue;
            }
        };
        let wide = if decl.ty.dtype == DType::F32 {
            widened(&view)
        } else {
            None
        };
        let dt = if wide.is_some() {
            Some(DType::F32)
        } else {
            st_dtype(view.dtype())
        };
        if dt != Some(decl.ty.dtype) {
            diags.push(
                Diagnostic::at(
                    decl.path.clone(),
                    format!(
                        "weight `{}` has dtype {:?} in {file}, expected {}",
                        decl.name,
                        view.dtype(),
                        decl.ty.dtype
                    ),
                )
                .label(format!("expects {}", decl.ty)),
            );
            continue;
        }
        if view.shape() != want.as_slice() {
            diags.push(
                Diagnostic::at(
                    decl.path.clone(),
                    format!(
                        "weight `{}` has shape {:?} in {file}, expected {}",
                        decl.name,
                        view.shape(),
                        decl.ty
                    ),
                )
                .label(format!("expects {}", decl.ty)),
            );
            continue;
        }
        match Tensor::from_le_bytes(decl.ty.dtype, want, wide.as_deref().unwrap_or(view.data())) {
            Ok(t) => {
                out.insert(decl.name.clone(), t);
            }
            Err(e) => diags.push(Diagnostic::at(
                decl.path.clone(),
                format!("weight `{}`: {e}", decl.name),
            )),
        }
    }
    let mut extra: Vec<String> = names
        .iter()
        .filter(|n| !out.contains_key(**n) && !lowered.params.iter().any(|p| p.name == **n))
        .filter(|n| !lowered.ignore_weights.iter().any(|g| glob_match(g, n)))
        .map(|n| n.to_string())
        .collect();
    extra.sort();
    if !extra.is_empty() {
        let shown: Vec<String> = extra.iter().take(8).map(|n| format!("`{n}`")).collect();
        let more = if extra.len() > 8 {
            format!(" and {} more", extra.len() - 8)
        } else {
            String::new()
        };
        diags.push(
            Diagnostic::at(
                crate::SpecPath::default().field("ignore_weights"),
                format!(
                    "{file} has {} tensor(s) the model does not use: {}{more}",
                    extra.len(),
                    shown.join(", ")
                ),
            )
            .note("list them (globs with `*` allowed) in `ignore_weights` if they are expected"),
        );
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(lowered.error(diags).into())
    }
}

/// Deterministic pseudo-random weights for every parameter, for running and benchmarking without
/// a checkpoint. Matrices and tables are uniform in ±1/√fan_in, norm scales near 1, biases near 0.
pub fn random(lowered: &Lowered, seed: u64) -> Weights {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let mut out = Weights::new();
    for p in &lowered.params {
        let shape: Vec<usize> = p.ty.shape.iter().map(|d| d.as_known().unwrap_or(0) as usize).collect();
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f64;
        let (center, scale) = match p.role {
            ParamRole::Matrix | ParamRole::Table => (0.0, 1.0 / fan_in.sqrt()),
            ParamRole::Scale => (1.0, 0.1),
            ParamRole::Bias | ParamRole::Tensor => (0.0, 0.02),
        };
        let v: Vec<f64> = (0..n).map(|_| center + scale * next()).collect();
        out.insert(
            p.name.clone(),
            Tensor::from_f64(p.ty.dtype, shape, &v).expect("length matches shape"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("pooler.*", "pooler.dense.weight"));
        assert!(glob_match("*.position_ids", "embeddings.position_ids"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*e", "abcd"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exact2"));
    }
}
