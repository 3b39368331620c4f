//! kiln's CPU backend.
//!
//! [`compile`] plans a verified graph ([`plan`], the shared planner of `kiln-plan`), packs weights
//! for the level's microkernel ([`pack`]), generates every fused kernel with Cranelift
//! ([`codegen`]) and returns the pieces of an artifact; [`compile_to_file`] writes it. The runtime
//! (`kiln-runtime`) loads and runs the result without this crate.

pub mod bisect;
pub mod codegen;
pub mod costs;
pub mod logits;
pub mod pack;
pub mod quant;

use std::collections::BTreeMap;
use std::path::Path;

use kiln_ir::{Graph, Tensor};
use kiln_runtime::plan::Target;

pub use kiln_plan::{plan, CompileError, Compiled, Options};

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
        features: opts
            .cpu
            .features()
            .iter()
            .chain(&opts.vnni.feature())
            .map(|f| f.to_string())
            .collect(),
        level: opts.cpu.name().to_string(),
        int8_prefill: opts.int8_prefill && opts.vnni != kiln_runtime::cpu::Vnni::None,
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
        fusion: planned.fusion,
        predicted: planned.predicted,
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
