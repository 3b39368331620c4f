//! The per-target cost model: how long one op takes, from a roofline of the target (arithmetic
//! rate, memory bandwidth, per-op overhead). Extraction picks the cheapest form of every e-class
//! with it, and `kiln compile --report` prints the estimated time of the graph before and after
//! the pipeline.
//!
//! Symbolic dims are costed at [`CostModel::symbol_extent`] (a typical sequence length), batch dims
//! at 1; the model
//! ranks alternatives, it does not predict latency. Fusion is not modelled: the estimate counts
//! every op as its own pass over memory, which is what `-O0` runs.

use egg::{CostFunction, Id, Language};
use kiln_ir::fused::Arg;
use kiln_ir::{BinaryOp, Graph, Op, TensorType, UnaryOp};

use crate::egraph::{TensorEGraph, TensorLang};

/// The constants of one target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Target name (`cpu`, `cuda`).
    pub name: &'static str,
    /// Matrix-product rate, flop per ns (GFLOP/s).
    pub matmul_flops_per_ns: f64,
    /// Elementwise arithmetic rate, flop per ns.
    pub vector_flops_per_ns: f64,
    /// Memory bandwidth, bytes per ns (GB/s).
    pub bytes_per_ns: f64,
    /// Fixed cost of running one op (dispatch, launch), ns.
    pub op_overhead_ns: f64,
    /// Extent assumed for every symbolic dim.
    pub symbol_extent: u64,
}

impl CostModel {
    /// This project's CPU target, 2 cores (measured: the GEMM library at about 140 GFLOP/s on
    /// MiniLM's shapes, about 10 GB/s streaming, a few µs to dispatch a kernel to the pool).
    pub fn cpu() -> CostModel {
        CostModel {
            name: "cpu",
            matmul_flops_per_ns: 140.0,
            vector_flops_per_ns: 16.0,
            bytes_per_ns: 10.0,
            op_overhead_ns: 3_000.0,
            symbol_extent: 128,
        }
    }

    /// A data-centre GPU (H100-class datasheet figures: fp32 tensor-core GEMM, HBM bandwidth,
    /// kernel launch latency).
    pub fn cuda() -> CostModel {
        CostModel {
            name: "cuda",
            matmul_flops_per_ns: 200_000.0,
            vector_flops_per_ns: 30_000.0,
            bytes_per_ns: 2_500.0,
            op_overhead_ns: 4_000.0,
            symbol_extent: 128,
        }
    }

    /// The model for a target name.
    pub fn for_target(name: &str) -> Option<CostModel> {
        match name {
            "cpu" => Some(CostModel::cpu()),
            "cuda" => Some(CostModel::cuda()),
            _ => None,
        }
    }

    /// The extent assumed for symbol `name`: 1 for batch dims, [`CostModel::symbol_extent`]
    /// for the rest.
    fn symbol(&self, name: &str) -> f64 {
        if name.contains("batch") {
            1.0
        } else {
            self.symbol_extent as f64
        }
    }

    fn elements(&self, t: &TensorType) -> f64 {
        t.shape
            .iter()
            .map(|d| (d.coeff() as f64) * d.symbols().iter().map(|s| self.symbol(s)).product::<f64>())
            .product()
    }

    fn bytes(&self, t: &TensorType) -> f64 {
        self.elements(t) * t.dtype.size_bytes() as f64
    }

    /// Estimated ns for `op` with operand types `args` and result type `out`: a fixed overhead,
    /// the operands and result moved through memory once, and the arithmetic.
    pub fn op_ns(&self, op: &Op, args: &[&TensorType], out: &TensorType) -> f64 {
        match op {
            Op::Input { .. } | Op::Param { .. } | Op::Scalar { .. } | Op::Reshape { .. } => 0.0,
            Op::Iota { .. } => self.op_overhead_ns,
            // A lookup reads the rows it gathers, not the whole table.
            Op::Gather { .. } => {
                let bytes = self.bytes(args[1]) + 2.0 * self.bytes(out);
                self.op_overhead_ns + bytes / self.bytes_per_ns
            }
            // Each row reads its top-k experts' weights, at most every expert once.
            Op::Moe { experts, top_k, .. } => {
                let rows = self.rows(out);
                let per_expert: f64 = args[2..5].iter().map(|t| self.bytes(t)).sum();
                let read = (rows * f64::from(*top_k)).min(f64::from(*experts));
                let bytes = self.bytes(args[0]) + self.bytes(args[1]) + self.bytes(out) + read * per_expert;
                self.op_overhead_ns + bytes / self.bytes_per_ns + self.work_ns(op, args, out)
            }
            _ => {
                let bytes: f64 = args.iter().map(|t| self.bytes(t)).sum::<f64>() + self.bytes(out);
                self.op_overhead_ns + bytes / self.bytes_per_ns + self.work_ns(op, args, out)
            }
        }
    }

    /// Rows of `t`: the elements of every axis but the last.
    fn rows(&self, t: &TensorType) -> f64 {
        self.elements(&TensorType::new(
            t.dtype,
            t.shape[..t.rank().saturating_sub(1)].to_vec(),
        ))
    }

