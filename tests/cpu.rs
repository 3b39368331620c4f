//! The CPU backend against the reference interpreter: every spec, several shapes, compiled at
//! every optimization level, run through the artifact file and the runtime.

mod common;

use std::collections::BTreeMap;

use common::*;
use kiln_ir::{DType, Op, Tensor};
use kiln_passes::{optimize, OptLevel};
use kiln_runtime::cpu::Level;

/// Deterministic inputs for a graph at concrete dims: ids in [0, vocab), masks with padding.
fn inputs_for(
    l: &kiln_frontend::Lowered,
    dims: &BTreeMap<&str, usize>,
    seed: u64,
    vocab: i64,
) -> BTreeMap<String, Tensor> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f64 / (1u64 << 31) as f64
    };
    let mut out = BTreeMap::new();
    for &i in l.graph.inputs() {
        let Op::Input { name, ty, .. } = &l.graph.node(i).op else {
            continue;
        };
        let shape: Vec<usize> = ty
            .shape
            .iter()
            .map(|d| {
                d.eval(&dims.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                    .unwrap()
            })
            .collect();
        let n: usize = shape.iter().product();
        let t = match ty.dtype {
            DType::F32 => Tensor::from_f32(shape, (0..n).map(|_| (next() * 4.0 - 2.0) as f32).collect()).unwrap(),
            DType::I64 if name.contains("mask") => {
                // Row b keeps its first seq - b positions.
                let seq = *shape.last().unwrap();
                Tensor::from_i64(shape, (0..n).map(|k| ((k % seq) + (k / seq) < seq) as i64).collect()).unwrap()
            }
            DType::I64 if name.contains("type") => {
                Tensor::from_i64(shape, (0..n).map(|_| (next() * 2.0) as i64).collect()).unwrap()
            }
            DType::I64 => Tensor::from_i64(shape, (0..n).map(|_| (next() * vocab as f64) as i64).collect()).unwrap(),
            other => panic!("no generator for {other}"),
        };
        out.insert(name.clone(), t);
    }
    out
}

fn check_spec(name: &str, overrides: &[(&str, &str)], shapes: &[&[(&str, usize)]], vocab: i64, tol: f64) {
    let l = spec(name, overrides);
    let w = kiln_frontend::weights::random(&l, 11);
    // Every optimization level for the best CPU level here, and -O2 for every other CPU level
    // this machine runs (so the AVX-512, AVX2 and portable kernels are all checked where they run).
    let host = Level::host();
    let mut runs: Vec<(OptLevel, Level)> = [OptLevel::O0, OptLevel::O1, OptLevel::O2].map(|o| (o, host)).into();
    runs.extend(
        Level::runnable()
            .into_iter()
            .filter(|c| *c != host)
            .map(|c| (OptLevel::O2, c)),
    );
    for c in Level::ALL.into_iter().filter(|c| !c.runs_here()) {
        eprintln!(
            "SKIPPED {name} at --cpu {c}: this CPU ({}) lacks it",
            kiln_runtime::cpu::model_name()
        );
    }
    for (level, cpu) in runs {
        let mut g = l.graph.clone();
        optimize(&mut g, level, true).unwrap();
        let dir = std::env::temp_dir().join(format!("kiln-cpu-{}-{name}-{level:?}-{cpu}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.kiln");
        let opts = kiln_cpu::Options {
            cpu,
            ..kiln_cpu::Options::for_level(if level == OptLevel::O0 { 0 } else { 1 })
        };
        kiln_cpu::compile_to_file(&g, &w, &l.dims, &opts, &path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = kiln_runtime::Model::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (si, s) in shapes.iter().enumerate() {
            let dims: BTreeMap<&str, usize> = s.iter().copied().collect();
            let inputs = inputs_for(&l, &dims, 7 + si as u64, vocab);
            let want = kiln_interp::run(&l.graph, &w, &inputs).unwrap();
            let got = model.run(&inputs).unwrap_or_else(|e| panic!("{name} {s:?}: {e}"));
            for ((n1, a), (n2, b)) in want.iter().zip(&got) {
                assert_eq!(n1, n2);
                let err = a
                    .max_abs_diff(b)
                    .unwrap_or_else(|| panic!("{name} {n1}: shape {:?} vs {:?}", a.shape(), b.shape()));
                eprintln!("{name} {level:?} {cpu} {s:?} {n1}: max abs error {err:.2e}");
                assert!(
                    err <= tol,
                    "{name} {level:?} {cpu} {s:?} {n1}: max abs error {err:e} > {tol:e}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn mlp_matches_interpreter() {
    check_spec(
        "mlp.ron",
        &[],
        &[&[("batch", 1)], &[("batch", 7)], &[("batch", 64)]],
        0,
        1e-5,
    );
}

#[test]
fn gpt2_tiny_matches_interpreter() {
    let o = [
        ("layers", "2"),
        ("hidden", "64"),
        ("heads", "4"),
        ("vocab", "256"),
        ("max_pos", "64"),
    ];
    check_spec(
        "gpt2.ron",
        &o,
        &[
            &[("batch", 1), ("seq", 1)],
            &[("batch", 2), ("seq", 13)],
            &[("batch", 3), ("seq", 64)],
        ],
        256,
        1e-4,
    );
}

#[test]
fn llama_tiny_matches_interpreter() {
    check_spec(
        "llama.ron",
        LLAMA_TINY,
        &[
            &[("batch", 1), ("seq", 1)],
            &[("batch", 2), ("seq", 9)],
            &[("batch", 1), ("seq", 33)],
        ],
        256,
        1e-4,
    );
}

#[test]
fn minilm_small_matches_interpreter() {
    let o = [("layers", "2")];
    check_spec(
        "minilm.ron",
        &o,
        &[
            &[("batch", 1), ("seq", 5)],
            &[("batch", 3), ("seq", 17)],
            &[("batch", 2), ("seq", 150)],
        ],
        30522,
        1e-4,
    );
}
