//! Every rewrite rule is checked by execution: both sides evaluated by the reference interpreter on
//! random tensors (symbolic batch dim, several sizes). Plus start ⇒ goal tests, tests that a rule
//! does not fire where it must not, and the Graph ⇄ e-graph round trip.

mod common;

use std::collections::BTreeMap;

use kiln_ir::{BinaryOp, DType, Dim, Graph, Literal, NodeId, Op, Tensor, TensorType, UnaryOp};
use kiln_passes::cost::CostModel;
use kiln_passes::simplify::{run_rules, Limits};

/// Builds a graph from an s-expression over inputs `x`, `y` (f32[n, 3]) and f32 constants.
fn graph_of(src: &str) -> Graph {
    let toks: Vec<String> = src
        .replace('(', " ( ")
        .replace(')', " ) ")
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut g = Graph::new("expr");
    let mut inputs: BTreeMap<String, NodeId> = BTreeMap::new();
    for name in ["x", "y"] {
        let ty = TensorType::new(DType::F32, vec![Dim::sym("n"), Dim::known(3)]);
        inputs.insert(name.into(), g.add(Op::input(name, ty), &[], name).unwrap());
    }
    fn parse(toks: &[String], pos: &mut usize, g: &mut Graph, inputs: &BTreeMap<String, NodeId>) -> NodeId {
        let t = toks[*pos].clone();
        *pos += 1;
        if t != "(" {
            if let Some(id) = inputs.get(&t) {
                return *id;
            }
            let v: f64 = t.parse().unwrap_or_else(|_| panic!("bad atom {t}"));
            return g
                .add(
                    Op::Scalar {
                        value: Literal::float(v),
                        dtype: DType::F32,
                    },
                    &[],
                    format!("c{v}"),
                )
                .unwrap();
        }
        let head = toks[*pos].clone();
        *pos += 1;
        let mut args = Vec::new();
        while toks[*pos] != ")" {
            args.push(parse(toks, pos, g, inputs));
        }
        *pos += 1;
        let op = match head.as_str() {
            "add" => Op::Binary(BinaryOp::Add),
            "sub" => Op::Binary(BinaryOp::Sub),
            "mul" => Op::Binary(BinaryOp::Mul),
            "div" => Op::Binary(BinaryOp::Div),
            "neg" => Op::Unary(UnaryOp::Neg),
            "recip" => Op::Unary(UnaryOp::Recip),
            "sqrt" => Op::Unary(UnaryOp::Sqrt),
            "exp" => Op::Unary(UnaryOp::Exp),
            other => panic!("unknown op {other}"),
        };
        g.add(op, &args, head).unwrap()
    }
    let mut pos = 0;
    let root = parse(&toks, &mut pos, &mut g, &inputs);
    g.add_output("out", root).unwrap();
    g
}

fn eval(g: &Graph, n: usize, seed: u64) -> Tensor {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        0.25 + (s >> 40) as f32 / (1u64 << 24) as f32 * 3.0
    };
    let mut feed = BTreeMap::new();
    for name in ["x", "y"] {
        feed.insert(
            name.to_string(),
            Tensor::from_f32(vec![n, 3], (0..n * 3).map(|_| next()).collect()).unwrap(),
        );
    }
    kiln_interp::run(g, &BTreeMap::new(), &feed).unwrap().remove(0).1
}

fn rule(name: &str) -> kiln_passes::rules::Rule {
    kiln_passes::rules::algebraic()
        .into_iter()
        .find(|r| r.name.as_str() == name)
        .unwrap_or_else(|| panic!("no rule {name}"))
}

