//! The one boundary between the graph IR and egg: the tensor e-graph language, its analysis
//! (type and scalar-constant per e-class), and the conversions `Graph → EGraph → Graph`.
//!
//! Elementwise arithmetic gets first-class e-nodes so rules can be written as patterns; every other
//! op is an `Other` node referring to an entry of an [`OpTable`], so nothing of the IR is lost and
//! identical ops (CSE) still share e-classes. The IR crate knows nothing of egg.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use egg::{define_language, Analysis, DidMerge, EGraph, Id, Language};
use kiln_ir::{BinaryOp, DType, Graph, Literal, NodeId, Op, TensorType, UnaryOp};

/// A rank-0 constant: its value's bits and dtype (written `0.5:f32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scalar {
    bits: u64,
    dtype: DType,
}

impl Scalar {
    /// A constant of `dtype`.
    pub fn new(v: f64, dtype: DType) -> Scalar {
        Scalar {
            bits: v.to_bits(),
            dtype,
        }
    }
    /// Its value.
    pub fn value(self) -> f64 {
        f64::from_bits(self.bits)
    }
    /// Its dtype.
    pub fn dtype(self) -> DType {
        self.dtype
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:{}", self.value(), self.dtype)
    }
}

impl FromStr for Scalar {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (v, d) = s.split_once(':').ok_or("not a scalar")?;
        Ok(Scalar::new(v.parse::<f64>().map_err(|e| e.to_string())?, d.parse()?))
    }
}

/// An index into the [`OpTable`] of non-arithmetic ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpRef(pub u32);

impl fmt::Display for OpRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op{}", self.0)
    }
}

impl FromStr for OpRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("op")
            .and_then(|n| n.parse().ok())
            .map(OpRef)
            .ok_or_else(|| format!("not an op reference: {s}"))
    }
}

define_language! {
    /// The tensor language the optimizer's rewrites are written in: elementwise arithmetic as
    /// first-class nodes (named like the IR mnemonics), constants, and every other op by reference.
    #[allow(missing_docs)]
    pub enum TensorLang {
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "neg" = Neg([Id; 1]),
        "recip" = Recip([Id; 1]),
        "sqrt" = Sqrt([Id; 1]),
        "rsqrt" = Rsqrt([Id; 1]),
        "exp" = Exp([Id; 1]),
        Const(Scalar),
        Other(OpRef, Vec<Id>),
    }
}

/// The ops behind `Other` nodes, deduplicated so equal ops get equal references.
#[derive(Clone, Debug, Default)]
pub struct OpTable {
    ops: Vec<Op>,
    index: HashMap<Op, u32>,
}

impl OpTable {
    /// The reference for `op`, adding it if new.
    pub fn intern(&mut self, op: &Op) -> OpRef {
        if let Some(i) = self.index.get(op) {
            return OpRef(*i);
        }
        let i = self.ops.len() as u32;
        self.ops.push(op.clone());
        self.index.insert(op.clone(), i);
        OpRef(i)
    }
    /// The op behind a reference.
    pub fn get(&self, r: OpRef) -> &Op {
        &self.ops[r.0 as usize]
    }
}

impl TensorLang {
    /// The IR op this e-node stands for.
    pub fn to_op(&self, table: &OpTable) -> Op {
        match self {
            TensorLang::Add(_) => Op::Binary(BinaryOp::Add),
            TensorLang::Sub(_) => Op::Binary(BinaryOp::Sub),
            TensorLang::Mul(_) => Op::Binary(BinaryOp::Mul),
            TensorLang::Div(_) => Op::Binary(BinaryOp::Div),
            TensorLang::Neg(_) => Op::Unary(UnaryOp::Neg),
            TensorLang::Recip(_) => Op::Unary(UnaryOp::Recip),
            TensorLang::Sqrt(_) => Op::Unary(UnaryOp::Sqrt),
            TensorLang::Rsqrt(_) => Op::Unary(UnaryOp::Rsqrt),
            TensorLang::Exp(_) => Op::Unary(UnaryOp::Exp),
            TensorLang::Const(s) => {
                let value = if s.dtype.is_float() {
                    Literal::float(s.value())
                } else {
                    Literal::Int(s.value() as i64)
                };
                Op::Scalar { value, dtype: s.dtype }
            }
            TensorLang::Other(r, _) => table.get(*r).clone(),
        }
    }

