//! The artifact loader refuses damaged files with an error and never crashes, and a loaded model
//! refuses inputs outside its compiled bounds.

mod common;

use kiln_runtime::Decoder;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use kiln_ir::Tensor;
use kiln_runtime::cpu::{self, Level};
use kiln_runtime::plan::{Manifest, Step, Storage};
use kiln_runtime::{artifact, Model};

fn tiny_gpt2() -> (kiln_frontend::Lowered, kiln_cpu::Compiled) {
    tiny_gpt2_with(false)
}

fn tiny_gpt2_with(decode: bool) -> (kiln_frontend::Lowered, kiln_cpu::Compiled) {
    let mut l = spec_with(
        "gpt2.ron",
        &[
            ("layers", "1"),
            ("hidden", "32"),
            ("heads", "2"),
            ("vocab", "64"),
            ("max_pos", "16"),
        ],
        decode,
    );
    let w = kiln_frontend::weights::random(&l, 3);
    if decode {
        kiln_passes::optimize(&mut l.graph, kiln_passes::OptLevel::O2, true).unwrap();
    }
    let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(1)).unwrap();
    (l, c)
}

fn ids(b: usize, s: usize) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert(
        "input_ids".to_string(),
        Tensor::from_i64(vec![b, s], (0..(b * s) as i64).map(|i| i % 64).collect()).unwrap(),
    );
    m
}

#[test]
fn round_trip_and_bounds() {
    let (_, c) = tiny_gpt2();
    let bytes = artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    let model = Model::from_bytes(&bytes).unwrap();
    let out = model.run(&ids(2, 5)).unwrap();
    assert_eq!(out[0].1.shape(), &[2, 5, 64]);
    let e = model.run(&ids(1, 17)).unwrap_err().to_string();
    assert!(e.contains("outside the compiled range 1..=16"), "{e}");
    let mut bad = ids(1, 4);
    bad.insert(
        "input_ids".into(),
        Tensor::from_i64(vec![1, 4], vec![0, 1, 64, 2]).unwrap(),
    );
    let e = model.run(&bad).unwrap_err().to_string();
    assert!(e.contains("index 64") && e.contains("out of range"), "{e}");
}

#[test]
fn optional_inputs_take_their_defaults() {
    // minilm.ron declares attention_mask (default 1) and token_type_ids (default 0) optional.
    let l = spec(
        "minilm.ron",
        &[("layers", "1"), ("vocab", "64"), ("hidden", "32"), ("heads", "2")],
    );
    let w = kiln_frontend::weights::random(&l, 5);
    let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(1)).unwrap();
    let model = Model::from_bytes(&artifact::encode(&c.manifest, &c.weights, &c.code).unwrap()).unwrap();
    let bare = ids(2, 5);
    let mut full = bare.clone();
    full.insert(
        "attention_mask".into(),
        Tensor::from_i64(vec![2, 5], vec![1; 10]).unwrap(),
    );
    full.insert(
        "token_type_ids".into(),
        Tensor::from_i64(vec![2, 5], vec![0; 10]).unwrap(),
    );
    let (a, b) = (model.run(&bare).unwrap(), model.run(&full).unwrap());
    assert_eq!(
        a[0].1.to_f64_vec(),
        b[0].1.to_f64_vec(),
        "left out = given as the defaults"
    );
    let interp = kiln_interp::run(&l.graph, &w, &bare).unwrap();
    assert!(
        interp[0].1.max_abs_diff(&a[0].1).unwrap() < 1e-4,
        "interpreter fills them too"
    );
    // A required input is still required; a default that is no value of its dtype is refused.
    let e = model.run(&BTreeMap::<String, Tensor>::new()).unwrap_err().to_string();
    assert!(e.contains("missing input `input_ids`"), "{e}");
    let mut m = c.manifest.clone();
    let mask = m.inputs.iter_mut().find(|p| p.name == "attention_mask").unwrap();
    mask.default = Some(kiln_ir::Literal::float(0.5));
    let e = Model::from_bytes(&artifact::encode(&m, &c.weights, &c.code).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("input `attention_mask` defaults to") && e.contains("which does not fit its dtype i64"),
        "{e}"
    );
}