/// Applies `rules` to the expression, checks the result is valid and equal by execution.
fn rewrite(src: &str, rules: &[kiln_passes::rules::Rule]) -> (Graph, Graph) {
    let g = graph_of(src);
    let mut h = g.clone();
    run_rules(&mut h, rules, Limits::default(), CostModel::cpu());
    kiln_ir::verify(&h).unwrap_or_else(|e| panic!("{src}: {e}"));
    for (n, seed) in [(1, 3), (4, 5), (9, 7)] {
        let (a, b) = (eval(&g, n, seed), eval(&h, n, seed));
        let err = a.max_abs_diff(&b).expect("same shape");
        let scale = a.to_f64_vec().iter().fold(1.0f64, |m, v| m.max(v.abs()));
        assert!(
            err <= 1e-6 * scale,
            "{src}: rewritten graph differs by {err:e}\n{}",
            h.to_text()
        );
    }
    (g, h)
}

/// One example per rule, and whether the rule must make the graph cheaper.
const EXAMPLES: &[(&str, &str, bool)] = &[
    ("mul-one", "(mul x 1)", true),
    ("div-one", "(div x 1)", true),
    ("add-zero", "(add x 0)", true),
    ("sub-zero", "(sub x 0)", true),
    ("const-right-mul", "(mul 3 x)", false),
    ("const-right-add", "(add 2 x)", false),
    ("sub-const-to-add", "(sub x 2)", false),
    ("div-const-to-mul", "(div x 4)", true),
    ("mul-const-assoc", "(mul (mul x 2) 3)", true),
    ("add-const-assoc", "(add (add x 2) 3)", true),
    ("neg-neg", "(neg (neg x))", true),
    ("recip-sqrt", "(recip (sqrt x))", true),
    ("recip-recip", "(recip (recip x))", true),
];

#[test]
fn every_rule_is_correct_by_execution() {
    let names: Vec<String> = kiln_passes::rules::all().iter().map(|r| r.name.to_string()).collect();
    for n in &names {
        assert!(
            EXAMPLES.iter().any(|(r, _, _)| r == n) || LAYOUT.iter().any(|(r, _)| r == n),
            "rule {n} has no example in tests/rules.rs"
        );
    }
    for (name, src, cheaper) in EXAMPLES {
        let (g, h) = rewrite(src, &[rule(name)]);
        if *cheaper {
            assert!(h.to_text() != g.to_text(), "{name} did not fire on {src}");
        }
    }
}

#[test]
fn start_to_goal() {
    let all = kiln_passes::rules::algebraic();
    for (start, goal) in [
        ("(div (mul x 2) 4)", "(mul x 0.5)"),
        ("(recip (sqrt (add (mul x 1) 0)))", "(recip (sqrt x))"),
        ("(sub (add 3 x) 3)", "x"),
        ("(mul 2 (mul 3 (mul x 4)))", "(mul x 24)"),
        ("(neg (neg (div x 1)))", "x"),
    ] {
        let (_, h) = rewrite(start, &all);
        let want = graph_of(goal);
        // Goal reached: same number of ops of each kind (rsqrt counts as recip+sqrt's result).
        let ops = |g: &Graph| {
            g.node_ids()
                .filter(|n| !matches!(g.node(*n).op, Op::Input { .. } | Op::Scalar { .. }))
                .count()
        };
        let want_ops = if goal.contains("sqrt") { 1 } else { ops(&want) };
        assert_eq!(ops(&h), want_ops, "{start} => {goal}, got:\n{}", h.to_text());
    }
}

#[test]
fn rules_do_not_fire_where_they_must_not() {
    for (name, src) in [
        ("mul-one", "(mul x y)"),
        ("div-const-to-mul", "(div x y)"),
        ("div-const-to-mul", "(div x 0)"),
        ("add-zero", "(add x y)"),
        ("mul-const-assoc", "(mul (mul x y) 3)"),
    ] {
        let (g, h) = rewrite(src, &[rule(name)]);
        assert_eq!(g.to_text(), h.to_text(), "{name} changed {src}");
    }
}

