//! Graphviz DOT output, for looking at a graph.

use std::collections::HashMap;
use std::fmt::Write;

use crate::{Graph, NodeId, Op};

impl Graph {
    /// Renders the graph as Graphviz DOT, nodes labelled with op, type and name.
    pub fn to_dot(&self) -> String {
        let order = self.topo_order().unwrap_or_else(|_| self.node_ids().collect());
        let num: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut out = format!("digraph {:?} {{\n  node [shape=box, fontname=monospace];\n", self.name);
        for id in &order {
            let node = self.node(*id);
            let attrs = node.op.attrs();
            let label = format!("{} {}\\n{}\\n{}", node.op.mnemonic(), attrs, node.ty, node.name);
            let style = match node.op {
                Op::Input { .. } => ", style=filled, fillcolor=lightblue",
                Op::Param { .. } => ", style=filled, fillcolor=lightgrey",
                _ => "",
            };
            let _ = writeln!(out, "  n{} [label={:?}{style}];", num[id], label.replace("\\n", "\n"));
            for (i, a) in self.args(*id).iter().enumerate() {
                let _ = writeln!(out, "  n{} -> n{} [label=\"{i}\"];", num[a], num[id]);
            }
        }
        for o in &self.outputs {
            let _ = writeln!(
                out,
                "  {:?} [shape=oval];\n  n{} -> {:?};",
                o.name, num[&o.node], o.name
            );
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Dim, Graph, Op, TensorType, UnaryOp};

    #[test]
    fn dot_has_every_node_and_edge() {
        let mut g = Graph::new("g");
        let x = g
            .add(
                Op::input("x", TensorType::new(DType::F32, vec![Dim::known(2)])),
                &[],
                "x",
            )
            .unwrap();
        let y = g.add(Op::Unary(UnaryOp::Exp), &[x], "y").unwrap();
        g.add_output("out", y).unwrap();
        let dot = g.to_dot();
        assert!(dot.starts_with("digraph \"g\""));
        assert!(dot.contains("n0 -> n1"));
        assert!(dot.contains("n1 -> \"out\""));
    }
}
