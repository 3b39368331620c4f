//! The one stable text form of the IR.
//!
//! Nodes are printed in [`Graph::topo_order`] and renumbered densely (`%0`, `%1`, …), so the text
//! depends only on the graph's structure and insertion order, never on ids left by removals.

use std::collections::HashMap;
use std::fmt::Write;

use crate::{Graph, NodeId, Op};

impl Graph {
    /// Renders the graph in the stable text form.
    pub fn to_text(&self) -> String {
        let order = match self.topo_order() {
            Ok(o) => o,
            Err(_) => return format!("graph {} {{ <cyclic> }}\n", self.name),
        };
        let mut num: HashMap<NodeId, usize> = HashMap::new();
        let mut out = String::new();
        let ins: Vec<String> = self
            .inputs
            .iter()
            .map(|i| match &self.node(*i).op {
                Op::Input { name, ty, default } => match default {
                    Some(d) => format!("{name}: {ty} = {d}"),
                    None => format!("{name}: {ty}"),
                },
                _ => "?".into(),
            })
            .collect();
        let _ = writeln!(out, "graph {}({}) {{", self.name, ins.join(", "));
        for id in order {
            let n = num.len();
            num.insert(id, n);
            let node = self.node(id);
            let args: Vec<String> = self.args(id).iter().map(|a| format!("%{}", num[a])).collect();
            let mut line = format!("  %{n} = {}", node.op.mnemonic());
            let attrs = node.op.attrs();
            if !attrs.is_empty() {
                line.push(' ');
                line.push_str(&attrs);
            }
            if !args.is_empty() {
                line.push_str(if attrs.is_empty() { " " } else { ", " });
                line.push_str(&args.join(", "));
            }
            let _ = write!(out, "{line} : {}  # {}", node.ty, node.name);
            if !node.rules.is_empty() {
                let _ = write!(out, "  [{}]", node.rules.join(", "));
            }
            out.push('\n');
        }
        let outs: Vec<String> = self
            .outputs
            .iter()
            .map(|o| format!("{}=%{}", o.name, num[&o.node]))
            .collect();
        let _ = writeln!(out, "  return {}", outs.join(", "));
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::{BinaryOp, DType, Dim, Graph, Op, TensorType};

    #[test]
    fn text_form_is_dense_and_stable() {
        let mut g = Graph::new("tiny");
        let x = g
            .add(
                Op::input("x", TensorType::new(DType::F32, vec![Dim::sym("batch"), Dim::known(4)])),
                &[],
                "x",
            )
            .unwrap();
        let dead = g.add(Op::Unary(crate::UnaryOp::Exp), &[x], "dead").unwrap();
        let w = g
            .add(
                Op::Param {
                    name: "w".into(),
                    ty: TensorType::new(DType::F32, vec![Dim::known(4)]),
                },
                &[],
                "w",
            )
            .unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[x, w], "y").unwrap();
        g.add_output("y", y).unwrap();
        g.remove(dead);
        crate::verify(&g).unwrap();
        insta::assert_snapshot!(g.to_text(), @r#"
        graph tiny(x: f32[batch, 4]) {
          %0 = input "x" : f32[batch, 4]  # x
          %1 = param "w" : f32[4]  # w
          %2 = add %0, %1 : f32[batch, 4]  # y
          return y=%2
        }
        "#);
    }
}