#[test]
fn egraph_round_trip_preserves_graphs() {
    let tiny = [
        ("layers", "2"),
        ("hidden", "64"),
        ("heads", "4"),
        ("vocab", "256"),
        ("max_pos", "64"),
    ];
    let mut l = common::spec("gpt2.ron", &tiny);
    kiln_passes::optimize(&mut l.graph, kiln_passes::OptLevel::O1, true).unwrap();
    let mut h = l.graph.clone();
    run_rules(&mut h, &[], Limits::default(), CostModel::cpu());
    kiln_ir::verify(&h).unwrap();
    assert_eq!(
        h.len(),
        l.graph.len(),
        "a rule-free round trip keeps every (CSE'd) node"
    );
    let w = kiln_frontend::weights::load_safetensors(&l, &common::data("gpt2_tiny/model.safetensors")).unwrap();
    let ids = common::npy("gpt2_tiny/input_ids.npy");
    let a = common::run(&l, &w, &[("input_ids", ids.clone())]);
    let mut l2 = l.clone();
    l2.graph = h;
    let b = common::run(&l2, &w, &[("input_ids", ids)]);
    assert_eq!(a["logits"], b["logits"]);
}

#[test]
fn o2_simplifies_every_spec_and_keeps_outputs() {
    for (name, o) in [
        ("minilm.ron", vec![("layers", "2")]),
        (
            "llama.ron",
            vec![
                ("layers", "2"),
                ("hidden", "64"),
                ("heads", "4"),
                ("kv_heads", "2"),
                ("ffn", "128"),
                ("vocab", "256"),
            ],
        ),
    ] {
        let l = common::spec(name, &o);
        let mut o1 = l.graph.clone();
        kiln_passes::optimize(&mut o1, kiln_passes::OptLevel::O1, true).unwrap();
        let mut o2 = l.graph.clone();
        let report = kiln_passes::optimize(&mut o2, kiln_passes::OptLevel::O2, true).unwrap();
        let s = report.iter().find(|r| r.pass == "simplify").unwrap();
        assert!(
            s.stats.notes.iter().any(|n| n.contains("stopped: saturated")),
            "{name}: {:?}",
            s.stats.notes
        );
        let matmuls = |g: &Graph| {
            g.node_ids()
                .filter(|n| matches!(g.node(*n).op, Op::MatMul { .. }))
                .count()
        };
        assert!(
            matmuls(&o2) < matmuls(&o1),
            "{name}: O2 has {} matmuls, O1 {}",
            matmuls(&o2),
            matmuls(&o1)
        );
        let w = kiln_frontend::weights::random(&l, 5);
        let dims: BTreeMap<&str, usize> = [("batch", 2), ("seq", 7)].into_iter().collect();
        let mut feed = BTreeMap::new();
        for &i in l.graph.inputs() {
            let Op::Input { name: n, ty, .. } = &l.graph.node(i).op else {
                unreachable!()
            };
            let shape: Vec<usize> = ty
                .shape
                .iter()
                .map(|d| {
                    d.eval(&dims.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                        .unwrap()
                })
                .collect();
            let c: usize = shape.iter().product();
            feed.insert(
                n.clone(),
                Tensor::from_i64(
                    shape,
                    (0..c as i64)
                        .map(|k| if n == "input_ids" { k % 50 } else { (k * 7) % 2 })
                        .collect(),
                )
                .unwrap(),
            );
        }
        let run = |g: &Graph| kiln_interp::run(g, &w, &feed).unwrap();
        for ((on, a), (_, b)) in run(&o1).iter().zip(run(&o2).iter()) {
            let e = a.max_abs_diff(b).unwrap();
            assert!(e < 1e-5, "{name} {on}: O2 differs from O1 by {e}");
        }
    }
}

// ------------------------------------------------------------------------------------ layout

/// Inputs of the layout examples: `x`, `y`: f32[n, 4, 6]; `z`: f32[4, 6].
fn layout_inputs(g: &mut Graph) -> [NodeId; 3] {
    let n = Dim::sym("n");
    let mut add = |name: &str, shape: Vec<Dim>| {
        let ty = TensorType::new(DType::F32, shape);
        g.add(Op::input(name, ty), &[], name).unwrap()
    };
    let x = add("x", vec![n.clone(), Dim::known(4), Dim::known(6)]);
    let y = add("y", vec![n, Dim::known(4), Dim::known(6)]);
    let z = add("z", vec![Dim::known(4), Dim::known(6)]);
    [x, y, z]
}

fn op1(g: &mut Graph, op: Op, a: NodeId) -> NodeId {
    g.add(op, &[a], "t").unwrap()
}

fn tr(perm: &[usize]) -> Op {
    Op::Transpose { perm: perm.to_vec() }
}

fn mm(ta: bool, tb: bool) -> Op {
    Op::MatMul {
        transpose_a: ta,
        transpose_b: tb,
    }
}

type Build = fn(&mut Graph, [NodeId; 3]) -> NodeId;

/// One or more examples per layout rule; each must fire and keep the value.
const LAYOUT: &[(&str, Build)] = &[
    ("transpose-transpose", |g, [x, _, _]| {
        let t = op1(g, tr(&[1, 0, 2]), x);
        op1(g, tr(&[2, 0, 1]), t)
    }),
    ("transpose-transpose", |g, [x, _, _]| {
        let t = op1(g, tr(&[0, 2, 1]), x);
        op1(g, tr(&[0, 2, 1]), t)
    }),
    ("transpose-identity", |g, [x, _, _]| op1(g, tr(&[0, 1, 2]), x)),
    ("transpose-into-matmul", |g, [x, y, _]| {
        let t = op1(g, tr(&[0, 2, 1]), y);
        g.add(mm(false, false), &[x, t], "mm").unwrap()
    }),
    ("transpose-into-matmul", |g, [x, y, _]| {
        let t = op1(g, tr(&[0, 2, 1]), x);
        g.add(mm(false, false), &[t, y], "mm").unwrap()
    }),
    ("reshape-reshape", |g, [x, _, _]| {
        let r = op1(
            g,
            Op::Reshape {
                shape: vec![Dim::sym("n"), Dim::known(24)],
            },
            x,
        );
        op1(
            g,
            Op::Reshape {
                shape: vec![Dim::sym("n"), Dim::known(2), Dim::known(12)],
            },
            r,
        )
    }),
    ("reshape-reshape", |g, [x, _, _]| {
        let r = op1(
            g,
            Op::Reshape {
                shape: vec![Dim::sym("n"), Dim::known(24)],
            },
            x,
        );
        op1(
            g,
            Op::Reshape {
                shape: vec![Dim::sym("n"), Dim::known(4), Dim::known(6)],
            },
            r,
        )
    }),
    ("broadcast-hoist", |g, [_, _, z]| {
        let b = op1(
            g,
            Op::Broadcast {
                shape: vec![Dim::sym("n"), Dim::known(4), Dim::known(6)],
            },
            z,
        );
        op1(g, Op::Unary(UnaryOp::Tanh), b)
    }),
];

fn layout_feed(n: usize, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = common::Rng(seed);
    let mut feed = BTreeMap::new();
    for (name, shape) in [("x", vec![n, 4, 6]), ("y", vec![n, 4, 6]), ("z", vec![4, 6])] {
        let c: usize = shape.iter().product();
        feed.insert(
            name.to_string(),
            Tensor::from_f32(
                shape,
                (0..c).map(|_| (rng.below(2001) as f32 - 1000.0) / 500.0).collect(),
            )
            .unwrap(),
        );
    }
    feed
}

#[test]
fn every_layout_rule_is_correct_by_execution() {
    for (name, build) in LAYOUT {
        let mut g = Graph::new("layout");
        let ins = layout_inputs(&mut g);
        let out = build(&mut g, ins);
        g.add_output("out", out).unwrap();
        let only: Vec<_> = kiln_passes::rules::all()
            .into_iter()
            .filter(|r| r.name.as_str() == *name)
            .collect();
        let mut h = g.clone();
        let stats = run_rules(&mut h, &only, Limits::default(), CostModel::cpu());
        kiln_ir::verify(&h).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            stats.notes.iter().any(|n| n.contains(name)),
            "{name} did not fire:\n{}",
            h.to_text()
        );
        assert!(
            h.len() < g.len() || *name == "broadcast-hoist",
            "{name} did not simplify:\n{}",
            h.to_text()
        );
        // Every node the rule made says so.
        assert!(
            h.node_ids().any(|n| h.node(n).rules.iter().any(|r| r == name)) || h.len() <= 4,
            "{name}: no node records the rule:\n{}",
            h.to_text()
        );
        for (n, seed) in [(1, 1), (3, 2), (5, 3)] {
            let feed = layout_feed(n, seed);
            let a = kiln_interp::run(&g, &BTreeMap::new(), &feed).unwrap().remove(0).1;
            let b = kiln_interp::run(&h, &BTreeMap::new(), &feed).unwrap().remove(0).1;
            let e = a.max_abs_diff(&b).expect("same shape");
            assert!(e <= 1e-6, "{name}: differs by {e}\n{}", h.to_text());
        }
    }
}

