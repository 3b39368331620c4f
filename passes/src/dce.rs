//! Dead code elimination.
//!
//! Removes every node no output depends on. Assumes a verified graph. Leaves graph inputs in
//! place even when unused, because they are part of the model's signature: callers still pass
//! them. Does not look at values (a multiply by zero is not dead).

use std::collections::HashSet;

use kiln_ir::{Graph, NodeId, Op};

use crate::PassStats;

/// Runs the pass.
pub fn run(g: &mut Graph, _: &crate::PipelineOptions) -> PassStats {
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs().iter().map(|o| o.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.args(n));
        }
    }
    let dead: Vec<NodeId> = g
        .node_ids()
        .filter(|n| !live.contains(n) && !matches!(g.node(*n).op, Op::Input { .. }))
        .collect();
    for n in &dead {
        g.remove(*n);
    }
    PassStats {
        removed: dead.len(),
        merged: 0,
        notes: Vec::new(),
        fired: Vec::new(),
    }
}
