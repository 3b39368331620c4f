//! Common subexpression elimination.
//!
//! Two nodes with the same op (attributes included) and the same operands compute the same value;
//! uses of the later one are redirected to the earlier. Visits nodes in topological order, so
//! chains collapse in one sweep. Inputs and params are never merged (they are identified by name
//! and already unique). The merged node keeps the earlier node's name. Leaves the now-unused node
//! for DCE to remove.

use std::collections::HashMap;

use kiln_ir::{Graph, NodeId, Op};

use crate::PassStats;

/// Runs the pass.
pub fn run(g: &mut Graph, _: &crate::PipelineOptions) -> PassStats {
    let order = g.topo_order().expect("CSE runs on verified, acyclic graphs");
    let mut seen: HashMap<(Op, Vec<NodeId>), NodeId> = HashMap::new();
    let mut merged = 0;
    for id in order {
        let op = g.node(id).op.clone();
        if matches!(op, Op::Input { .. } | Op::Param { .. }) {
            continue;
        }
        let key = (op, g.args(id));
        match seen.get(&key) {
            Some(&first) => {
                g.replace_uses(id, first);
                merged += 1;
            }
            None => {
                seen.insert(key, id);
            }
        }
    }
    PassStats {
        removed: 0,
        merged,
        notes: Vec::new(),
        fired: Vec::new(),
    }
}