#[test]
fn disabled_layout_rule_does_not_fire() {
    let mut g = Graph::new("layout");
    let [x, y, _] = layout_inputs(&mut g);
    let t = op1(&mut g, tr(&[0, 2, 1]), y);
    let m = g.add(mm(false, false), &[x, t], "mm").unwrap();
    g.add_output("out", m).unwrap();
    let opts = kiln_passes::PipelineOptions {
        verify_each: true,
        disabled_rules: vec!["transpose-into-matmul".into()],
        ..Default::default()
    };
    let mut h = g.clone();
    kiln_passes::optimize_with(&mut h, kiln_passes::OptLevel::O2, &opts).unwrap();
    assert!(h.node_ids().any(|n| matches!(h.node(n).op, Op::Transpose { .. })));
    let mut k = g.clone();
    kiln_passes::optimize(&mut k, kiln_passes::OptLevel::O2, true).unwrap();
    assert!(
        !k.node_ids().any(|n| matches!(k.node(n).op, Op::Transpose { .. })),
        "{}",
        k.to_text()
    );
}

/// The decoder-prefill pattern: a gather of the last position after a norm and a projection
/// moves ahead of both, and the values stay the same.
#[test]
fn narrow_moves_a_last_position_gather_ahead_of_norm_and_matmul() {
    let mut g = Graph::new("narrow");
    let [x, _, z] = layout_inputs(&mut g);
    let mean = g
        .add(
            Op::Reduce {
                op: kiln_ir::ReduceOp::Mean,
                axes: vec![2],
                keep_dims: true,
            },
            &[x],
            "mean",
        )
        .unwrap();
    let d = g.add(Op::Binary(BinaryOp::Sub), &[x, mean], "d").unwrap();
    let sq = g.add(Op::Binary(BinaryOp::Mul), &[d, d], "sq").unwrap();
    let var = g
        .add(
            Op::Reduce {
                op: kiln_ir::ReduceOp::Mean,
                axes: vec![2],
                keep_dims: true,
            },
            &[sq],
            "var",
        )
        .unwrap();
    let r = g.add(Op::Unary(UnaryOp::Rsqrt), &[var], "r").unwrap();
    let nrm = g.add(Op::Binary(BinaryOp::Mul), &[d, r], "norm").unwrap();
    let logits = g.add(mm(false, true), &[nrm, z], "logits").unwrap();
    let idx = g
        .add(
            Op::input("last", TensorType::new(DType::I64, vec![Dim::known(1)])),
            &[],
            "last",
        )
        .unwrap();
    let out = g.add(Op::Gather { axis: 1 }, &[logits, idx], "out").unwrap();
    g.add_output("out", out).unwrap();
    let mut h = g.clone();
    kiln_passes::optimize(&mut h, kiln_passes::OptLevel::O2, true).unwrap();
    let mm_rows: Vec<String> = h
        .node_ids()
        .filter(|n| matches!(h.node(*n).op, Op::MatMul { .. } | Op::Reduce { .. }))
        .map(|n| h.node(n).ty.to_string())
        .collect();
    assert!(
        mm_rows.iter().all(|t| t.contains("[n, 1,")),
        "{mm_rows:?}\n{}",
        h.to_text()
    );
    for (n, seed) in [(1, 4), (3, 5)] {
        let mut feed = layout_feed(n, seed);
        feed.insert("last".into(), Tensor::from_i64(vec![1], vec![2]).unwrap());
        let a = kiln_interp::run(&g, &BTreeMap::new(), &feed).unwrap().remove(0).1;
        let b = kiln_interp::run(&h, &BTreeMap::new(), &feed).unwrap().remove(0).1;
        assert!(a.max_abs_diff(&b).unwrap() <= 1e-6);
    }
}

