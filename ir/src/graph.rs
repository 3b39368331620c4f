//! The graph container.

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::{Op, TensorType, TypeError};

/// Identifies a node of one [`Graph`]. Ids stay valid when other nodes are removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) NodeIndex<u32>);

impl NodeId {
    /// The raw index, for diagnostics; not dense after removals.
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// One operation in the graph, with its inferred output type.
#[derive(Clone, Debug)]
pub struct Node {
    /// What the node computes.
    pub op: Op,
    /// Its output type, as inferred when the node was added.
    pub ty: TensorType,
    /// Where it came from in the model (`layer.3/attention/scores`); kept through every pass.
    pub name: String,
    /// The rewrite rules (or passes) that produced this node, empty for nodes as the frontend
    /// built them. Lets a numeric mismatch be bisected to one rule (`--disable-rule`).
    pub rules: Vec<String>,
}

/// A named graph result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The name callers see.
    pub name: String,
    /// The node whose value is returned.
    pub node: NodeId,
}

/// Errors from building or editing a graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// An op was applied to operands of the wrong types or shapes.
    #[error("{node}: {source}")]
    Type {
        /// Name of the node being added.
        node: String,
        /// What did not fit.
        #[source]
        source: TypeError,
    },
    /// An operand id does not belong to this graph.
    #[error("{node}: operand {operand} is not a node of this graph")]
    DanglingOperand {
        /// Name of the node being added.
        node: String,
        /// Index of the operand.
        operand: usize,
    },
    /// A second input or output with the same name.
    #[error("duplicate {what} name `{name}`")]
    Duplicate {
        /// "input" or "output".
        what: &'static str,
        /// The repeated name.
        name: String,
    },
}

/// A typed dataflow graph of tensor ops. See the crate docs for its invariants.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub(crate) g: StableDiGraph<Node, u32>,
    pub(crate) inputs: Vec<NodeId>,
    pub(crate) outputs: Vec<Output>,
    /// The graph's name (the model name from the spec).
    pub name: String,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// Adds a node computing `op` over `args`, inferring and checking its type.
    pub fn add(&mut self, op: Op, args: &[NodeId], name: impl Into<String>) -> Result<NodeId, GraphError> {
        let name = name.into();
        let mut tys = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            match self.g.node_weight(a.0) {
                Some(n) => tys.push(&n.ty),
                None => return Err(GraphError::DanglingOperand { node: name, operand: i }),
            }
        }
        let ty = match op.infer(&tys) {
            Ok(t) => t,
            Err(source) => return Err(GraphError::Type { node: name, source }),
        };
        if let Op::Input { name: input, .. } = &op {
            if self
                .inputs
                .iter()
                .any(|i| matches!(&self.g[i.0].op, Op::Input { name: n, .. } if n == input))
            {
                return Err(GraphError::Duplicate {
                    what: "input",
                    name: input.clone(),
                });
            }
        }
        let is_input = matches!(op, Op::Input { .. });
        let id = NodeId(self.g.add_node(Node {
            op,
            ty,
            name,
            rules: Vec::new(),
        }));
        for (i, a) in args.iter().enumerate() {
            self.g.add_edge(a.0, id.0, i as u32);
        }
        if is_input {
            self.inputs.push(id);
        }
        Ok(id)
    }

    /// Marks `node` as a graph result called `name`.
    pub fn add_output(&mut self, name: impl Into<String>, node: NodeId) -> Result<(), GraphError> {
        let name = name.into();
        if self.outputs.iter().any(|o| o.name == name) {
            return Err(GraphError::Duplicate { what: "output", name });
        }
        self.outputs.push(Output { name, node });
        Ok(())
    }

    /// Records that `rules` produced node `id` (merged with what it already records, sorted).
    pub fn add_rules(&mut self, id: NodeId, rules: impl IntoIterator<Item = String>) {
        let node = &mut self.g[id.0];
        node.rules.extend(rules);
        node.rules.sort();
        node.rules.dedup();
    }

    /// The node behind `id`. Panics if `id` is from another graph, which is a compiler bug.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    /// Whether `id` names a live node of this graph.
    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    /// The operands of `id`, in order.
    pub fn args(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (*e.weight(), NodeId(e.source())))
            .collect();
        e.sort();
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// The nodes that use `id`, each once, in id order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self
            .g
            .neighbors_directed(id.0, Direction::Outgoing)
            .map(NodeId)
            .collect();
        u.sort();
        u.dedup();
        u
    }

    /// Graph inputs, in declaration order.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    /// Graph outputs, in declaration order.
    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    /// Number of live nodes.
    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// All live node ids, in insertion order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices().map(NodeId)
    }

    /// Parameter nodes with their names, in insertion order.
    pub fn params(&self) -> impl Iterator<Item = (NodeId, &str, &TensorType)> + '_ {
        self.node_ids().filter_map(|id| match &self.g[id.0].op {
            Op::Param { name, ty } => Some((id, name.as_str(), ty)),
            _ => None,
        })
    }

    /// A topological order that is deterministic: among ready nodes, the earliest inserted first.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, NodeId> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut indeg: std::collections::HashMap<NodeIndex<u32>, usize> = self
            .g
            .node_indices()
            .map(|n| (n, self.g.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: BinaryHeap<Reverse<NodeIndex<u32>>> = indeg
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(n, _)| Reverse(*n))
            .collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(NodeId(n));
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != self.g.node_count() {
            let stuck = indeg
                .iter()
                .filter(|(_, d)| **d > 0)
                .map(|(n, _)| *n)
                .min()
                .expect("a node is left");
            return Err(NodeId(stuck));
        }
        Ok(order)
    }

    /// Redirects every use of `old` (operands and outputs) to `new`. Types must match; the
    /// verifier checks that afterwards.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<(NodeIndex<u32>, u32, petgraph::stable_graph::EdgeIndex<u32>)> = self
            .g
            .edges_directed(old.0, Direction::Outgoing)
            .map(|e| (e.target(), *e.weight(), e.id()))
            .collect();
        for (target, pos, edge) in uses {
            self.g.remove_edge(edge);
            self.g.add_edge(new.0, target, pos);
        }
        for o in &mut self.outputs {
            if o.node == old {
                o.node = new;
            }
        }
    }

    /// Removes a node and its edges. Callers make sure nothing uses it any more.
    pub fn remove(&mut self, id: NodeId) {
        self.inputs.retain(|i| *i != id);
        self.g.remove_node(id.0);
    }
}