#[test]
fn a_dim_only_an_omitted_input_sets_is_an_error() {
    let src = r#"Model(
        name: "scale",
        dims: { "n": 8, "k": 4 },
        inputs: {
            "x": (dtype: f32, shape: ["n", 1]),
            "w": (dtype: f32, shape: ["n", "k"], default: 2),
        },
        body: { "y": Mul(a: "w", b: "x") },
        outputs: { "y": "y" },
    )"#;
    let l = kiln_frontend::lower_source("scale.ron", src, &kiln_frontend::Options::default()).unwrap();
    let c = kiln_cpu::compile(&l.graph, &BTreeMap::new(), &l.dims, &kiln_cpu::Options::for_level(1)).unwrap();
    let model = Model::from_bytes(&artifact::encode(&c.manifest, &c.weights, &c.code).unwrap()).unwrap();
    let x: BTreeMap<String, Tensor> = [("x".to_string(), Tensor::from_f32(vec![3, 1], vec![1.5; 3]).unwrap())].into();
    let e = model.run(&x).unwrap_err().to_string();
    assert!(
        e.contains("`k`") && e.contains("only input `w` determines this dim"),
        "{e}"
    );
    let e = kiln_interp::run(&l.graph, &BTreeMap::new(), &x)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`w`") && e.contains("only this input determines `k`"), "{e}");
    let mut given = x.clone();
    given.insert("w".into(), Tensor::from_f32(vec![3, 2], vec![3.0; 6]).unwrap());
    assert_eq!(model.run(&given).unwrap()[0].1.to_f64_vec(), vec![4.5; 6]);
}

#[test]
fn damaged_files_are_refused() {
    let (_, c) = tiny_gpt2();
    let bytes = artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    // Every truncation point in the header, and a spread of others.
    let mut cuts: Vec<usize> = (0..80).collect();
    cuts.extend((80..bytes.len()).step_by(bytes.len() / 97 + 1));
    for cut in cuts {
        assert!(
            Model::from_bytes(&bytes[..cut]).is_err(),
            "truncated at {cut} was accepted"
        );
    }
    // Single-byte damage anywhere is caught by the checksum (or the header checks).
    for (k, at) in (0..bytes.len()).step_by(bytes.len() / 211 + 1).enumerate() {
        let mut b = bytes.clone();
        b[at] ^= 1 << (k % 8);
        let e = Model::from_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("invalid kiln artifact") || e.contains("version"), "{e}");
    }
    let mut v = bytes.clone();
    v[8] = 9;
    let e = Model::from_bytes(&v).unwrap_err().to_string();
    assert!(e.contains("format version 9"), "{e}");
}

#[test]
fn wrong_target_is_refused() {
    let (_, c) = tiny_gpt2();
    let mut m = c.manifest.clone();
    m.target.arch = "riscv64".into();
    let e = Model::from_bytes(&artifact::encode(&m, &c.weights, &c.code).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("compiled for riscv64"), "{e}");
    // A feature name this runtime does not know never stops a load (a newer compiler may
    // record one); the features it knows are checked.
    let mut m = c.manifest.clone();
    m.target.features.push("quantum-fp".into());
    Model::from_bytes(&artifact::encode(&m, &c.weights, &c.code).unwrap()).unwrap();
    let Some(above) = Level::ALL.into_iter().find(|l| !l.runs_here()) else {
        eprintln!(
            "SKIPPED the missing-feature check: this CPU runs every level ({})",
            cpu::model_name()
        );
        return;
    };
    let lacking: Vec<&str> = above
        .features()
        .into_iter()
        .filter(|f| cpu::has(f) == Some(false))
        .collect();
    let mut m = c.manifest.clone();
    m.target.features = above.features().iter().map(|f| f.to_string()).collect();
    m.target.level = above.name().into();
    let e = Model::from_bytes(&artifact::encode(&m, &c.weights, &c.code).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains(above.name()) && e.contains(lacking[0]), "{e}");
    assert!(e.contains(&format!("compile with --cpu {}", Level::host())), "{e}");
    // A level whose features the list leaves out is still checked against its own.
    m.target.features.clear();
    let e = Model::from_bytes(&artifact::encode(&m, &c.weights, &c.code).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains(lacking[0]), "{e}");
}

#[test]
fn lower_levels_load_and_name_their_level() {
    let (_, c) = tiny_gpt2();
    assert_eq!(c.manifest.target.level, Level::host().name());
    let m = Model::from_bytes(&artifact::encode(&c.manifest, &c.weights, &c.code).unwrap()).unwrap();
    assert_eq!(m.level(), Level::host());
    // An artifact that predates levels: its level is read from its features.
    let mut old = c.manifest.clone();
    old.target.level.clear();
    let m = Model::from_bytes(&artifact::encode(&old, &c.weights, &c.code).unwrap()).unwrap();
    assert_eq!(m.level(), Level::host());
}