/// The inputs of the fusion examples: `x` f32[n, 4, 6], `w` f32[5, 6], `b` f32[5], `r` f32[n, 4, 5].
fn fusion_inputs(g: &mut Graph) -> [NodeId; 4] {
    let n = Dim::sym("n");
    let mut add = |name: &str, shape: Vec<Dim>| {
        let ty = TensorType::new(DType::F32, shape);
        g.add(Op::input(name, ty), &[], name).unwrap()
    };
    let x = add("x", vec![n.clone(), Dim::known(4), Dim::known(6)]);
    let w = add("w", vec![Dim::known(5), Dim::known(6)]);
    let b = add("b", vec![Dim::known(5)]);
    let r = add("r", vec![n, Dim::known(4), Dim::known(5)]);
    [x, w, b, r]
}

fn fusion_feed(n: usize, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = common::Rng(seed);
    let mut feed = BTreeMap::new();
    for (name, shape) in [
        ("x", vec![n, 4, 6]),
        ("w", vec![5, 6]),
        ("b", vec![5]),
        ("r", vec![n, 4, 5]),
    ] {
        let c: usize = shape.iter().product();
        let v = (0..c).map(|_| (rng.below(2001) as f32 - 1000.0) / 500.0).collect();
        feed.insert(name.to_string(), Tensor::from_f32(shape, v).unwrap());
    }
    feed
}

