//! Op-level checks of the interpreter against hand-computed results.

use std::collections::BTreeMap;

use kiln_interp::{run, InterpError};
use kiln_ir::{BinaryOp, CmpOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Tensor, TensorType, UnaryOp};

fn input(g: &mut Graph, name: &str, dtype: DType, shape: &[&str]) -> NodeId {
    let shape = shape
        .iter()
        .map(|d| d.parse::<u64>().map(Dim::known).unwrap_or_else(|_| Dim::sym(*d)))
        .collect();
    g.add(Op::input(name, TensorType::new(dtype, shape)), &[], name)
        .unwrap()
}

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), v.to_vec()).unwrap()
}

fn eval(g: &Graph, inputs: Vec<(&str, Tensor)>) -> Result<Vec<(String, Tensor)>, InterpError> {
    let feed: BTreeMap<String, Tensor> = inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    run(g, &BTreeMap::new(), &feed)
}

fn single(g: &Graph, inputs: Vec<(&str, Tensor)>) -> Vec<f64> {
    eval(g, inputs).unwrap().remove(0).1.to_f64_vec()
}

#[test]
fn matmul_with_every_transpose_and_batch_broadcast() {
    // a: [2, 2, 3] (batch 2), b: [3, 2] shared; checked against explicit sums.
    let a: Vec<f32> = (0..12).map(|x| x as f32).collect();
    let b: Vec<f32> = (0..6).map(|x| (x as f32) - 2.0).collect();
    let want = |a: &[f32], b: &[f32]| -> Vec<f64> {
        let mut out = Vec::new();
        for batch in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    out.push(
                        (0..3)
                            .map(|k| a[batch * 6 + i * 3 + k] as f64 * b[k * 2 + j] as f64)
                            .sum(),
                    );
                }
            }
        }
        out
    };
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut g = Graph::new("mm");
        let sa = if ta { ["2", "3", "2"] } else { ["2", "2", "3"] };
        let sb = if tb { ["2", "3"] } else { ["3", "2"] };
        let x = input(&mut g, "a", DType::F32, &sa);
        let y = input(&mut g, "b", DType::F32, &sb);
        let z = g
            .add(
                Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                },
                &[x, y],
                "z",
            )
            .unwrap();
        g.add_output("z", z).unwrap();
        // Feed the transposed layouts of the same logical matrices.
        let av: Vec<f32> = if ta {
            (0..2)
                .flat_map(|bt| (0..3).flat_map(move |k| (0..2).map(move |i| (bt * 6 + i * 3 + k) as f32)))
                .collect()
        } else {
            a.clone()
        };
        let bv: Vec<f32> = if tb {
            let bb = &b;
            (0..2).flat_map(|j| (0..3).map(move |k| bb[k * 2 + j])).collect()
        } else {
            b.clone()
        };
        let got = single(
            &g,
            vec![
                ("a", f32s(&[2, sa[1].parse().unwrap(), sa[2].parse().unwrap()], &av)),
                ("b", f32s(&[sb[0].parse().unwrap(), sb[1].parse().unwrap()], &bv)),
            ],
        );
        assert_eq!(got, want(&a, &b), "ta={ta} tb={tb}");
    }
}

#[test]
fn broadcasting_reduce_where_and_compare() {
    let mut g = Graph::new("b");
    let x = input(&mut g, "x", DType::F32, &["n", "3"]);
    let y = input(&mut g, "y", DType::F32, &["3"]);
    let s = g.add(Op::Binary(BinaryOp::Sub), &[x, y], "s").unwrap();
    let m = g
        .add(
            Op::Reduce {
                op: ReduceOp::Max,
                axes: vec![1],
                keep_dims: true,
            },
            &[s],
            "m",
        )
        .unwrap();
    let mean = g
        .add(
            Op::Reduce {
                op: ReduceOp::Mean,
                axes: vec![0, 1],
                keep_dims: false,
            },
            &[s],
            "mean",
        )
        .unwrap();
    let gt = g.add(Op::Compare(CmpOp::Gt), &[s, m], "gt").unwrap();
    let ge = g.add(Op::Compare(CmpOp::Ge), &[s, m], "ge").unwrap();
    let w = g.add(Op::Where, &[ge, s, m], "w").unwrap();
    for (n, id) in [("s", s), ("m", m), ("mean", mean), ("gt", gt), ("w", w)] {
        g.add_output(n, id).unwrap();
    }
    let out = eval(
        &g,
        vec![
            ("x", f32s(&[2, 3], &[1.0, 5.0, 3.0, 4.0, 2.0, 6.0])),
            ("y", f32s(&[3], &[1.0, 1.0, 1.0])),
        ],
    )
    .unwrap();
    assert_eq!(out[0].1.to_f64_vec(), vec![0.0, 4.0, 2.0, 3.0, 1.0, 5.0]);
    assert_eq!(out[1].1.to_f64_vec(), vec![4.0, 5.0]);
    assert_eq!(out[1].1.shape(), &[2, 1]);
    assert_eq!(out[2].1.to_f64_vec(), vec![2.5]);
    assert_eq!(out[3].1.dtype(), DType::Bool);
    assert_eq!(out[3].1.to_f64_vec(), vec![0.0; 6]);
    assert_eq!(out[4].1.to_f64_vec(), vec![4.0, 4.0, 4.0, 5.0, 5.0, 5.0]);
}

