//! kiln's frontend: the RON model-spec language.
//!
//! Stages, each its own module: [`parse`] (RON text → [`ast::Spec`], serde positions kept),
//! [`lower`] (resolve names, evaluate config expressions, expand blocks and repeats, emit
//! primitive IR), [`weights`] (bind a safetensors checkpoint to the graph's parameters, or make
//! random ones). Every user mistake becomes a [`SpecError`] pointing into the spec file; the
//! graph handed on has passed [`kiln_ir::verify`].

pub mod ast;
pub mod diag;
pub mod expr;
pub mod hf;
pub mod lower;
pub mod parse;
pub mod weights;

use std::path::Path;

pub use diag::{Diagnostic, SpecError, SpecPath};
pub use lower::{Lowered, Options, ParamDecl, ParamRole};

/// Errors of the frontend as a whole.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not text, so it cannot be a spec.
    #[error(
        "{path} is not a model spec: specs are RON text and this file is binary (a compiled artifact \
         runs with `kiln run` or `kiln bench`)"
    )]
    NotText {
        /// The file.
        path: String,
    },
    /// Problems in the spec or in binding its checkpoint, rendered with snippets.
    #[error("{0}")]
    Spec(#[from] SpecError),
    /// The checkpoint file is not valid safetensors.
    #[error("{path}: not a valid safetensors checkpoint: {msg}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What the safetensors reader said.
        msg: String,
    },
    /// A Hugging Face folder could not be imported.
    #[error(transparent)]
    Import(#[from] hf::ImportError),
    /// The lowered graph failed verification: a bug in kiln, not in the spec.
    #[error("internal compiler error: the lowered graph is invalid: {0}\nplease report this with the spec")]
    Internal(#[from] kiln_ir::VerifyError),
}

/// Reads, parses and lowers a spec file.
pub fn load(path: &Path, opts: &Options) -> Result<Lowered, FrontendError> {
    if hf::is_folder(path) {
        let imported = hf::import(path)?;
        return lower_source(&format!("{} (imported)", path.display()), &imported.spec, opts);
    }
    let bytes = std::fs::read(path).map_err(|source| FrontendError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let src = String::from_utf8(bytes).map_err(|_| FrontendError::NotText {
        path: path.display().to_string(),
    })?;
    lower_source(&path.display().to_string(), &src, opts)
}

/// Parses and lowers spec text; `file` names it in messages.
pub fn lower_source(file: &str, src: &str, opts: &Options) -> Result<Lowered, FrontendError> {
    let spec = parse::parse(file, src)?;
    let lowered = lower::lower(file, src, &spec, opts)?;
    kiln_ir::verify(&lowered.graph)?;
    Ok(lowered)
}

/// The candidate closest to `name` by edit distance, if close enough to be a likely typo.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    fn dist(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                cur[j + 1] = (prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (dist(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}
