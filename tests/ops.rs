//! Every primitive op, compiled for the CPU (fused and unfused), against the interpreter on random
//! inputs at several shapes, symbolic dims included.

use std::collections::BTreeMap;

use kiln_ir::{BinaryOp, CmpOp, DType, Dim, Graph, Literal, NodeId, Op, ReduceOp, Tensor, TensorType, UnaryOp};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
}

fn input(g: &mut Graph, name: &str, dtype: DType, shape: &[&str]) -> NodeId {
    let shape = shape
        .iter()
        .map(|d| d.parse::<u64>().map(Dim::known).unwrap_or_else(|_| Dim::sym(*d)))
        .collect();
    g.add(Op::input(name, TensorType::new(dtype, shape)), &[], name)
        .unwrap()
}

/// Compiles `g` both ways and compares with the interpreter for each binding of `n`.
fn check(name: &str, g: &Graph, sizes: &[usize], tol: f64) {
    let weights = BTreeMap::new();
    for fuse_level in [0u8, 1] {
        let c = kiln_cpu::compile(
            g,
            &weights,
            &[("n".into(), 64)],
            &kiln_cpu::Options::for_level(fuse_level),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
        let model = kiln_runtime::Model::from_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        for &n in sizes {
            let mut rng = Rng(n as u64 * 31 + 7);
            let mut feed = BTreeMap::new();
            for &i in g.inputs() {
                let Op::Input { name: iname, ty, .. } = &g.node(i).op else {
                    unreachable!()
                };
                let shape: Vec<usize> = ty
                    .shape
                    .iter()
                    .map(|d| d.eval(&[("n".to_string(), n)].into_iter().collect()).unwrap())
                    .collect();
                let count: usize = shape.iter().product();
                let t = match ty.dtype {
                    DType::F32 => Tensor::from_f32(shape, (0..count).map(|_| rng.f()).collect()).unwrap(),
                    DType::I64 => {
                        Tensor::from_i64(shape, (0..count).map(|_| ((rng.f() + 2.0) * 2.0) as i64).collect()).unwrap()
                    }
                    DType::Bool => Tensor::from_f64(
                        DType::Bool,
                        shape,
                        &(0..count).map(|_| (rng.f() > 0.0) as u8 as f64).collect::<Vec<_>>(),
                    )
                    .unwrap(),
                    other => panic!("{other}"),
                };
                feed.insert(iname.clone(), t);
            }
            let want = kiln_interp::run(g, &weights, &feed).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = model.run(&feed).unwrap_or_else(|e| panic!("{name} n={n}: {e}"));
            for ((o, a), (_, b)) in want.iter().zip(&got) {
                let err = a
                    .max_abs_diff(b)
                    .unwrap_or_else(|| panic!("{name} {o}: shapes {:?} vs {:?}", a.shape(), b.shape()));
                let scale = a.to_f64_vec().iter().fold(1.0f64, |m, x| m.max(x.abs()));
                assert!(
                    err <= tol * scale,
                    "{name} (O{fuse_level}) n={n} {o}: error {err:e} (values up to {scale})"
                );
            }
        }
    }
}

fn scalar(g: &mut Graph, v: f64) -> NodeId {
    g.add(
        Op::Scalar {
            value: Literal::float(v),
            dtype: DType::F32,
        },
        &[],
        "c",
    )
    .unwrap()
}

#[test]
fn unary_ops() {
    for u in [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Recip,
        UnaryOp::Sin,
        UnaryOp::Cos,
    ] {
        let mut g = Graph::new("u");
        let x = input(&mut g, "x", DType::F32, &["n", "7"]);
        // Keep log/sqrt/rsqrt/recip on positive arguments; spread exp's range to ±20.
        let arg = match u {
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip => {
                let a = g.add(Op::Unary(UnaryOp::Abs), &[x], "abs").unwrap();
                let c = scalar(&mut g, 0.5);
                g.add(Op::Binary(BinaryOp::Add), &[a, c], "pos").unwrap()
            }
            _ => {
                let c = scalar(&mut g, 10.0);
                g.add(Op::Binary(BinaryOp::Mul), &[x, c], "wide").unwrap()
            }
        };
        let y = g.add(Op::Unary(u), &[arg], "y").unwrap();
        g.add_output("y", y).unwrap();
        check(&format!("{u:?}"), &g, &[1, 3, 17], 2e-6);
    }
}

#[test]
fn binary_compare_where_with_broadcasting() {
    for b in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ] {
        let mut g = Graph::new("b");
        let x = input(&mut g, "x", DType::F32, &["n", "1", "5"]);
        let y = input(&mut g, "y", DType::F32, &["3", "1"]);
        let (x, y) = if b == BinaryOp::Pow {
            let ax = g.add(Op::Unary(UnaryOp::Abs), &[x], "ax").unwrap();
            (ax, y)
        } else {
            (x, y)
        };
        let z = g.add(Op::Binary(b), &[x, y], "z").unwrap();
        g.add_output("z", z).unwrap();
        check(&format!("{b:?}"), &g, &[1, 4, 9], 1e-6);
    }
    for c in [CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge] {
        let mut g = Graph::new("c");
        let x = input(&mut g, "x", DType::F32, &["n", "6"]);
        let y = input(&mut g, "y", DType::F32, &["6"]);
        let k = g.add(Op::Compare(c), &[x, y], "k").unwrap();
        let w = g.add(Op::Where, &[k, x, y], "w").unwrap();
        g.add_output("k", k).unwrap();
        g.add_output("w", w).unwrap();
        check(&format!("{c:?}"), &g, &[1, 5], 0.0);
    }
    let mut g = Graph::new("wb");
    let m = input(&mut g, "m", DType::Bool, &["n", "1", "8"]);
    let x = input(&mut g, "x", DType::F32, &["n", "3", "8"]);
    let lowest = scalar(&mut g, f32::MIN as f64);
    let w = g.add(Op::Where, &[m, x, lowest], "w").unwrap();
    g.add_output("w", w).unwrap();
    check("where-bool", &g, &[1, 2, 7], 0.0);
}

