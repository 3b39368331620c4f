//! Static size and work estimates.

use crate::{Bindings, Graph, Op};

/// Number of scalar weights in the graph's parameters.
pub fn param_count(graph: &Graph) -> u64 {
    graph
        .params()
        .map(|(_, _, ty)| {
            ty.shape
                .iter()
                .map(|d| d.as_known().unwrap_or(0))
                .fold(1u64, u64::saturating_mul)
        })
        .fold(0u64, u64::saturating_add)
}

/// Floating-point operations for one execution with the symbolic dims bound as given: 2·m·n·k per
/// matrix product, one per output element of elementwise ops, one per input element of reductions.
/// Data movement (reshape, transpose, gather…) counts nothing. `Err` names an unbound symbol.
pub fn estimate_flops(graph: &Graph, bindings: &Bindings) -> Result<u64, String> {
    let mut total = 0u64;
    for id in graph.node_ids() {
        let node = graph.node(id);
        let out: u64 = crate::dim::eval_shape(&node.ty.shape, bindings)?
            .iter()
            .fold(1u64, |a, d| a.saturating_mul(*d as u64));
        total = total.saturating_add(match &node.op {
            Op::MatMul { transpose_a, .. } => {
                let a = &graph.node(graph.args(id)[0]).ty;
                let k = if *transpose_a {
                    &a.shape[a.rank() - 2]
                } else {
                    &a.shape[a.rank() - 1]
                };
                out.saturating_mul(2 * k.eval(bindings)? as u64)
            }
            Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Unary(_) => out,
            Op::Reduce { .. } => {
                let a = &graph.node(graph.args(id)[0]).ty;
                crate::dim::eval_shape(&a.shape, bindings)?
                    .iter()
                    .fold(1u64, |a, d| a.saturating_mul(*d as u64))
            }
            _ => 0,
        });
    }
    Ok(total)
}
