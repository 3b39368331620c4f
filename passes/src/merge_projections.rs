//! Merges projections of one input into one matrix product.
//!
//! `x @ W1ᵀ, x @ W2ᵀ, …` (the Q, K and V projections of attention; gate and up of SwiGLU) become
//! `x @ concat(W1, W2, …)ᵀ` followed by slices of the result's last axis, so the GEMM runs once
//! with a wider N. When every product is followed by its own bias add, the biases are concatenated
//! too. Assumes a verified graph; leaves one. The concatenated weights are weight-only subgraphs
//! that a backend folds at compile time. Does not merge products of different inputs or of
//! non-parameter right operands.

use std::collections::BTreeMap;

use kiln_ir::{BinaryOp, Dim, Graph, NodeId, Op};

use crate::PassStats;

const RULE: &str = "merge-projections";

/// Runs the pass.
pub fn run(g: &mut Graph, _: &crate::PipelineOptions) -> PassStats {
    // Products x @ Wᵀ with W a parameter [n, k], grouped by x.
    let mut groups: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
    for id in g.node_ids().collect::<Vec<_>>() {
        let Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        } = g.node(id).op
        else {
            continue;
        };
        let args = g.args(id);
        let w = &g.node(args[1]);
        if matches!(w.op, Op::Param { .. }) && w.ty.rank() == 2 && g.outputs().iter().all(|o| o.node != id) {
            groups.entry(args[0]).or_default().push(id);
        }
    }
    let mut merged = 0;
    let mut notes = Vec::new();
    for (x, mms) in groups {
        if mms.len() < 2 {
            continue;
        }
        let ws: Vec<NodeId> = mms.iter().map(|m| g.args(*m)[1]).collect();
        let widths: Vec<u64> = ws
            .iter()
            .map(|w| g.node(*w).ty.shape[0].as_known().unwrap_or(0))
            .collect();
        // A bias add after every product, each with a [n] parameter: merge those too.
        let biases: Option<Vec<(NodeId, NodeId)>> = mms
            .iter()
            .map(|m| {
                let users = g.users(*m);
                let [add] = users[..] else { return None };
                if g.node(add).op != Op::Binary(BinaryOp::Add) {
                    return None;
                }
                let a = g.args(add);
                let b = if a[0] == *m { a[1] } else { a[0] };
                let bn = g.node(b);
                (matches!(bn.op, Op::Param { .. }) && bn.ty.rank() == 1 && b != *m && g.node(add).ty == g.node(*m).ty)
                    .then_some((add, b))
            })
            .collect();
        let name = g.node(mms[0]).name.clone();
        let Ok(wcat) = g.add(Op::Concat { axis: 0 }, &ws, format!("{name}/merged_weight")) else {
            continue;
        };
        let Ok(mut y) = g.add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[x, wcat],
            format!("{name}/merged"),
        ) else {
            continue;
        };
        let replaced: Vec<NodeId> = match &biases {
            Some(bs) => {
                let bv: Vec<NodeId> = bs.iter().map(|(_, b)| *b).collect();
                let Ok(bcat) = g.add(Op::Concat { axis: 0 }, &bv, format!("{name}/merged_bias")) else {
                    continue;
                };
                let Ok(yb) = g.add(Op::Binary(BinaryOp::Add), &[y, bcat], format!("{name}/merged_bias_add")) else {
                    continue;
                };
                y = yb;
                bs.iter().map(|(add, _)| *add).collect()
            }
            None => mms.clone(),
        };
        for n in [wcat, y] {
            g.add_rules(n, [RULE.to_string()]);
        }
        if let Some(b) = g.args(y).get(1).copied().filter(|_| biases.is_some()) {
            g.add_rules(b, [RULE.to_string()]);
            let mm = g.args(y)[0];
            g.add_rules(mm, [RULE.to_string()]);
        }
        let axis = g.node(y).ty.rank() - 1;
        let mut start = 0u64;
        for (old, w) in replaced.iter().zip(&widths) {
            let slice = g
                .add(
                    Op::Slice {
                        axis,
                        start,
                        end: start + w,
                    },
                    &[y],
                    g.node(*old).name.clone(),
                )
                .expect("slices of the merged product have the original types");
            debug_assert_eq!(g.node(slice).ty.shape.last(), Some(&Dim::known(*w)));
            g.add_rules(slice, [RULE.to_string()]);
            g.replace_uses(*old, slice);
            start += w;
        }
        merged += mms.len();
        notes.push(format!(
            "merged {} projections of `{}` into one N={start} product{}",
            mms.len(),
            g.node(x).name,
            if biases.is_some() { " with biases" } else { "" }
        ));
    }
    PassStats {
        removed: 0,
        merged,
        notes,
        fired: Vec::new(),
    }
}