#[test]
fn data_movement_ops() {
    let mut g = Graph::new("dm");
    let x = input(&mut g, "x", DType::F32, &["2", "3"]);
    let t = g.add(Op::Transpose { perm: vec![1, 0] }, &[x], "t").unwrap();
    let sl = g
        .add(
            Op::Slice {
                axis: 1,
                start: 1,
                end: 3,
            },
            &[x],
            "sl",
        )
        .unwrap();
    let c = g.add(Op::Concat { axis: 1 }, &[x, sl], "c").unwrap();
    let r = g
        .add(
            Op::Reshape {
                shape: vec![Dim::known(3), Dim::known(2)],
            },
            &[x],
            "r",
        )
        .unwrap();
    let b = g
        .add(
            Op::Broadcast {
                shape: vec![Dim::known(2), Dim::known(2), Dim::known(3)],
            },
            &[x],
            "b",
        )
        .unwrap();
    for (n, id) in [("t", t), ("sl", sl), ("c", c), ("r", r), ("b", b)] {
        g.add_output(n, id).unwrap();
    }
    let out = eval(&g, vec![("x", f32s(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))]).unwrap();
    assert_eq!(out[0].1.to_f64_vec(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    assert_eq!(out[1].1.to_f64_vec(), vec![1.0, 2.0, 4.0, 5.0]);
    assert_eq!(
        out[2].1.to_f64_vec(),
        vec![0.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 4.0, 5.0]
    );
    assert_eq!(out[3].1.shape(), &[3, 2]);
    assert_eq!(out[4].1.to_f64_vec().len(), 12);
}

#[test]
fn gather_and_iota_and_cast() {
    let mut g = Graph::new("ga");
    let table = input(&mut g, "t", DType::F32, &["3", "2"]);
    let ids = input(&mut g, "ids", DType::I64, &["n"]);
    let x = g.add(Op::Gather { axis: 0 }, &[table, ids], "x").unwrap();
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
    let f = g.add(Op::Cast { to: DType::F32 }, &[io], "f").unwrap();
    let e = g.add(Op::Unary(UnaryOp::Exp), &[f], "e").unwrap();
    let back = g.add(Op::Cast { to: DType::I32 }, &[e], "back").unwrap();
    for (n, id) in [("x", x), ("io", io), ("back", back)] {
        g.add_output(n, id).unwrap();
    }
    let t = f32s(&[3, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    let out = eval(
        &g,
        vec![
            ("t", t.clone()),
            ("ids", Tensor::from_i64(vec![3], vec![2, 0, 2]).unwrap()),
        ],
    )
    .unwrap();
    assert_eq!(out[0].1.to_f64_vec(), vec![20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
    assert_eq!(out[1].1.to_f64_vec(), vec![0.0, 1.0, 2.0]);
    assert_eq!(out[2].1.to_f64_vec(), vec![1.0, 2.0, 7.0], "casts truncate toward zero");
    let err = eval(&g, vec![("t", t), ("ids", Tensor::from_i64(vec![1], vec![3]).unwrap())]).unwrap_err();
    assert!(err.to_string().contains("out of range for 3 rows"), "{err}");
}

#[test]
fn f32_results_are_rounded_to_f32() {
    let mut g = Graph::new("r");
    let x = input(&mut g, "x", DType::F32, &["1"]);
    let third = g
        .add(
            Op::Scalar {
                value: kiln_ir::Literal::float(3.0),
                dtype: DType::F32,
            },
            &[],
            "c",
        )
        .unwrap();
    let d = g.add(Op::Binary(BinaryOp::Div), &[x, third], "d").unwrap();
    g.add_output("d", d).unwrap();
    let got = single(&g, vec![("x", f32s(&[1], &[1.0]))]);
    assert_eq!(got[0], (1.0f32 / 3.0) as f64);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let mut g = Graph::new("in");
    let a = input(&mut g, "a", DType::F32, &["batch", "seq"]);
    let b = input(&mut g, "b", DType::I64, &["batch", "seq"]);
    g.add_output("a", a).unwrap();
    g.add_output("b", b).unwrap();
    let a23 = f32s(&[2, 3], &[0.0; 6]);
    let cases = vec![
        (vec![("a", a23.clone())], "missing input `b`"),
        (
            vec![
                ("a", a23.clone()),
                ("b", Tensor::from_i64(vec![2, 4], vec![0; 8]).unwrap()),
            ],
            "already set `seq` = 3",
        ),
        (
            vec![("a", a23.clone()), ("b", f32s(&[2, 3], &[0.0; 6]))],
            "expected dtype i64, got f32",
        ),
        (
            vec![
                ("a", a23.clone()),
                ("b", Tensor::from_i64(vec![6], vec![0; 6]).unwrap()),
            ],
            "rank 2",
        ),
        (
            vec![
                ("a", a23.clone()),
                ("b", Tensor::from_i64(vec![2, 3], vec![0; 6]).unwrap()),
                ("c", a23),
            ],
            "unknown input `c`",
        ),
    ];
    for (inputs, want) in cases {
        let e = eval(&g, inputs).unwrap_err().to_string();
        assert!(e.contains(want), "expected {want:?} in {e:?}");
    }
}
