//! The verifier: checks the invariants listed in the crate docs.

use std::collections::HashSet;

use crate::{Graph, NodeId, Op};

/// A broken invariant. After the frontend has accepted a model, this is always a compiler bug.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The graph has a cycle through the named node.
    #[error("cycle through node `{0}`")]
    Cycle(String),
    /// A node's operands are not numbered `0..arity`.
    #[error("node `{node}` ({op}): {msg}")]
    Arity {
        /// Node name.
        node: String,
        /// Op mnemonic.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A node's stored type differs from the inferred one, or inference fails.
    #[error("node `{node}` ({op}): {msg}")]
    Type {
        /// Node name.
        node: String,
        /// Op mnemonic.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// Inputs, params or outputs are inconsistent.
    #[error("{0}")]
    Signature(String),
}

/// Checks every invariant of `graph`; returns the first violation found.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let order = graph
        .topo_order()
        .map_err(|n| VerifyError::Cycle(graph.node(n).name.clone()))?;
    for &id in &order {
        let node = graph.node(id);
        let mut positions: Vec<u32> = graph
            .g
            .edges_directed(id.0, petgraph::Direction::Incoming)
            .map(|e| *e.weight())
            .collect();
        positions.sort_unstable();
        if positions.iter().enumerate().any(|(i, p)| *p as usize != i) {
            return Err(VerifyError::Arity {
                node: node.name.clone(),
                op: node.op.mnemonic(),
                msg: format!("operand positions {positions:?} are not 0..{}", positions.len()),
            });
        }
        let args = graph.args(id);
        let tys: Vec<_> = args.iter().map(|a| &graph.node(*a).ty).collect();
        match node.op.infer(&tys) {
            Ok(t) if t == node.ty => {}
            Ok(t) => {
                return Err(VerifyError::Type {
                    node: node.name.clone(),
                    op: node.op.mnemonic(),
                    msg: format!("stored type {} but operands give {t}", node.ty),
                })
            }
            Err(e) => {
                return Err(VerifyError::Type {
                    node: node.name.clone(),
                    op: node.op.mnemonic(),
                    msg: e.0,
                })
            }
        }
    }
    let mut input_names = HashSet::new();
    let listed: HashSet<NodeId> = graph.inputs.iter().copied().collect();
    if listed.len() != graph.inputs.len() {
        return Err(VerifyError::Signature("an input is listed twice".into()));
    }
    let mut param_names = HashSet::new();
    for id in graph.node_ids() {
        match &graph.node(id).op {
            Op::Input { name, .. } => {
                if !listed.contains(&id) {
                    return Err(VerifyError::Signature(format!(
                        "input `{name}` is not in the input list"
                    )));
                }
                if !input_names.insert(name.clone()) {
                    return Err(VerifyError::Signature(format!("input name `{name}` is used twice")));
                }
            }
            Op::Param { name, ty } => {
                if !param_names.insert(name.clone()) {
                    return Err(VerifyError::Signature(format!("param `{name}` appears twice")));
                }
                if ty.shape.iter().any(|d| d.as_known().is_none()) {
                    return Err(VerifyError::Signature(format!(
                        "param `{name}` has a symbolic shape {ty}"
                    )));
                }
            }
            _ => {}
        }
    }
    for i in &graph.inputs {
        if !graph.contains(*i) || !matches!(graph.node(*i).op, Op::Input { .. }) {
            return Err(VerifyError::Signature(
                "the input list names a node that is not an input".into(),
            ));
        }
    }
    let mut out_names = HashSet::new();
    for o in &graph.outputs {
        if !graph.contains(o.node) {
            return Err(VerifyError::Signature(format!(
                "output `{}` names a removed node",
                o.name
            )));
        }
        if !out_names.insert(o.name.clone()) {
            return Err(VerifyError::Signature(format!(
                "output name `{}` is used twice",
                o.name
            )));
        }
    }
    Ok(())
}
