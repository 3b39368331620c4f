//! The mixture-of-experts layer beyond Mixtral's settings (which tests/families.rs checks against
//! transformers): sigmoid scores, no renormalization, GELU and ReLU experts, top 1 and top 3 —
//! the compiled routed kernel against the interpreter's dense definition, on a prefill of many
//! rows (the GEMM path) and on single rows (the matrix-vector path); and the weight bytes a run
//! reads, which must count only the experts its rows were routed to.

mod common;

use std::collections::BTreeMap;

use common::*;
use kiln_frontend::{lower_source, Lowered, Options};
use kiln_ir::Tensor;

/// One layer: a router and a mixture of 4 experts of width 48 over a 32-wide input.
fn spec(top_k: u32, extra: &str) -> Lowered {
    let src = format!(
        r#"Model(
    name: "moe",
    config: {{ "hidden": 32 }},
    dims: {{ "batch": 4, "seq": 64 }},
    inputs: {{ "x": (dtype: f32, shape: ["batch", "seq", "hidden"]) }},
    body: {{
        "router": Linear(x: "x", param: "router", bias: false, in_features: "hidden", out_features: 4),
        "y": Moe(x: "x", logits: "router", experts: 4, top_k: {top_k}, dim: "hidden", ffn: 48,
                 gate: "experts.{{e}}.w1", up: "experts.{{e}}.w3", down: "experts.{{e}}.w2"{extra}),
    }},
    outputs: {{ "y": "y" }},
)
"#
    );
    lower_source("moe.ron", &src, &Options::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// `[batch, seq, 32]` of values in [-2, 2).
fn input(batch: usize, seq: usize, seed: u64) -> Tensor {
    let mut r = Rng(seed);
    let v: Vec<f64> = (0..batch * seq * 32)
        .map(|_| (r.below(4000) as f64 - 2000.0) / 1000.0)
        .collect();
    Tensor::from_f64(kiln_ir::DType::F32, vec![batch, seq, 32], &v).unwrap()
}

fn feed(x: Tensor) -> BTreeMap<String, Tensor> {
    [("x".to_string(), x)].into_iter().collect()
}

#[test]
fn routed_kernel_matches_the_dense_definition() {
    let cases = [
        (2, ""),
        (1, ", scores: Sigmoid, renormalize: false"),
        (3, ", scores: Sigmoid, act: Gelu"),
        (2, ", renormalize: false, act: GeluTanh"),
        (2, ", act: Relu"),
    ];
    for (i, (k, extra)) in cases.into_iter().enumerate() {
        let l = spec(k, extra);
        let w = kiln_frontend::weights::random(&l, 7 + i as u64);
        let m = compile_o2(l.clone(), &w);
        for (batch, seq) in [(3, 9), (1, 1), (2, 1)] {
            let x = input(batch, seq, i as u64 * 31 + seq as u64);
            let want = run(&l, &w, &[("x", x.clone())]).remove("y").unwrap();
            let got = m.run(&feed(x)).unwrap_or_else(|e| panic!("{e}")).remove(0).1;
            // The outputs are large enough that a wrongly routed row could not hide in the tolerance.
            let scale = want.to_f64_vec().iter().fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(scale > 0.05, "outputs of magnitude {scale} test nothing");
            assert_close(&format!("top_k {k}{extra}, {batch}x{seq} rows"), &got, &want, 1e-4);
        }
    }
}

#[test]
fn a_run_reads_only_the_routed_experts() {
    // Expert weights: 3 matrices of 48 x 32 f32 each.
    let expert = 3 * 48 * 32 * 4;
    let read = |k: u32, seq: usize| {
        let l = spec(k, "");
        let w = kiln_frontend::weights::random(&l, 3);
        let m = compile_o2(l, &w);
        let (_, stats) = m
            .run_with_stats(&feed(input(1, seq, 5)))
            .unwrap_or_else(|e| panic!("{e}"));
        stats.weight_bytes_read
    };
    // Every expert routed (top 4 of 4) against one row's top 2: the difference is two experts.
    let (all, one_row) = (read(4, 1), read(2, 1));
    assert_eq!(all - one_row, 2 * expert, "one row, top 2 of 4 experts");
    // Many rows reach every expert, never more.
    assert_eq!(read(2, 40), all, "40 rows, top 2 of 4 experts");
}