    /// The e-node for `op` applied to `args` (arithmetic as first-class nodes, the rest by reference).
    pub fn from_op(op: &Op, args: Vec<Id>, table: &mut OpTable) -> TensorLang {
        let a = |i: usize| args[i];
        match op {
            Op::Binary(BinaryOp::Add) => TensorLang::Add([a(0), a(1)]),
            Op::Binary(BinaryOp::Sub) => TensorLang::Sub([a(0), a(1)]),
            Op::Binary(BinaryOp::Mul) => TensorLang::Mul([a(0), a(1)]),
            Op::Binary(BinaryOp::Div) => TensorLang::Div([a(0), a(1)]),
            Op::Unary(UnaryOp::Neg) => TensorLang::Neg([a(0)]),
            Op::Unary(UnaryOp::Recip) => TensorLang::Recip([a(0)]),
            Op::Unary(UnaryOp::Sqrt) => TensorLang::Sqrt([a(0)]),
            Op::Unary(UnaryOp::Rsqrt) => TensorLang::Rsqrt([a(0)]),
            Op::Unary(UnaryOp::Exp) => TensorLang::Exp([a(0)]),
            Op::Scalar { value, dtype } if !matches!(value, Literal::Bool(_)) => {
                TensorLang::Const(Scalar::new(value.as_f64(), *dtype))
            }
            other => TensorLang::Other(table.intern(other), args),
        }
    }
}

/// What is known about an e-class: its type, and its value when it is a rank-0 constant.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    /// The type every node of the class has.
    pub ty: Option<TensorType>,
    /// The value, for rank-0 constants (folded).
    pub konst: Option<f64>,
    /// How many graph nodes read the value, a graph output counting as one (set by the fusion
    /// pass when it loads a graph; 0 otherwise): fusion never absorbs a value used twice.
    pub uses: u32,
    /// The value depends on weights and constants alone (no input, no symbolic extent): the
    /// planner computes it at compile time, so fusion leaves it out of kernels.
    pub fixed: bool,
}

/// Types and constant folding, driven by the IR's own type rules.
#[derive(Default)]
pub struct TensorAnalysis {
    /// The op table `Other` nodes refer to.
    pub table: OpTable,
    /// The rules that added an equivalent form to each e-class (by the id the rule saw; look up
    /// through [`egg::EGraph::find`]). Extraction turns it into per-node provenance.
    pub provenance: HashMap<Id, std::collections::BTreeSet<String>>,
}

impl TensorAnalysis {
    /// The op of `node` (a reference into the table for `Other` nodes).
    pub fn op_of<'a>(&'a self, node: &TensorLang) -> std::borrow::Cow<'a, Op> {
        match node {
            TensorLang::Other(r, _) => std::borrow::Cow::Borrowed(self.table.get(*r)),
            n => std::borrow::Cow::Owned(n.to_op(&self.table)),
        }
    }
}

fn round(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        d if d.is_int() => v.trunc(),
        _ => v,
    }
}

