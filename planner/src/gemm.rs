//! Matrix products and their epilogues, as the planner lowers them: the fused products that
//! `fuse-gemm-epilogue` made (`acc + bias + scale · (a @ b)`) and plain f32 products become one
//! GEMM step each; a right operand that is a quantized or sparse weight read only by products is
//! read in its stored form (`QMatMul`, `SpMatMul`, `SpMatMul24`).

use std::collections::{HashMap, HashSet};

use kiln_ir::{DType, Graph, NodeId, Op, TensorType};
use kiln_runtime::plan::Step;

use crate::CompileError;

/// A product and its epilogue: `acc + bias + scale · (a @ b)`, the value of node `node`.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue {
    pub a: NodeId,
    pub b: NodeId,
    pub ta: bool,
    pub tb: bool,
    pub scale: f32,
    pub bias: Option<NodeId>,
    pub acc: Option<NodeId>,
}

/// The product node `n` computes, if it is an f32 product or a fused product with an epilogue.
pub(crate) fn epilogue(graph: &Graph, n: NodeId) -> Option<Epilogue> {
    let node = graph.node(n);
    let args = graph.args(n);
    match &node.op {
        Op::MatMul {
            transpose_a,
            transpose_b,
        } if node.ty.dtype == DType::F32 => Some(Epilogue {
            a: args[0],
            b: args[1],
            ta: *transpose_a,
            tb: *transpose_b,
            scale: 1.0,
            bias: None,
            acc: None,
        }),
        Op::Fused(f) if f.rule == kiln_passes::fuse_gemm::NAME => {
            let tys: Vec<&TensorType> = args.iter().map(|a| &graph.node(*a).ty).collect();
            let g = f.gemm(&tys)?;
            Some(Epilogue {
                a: args[0],
                b: args[1],
                ta: g.transpose_a,
                tb: g.transpose_b,
                scale: g.scale,
                bias: g.bias.map(|i| args[i as usize]),
                acc: g.acc.map(|i| args[i as usize]),
            })
        }
        _ => None,
    }
}

/// Whether node `u` is a product that reads `w` as its right operand `[n, k]` and nowhere else.
fn reads_as_weight(graph: &Graph, u: NodeId, w: NodeId) -> bool {
    let args = graph.args(u);
    epilogue(graph, u).is_some_and(|e| !e.ta && e.tb && e.b == w && args.iter().filter(|a| **a == w).count() == 1)
}

/// The quantized or sparse weight node `e` reads in place of a dense right operand: a
/// `Dequantize`, `Densify` or `Densify24` read only by products, as their weight.
pub(crate) fn stored_weight(
    graph: &Graph,
    e: &Epilogue,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> Option<NodeId> {
    let b = e.b;
    let stored = matches!(
        graph.node(b).op,
        Op::Dequantize { .. } | Op::Densify { .. } | Op::Densify24 { .. }
    );
    let only_products = users[&b].iter().all(|u| reads_as_weight(graph, *u, b));
    (!e.ta && e.tb && stored && only_products && !outputs.contains(&b)).then_some(b)
}

/// The operands the step for `e` reads: `a`, the weight (or its stored form's operands), the
/// bias and the addend.
pub(crate) fn operands(graph: &Graph, e: &Epilogue, stored: Option<NodeId>) -> Vec<NodeId> {
    let weight = match stored {
        Some(w) => graph.args(w),
        None => vec![e.b],
    };
    std::iter::once(e.a).chain(weight).chain(e.bias).chain(e.acc).collect()
}

/// The step computing `e` into value `out`; `val` gives an operand's value.
pub(crate) fn step(
    graph: &Graph,
    e: &Epilogue,
    stored: Option<NodeId>,
    out: u32,
    val: &dyn Fn(&NodeId) -> Result<u32, CompileError>,
) -> Result<Step, CompileError> {
    let (a, scale) = (val(&e.a)?, e.scale);
    let bias = e.bias.as_ref().map(val).transpose()?;
    let acc = e.acc.as_ref().map(val).transpose()?;
    let Some(w) = stored else {
        return Ok(Step::MatMul {
            a,
            b: val(&e.b)?,
            out,
            ta: e.ta,
            tb: e.tb,
            scale,
            bias,
            acc,
        });
    };
    let wa = graph.args(w);
    Ok(match graph.node(w).op {
        Op::Densify24 { sparse_rows, .. } => Step::SpMatMul24 {
            a,
            vals: val(&wa[0])?,
            idx: val(&wa[1])?,
            out,
            sparse_rows,
            scale,
            bias,
            acc,
        },
        Op::Densify { sparse_rows, block, .. } => Step::SpMatMul {
            a,
            row_ptr: val(&wa[0])?,
            cols: val(&wa[1])?,
            vals: val(&wa[2])?,
            out,
            sparse_rows,
            block,
            scale,
            bias,
            acc,
        },
        Op::Dequantize { bits, group } => Step::QMatMul {
            a,
            codes: val(&wa[0])?,
            scales: val(&wa[1])?,
            mins: wa.get(2).map(val).transpose()?,
            bits,
            group,
            out,
            scale,
            bias,
            acc,
        },
        _ => {
            return Err(CompileError::Internal(format!(
                "`{}` is not a stored weight",
                graph.node(w).name
            )))
        }
    })
}