/// Damages one field of the manifest in a way a checksum cannot catch (a hostile or buggy writer).
fn mutate(m: &mut Manifest, r: &mut Rng) {
    let nv = m.values.len() as u32;
    let nk = m.kernels.len();
    let pick = |r: &mut Rng, n: u32| -> u32 {
        if r.below(4) == 0 {
            n + r.below(3) as u32
        } else {
            r.below(n as usize) as u32
        }
    };
    match r.below(10) {
        0 => {
            let v = r.below(m.values.len());
            if let Some(d) = m.values[v].shape.get_mut(0) {
                d.coeff = [0, 1, 2, 3, 1000, u64::MAX][r.below(6)];
            }
        }
        1 => {
            let v = r.below(m.values.len());
            m.values[v].storage = match r.below(4) {
                0 => Storage::Temp,
                1 => Storage::Alias(pick(r, nv)),
                2 => Storage::Weight {
                    offset: r.below(1 << 20) as u64 * 4,
                    len: r.below(1 << 16) as u64,
                },
                _ => Storage::Input(r.below(2) as u32),
            };
        }
        2 => {
            let s = r.below(m.steps.len());
            match &mut m.steps[s] {
                Step::Kernel { inputs, out, .. } | Step::Fallback { inputs, out, .. } => {
                    if !inputs.is_empty() && r.below(2) == 0 {
                        let i = r.below(inputs.len());
                        inputs[i] = pick(r, nv);
                    } else {
                        *out = pick(r, nv);
                    }
                }
                Step::MatMul { a, b, out, .. } => *[a, b, out][r.below(3)] = pick(r, nv),
                Step::PackedMatMul { a, w, out, kernel, .. } => match r.below(4) {
                    0 => *kernel = ["avx512_8x32", "sse_6x8", "no_such_kernel"][r.below(3)].to_string(),
                    _ => *[a, w, out][r.below(3)] = pick(r, nv),
                },
                Step::SpMatMul {
                    a,
                    row_ptr,
                    cols,
                    sparse_rows,
                    block,
                    ..
                } => match r.below(4) {
                    0 => *[a, row_ptr, cols][r.below(3)] = pick(r, nv),
                    1 => *sparse_rows = r.below(8) as u64,
                    2 => *block = [r.below(5) as u64, r.below(5) as u64],
                    _ => *cols = pick(r, nv),
                },
                Step::SpMatMul24 {
                    a,
                    vals,
                    idx,
                    sparse_rows,
                    ..
                } => match r.below(3) {
                    0 => *[a, vals, idx][r.below(3)] = pick(r, nv),
                    1 => *sparse_rows = r.below(8) as u64,
                    _ => *idx = pick(r, nv),
                },
                Step::QMatMul {
                    a,
                    codes,
                    scales,
                    out,
                    group,
                    bits,
                    ..
                } => match r.below(4) {
                    0 => *[a, codes, scales, out][r.below(4)] = pick(r, nv),
                    1 => *group = r.below(300) as u64,
                    2 => *bits = [4, 8, 3][r.below(3)],
                    _ => *scales = pick(r, nv),
                },
                Step::Gather { table, idx, out, .. } => *[table, idx, out][r.below(3)] = pick(r, nv),
                Step::Transpose { x, out, perm } => {
                    if r.below(2) == 0 {
                        *x = pick(r, nv);
                    } else if !perm.is_empty() {
                        let i = r.below(perm.len());
                        perm[i] = r.below(5) as u32;
                    } else {
                        *out = pick(r, nv);
                    }
                }
                Step::Slice { start, axis, .. } => {
                    *start = r.below(100) as u64;
                    *axis = r.below(4) as u32;
                }
                Step::Concat { axis, .. } => *axis = r.below(4) as u32,
                Step::Broadcast { x, .. } => *x = pick(r, nv),
                Step::CacheAppend { x, out, slot, view } => match r.below(4) {
                    0 => *x = pick(r, nv),
                    1 => *out = pick(r, nv),
                    2 => *slot = r.below(4) as u32,
                    _ => *view = !*view,
                },
                Step::Attention {
                    q,
                    k,
                    v,
                    out,
                    kernel_inputs,
                    contiguous,
                    seq_major,
                    logits,
                    ..
                } => match r.below(6) {
                    0 => *[q, k, v, out][r.below(4)] = pick(r, nv),
                    1 if !kernel_inputs.is_empty() => {
                        let i = r.below(kernel_inputs.len());
                        kernel_inputs[i] = if r.below(2) == 0 { None } else { Some(pick(r, nv)) };
                    }
                    2 if !contiguous.is_empty() => {
                        let i = r.below(contiguous.len());
                        contiguous[i] = !contiguous[i];
                    }
                    3 => {
                        let i = r.below(4);
                        seq_major[i] = !seq_major[i];
                    }
                    4 => *logits = Some(r.below(nk + 2) as u32),
                    _ => *out = pick(r, nv),
                },
            }
        }
        3 => {
            let s = r.below(m.steps.len());
            if let Step::Kernel {
                contiguous,
                space,
                kernel,
                ..
            } = &mut m.steps[s]
            {
                match r.below(3) {
                    0 if !contiguous.is_empty() => {
                        let i = r.below(contiguous.len());
                        contiguous[i] = !contiguous[i];
                    }
                    1 if !space.is_empty() => {
                        let i = r.below(space.len());
                        space[i].coeff += 1;
                    }
                    _ => *kernel = r.below(m.kernels.len() + 1) as u32,
                }
            }
        }
        4 => {
            let k = r.below(m.kernels.len().max(1));
            if let Some(k) = m.kernels.get_mut(k) {
                k.offset = r.below(1 << 16) as u64 * 16;
            }
        }
        5 => {
            let a = r.below(m.steps.len());
            let b = r.below(m.steps.len());
            m.steps.swap(a, b);
        }
        6 => {
            let o = r.below(m.outputs.len());
            m.outputs[o].value = pick(r, nv);
        }
        7 => {
            let v = r.below(m.values.len());
            m.values[v].dtype = kiln_ir::DType::ALL[r.below(8)];
        }
        8 => {
            use kiln_ir::Literal;
            let i = r.below(m.inputs.len());
            let lits = [
                Literal::Int(0),
                Literal::Int(-1),
                Literal::Int(i64::MAX),
                Literal::float(0.5),
                Literal::Bool(true),
            ];
            m.inputs[i].default = Some(lits[r.below(lits.len())]);
        }
        _ => {
            let d = r.below(m.dims.len());
            m.dims[d].1 = r.below(3) as u64;
        }
    }
}