impl Analysis<TensorLang> for TensorAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph<TensorLang, Self>, enode: &TensorLang, _id: Id) -> ClassData {
        let kids: Vec<&ClassData> = enode.children().iter().map(|c| &egraph[*c].data).collect();
        let op = enode.to_op(&egraph.analysis.table);
        let tys: Option<Vec<&TensorType>> = kids.iter().map(|k| k.ty.as_ref()).collect();
        let ty = tys.and_then(|t| op.infer(&t).ok());
        let k = |i: usize| kids.get(i).and_then(|d| d.konst);
        let float = ty.as_ref().is_some_and(|t| t.dtype == DType::F32);
        let fold = || -> Option<f64> {
            match enode {
                TensorLang::Const(s) => Some(s.value()),
                _ if !float => None,
                TensorLang::Add(_) => Some(k(0)? + k(1)?),
                TensorLang::Sub(_) => Some(k(0)? - k(1)?),
                TensorLang::Mul(_) => Some(k(0)? * k(1)?),
                TensorLang::Div(_) => Some(k(0)? / k(1)?),
                TensorLang::Neg(_) => Some(-k(0)?),
                TensorLang::Recip(_) => Some(1.0 / k(0)?),
                TensorLang::Sqrt(_) => Some(k(0)?.sqrt()),
                TensorLang::Rsqrt(_) => Some(1.0 / k(0)?.sqrt()),
                TensorLang::Exp(_) => Some(k(0)?.exp()),
                TensorLang::Other(..) => None,
            }
        };
        let konst = fold()
            .filter(|v| v.is_finite())
            .map(|v| round(ty.as_ref().map_or(DType::F32, |t| t.dtype), v));
        let scalar = ty.as_ref().is_some_and(|t| t.rank() == 0);
        let known = ty
            .as_ref()
            .is_some_and(|t| t.shape.iter().all(|d| d.as_known().is_some()));
        let fixed = known
            && match &op {
                Op::Param { .. } | Op::Scalar { .. } | Op::Iota { .. } => true,
                Op::Input { .. }
                | Op::CacheAppend { .. }
                | Op::Dequantize { .. }
                | Op::Densify { .. }
                | Op::Densify24 { .. } => false,
                _ => !kids.is_empty() && kids.iter().all(|k| k.fixed),
            };
        ClassData {
            ty,
            konst: konst.filter(|_| scalar),
            uses: 0,
            fixed,
        }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        let mut changed = false;
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty;
            changed = true;
        }
        if a.konst.is_none() && b.konst.is_some() {
            a.konst = b.konst;
            changed = true;
        }
        if b.fixed && !a.fixed {
            a.fixed = true;
            changed = true;
        }
        if b.uses > a.uses {
            a.uses = b.uses;
            changed = true;
        }
        DidMerge(changed, a.ty.is_some() || a.konst.is_some())
    }

    fn modify(egraph: &mut EGraph<TensorLang, Self>, id: Id) {
        let data = egraph[id].data.clone();
        if let (Some(v), Some(ty)) = (data.konst, data.ty) {
            let c = egraph.add(TensorLang::Const(Scalar::new(v, ty.dtype)));
            egraph.union(id, c);
        }
    }
}

/// The e-graph kiln optimizes in.
pub type TensorEGraph = EGraph<TensorLang, TensorAnalysis>;

/// A graph loaded into an e-graph.
pub struct Loaded {
    /// The e-graph.
    pub egraph: TensorEGraph,
    /// The e-class of every graph output, in order.
    pub outputs: Vec<(String, Id)>,
    /// A name for each e-class that came from the graph (its first node's name).
    pub names: HashMap<Id, String>,
    /// The graph's inputs in order (the signature survives even if unused): their `Op::Input`s.
    pub inputs: Vec<Op>,
    /// Every e-node as loaded: an extracted node not among them was made by a rule.
    pub original: Vec<TensorLang>,
    /// Provenance the loaded nodes already carried, by e-class.
    pub rules: HashMap<Id, Vec<String>>,
    /// The e-class each graph node was loaded into (look up through [`egg::EGraph::find`]).
    pub class: HashMap<NodeId, Id>,
}

/// Loads `graph` into a fresh e-graph.
pub fn load(graph: &Graph) -> Loaded {
    let mut egraph = TensorEGraph::new(TensorAnalysis::default()).with_explanations_disabled();
    let mut class: HashMap<NodeId, Id> = HashMap::new();
    let mut names = HashMap::new();
    let mut original = Vec::new();
    let mut rules: HashMap<Id, Vec<String>> = HashMap::new();
    let order = graph.topo_order().expect("optimizer input is verified");
    for n in order {
        let node = graph.node(n);
        let args: Vec<Id> = graph.args(n).iter().map(|a| class[a]).collect();
        let enode = TensorLang::from_op(&node.op, args, &mut egraph.analysis.table);
        original.push(enode.clone());
        let id = egraph.add(enode);
        names.entry(egraph.find(id)).or_insert_with(|| node.name.clone());
        if !node.rules.is_empty() {
            rules.entry(id).or_default().extend(node.rules.iter().cloned());
        }
        class.insert(n, id);
    }
    egraph.rebuild();
    let outputs = graph
        .outputs()
        .iter()
        .map(|o| (o.name.clone(), egraph.find(class[&o.node])))
        .collect();
    let inputs = graph
        .inputs()
        .iter()
        .filter_map(|i| match &graph.node(*i).op {
            op @ Op::Input { .. } => Some(op.clone()),
            _ => None,
        })
        .collect();
    let names = names.into_iter().map(|(k, v)| (egraph.find(k), v)).collect();
    Loaded {
        egraph,
        outputs,
        names,
        inputs,
        original,
        rules,
        class,
    }
}