    /// The arithmetic of `op` alone, in ns; a fused op's is its body's (its intermediate values
    /// never go through memory).
    fn work_ns(&self, op: &Op, args: &[&TensorType], out: &TensorType) -> f64 {
        let per_element = |w: f64| w * self.elements(out) / self.vector_flops_per_ns;
        match op {
            Op::MatMul { transpose_a, .. } => {
                let a = args[0];
                let k = if *transpose_a {
                    &a.shape[a.rank() - 2]
                } else {
                    &a.shape[a.rank() - 1]
                };
                let k = self.elements(&TensorType::new(a.dtype, vec![k.clone()]));
                2.0 * self.elements(out) * k / self.matmul_flops_per_ns
            }
            Op::Binary(BinaryOp::Div | BinaryOp::Pow) => per_element(8.0),
            Op::Binary(_) => per_element(1.0),
            Op::Unary(UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Not) => per_element(1.0),
            Op::Unary(UnaryOp::Recip | UnaryOp::Rsqrt) => per_element(4.0),
            Op::Unary(UnaryOp::Sqrt) => per_element(8.0),
            Op::Unary(_) => per_element(16.0),
            Op::Compare(_) | Op::Where | Op::Cast { .. } => per_element(1.0),
            Op::Reduce { .. } => self.elements(args[0]) / self.vector_flops_per_ns,
            Op::Fused(f) => {
                let Ok(tys) = f.types(args) else {
                    return f64::INFINITY;
                };
                f.body
                    .iter()
                    .zip(&tys)
                    .map(|(n, t)| {
                        let at: Vec<&TensorType> = n
                            .args
                            .iter()
                            .map(|a| match *a {
                                Arg::Operand(o) => args[o as usize],
                                Arg::Node(j) => &tys[j as usize],
                            })
                            .collect();
                        self.work_ns(&n.op, &at, t)
                    })
                    .sum()
            }
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Scalar { .. }
            | Op::Iota { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Gather { .. }
            | Op::CacheAppend { .. }
            | Op::Dequantize { .. }
            | Op::Densify { .. }
            | Op::Densify24 { .. } => 0.0,
            // Three products of each routed row with one expert's weights.
            Op::Moe { top_k, .. } => {
                let rows = self.rows(out);
                let per_expert: f64 = args[2..5].iter().map(|t| self.elements(t)).sum();
                2.0 * rows * f64::from(*top_k) * per_expert / self.matmul_flops_per_ns
            }
        }
    }

    /// Estimated ns of one run of `graph`, every op on its own. Ops that depend on weights and
    /// constants only are free: backends fold them at compile time.
    pub fn graph_ns(&self, graph: &Graph) -> f64 {
        let order = graph.topo_order().unwrap_or_default();
        let mut folded = std::collections::HashSet::new();
        for &id in &order {
            let stat = match graph.node(id).op {
                Op::Param { .. } | Op::Scalar { .. } => true,
                Op::Input { .. } => false,
                _ => graph.args(id).iter().all(|a| folded.contains(a)),
            };
            if stat && graph.node(id).ty.shape.iter().all(|d| d.as_known().is_some()) {
                folded.insert(id);
            }
        }
        order
            .into_iter()
            .filter(|id| !folded.contains(id))
            .map(|id| {
                let args: Vec<&TensorType> = graph.args(id).iter().map(|a| &graph.node(*a).ty).collect();
                let n = graph.node(id);
                self.op_ns(&n.op, &args, &n.ty)
            })
            .sum()
    }
}

impl CostModel {
    /// Estimated ns of one e-node on its classes' types (infinite where they do not type-check).
    pub fn enode_ns(&self, eg: &TensorEGraph, enode: &TensorLang) -> f64 {
        let op = eg.analysis.op_of(enode);
        let tys: Option<Vec<&TensorType>> = enode.children().iter().map(|c| eg[*c].data.ty.as_ref()).collect();
        match tys.as_ref().and_then(|t| op.infer(t).ok().map(|o| (t, o))) {
            Some((args, out)) => self.op_ns(&op, args, &out),
            None => f64::INFINITY,
        }
    }
}

/// Extraction cost: an e-node's own estimated time plus the dearest of its operands.
///
/// Summing operands (egg's usual tree cost) counts a shared subgraph once per use, which grows as
/// 2^layers through a residual stack and drowns local differences in rounding; the critical path
/// stays additive along a chain and still prefers the cheaper of two forms of the same value.
pub struct ExtractCost<'a> {
    /// The e-graph whose classes carry the types.
    pub egraph: &'a TensorEGraph,
    /// The target's constants.
    pub model: CostModel,
    /// Each e-node's own time, computed once: egg's extractor asks for every node's cost once
    /// per sweep, and sweeps as many times as the graph is deep.
    pub own: std::collections::HashMap<TensorLang, f64>,
}

impl ExtractCost<'_> {
    /// `enode`'s own estimated time, from the cache.
    pub fn own(&mut self, enode: &TensorLang) -> f64 {
        if let Some(c) = self.own.get(enode) {
            return *c;
        }
        let c = self.model.enode_ns(self.egraph, enode);
        self.own.insert(enode.clone(), c);
        c
    }
}

impl CostFunction<TensorLang> for ExtractCost<'_> {
    type Cost = f64;
    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &TensorLang, mut costs: C) -> f64 {
        let own = self.own(enode);
        own + enode.fold(0.0, |m: f64, id| m.max(costs(id)))
    }
}
