//! The tensor names of a Hugging Face folder's checkpoint — one `model.safetensors` or shards listed
//! by `model.safetensors.index.json` — read from the headers alone, so an import can find weight
//! prefixes and tied heads without loading any weight.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ImportError;

/// A folder's checkpoint: what to load and which tensors it has.
pub struct Checkpoint {
    /// `model.safetensors`, or the shard index.
    pub path: PathBuf,
    /// Every tensor name.
    pub names: BTreeSet<String>,
}

impl Checkpoint {
    /// The checkpoint in `dir`.
    pub fn find(dir: &Path) -> Result<Checkpoint, ImportError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            let names = header_names(&single)?;
            return Ok(Checkpoint { path: single, names });
        }
        if index.is_file() {
            let names = shard_map(&index)?.into_iter().map(|(n, _)| n).collect();
            return Ok(Checkpoint { path: index, names });
        }
        Err(ImportError::NoCheckpoint {
            dir: dir.display().to_string(),
        })
    }

    /// Whether the checkpoint has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The prefix before `suffix` of the first tensor named `…suffix` (`"model."` for
    /// `model.embed_tokens.weight`), trying the suffixes in order.
    pub fn prefix_of(&self, suffixes: &[&str]) -> Option<String> {
        suffixes.iter().find_map(|s| {
            self.names
                .iter()
                .filter_map(|n| n.strip_suffix(s))
                .filter(|p| p.is_empty() || p.ends_with('.'))
                .min_by_key(|p| p.len())
                .map(str::to_string)
        })
    }
}

/// `(tensor name, shard file)` from a `model.safetensors.index.json`, shards resolved next to it.
pub fn shard_map(index: &Path) -> Result<Vec<(String, PathBuf)>, ImportError> {
    let file = index.display().to_string();
    let text = std::fs::read_to_string(index).map_err(|source| ImportError::Io {
        path: file.clone(),
        source,
    })?;
    let bad = |msg: &str| ImportError::Json {
        file: file.clone(),
        msg: msg.to_string(),
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("expected an object `weight_map` of tensor name → shard file"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    map.iter()
        .map(|(name, f)| {
            let f = f
                .as_str()
                .ok_or_else(|| bad(&format!("`weight_map.{name}` is not a file name")))?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(bad(&format!("shard `{f}` of `{name}` is not a file next to the index")));
            }
            Ok((name.clone(), dir.join(f)))
        })
        .collect()
}

/// The tensor names in a safetensors file's header.
fn header_names(path: &Path) -> Result<BTreeSet<String>, ImportError> {
    let file = path.display().to_string();
    let io = |source| ImportError::Io {
        path: file.clone(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    let size = f.metadata().map_err(io)?.len();
    if len > 100_000_000 || len + 8 > size {
        return Err(ImportError::Json {
            file,
            msg: format!("not a safetensors file: a header of {len} bytes in a file of {size}"),
        });
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: Value = serde_json::from_slice(&header).map_err(|e| ImportError::Json {
        file: file.clone(),
        msg: format!("safetensors header: {e}"),
    })?;
    let obj = v.as_object().ok_or_else(|| ImportError::Json {
        file,
        msg: "safetensors header is not an object".into(),
    })?;
    Ok(obj.keys().filter(|k| *k != "__metadata__").cloned().collect())
}