/// Rebuilds a graph from the best node of every needed e-class, as chosen by `cost`. A node that
/// was not in the loaded graph records the rules that fired on its e-class (or `pass`, when it was
/// built inside a rule's right-hand side).
pub fn extract(loaded: &Loaded, name: &str, pass: &str, cost: impl egg::CostFunction<TensorLang>) -> Graph {
    extract_from(loaded, name, pass, &egg::Extractor::new(&loaded.egraph, cost))
}

/// [`extract`] with an extractor the caller built (and may also ask which node it chose).
pub fn extract_from<C: egg::CostFunction<TensorLang>>(
    loaded: &Loaded,
    name: &str,
    pass: &str,
    extractor: &egg::Extractor<'_, C, TensorLang, TensorAnalysis>,
) -> Graph {
    let eg = &loaded.egraph;
    let canon = |n: &TensorLang| n.clone().map_children(|c| eg.find(c));
    let original: std::collections::HashSet<TensorLang> = loaded.original.iter().map(canon).collect();
    let mut provenance: HashMap<Id, Vec<String>> = HashMap::new();
    for (id, rules) in &eg.analysis.provenance {
        provenance
            .entry(eg.find(*id))
            .or_default()
            .extend(rules.iter().cloned());
    }
    let mut carried: HashMap<Id, Vec<String>> = HashMap::new();
    for (id, rules) in &loaded.rules {
        carried.entry(eg.find(*id)).or_default().extend(rules.iter().cloned());
    }
    let ctx = Ctx {
        eg,
        ex: extractor,
        names: &loaded.names,
        original: &original,
        provenance: &provenance,
        carried: &carried,
        pass,
    };
    let mut g = Graph::new(name);
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    // Inputs first, in signature order, so the graph keeps its interface.
    for op in &loaded.inputs {
        let Op::Input { name: iname, .. } = op else {
            continue;
        };
        let op = op.clone();
        let r = eg.analysis.table.index.get(&op).copied();
        let id = g.add(op, &[], iname.clone()).expect("inputs are well typed");
        if let Some(r) = r {
            if let Some(c) = eg.lookup(TensorLang::Other(OpRef(r), vec![])) {
                built.insert(eg.find(c), id);
            }
        }
    }
    for (oname, c) in &loaded.outputs {
        let id = build(*c, &ctx, &mut g, &mut built);
        g.add_output(oname.clone(), id).expect("output names are unique");
    }
    g
}

struct Ctx<'a, C: egg::CostFunction<TensorLang>> {
    eg: &'a TensorEGraph,
    ex: &'a egg::Extractor<'a, C, TensorLang, TensorAnalysis>,
    names: &'a HashMap<Id, String>,
    original: &'a std::collections::HashSet<TensorLang>,
    provenance: &'a HashMap<Id, Vec<String>>,
    carried: &'a HashMap<Id, Vec<String>>,
    pass: &'a str,
}

fn build<C: egg::CostFunction<TensorLang>>(
    c: Id,
    cx: &Ctx<'_, C>,
    g: &mut Graph,
    built: &mut HashMap<Id, NodeId>,
) -> NodeId {
    let eg = cx.eg;
    let c = eg.find(c);
    if let Some(n) = built.get(&c) {
        return *n;
    }
    // Recursive; transformer graphs are a few thousand nodes deep at most.
    let node = cx.ex.find_best_node(c).clone();
    let args: Vec<NodeId> = node.children().iter().map(|k| build(*k, cx, g, built)).collect();
    let op = node.to_op(&eg.analysis.table);
    let name = cx
        .names
        .get(&c)
        .cloned()
        .unwrap_or_else(|| format!("opt/{}", op.mnemonic()));
    let id = g
        .add(op, &args, name)
        .expect("extraction keeps types: every e-class has one type");
    if let Some(r) = cx.carried.get(&c) {
        g.add_rules(id, r.iter().cloned());
    }
    if !cx.original.contains(&node.clone().map_children(|k| eg.find(k))) {
        match cx.provenance.get(&c) {
            Some(r) => g.add_rules(id, r.iter().cloned()),
            None => g.add_rules(id, [cx.pass.to_string()]),
        }
    }
    built.insert(c, id);
    id
}