/// Damages `tries` copies of `c`'s manifest (one or two field mutations each), loads each and runs
/// it with `run`; panics if any panics. Returns (refused at load, refused at run, ran).
fn damage(c: &kiln_cpu::Compiled, seed: u64, tries: usize, run: impl Fn(&Model) -> bool) -> (usize, usize, usize) {
    let mut r = Rng(seed);
    let (mut refused, mut failed, mut ran) = (0, 0, 0);
    for i in 0..tries {
        let mut m = c.manifest.clone();
        for _ in 0..1 + r.below(2) {
            mutate(&mut m, &mut r);
        }
        let bytes = artifact::encode(&m, &c.weights, &c.code).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| match Model::from_bytes(&bytes) {
            Err(_) => 0,
            Ok(model) if run(&model) => 2,
            Ok(_) => 1,
        }));
        match outcome {
            Ok(0) => refused += 1,
            Ok(1) => failed += 1,
            Ok(_) => ran += 1,
            Err(_) => panic!("mutation {i} panicked the runtime"),
        }
    }
    eprintln!("{refused} refused at load, {failed} refused at run, {ran} ran");
    (refused, failed, ran)
}

#[test]
fn manifests_with_damaged_fields_never_crash() {
    let (_, c) = tiny_gpt2();
    let (refused, failed, _) = damage(&c, 5, 2000, |model| model.run(&ids(2, 7)).is_ok());
    assert!(refused + failed > 1200);
}

/// The same for a decoding artifact (cache steps, in-place cache reads), run through a session.
#[test]
fn damaged_decoding_manifests_never_crash() {
    let (_, c) = tiny_gpt2_with(true);
    assert!(c
        .manifest
        .steps
        .iter()
        .any(|s| matches!(s, Step::CacheAppend { view: true, .. })));
    let (refused, failed, _) = damage(&c, 9, 1500, |model| {
        model
            .session()
            .and_then(|mut s| {
                s.prefill(&[vec![1, 2, 3], vec![4]])?;
                s.step(&[5, 6])
            })
            .is_ok()
    });
    assert!(refused + failed > 800);
}