fn scalar(g: &mut Graph, v: f64) -> NodeId {
    let op = Op::Scalar {
        value: Literal::float(v),
        dtype: DType::F32,
    };
    g.add(op, &[], "c").unwrap()
}

fn bin(g: &mut Graph, op: BinaryOp, a: NodeId, b: NodeId) -> NodeId {
    g.add(Op::Binary(op), &[a, b], "t").unwrap()
}

/// Examples per fusion rule: the graph, and how many fused ops extraction must keep.
const FUSION: &[(&str, Build4, usize)] = &[
    // residual + bias + 0.5 · (x @ wᵀ), written in the residual-first order models use.
    (
        "fuse-gemm-epilogue",
        |g, [x, w, b, r]| {
            let m = g.add(mm(false, true), &[x, w], "mm").unwrap();
            let c = scalar(g, 0.5);
            let s = bin(g, BinaryOp::Mul, c, m);
            let t = bin(g, BinaryOp::Add, s, b);
            bin(g, BinaryOp::Add, r, t)
        },
        1,
    ),
    // A product read twice keeps its own node: extraction would compute it twice otherwise.
    (
        "fuse-gemm-epilogue",
        |g, [x, w, b, _]| {
            let m = g.add(mm(false, true), &[x, w], "mm").unwrap();
            let t = bin(g, BinaryOp::Add, m, b);
            let u = g.add(Op::Unary(UnaryOp::Tanh), &[m], "u").unwrap();
            bin(g, BinaryOp::Mul, t, u)
        },
        0,
    ),
    // A bias after the residual is not an epilogue of this form: the product takes the residual.
    (
        "fuse-gemm-epilogue",
        |g, [x, w, b, r]| {
            let m = g.add(mm(false, true), &[x, w], "mm").unwrap();
            let t = bin(g, BinaryOp::Add, m, r);
            bin(g, BinaryOp::Add, t, b)
        },
        1,
    ),
    // tanh(0.5 · r + b): one loop.
    (
        "fuse-elementwise",
        |g, [_, _, b, r]| {
            let c = scalar(g, 0.5);
            let m = bin(g, BinaryOp::Mul, r, c);
            let a = bin(g, BinaryOp::Add, m, b);
            g.add(Op::Unary(UnaryOp::Tanh), &[a], "t").unwrap()
        },
        1,
    ),
    // exp(r) is read twice, so it stays a value of its own: exp(r) + exp(r) · r fuses the rest.
    (
        "fuse-elementwise",
        |g, [_, _, _, r]| {
            let e = g.add(Op::Unary(UnaryOp::Exp), &[r], "e").unwrap();
            let m = bin(g, BinaryOp::Mul, e, r);
            bin(g, BinaryOp::Add, e, m)
        },
        1,
    ),
    // sum over the last axis of r · r.
    (
        "fuse-reduction",
        |g, [_, _, _, r]| {
            let m = bin(g, BinaryOp::Mul, r, r);
            let op = Op::Reduce {
                op: kiln_ir::ReduceOp::Sum,
                axes: vec![2],
                keep_dims: false,
            };
            g.add(op, &[m], "s").unwrap()
        },
        1,
    ),
    // softmax(r + b) over the last axis, its prologue inside.
    (
        "fuse-softmax",
        |g, [_, _, b, r]| {
            let x = bin(g, BinaryOp::Add, r, b);
            let reduce = |g: &mut Graph, op, a| {
                let op = Op::Reduce {
                    op,
                    axes: vec![2],
                    keep_dims: true,
                };
                g.add(op, &[a], "r").unwrap()
            };
            let m = reduce(g, kiln_ir::ReduceOp::Max, x);
            let d = bin(g, BinaryOp::Sub, x, m);
            let e = g.add(Op::Unary(UnaryOp::Exp), &[d], "e").unwrap();
            let s = reduce(g, kiln_ir::ReduceOp::Sum, e);
            bin(g, BinaryOp::Div, e, s)
        },
        1,
    ),
    // softmax(0.5 · q kᵀ) @ v over heads: q = k = x as [n, 1, 4, 6], v = r as [n, 1, 4, 5].
    (
        "fuse-attention",
        |g, [x, _, _, r]| {
            let heads = |g: &mut Graph, a: NodeId, d: u64| {
                let shape = vec![Dim::sym("n"), Dim::known(1), Dim::known(4), Dim::known(d)];
                g.add(Op::Reshape { shape }, &[a], "h").unwrap()
            };
            let (q, v) = (heads(g, x, 6), heads(g, r, 5));
            let s = g.add(mm(false, true), &[q, q], "qk").unwrap();
            let c = scalar(g, 0.5);
            let s = bin(g, BinaryOp::Mul, s, c);
            let reduce = |g: &mut Graph, op, a| {
                let op = Op::Reduce {
                    op,
                    axes: vec![3],
                    keep_dims: true,
                };
                g.add(op, &[a], "r").unwrap()
            };
            let m = reduce(g, kiln_ir::ReduceOp::Max, s);
            let d = bin(g, BinaryOp::Sub, s, m);
            let e = g.add(Op::Unary(UnaryOp::Exp), &[d], "e").unwrap();
            let z = reduce(g, kiln_ir::ReduceOp::Sum, e);
            let p = bin(g, BinaryOp::Div, e, z);
            g.add(mm(false, false), &[p, v], "pv").unwrap()
        },
        1,
    ),
];

