//! Hugging Face folders as kiln specs: `config.json` (and the checkpoint's tensor names) become a
//! readable spec like the bundled ones, which `kiln import` writes and `kiln compile DIR` lowers
//! directly. One file per family; `config.rs` makes sure no config field is silently ignored.

mod bert;
pub mod checkpoint;
mod config;
mod decoder;
mod distilbert;
mod gpt2;
mod gpt_neox;
mod vit;

use std::path::{Path, PathBuf};

pub use checkpoint::Checkpoint;
pub use config::Config;

/// The model types `import` reads.
pub const SUPPORTED: &[&str] = &[
    "bert",
    "distilbert",
    "gpt2",
    "gpt_neox",
    "llama",
    "mistral",
    "mixtral",
    "phi3",
    "qwen2",
    "roberta",
    "vit",
];

/// Why a folder could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("{file}: {msg}")]
    Json {
        /// The file.
        file: String,
        /// What is wrong.
        msg: String,
    },
    /// `model_type` names a family kiln cannot import.
    #[error("{file}: model_type `{model_type}` is not supported by `kiln import` (supported: {})", SUPPORTED.join(", "))]
    UnsupportedType {
        /// The config file.
        file: String,
        /// Its model type.
        model_type: String,
    },
    /// A required field is absent.
    #[error("{file}: `{field}` is missing")]
    Missing {
        /// The config file.
        file: String,
        /// The field.
        field: String,
    },
    /// A field has a value kiln does not implement.
    #[error("{file}: `{field}` = {value}: {why}")]
    Field {
        /// The config file.
        file: String,
        /// The field.
        field: String,
        /// Its value, as JSON.
        value: String,
        /// What kiln does not implement.
        why: String,
    },
    /// The folder has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoCheckpoint {
        /// The folder.
        dir: String,
    },
    /// The checkpoint lacks a tensor the family needs.
    #[error("{dir}: the checkpoint has no tensor named `…{suffix}` ({what})")]
    Tensor {
        /// The folder.
        dir: String,
        /// The name's end.
        suffix: String,
        /// What it is.
        what: String,
    },
}

/// A folder, imported.
pub struct Imported {
    /// `config.json`'s model type.
    pub model_type: String,
    /// The spec's RON text.
    pub spec: String,
    /// The checkpoint to bind: `model.safetensors` or the shard index.
    pub checkpoint: PathBuf,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer: Option<PathBuf>,
}

/// Imports the Hugging Face folder `dir`.
pub fn import(dir: &Path) -> Result<Imported, ImportError> {
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).map_err(|source| ImportError::Io {
        path: file.display().to_string(),
        source,
    })?;
    let c = Config::parse(&file.display().to_string(), &text)?;
    let ck = Checkpoint::find(dir)?;
    let model_type = c.str_or("model_type", "")?.to_string();
    let body = match model_type.as_str() {
        "llama" | "mistral" | "qwen2" | "phi3" | "mixtral" => decoder::spec(&c, &ck, &model_type)?,
        "gpt_neox" => gpt_neox::spec(&c, &ck)?,
        "gpt2" => gpt2::spec(&c, &ck)?,
        "bert" | "roberta" => bert::spec(&c, &ck, &model_type)?,
        "distilbert" => distilbert::spec(&c, &ck)?,
        "vit" => vit::spec(&c, &ck)?,
        "" => return Err(c.unsupported("model_type", "expected the model family, e.g. \"llama\"")),
        _ => {
            return Err(ImportError::UnsupportedType {
                file: c.file.clone(),
                model_type,
            })
        }
    };
    c.finish(&model_type)?;
    let example = if body.contains("\"max_pos\"") {
        " (e.g. --set max_pos=512 bounds the sequence)"
    } else {
        ""
    };
    let header = format!(
        "// Imported by `kiln import` from {} (model_type \"{model_type}\"); edit freely.\n\
         // Config entries take --set NAME=VALUE{example}.\n",
        dir.display()
    );
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(Imported {
        model_type,
        spec: header + &body,
        checkpoint: ck.path,
        tokenizer,
    })
}

/// Whether `path` is a folder to import (it holds a `config.json`).
pub fn is_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// A spec's `config: { … }` entries, one per line: `(name, RON value)`.
fn config_block(entries: &[(&str, String)]) -> String {
    entries
        .iter()
        .map(|(k, v)| format!("        \"{k}\": {v},\n"))
        .collect()
}

/// A float as RON writes it (always with a decimal point or exponent).
fn float(x: f64) -> String {
    format!("{x:?}")
}

/// The checkpoint's prefix for a family's tensors, from the first suffix found.
fn prefix(ck: &Checkpoint, dir: &Path, suffixes: &[&str], what: &str) -> Result<String, ImportError> {
    ck.prefix_of(suffixes).ok_or_else(|| ImportError::Tensor {
        dir: dir.display().to_string(),
        suffix: suffixes[0].to_string(),
        what: what.to_string(),
    })
}

/// The folder of a checkpoint path.
fn folder(ck: &Checkpoint) -> &Path {
    ck.path.parent().unwrap_or(Path::new("."))
}
