//! Weight forms as e-graph alternatives. With `--quantize` or `--sparsity` the user grants an
//! approximation; each product it applies to then has several forms — f32, int8, int4 codes,
//! CSR, block CSR, packed 2:4, as the grant allows — each a product node over its own encoding of
//! the weight. The forms join the e-class of the product they replace and extraction keeps, per
//! product, the one whose measured time is least: a form is a product over stored weights, read
//! in place (its `Dequantize`/`Densify` node costs nothing of its own), costed at the time
//! measured for its kernel at the product's shape on the compiling CPU.
//!
//! The rest of the graph is extracted as it was loaded (every other class has one node).

use std::collections::HashMap;

use egg::{CostFunction, Id, Language};
use kiln_ir::{Graph, NodeId, Op};

use crate::cost::{CostModel, ExtractCost};
use crate::egraph::{self, TensorLang};

/// One way to compute a product.
#[derive(Clone, Debug)]
pub struct Form {
    /// For reports: `f32`, `int8`, `int4:128`, `CSR`, `16x16 block CSR`, `packed 2:4`.
    pub label: String,
    /// The product node computing the value from this form (read by nothing yet, unless it is the
    /// original product).
    pub product: NodeId,
    /// Measured nanoseconds of one run of the product at the rows it is costed at.
    pub ns: f64,
}

/// A product and its forms.
#[derive(Clone, Debug)]
pub struct Alternatives {
    /// The product the graph computes now.
    pub product: NodeId,
    /// Its forms (the product itself may be one of them).
    pub forms: Vec<Form>,
}

/// Extraction cost: measured time for the forms' products, nothing for the stored weights they
/// read in place, the target's estimate (critical path) for everything else.
struct FormCost<'a> {
    base: ExtractCost<'a>,
    measured: HashMap<TensorLang, f64>,
}

impl CostFunction<TensorLang> for FormCost<'_> {
    type Cost = f64;
    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &TensorLang, mut costs: C) -> f64 {
        let op = self.base.egraph.analysis.op_of(enode);
        let own = match (self.measured.get(enode), &*op) {
            (Some(ns), _) => *ns,
            (None, Op::Dequantize { .. } | Op::Densify { .. } | Op::Densify24 { .. }) => 0.0,
            _ => return self.base.cost(enode, costs),
        };
        own + enode.fold(0.0, |m: f64, id| m.max(costs(id)))
    }
}

/// The e-node of `product` in the e-graph: the product node of its class whose operands are the
/// classes of the graph node's operands.
fn enode_of(g: &Graph, loaded: &egraph::Loaded, product: NodeId) -> Option<TensorLang> {
    let eg = &loaded.egraph;
    let kids: Vec<Id> = g.args(product).iter().map(|a| eg.find(loaded.class[a])).collect();
    let class = eg.find(loaded.class[&product]);
    eg[class]
        .nodes
        .iter()
        .find(|n| n.children() == kids.as_slice() && matches!(&*eg.analysis.op_of(n), Op::MatMul { .. }))
        .cloned()
}

/// Puts every product's forms in its e-class and extracts the graph with the fastest form of each;
/// returns, per entry of `alts`, the index of the form kept.
pub fn choose(g: &mut Graph, alts: &[Alternatives], model: CostModel) -> Vec<usize> {
    let mut loaded = egraph::load(g);
    for a in alts {
        for f in &a.forms {
            loaded.egraph.union(loaded.class[&a.product], loaded.class[&f.product]);
        }
    }
    loaded.egraph.rebuild();
    let outputs = loaded
        .outputs
        .iter()
        .map(|(n, c)| (n.clone(), loaded.egraph.find(*c)))
        .collect();
    loaded.outputs = outputs;
    let enodes: Vec<Vec<Option<TensorLang>>> = alts
        .iter()
        .map(|a| a.forms.iter().map(|f| enode_of(g, &loaded, f.product)).collect())
        .collect();
    let mut measured = HashMap::new();
    for (a, nodes) in alts.iter().zip(&enodes) {
        for (f, n) in a.forms.iter().zip(nodes) {
            if let Some(n) = n {
                measured.insert(n.clone(), f.ns);
            }
        }
    }
    let cost = FormCost {
        base: ExtractCost {
            egraph: &loaded.egraph,
            model,
            own: Default::default(),
        },
        measured,
    };
    let extractor = egg::Extractor::new(&loaded.egraph, cost);
    let chosen = alts
        .iter()
        .zip(&enodes)
        .map(|(a, nodes)| {
            let best = extractor.find_best_node(loaded.egraph.find(loaded.class[&a.product]));
            nodes.iter().position(|n| n.as_ref() == Some(best)).unwrap_or(0)
        })
        .collect();
    let new = egraph::extract_from(&loaded, &g.name, "weight-forms", &extractor);
    *g = new;
    chosen
}
