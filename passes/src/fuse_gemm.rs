//! `fuse-gemm-epilogue`: a matrix product absorbs what follows it — a constant scale, a bias row
//! and an element-wise addend (the residual), in that order — into one fused op,
//! `acc + bias + scale · (a @ b)` ([`kiln_ir::fused::Gemm`]), which backends run as one product
//! whose epilogue works on the accumulators before the one store.
//!
//! Written as a [`NodeFn`](crate::layout::NodeFn) over the multiplication or addition that
//! follows: where one operand's class holds an f32 product (or a fused product this rule made)
//! read by nothing else, the rule adds the longer fused product to the class. Applied until
//! nothing changes, it grows the epilogue one op at a time.

use egg::Id;
use kiln_ir::{BinaryOp, DType, Fused, Op, TensorType};

use crate::egraph::TensorEGraph;
use crate::layout::{nodes, ty, Build};

/// The rule's name.
pub const NAME: &str = "fuse-gemm-epilogue";

/// The fused product in class `id`, with its operands, if the class is read once.
fn product(eg: &TensorEGraph, id: Id) -> Vec<(Fused, Vec<Id>)> {
    if eg[id].data.uses != 1 {
        return vec![];
    }
    nodes(eg, id)
        .filter_map(|(op, kids)| match &*op {
            Op::MatMul {
                transpose_a,
                transpose_b,
            } if ty(eg, id).is_some_and(|t| t.dtype == DType::F32) => {
                Some((Fused::gemm_of(NAME, *transpose_a, *transpose_b), kids.to_vec()))
            }
            Op::Fused(f) if f.rule == NAME => Some(((**f).clone(), kids.to_vec())),
            _ => None,
        })
        .collect()
}

/// The types of `ids`, if all are known.
fn types(eg: &TensorEGraph, ids: &[Id]) -> Option<Vec<TensorType>> {
    ids.iter().map(|i| ty(eg, *i).cloned()).collect()
}

/// `f` extended by `op` with `other` (a scale constant, or a new operand), if the result is
/// still a product with an epilogue in the canonical order.
fn extend(eg: &TensorEGraph, op: &Op, (f, mut args): (Fused, Vec<Id>), other: Id) -> Option<Build> {
    let before = f.gemm(&types(eg, &args)?.iter().collect::<Vec<_>>())?;
    let g = match op {
        Op::Binary(BinaryOp::Mul) => {
            let c = eg[other].data.konst?;
            let scalar = ty(eg, other).is_some_and(|t| t.rank() == 0 && t.dtype == DType::F32);
            if !scalar || before.scale != 1.0 || before.bias.is_some() || before.acc.is_some() {
                return None;
            }
            f.with_scale(c as f32)
        }
        Op::Binary(BinaryOp::Add) => {
            args.push(other);
            f.with_added()
        }
        _ => return None,
    };
    g.gemm(&types(eg, &args)?.iter().collect::<Vec<_>>())?;
    Some(Build::Node(
        Op::Fused(Box::new(g)),
        args.into_iter().map(Build::Class).collect(),
    ))
}

/// The rule: `mul(p, c)`, `add(p, x)` (either operand order) over a product `p` read once.
pub fn fuse_gemm_epilogue(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    if !matches!(op, Op::Binary(BinaryOp::Mul | BinaryOp::Add)) || kids.len() != 2 || kids[0] == kids[1] {
        return vec![];
    }
    let mut out = Vec::new();
    for (p, other) in [(kids[0], kids[1]), (kids[1], kids[0])] {
        for base in product(eg, p) {
            out.extend(extend(eg, op, base, other));
        }
    }
    out
}
