//! Attention's logits kernels: each attention step's fused softmax kernel again, as a `Map`
//! kernel that computes only its elementwise prologue (scores plus mask or bias). The runtime runs
//! it over each block of scores and does the softmax itself, online over blocks of keys and at the
//! CPU level's full vector width (`kiln_runtime`'s `attention.rs`); the softmax kernel stays in the
//! artifact for runtimes that normalise whole score rows (the CUDA target's fused attention).

use kiln_runtime::plan::{KernelKind, Step};

use crate::plan::{intern_kernel, Planned};

/// Gives every attention step its logits kernel.
pub fn add_logits_kernels(planned: &mut Planned) {
    let Planned { manifest, kernels, .. } = planned;
    for step in &mut manifest.steps {
        if let Step::Attention { kernel, logits, .. } = step {
            let mut spec = kernels[*kernel as usize].clone();
            spec.kind = KernelKind::Map;
            spec.reduce = None;
            let name = format!("{}/logits", manifest.kernels[*kernel as usize].name);
            *logits = Some(intern_kernel(kernels, &mut manifest.kernels, spec, name, 0));
        }
    }
}
