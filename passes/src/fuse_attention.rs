//! `fuse-attention`: `softmax(scale · q kᵀ + …) @ v` as one fused op, which backends run as
//! blocked attention (the scores and probabilities never stored).
//!
//! Written over the product by `v`: where its left operand's class holds a fused softmax
//! (`fuse-softmax`) read only there, and exactly one of the softmax's operands is a class read only
//! by the softmax's nodes (as many readers as its body has) that holds the scores product `q kᵀ` (plain, or fused with a scale and nothing else), the
//! rule adds the fused attention: operands `q, k, v` and the softmax's other operands; body the
//! scores product, the softmax's body over it, and the product by `v`. Operands are rank 4,
//! `[batch, heads, seq, head_dim]`, as backends run attention.

use egg::Id;
use kiln_ir::fused::{Arg, BodyNode};
use kiln_ir::{DType, Fused, Op, TensorType};

use crate::egraph::TensorEGraph;
use crate::layout::{nodes, ty, Build};

/// The rule's name.
pub const NAME: &str = "fuse-attention";

/// The fused softmax in class `id`, with its operands, if only one node reads the class.
fn softmax(eg: &TensorEGraph, id: Id) -> Option<(Fused, Vec<Id>)> {
    if eg[id].data.uses != 1 {
        return None;
    }
    nodes(eg, id).find_map(|(op, kids)| match &*op {
        Op::Fused(f) if f.rule == crate::fuse_kernel::SOFTMAX => Some(((**f).clone(), kids.to_vec())),
        _ => None,
    })
}

/// A scores product: its body, and the classes of `q` and `k`.
type Scores = (Vec<BodyNode>, [Id; 2]);

/// The scores product in class `id` — `q kᵀ`, or a fused product of it with a scale alone — as
/// its body and `[q, k]`, if the class is read by `reads` nodes (those of the softmax).
fn scores(eg: &TensorEGraph, id: Id, reads: u32) -> Option<Scores> {
    if eg[id].data.uses != reads || ty(eg, id).is_none_or(|t| t.dtype != DType::F32) {
        return None;
    }
    nodes(eg, id).find_map(|(op, kids)| {
        let [q, k] = kids else { return None };
        match &*op {
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            } => Some((Fused::gemm_of(NAME, false, true).body, [*q, *k])),
            Op::Fused(f) if f.rule == crate::fuse_gemm::NAME => {
                let tys: Vec<&TensorType> = [q, k].iter().map(|c| ty(eg, **c)).collect::<Option<_>>()?;
                let g = f.gemm(&tys)?;
                let plain = !g.transpose_a && g.transpose_b && g.bias.is_none() && g.acc.is_none();
                plain.then(|| (f.body.clone(), [*q, *k]))
            }
            _ => None,
        }
    })
}

/// Body nodes of `body` appended to `out` with operand `i` read as `map[i]` and node `j` as
/// `out`'s node `base + j`.
fn splice(out: &mut Vec<BodyNode>, body: &[BodyNode], map: &[Arg]) {
    let base = out.len() as u32;
    for n in body {
        let args = n
            .args
            .iter()
            .map(|a| match *a {
                Arg::Operand(o) => map[o as usize],
                Arg::Node(j) => Arg::Node(base + j),
            })
            .collect();
        out.push(BodyNode { op: n.op.clone(), args });
    }
}

/// The rule: `matmul(p, v)` over a fused softmax `p` of scores `q kᵀ`.
pub fn fuse_attention(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let (
        Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        },
        [p, v],
    ) = (op, kids)
    else {
        return vec![];
    };
    let Some((sm, sm_ops)) = softmax(eg, *p) else {
        return vec![];
    };
    let found: Vec<(usize, Scores)> = sm_ops
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let reads = sm
                .body
                .iter()
                .filter(|n| n.args.contains(&Arg::Operand(i as u32)))
                .count();
            scores(eg, *c, reads as u32).map(|s| (i, s))
        })
        .collect();
    let [(si, (sbody, [q, k]))] = &found[..] else {
        return vec![];
    };
    // Backends run attention over [batch, heads, seq, head_dim] operands.
    if [*q, *k, *v].iter().any(|c| ty(eg, *c).is_none_or(|t| t.rank() != 4)) {
        return vec![];
    }
    // Operands: q, k, v, then the softmax's others in order.
    let mut operands = vec![*q, *k, *v];
    let mut map = Vec::with_capacity(sm_ops.len());
    let mut body: Vec<BodyNode> = Vec::new();
    splice(&mut body, sbody, &[Arg::Operand(0), Arg::Operand(1)]);
    let scores_at = Arg::Node(body.len() as u32 - 1);
    for (i, c) in sm_ops.iter().enumerate() {
        if i == *si {
            map.push(scores_at);
        } else {
            map.push(Arg::Operand(operands.len() as u32));
            operands.push(*c);
        }
    }
    splice(&mut body, &sm.body, &map);
    let probs = Arg::Node(body.len() as u32 - 1);
    body.push(BodyNode {
        op: op.clone(),
        args: vec![probs, Arg::Operand(2)],
    });
    let f = Fused {
        rule: NAME.to_string(),
        operands: operands.len() as u32,
        body,
    };
    vec![Build::Node(
        Op::Fused(Box::new(f)),
        operands.into_iter().map(Build::Class).collect(),
    )]
}
