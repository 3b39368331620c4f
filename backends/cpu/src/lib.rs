//! kiln's CPU backend.
//!
//! [`compile`] plans a verified graph ([`plan`]), generates every fused kernel with Cranelift
//! ([`codegen`]) and returns the pieces of an artifact; [`compile_to_file`] writes it. The runtime
//! (`kiln-runtime`) loads and runs the result without this crate.

pub mod bisect;
pub mod codegen;
pub mod logits;
pub mod pack;
pub mod plan;
pub mod quant;

use std::collections::BTreeMap;
use std::path::Path;

use kiln_ir::{Graph, Tensor};
use kiln_runtime::cpu::Level;
use kiln_runtime::plan::{Manifest, Target};

/// Why a graph could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A parameter has no weight.
    #[error("no weight for parameter `{0}`")]
    MissingWeight(String),
    /// A weight does not fit its parameter.
    #[error("weight `{name}` is {got}, the graph expects {expected}")]
    BadWeight {
        /// Weight name.
        name: String,
        /// Declared type.
        expected: String,
        /// What was supplied.
        got: String,
    },
    /// Cranelift could not be set up or failed on a kernel.
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// A bug in kiln.
    #[error("internal compiler error: {0}")]
    Internal(String),
    /// The artifact could not be written.
    #[error("{0}")]
    Write(#[from] kiln_runtime::LoadError),
}

/// How to compile.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fuse elementwise chains, reductions, softmax and matmul epilogues into kernels. Without
    /// it every primitive op is its own step (the -O0 baseline).
    pub fuse: bool,
    /// The optimization level, recorded in the manifest.
    pub opt_level: String,
    /// A `tokenizer.json` to carry in the artifact.
    pub tokenizer: Option<String>,
    /// The CPU level to compile for (`--cpu`; default: the best this machine runs).
    pub cpu: Level,
}

impl Options {
    /// The options for `-O<level>`.
    pub fn for_level(level: u8) -> Options {
        Options {
            fuse: level > 0,
            opt_level: format!("O{level}"),
            tokenizer: None,
            cpu: Level::host(),
        }
    }
}

/// An artifact's pieces.
pub struct Compiled {
    /// The manifest.
    pub manifest: Manifest,
    /// The weight section.
    pub weights: Vec<u8>,
    /// The code section.
    pub code: Vec<u8>,
}

/// Compiles `graph` for the CPU level `opts.cpu`.
pub fn compile(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    opts: &Options,
) -> Result<Compiled, CompileError> {
    let cg = codegen::Codegen::for_level(opts.cpu).map_err(CompileError::Codegen)?;
    let target = Target {
        arch: std::env::consts::ARCH.to_string(),
        features: opts.cpu.features().iter().map(|f| f.to_string()).collect(),
        level: opts.cpu.name().to_string(),
    };
    let mut planned = plan::plan(graph, weights, dims, target, opts)?;
    // KILN_ATTN=rows keeps the whole-row softmax kernel in attention (for side-by-side runs).
    if std::env::var("KILN_ATTN").as_deref() != Ok("rows") {
        logits::add_logits_kernels(&mut planned);
    }
    // KILN_PACK=off keeps products on the GEMM library (for side-by-side measurements).
    if opts.fuse && std::env::var("KILN_PACK").as_deref() != Ok("off") {
        pack::pack_weights(&mut planned, opts.cpu);
    }
    let mut manifest = planned.manifest;
    manifest.tokenizer = opts.tokenizer.clone();
    let mut code = Vec::new();
    for (decl, spec) in manifest.kernels.iter_mut().zip(&planned.kernels) {
        let bytes = cg
            .compile(spec)
            .map_err(|e| CompileError::Codegen(format!("kernel `{}`: {e}", spec.name)))?;
        while code.len() % 16 != 0 {
            code.push(0xCC);
        }
        decl.offset = code.len() as u64;
        decl.len = bytes.len() as u64;
        code.extend_from_slice(&bytes);
    }
    Ok(Compiled {
        manifest,
        weights: planned.weights,
        code,
    })
}

/// Compiles and writes an artifact file.
pub fn compile_to_file(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    opts: &Options,
    path: &Path,
) -> Result<Compiled, CompileError> {
    let c = compile(graph, weights, dims, opts)?;
    kiln_runtime::artifact::write(path, &c.manifest, &c.weights, &c.code)?;
    Ok(c)
}