#[test]
fn reductions_and_softmax() {
    for (op, axes) in [
        (ReduceOp::Sum, vec![2]),
        (ReduceOp::Max, vec![2]),
        (ReduceOp::Min, vec![2]),
        (ReduceOp::Mean, vec![2]),
        (ReduceOp::Sum, vec![1]),
        (ReduceOp::Mean, vec![0, 2]),
    ] {
        for keep_dims in [false, true] {
            let mut g = Graph::new("r");
            let x = input(&mut g, "x", DType::F32, &["n", "3", "37"]);
            let sq = g.add(Op::Binary(BinaryOp::Mul), &[x, x], "sq").unwrap();
            let r = g
                .add(
                    Op::Reduce {
                        op,
                        axes: axes.clone(),
                        keep_dims,
                    },
                    &[sq],
                    "r",
                )
                .unwrap();
            g.add_output("r", r).unwrap();
            check(&format!("{op:?} {axes:?} {keep_dims}"), &g, &[1, 6], 2e-6);
        }
    }
    let mut g = Graph::new("softmax");
    let x = input(&mut g, "x", DType::F32, &["n", "2", "19"]);
    let bias = input(&mut g, "b", DType::F32, &["19"]);
    let s = g.add(Op::Binary(BinaryOp::Add), &[x, bias], "s").unwrap();
    let m = g
        .add(
            Op::Reduce {
                op: ReduceOp::Max,
                axes: vec![2],
                keep_dims: true,
            },
            &[s],
            "m",
        )
        .unwrap();
    let d = g.add(Op::Binary(BinaryOp::Sub), &[s, m], "d").unwrap();
    let e = g.add(Op::Unary(UnaryOp::Exp), &[d], "e").unwrap();
    let z = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![2],
                keep_dims: true,
            },
            &[e],
            "z",
        )
        .unwrap();
    let p = g.add(Op::Binary(BinaryOp::Div), &[e, z], "p").unwrap();
    g.add_output("p", p).unwrap();
    check("softmax", &g, &[1, 3, 64], 1e-6);
}

#[test]
fn matmul_variants_and_epilogues() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let mut g = Graph::new("mm");
        let sa = if ta { ["n", "9", "5"] } else { ["n", "5", "9"] };
        let sb = if tb { ["4", "9"] } else { ["9", "4"] };
        let a = input(&mut g, "a", DType::F32, &sa);
        let b = input(&mut g, "b", DType::F32, &sb);
        let bias = input(&mut g, "bias", DType::F32, &["4"]);
        let res = input(&mut g, "res", DType::F32, &["n", "5", "4"]);
        let mm = g
            .add(
                Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                },
                &[a, b],
                "mm",
            )
            .unwrap();
        let c = scalar(&mut g, 0.25);
        let sc = g.add(Op::Binary(BinaryOp::Mul), &[mm, c], "scaled").unwrap();
        let bi = g.add(Op::Binary(BinaryOp::Add), &[sc, bias], "biased").unwrap();
        let r = g.add(Op::Binary(BinaryOp::Add), &[res, bi], "residual").unwrap();
        g.add_output("r", r).unwrap();
        check(&format!("matmul ta={ta} tb={tb}"), &g, &[1, 3], 1e-6);
    }
    // Batched with broadcasting on both sides.
    let mut g = Graph::new("bmm");
    let a = input(&mut g, "a", DType::F32, &["n", "1", "6", "8"]);
    let b = input(&mut g, "b", DType::F32, &["3", "8", "5"]);
    let mm = g
        .add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[a, b],
            "mm",
        )
        .unwrap();
    g.add_output("mm", mm).unwrap();
    check("batched matmul", &g, &[1, 2], 1e-6);
}

#[test]
fn data_movement_gather_cast_iota() {
    let mut g = Graph::new("dm");
    let x = input(&mut g, "x", DType::F32, &["n", "4", "6"]);
    let t = g.add(Op::Transpose { perm: vec![2, 0, 1] }, &[x], "t").unwrap();
    let s = g
        .add(
            Op::Slice {
                axis: 2,
                start: 1,
                end: 5,
            },
            &[x],
            "s",
        )
        .unwrap();
    let c = g.add(Op::Concat { axis: 2 }, &[x, s], "c").unwrap();
    let r = g
        .add(
            Op::Reshape {
                shape: vec![Dim::sym("n"), Dim::known(24)],
            },
            &[x],
            "r",
        )
        .unwrap();
    let bshape = vec![Dim::known(2), Dim::sym("n"), Dim::known(4), Dim::known(6)];
    let b = g.add(Op::Broadcast { shape: bshape }, &[x], "b").unwrap();
    let table = input(&mut g, "table", DType::F32, &["10", "3"]);
    let ids = input(&mut g, "ids", DType::I64, &["n", "2"]);
    let ga = g.add(Op::Gather { axis: 0 }, &[table, ids], "ga").unwrap();
    let io = g
        .add(
            Op::Iota {
                len: Dim::sym("n"),
                dtype: DType::I64,
            },
            &[],
            "io",
        )
        .unwrap();
    let cf = g.add(Op::Cast { to: DType::F32 }, &[io], "cf").unwrap();
    for (n, id) in [("t", t), ("s", s), ("c", c), ("r", r), ("b", b), ("ga", ga), ("cf", cf)] {
        g.add_output(n, id).unwrap();
    }
    check("data movement", &g, &[1, 5], 0.0);
}
