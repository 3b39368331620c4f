//! kiln's intermediate representation: a typed tensor dataflow graph.
//!
//! # Invariants
//!
//! These hold for every [`Graph`] that has passed [`verify`]; passes and backends may assume them.
//!
//! 1. The graph is acyclic, and every node's operands are the incoming edges numbered `0..arity`
//!    with no gaps and no duplicates.
//! 2. Every node's stored [`TensorType`] equals what [`Op::infer`] computes from its operands' types.
//! 3. Every [`Op::Input`] node appears exactly once in [`Graph::inputs`], and input names are unique;
//!    [`Op::Param`] names are unique (a tied weight is one node with several users).
//! 4. Every output names an existing node, and output names are unique.
//! 5. Shapes are made of [`Dim`]s: products of a constant and symbols (`batch`, `seq`). A symbol
//!    stands for the same extent everywhere in one graph.
//!
//! The IR knows nothing of the frontend, of egg or of any backend. Its one text form
//! ([`Graph::to_text`]) is what dumps, snapshots and error messages use.

#![deny(missing_docs)]

mod cost;
mod dim;
mod dot;
mod dtype;
pub mod fused;
mod graph;
pub mod moe;
mod op;
pub mod progress;
mod tensor;
mod text;
mod verify;

pub use cost::{estimate_flops, param_count};
pub use dim::{Bindings, Dim, Shape};
pub use dtype::DType;
pub use fused::Fused;
pub use graph::{Graph, GraphError, Node, NodeId, Output};
pub use moe::{ExpertAct, Gating};
pub use op::{BinaryOp, CmpOp, Literal, Op, ReduceOp, TypeError, UnaryOp};
pub use tensor::{Tensor, TensorData, TensorError};
pub use verify::{verify, VerifyError};

/// The type of a tensor value: element type and (possibly symbolic) shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Extent of each axis, outermost first.
    pub shape: Shape,
}

impl TensorType {
    /// Builds a type from a dtype and shape.
    pub fn new(dtype: DType, shape: Shape) -> Self {
        TensorType { dtype, shape }
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}
