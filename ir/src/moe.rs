//! The mixture-of-experts op's attributes and type rule (`Op::Moe`).
//!
//! Routing is data-dependent — how many tokens each expert receives is known only at run time —
//! so no composition of the other primitives expresses "only the routed tokens go through an
//! expert". The op's *definition* is dense (every expert on every token, weighted by a score that
//! is zero outside the token's top k); backends run only the routed pairs.

use std::fmt;

use crate::{DType, TensorType, TypeError};

/// How router logits become expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Gating {
    /// A softmax over all experts (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// An independent sigmoid per expert (DeepSeek-V3 style).
    Sigmoid,
}

/// The activation applied to an expert's gate projection: `act(x·Wgᵀ) ⊙ (x·Wuᵀ)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExpertAct {
    /// `x · sigmoid(x)` (SwiGLU).
    Silu,
    /// Exact (erf) GELU (GeGLU).
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

impl ExpertAct {
    /// The spec language's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ExpertAct::Silu => "silu",
            ExpertAct::Gelu => "gelu",
            ExpertAct::GeluTanh => "gelu_tanh",
            ExpertAct::Relu => "relu",
        }
    }
}

impl fmt::Display for Gating {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Gating::Softmax => "softmax",
            Gating::Sigmoid => "sigmoid",
        })
    }
}

/// The output type of a mixture of `experts` experts over `x [.., d]`, router `logits
/// [.., experts]`, and per expert `e` (operands `2 + 3e ..`) its weights `gate [f, d]`,
/// `up [f, d]`, `down [d, f]` (the `[out, in]` layout of a linear layer): `[.., d]`.
pub(crate) fn infer(experts: u32, top_k: u32, args: &[&TensorType]) -> Result<TensorType, TypeError> {
    let (x, logits) = (args[0], args[1]);
    let shape_err = |what: String| {
        TypeError(format!(
            "moe takes f32 x [.., d], logits [.., {experts}], and per expert gate and up [ffn, d] and down [d, ffn]; {what}"
        ))
    };
    if x.dtype != DType::F32 || logits.dtype != DType::F32 || x.rank() < 1 || logits.rank() != x.rank() {
        return Err(shape_err(format!("got x {x} and logits {logits}")));
    }
    let (lead, d) = x.shape.split_at(x.rank() - 1);
    let (lead_l, e) = logits.shape.split_at(logits.rank() - 1);
    if lead != lead_l || e[0].as_known() != Some(u64::from(experts)) {
        return Err(shape_err(format!("got x {x} and logits {logits}")));
    }
    let ffn = args[2].shape.first().cloned();
    for (i, w) in args[2..].chunks(3).enumerate() {
        let (g, u, dn) = (w[0], w[1], w[2]);
        let ok = [g, u, dn].iter().all(|t| t.dtype == DType::F32 && t.rank() == 2)
            && Some(&g.shape[0]) == ffn.as_ref()
            && g.shape[1] == d[0]
            && u == g
            && dn.shape[..] == [d[0].clone(), g.shape[0].clone()];
        if !ok {
            return Err(shape_err(format!(
                "expert {i} has gate {g}, up {u}, down {dn} for x {x}"
            )));
        }
    }
    if top_k == 0 || top_k > experts {
        return Err(TypeError(format!(
            "moe routes each row to top_k = {top_k} experts, which must be between 1 and the {experts} experts"
        )));
    }
    Ok(x.clone())
}