type Build4 = fn(&mut Graph, [NodeId; 4]) -> NodeId;

fn fused_ops(g: &Graph) -> Vec<kiln_ir::Fused> {
    g.node_ids()
        .filter_map(|n| match &g.node(n).op {
            Op::Fused(f) => Some((**f).clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn every_fusion_rule_is_correct_by_execution() {
    for r in kiln_passes::fuse::rules() {
        assert!(
            FUSION.iter().any(|(n, _, _)| *n == r.name.as_str()),
            "fusion rule {} has no example in tests/rules.rs",
            r.name
        );
    }
    for (i, (name, build, want)) in FUSION.iter().enumerate() {
        let mut g = Graph::new("fusion");
        let ins = fusion_inputs(&mut g);
        let out = build(&mut g, ins);
        g.add_output("out", out).unwrap();
        // The rule alone, with the rules whose fused ops it builds on.
        let on: &[&str] = match *name {
            "fuse-attention" => &[*name, "fuse-gemm-epilogue", "fuse-softmax"],
            _ => &[*name],
        };
        let others: Vec<String> = kiln_passes::fuse::rules()
            .iter()
            .map(|r| r.name.to_string())
            .filter(|r| !on.contains(&r.as_str()))
            .collect();
        let mut h = g.clone();
        kiln_passes::fuse::run(&mut h, &others, CostModel::cpu());
        kiln_ir::verify(&h).unwrap_or_else(|e| panic!("{name} #{i}: {e}"));
        let fused = fused_ops(&h);
        let mine = fused.iter().filter(|f| f.rule == *name).count();
        assert_eq!(mine, *want, "{name} #{i}:\n{}", h.to_text());
        assert!(
            fused.iter().all(|f| on.contains(&f.rule.as_str())),
            "{name} #{i}:\n{}",
            h.to_text()
        );
        for (n, seed) in [(1, 1), (3, 2), (5, 3)] {
            let feed = fusion_feed(n, seed);
            let a = kiln_interp::run(&g, &BTreeMap::new(), &feed).unwrap().remove(0).1;
            let b = kiln_interp::run(&h, &BTreeMap::new(), &feed).unwrap().remove(0).1;
            let e = a.max_abs_diff(&b).expect("same shape");
            assert!(e <= 1e-6, "{name} #{i}: differs by {e}\n{}", h.to_text());
        }
    }
}

/// The fused product reads as `acc + bias + scale · (x @ wᵀ)`, and a disabled rule makes none.
#[test]
fn gemm_epilogue_fuses_in_order_and_can_be_disabled() {
    let mut g = Graph::new("fusion");
    let ins = fusion_inputs(&mut g);
    let out = (FUSION[0].1)(&mut g, ins);
    g.add_output("out", out).unwrap();
    let mut h = g.clone();
    let stats = kiln_passes::fuse::run(&mut h, &[], CostModel::cpu());
    let [f] = &fused_ops(&h)[..] else {
        panic!("one fused op expected:\n{}", h.to_text())
    };
    let tys: Vec<TensorType> = {
        let root = h.outputs()[0].node;
        h.args(root).iter().map(|a| h.node(*a).ty.clone()).collect()
    };
    let gm = f
        .gemm(&tys.iter().collect::<Vec<_>>())
        .expect("a product with an epilogue");
    assert_eq!((gm.transpose_a, gm.transpose_b, gm.scale), (false, true, 0.5));
    assert_eq!((gm.bias, gm.acc), (Some(2), Some(3)));
    assert!(
        stats.notes.iter().any(|n| n.contains("fuse-gemm-epilogue x1")),
        "{:?}",
        stats.notes
    );
    let mut k = g.clone();
    kiln_passes::fuse::run(&mut k, &["fuse-gemm-epilogue".to_string()], CostModel::cpu());
    assert!(
        fused_ops(&k).iter().all(|f| f.rule != "fuse-gemm-epilogue"),
        "{}",
        k.to_text()
    );
}
