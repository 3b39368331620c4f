//! Quantization: the fused dequantizing products against the reference interpreter (every scheme,
//! matrix–vector and tiled paths, decoding too), artifact sizes, and accuracy on the real MiniLM
//! checkpoint against thresholds.

mod common;

use kiln_runtime::Decoder;
use std::collections::BTreeMap;

use common::*;
use kiln_ir::{Op, Tensor};
use kiln_passes::quantize::Scheme;
use kiln_passes::{optimize, OptLevel};
use kiln_runtime::Model;

const GPT2: &[(&str, &str)] = &[
    ("layers", "2"),
    ("hidden", "64"),
    ("heads", "4"),
    ("vocab", "256"),
    ("max_pos", "64"),
];

fn model(l: &kiln_frontend::Lowered, w: &BTreeMap<String, Tensor>) -> (Model, usize) {
    let c = kiln_cpu::compile(&l.graph, w, &l.dims, &kiln_cpu::Options::for_level(2)).unwrap();
    let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    assert!(
        c.manifest.steps.iter().all(|s| !matches!(
            s,
            kiln_runtime::plan::Step::Fallback {
                op: Op::Dequantize { .. },
                ..
            }
        )),
        "a dequantized weight was materialised"
    );
    (Model::from_bytes(&bytes).unwrap(), c.weights.len())
}

fn ids(b: usize, s: usize, seed: usize) -> Vec<Vec<i64>> {
    (0..b)
        .map(|r| {
            (0..s)
                .map(|j| ((r * 31 + j * 17 + seed * 7) % 255 + 1) as i64)
                .collect()
        })
        .collect()
}

/// The compiled quantized model equals the interpreter on the quantized graph: the kernels
/// dequantize exactly what `Dequantize` means, for 1–4 rows (matrix–vector) and more (tiles).
/// With int8 activations (the runtime's default for 1–4 rows on AVX2; `q8.rs` bounds each
/// product's error by the activation step), the few-row shapes move by no more than the weight
/// quantization itself moved the outputs (measured: 0.99–1.30× for int8, 0.15–0.25× for 4 bits),
/// and the tiled shapes not at all.
#[test]
fn quantized_products_match_the_interpreter() {
    let calib = ids(4, 12, 1);
    for scheme in ["int8", "int4:32", "int4:64", "gptq4:32"] {
        let scheme: Scheme = scheme.parse().unwrap();
        let mut l = spec("gpt2.ron", GPT2);
        let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
        optimize(&mut l.graph, OptLevel::O2, true).unwrap();
        let (g0, w0) = (l.graph.clone(), w.clone());
        let r = kiln_cpu::quant::quantize(&mut l.graph, &mut w, &l.dims, scheme, &[], &calib).unwrap();
        assert_eq!(r.quantized.len(), 9, "{scheme}: {:?}", r.skipped);
        let (mut m, _) = model(&l, &w);
        for (b, s) in [(1, 1), (1, 3), (2, 2), (3, 7)] {
            let feed = kiln_cpu::quant::feed(&l.graph, &ids(b, s, 3)).unwrap();
            let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
            m.set_int8_activations(false);
            let got = m.run(&feed).unwrap();
            let e = got[0].1.max_abs_diff(&want[0].1).unwrap();
            assert!(
                e <= 1e-4,
                "{scheme} at {b}x{s}: compiled differs from the interpreter by {e:e}"
            );
            m.set_int8_activations(true);
            let got = m.run(&feed).unwrap();
            let e = got[0].1.max_abs_diff(&want[0].1).unwrap();
            let weights = kiln_interp::run(&g0, &w0, &feed).unwrap()[0]
                .1
                .max_abs_diff(&want[0].1)
                .unwrap();
            let limit = if b * s <= 4 { 1.5 * weights } else { 1e-4 };
            eprintln!(
                "{scheme} at {b}x{s}: int8 activations move the outputs by {e:.2e}, weight quantization by {weights:.2e}"
            );
            assert!(
                e <= limit,
                "{scheme} at {b}x{s}: with int8 activations, compiled differs from the interpreter by {e:e} (limit {limit:e})"
            );
        }
    }
}

/// `--int8-prefill` (VNNI): prefill-sized products quantize their activations too, and move the
/// outputs by no more than the weight quantization did (the same bound as the few-row path); without
/// VNNI on this CPU it cannot run, and says so.
#[test]
fn integer_prefills_stay_within_the_weight_error() {
    let vnni = kiln_runtime::cpu::Vnni::host(kiln_runtime::cpu::Level::host());
    if vnni == kiln_runtime::cpu::Vnni::None {
        eprintln!("SKIPPED: this CPU has neither AVX-512 VNNI nor AVX-VNNI; --int8-prefill is not tested here");
        return;
    }
    let calib = ids(4, 12, 1);
    for scheme in ["int8", "int4:32", "gptq4:64"] {
        let scheme: Scheme = scheme.parse().unwrap();
        let mut l = spec("gpt2.ron", GPT2);
        let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
        optimize(&mut l.graph, OptLevel::O2, true).unwrap();
        let (g0, w0) = (l.graph.clone(), w.clone());
        kiln_cpu::quant::quantize(&mut l.graph, &mut w, &l.dims, scheme, &[], &calib).unwrap();
        let opts = kiln_cpu::Options {
            int8_prefill: true,
            ..kiln_cpu::Options::for_level(2)
        };
        let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &opts).unwrap();
        assert!(c.manifest.target.int8_prefill && c.manifest.target.features.iter().any(|f| f.contains("vnni")));
        let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
        let mut m = Model::from_bytes(&bytes).unwrap();
        for (b, s) in [(3, 7), (2, 40)] {
            let feed = kiln_cpu::quant::feed(&l.graph, &ids(b, s, 3)).unwrap();
            let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
            let weights = kiln_interp::run(&g0, &w0, &feed).unwrap()[0]
                .1
                .max_abs_diff(&want[0].1)
                .unwrap();
            let e = m.run(&feed).unwrap()[0].1.max_abs_diff(&want[0].1).unwrap();
            eprintln!("{scheme} at {b}x{s}: integer prefill moves the outputs by {e:.2e}, weight quantization by {weights:.2e}");
            assert!(
                e > 0.0 && e <= 1.5 * weights,
                "{scheme} at {b}x{s}: {e:e} vs weights' {weights:e}"
            );
            // The switch restores the exact path.
            m.set_int8_activations(false);
            let e = m.run(&feed).unwrap()[0].1.max_abs_diff(&want[0].1).unwrap();
            assert!(e <= 1e-4, "{scheme} at {b}x{s}: exact path off by {e:e}");
            m.set_int8_activations(true);
        }
    }
}

/// Decoding with quantized weights: the compiled session against the interpreter step by step.
#[test]
fn quantized_decoding_matches_the_interpreter() {
    let mut l = spec_with("gpt2.ron", GPT2, true);
    let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    kiln_cpu::quant::quantize(
        &mut l.graph,
        &mut w,
        &l.dims,
        Scheme::Int4 { group: 32 },
        &["wte*".into()],
        &[],
    )
    .unwrap();
    // The kernels' exact path; the integer one (int8 activations) is checked by
    // `quantized_products_match_the_interpreter` and, through decoding sessions, by
    // `decoder_report_has_kl_and_perplexity`.
    let (mut m, _) = model(&l, &w);
    m.set_int8_activations(false);
    let mut s = m.session().unwrap();
    let mut feed = kiln_runtime::Feed::new("input_ids", 64);
    let mut cache = kiln_interp::KvCache::default();
    let tokens = [5i64, 9, 200, 17, 3, 64];
    let mut got = s.prefill(&[tokens[..2].to_vec()]).unwrap();
    let mut inputs = feed.prefill(&[tokens[..2].to_vec()]).unwrap();
    for next in &tokens[2..] {
        let want = kiln_interp::run_with_cache(&l.graph, &w, &inputs, &mut cache).unwrap();
        let wv: Vec<f64> = want[0].1.to_f64_vec();
        let e = got[0]
            .iter()
            .zip(&wv)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(e <= 1e-4, "decode step differs by {e:e}");
        got = s.step(&[*next]).unwrap();
        inputs = feed.step(&[*next]).unwrap();
    }
}

fn minilm_samples() -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let tok = std::fs::read_to_string(minilm_dir().join("tokenizer.json")).unwrap();
    let mut t = tokenizers::Tokenizer::from_bytes(tok.as_bytes()).unwrap();
    t.with_padding(None);
    t.with_truncation(None).unwrap();
    let text = std::fs::read_to_string(root().join("specs/data/calibration.txt")).unwrap();
    let rows: Vec<Vec<i64>> = text
        .lines()
        .map(|l| t.encode(l, true).unwrap().get_ids().iter().map(|i| *i as i64).collect())
        .collect();
    let held = rows.len() / 4;
    let (c, h) = rows.split_at(rows.len() - held);
    (c.to_vec(), h.to_vec())
}

/// The real MiniLM: sentence-embedding cosine to f32 on held-out sentences, artifact sizes, and
/// GPTQ against round-to-nearest at the same group size.
#[test]
fn minilm_quantization_accuracy() {
    let (calib, held) = minilm_samples();
    let base = spec("minilm.ron", &[]);
    let w0 = kiln_frontend::weights::load_safetensors(&base, &minilm_dir().join("model.safetensors")).unwrap();
    let mut g0 = base.clone();
    optimize(&mut g0.graph, OptLevel::O2, true).unwrap();
    let (_, f32_bytes) = model(&g0, &w0);
    let mut cos = BTreeMap::new();
    for scheme in ["int8", "int4:128", "gptq4:128"] {
        let mut l = g0.clone();
        let mut w = w0.clone();
        let r = kiln_cpu::quant::quantize(&mut l.graph, &mut w, &l.dims, scheme.parse().unwrap(), &[], &calib).unwrap();
        // Quantized products store about a quarter (int8) or an eighth (int4) of their f32 bytes.
        let ratio = r.bytes.1 as f64 / r.bytes.0 as f64;
        let (_, bytes) = model(&l, &w);
        eprintln!(
            "{scheme}: quantized weights {:.3} of f32; artifact weights {bytes} vs {f32_bytes}",
            ratio
        );
        let want = if scheme == "int8" { 0.25..0.254 } else { 0.13..0.135 };
        assert!(want.contains(&ratio), "{scheme}: size ratio {ratio}");
        let acc = kiln_cpu::quant::evaluate((&g0.graph, &w0), (&l.graph, &w), &l.dims, &held, false).unwrap();
        let e = acc.outputs.iter().find(|o| o.name == "sentence_embedding").unwrap();
        eprintln!(
            "{scheme}: sentence embedding cosine mean {:.5} min {:.5}",
            e.mean_cos, e.min_cos
        );
        cos.insert(scheme, e.mean_cos);
    }
    assert!(cos["int8"] >= 0.999, "int8: {}", cos["int8"]);
    assert!(
        cos["gptq4:128"] > cos["int4:128"],
        "GPTQ is not better than round-to-nearest: {cos:?}"
    );
    // The thresholds: int8 >= 0.999, int4 g128 >= 0.99 (measured 0.9918 with GPTQ on the 139
    // held-out lines, 0.9928 on their 116 sentences, 0.9867 on their 23 short queries);
    // round-to-nearest int4 is only guarded against regressions.
    assert!(cos["int4:128"] >= 0.95, "int4: {}", cos["int4:128"]);
    assert!(cos["gptq4:128"] >= 0.99, "gptq4: {}", cos["gptq4:128"]);
}

/// Pruned weights in CSR: the compiled products (sparse kernel and densified tiles) equal the
/// interpreter on the pruned graph, for every pattern.
#[test]
fn sparse_products_match_the_interpreter() {
    use kiln_passes::sparsity::{apply, Encoding, Pattern};
    for (pattern, rows, block) in [
        ("0.9", u64::MAX, [1, 1]),
        ("2:4", 0, [1, 1]),
        ("block:16x16:0.5", 4, [1, 1]),
        ("block:16x16:0.5", u64::MAX, [16, 16]),
        ("block:8x4:0.75", u64::MAX, [8, 4]),
        ("block:32x8:0.5", 0, [32, 8]),
        ("block:4x4:0.5", u64::MAX, [4, 4]),
        ("block:16x8:0.5", 2, [16, 8]),
        ("2:4", u64::MAX, [0, 0]),
        ("2:4", 2, [0, 0]),
    ] {
        let pattern: Pattern = pattern.parse().unwrap();
        let mut l = spec("gpt2.ron", GPT2);
        let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
        optimize(&mut l.graph, OptLevel::O2, true).unwrap();
        let (targets, _) = kiln_passes::quantize::targets(&l.graph, &[]);
        // Block [0, 0] stands for packed 2:4.
        let mut choose = |_: &str, _: &[f32], _: usize, _: usize| {
            let e = if block == [0, 0] {
                Encoding::TwoFour { sparse_rows: rows }
            } else {
                Encoding::Csr {
                    sparse_rows: rows,
                    block,
                }
            };
            (vec![(e, 0.0)], String::new())
        };
        let r = apply(&mut l.graph, &mut w, &targets, pattern, &mut choose).unwrap();
        assert_eq!(r.pruned.len(), 9, "{pattern}: {:?}", r.skipped);
        kiln_ir::verify(&l.graph).unwrap();
        let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(2)).unwrap();
        assert_eq!(
            c.manifest
                .steps
                .iter()
                .filter(|s| matches!(
                    s,
                    kiln_runtime::plan::Step::SpMatMul { .. } | kiln_runtime::plan::Step::SpMatMul24 { .. }
                ))
                .count(),
            9
        );
        let (m, _) = model(&l, &w);
        for (b, s) in [(1, 1), (1, 3), (2, 5)] {
            let feed = kiln_cpu::quant::feed(&l.graph, &ids(b, s, 2)).unwrap();
            let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
            let got = m.run(&feed).unwrap();
            let e = got[0].1.max_abs_diff(&want[0].1).unwrap();
            assert!(
                e <= 1e-4,
                "{pattern} (sparse up to {rows} rows) at {b}x{s}: differs by {e:e}"
            );
        }
    }
}

/// A CSR weight whose column index is out of range is an error at run time, not a wild read.
#[test]
fn corrupt_csr_indices_are_refused() {
    use kiln_passes::sparsity::{apply, Encoding, Pattern};
    let mut l = spec("gpt2.ron", GPT2);
    let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    let (targets, _) = kiln_passes::quantize::targets(&l.graph, &[]);
    let mut choose = |_: &str, _: &[f32], _: usize, _: usize| {
        (
            vec![(
                Encoding::Csr {
                    sparse_rows: u64::MAX,
                    block: [1, 1],
                },
                0.0,
            )],
            String::new(),
        )
    };
    apply(&mut l.graph, &mut w, &targets, Pattern::Unstructured(0.5), &mut choose).unwrap();
    let name = w.keys().find(|k| k.ends_with(".sparse.cols")).unwrap().clone();
    let t = &w[&name];
    let mut v = t.to_f64_vec();
    v[3] = 1e6;
    w.insert(name, Tensor::from_f64(t.dtype(), t.shape().to_vec(), &v).unwrap());
    let (m, _) = model(&l, &w);
    let feed = kiln_cpu::quant::feed(&l.graph, &ids(1, 2, 0)).unwrap();
    let e = m.run(&feed).unwrap_err().to_string();
    assert!(e.contains("CSR column index"), "{e}");
}

/// A packed 2:4 weight whose offsets byte does not name two increasing columns is refused at load.
#[test]
fn corrupt_24_offsets_are_refused() {
    use kiln_passes::sparsity::{apply, Encoding, Pattern};
    let mut l = spec("gpt2.ron", GPT2);
    let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    let (targets, _) = kiln_passes::quantize::targets(&l.graph, &[]);
    let mut choose =
        |_: &str, _: &[f32], _: usize, _: usize| (vec![(Encoding::TwoFour { sparse_rows: 4 }, 0.0)], String::new());
    apply(&mut l.graph, &mut w, &targets, Pattern::TwoFour, &mut choose).unwrap();
    let name = w.keys().find(|k| k.ends_with(".sparse.idx24")).unwrap().clone();
    let t = &w[&name];
    let mut v = t.to_f64_vec();
    v[5] = (2 | 1 << 2) as f64; // offsets 2 then 1: not increasing
    w.insert(name, Tensor::from_f64(t.dtype(), t.shape().to_vec(), &v).unwrap());
    let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(2)).unwrap();
    let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    let e = Model::from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("2:4 offsets byte 5 is 6"), "{e}");
}

/// GPT-2-style models get next-token KL and perplexity (teacher forcing through a decoding
/// session) on bundled text.
#[test]
fn decoder_report_has_kl_and_perplexity() {
    let text = std::fs::read_to_string(root().join("specs/data/calibration.txt")).unwrap();
    // The byte tokenizer of the tiny models: id = byte.
    let samples: Vec<Vec<i64>> = text
        .lines()
        .take(8)
        .map(|l| l.bytes().take(40).map(|b| b as i64).collect())
        .collect();
    let mut l = spec_with("gpt2.ron", GPT2, true);
    let w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    let (g0, w0) = (l.graph.clone(), w.clone());
    let mut w = w;
    kiln_cpu::quant::quantize(&mut l.graph, &mut w, &l.dims, Scheme::Int8, &[], &[]).unwrap();
    let acc = kiln_cpu::quant::evaluate((&g0, &w0), (&l.graph, &w), &l.dims, &samples, false).unwrap();
    let lm = acc.lm.expect("a language model report");
    eprintln!(
        "int8 tiny GPT-2: KL {:.2e}, perplexity {:.3} vs {:.3}",
        lm.kl, lm.ppl_quantized, lm.ppl_f32
    );
    assert_eq!(lm.tokens, samples.iter().map(Vec::len).sum::<usize>());
    assert!(lm.kl >= 0.0 && lm.kl < 1e-3, "KL {}", lm.kl);
    assert!((lm.ppl_quantized / lm.ppl_f32 - 1.0).abs() < 0.01);
}

/// Pruning whole weight columns (blocks as tall as the matrix) leaves features nothing reads: the
/// product that makes them and the one that reads them both shrink, with the same outputs.
#[test]
fn zero_columns_shrink_the_neighbouring_products() {
    use kiln_passes::sparsity::{apply, Encoding, Pattern};
    let mut l = spec("gpt2.ron", GPT2);
    let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    let (targets, _) = kiln_passes::quantize::targets(&l.graph, &[]);
    let pattern: Pattern = "block:64x8:0.5".parse().unwrap();
    let mut choose = |_: &str, _: &[f32], _: usize, _: usize| (vec![(Encoding::Dense, 0.0)], String::new());
    // The pruned graph before shrinking, as the reference.
    let mut reference = l.clone();
    let mut rw = w.clone();
    apply(&mut reference.graph, &mut rw, &targets, pattern, &mut choose).unwrap();
    let r = apply(&mut l.graph, &mut w, &targets, pattern, &mut choose).unwrap();
    eprintln!("{:?}", r.shrunk);
    assert!(
        r.shrunk
            .iter()
            .any(|(name, before, after)| name.contains("mlp") && *before == 256 && *after < 256),
        "{:?}",
        r.shrunk
    );
    kiln_ir::verify(&l.graph).unwrap();
    let widths: Vec<String> = l
        .graph
        .node_ids()
        .filter(|n| matches!(l.graph.node(*n).op, Op::MatMul { .. }) && l.graph.node(*n).name.contains("fc"))
        .map(|n| l.graph.node(n).ty.to_string())
        .collect();
    assert!(widths.iter().all(|t| !t.ends_with(", 256]")), "{widths:?}");
    for (b, s) in [(1, 4), (2, 3)] {
        let feed = kiln_cpu::quant::feed(&l.graph, &ids(b, s, 5)).unwrap();
        let want = kiln_interp::run(&reference.graph, &rw, &feed).unwrap();
        let got = kiln_interp::run(&l.graph, &w, &feed).unwrap();
        let e = got[0].1.max_abs_diff(&want[0].1).unwrap();
        assert!(e <= 1e-5, "shrinking changed the outputs by {e:e}");
        let (m, _) = model(&l, &w);
        let c = m.run(&feed).unwrap();
        assert!(c[0].1.max_abs_diff(&want[0].1).unwrap() <= 1e-4);
    }
}

/// With measured forms, each product's f32, int8 and int4 forms share its e-class and extraction
/// keeps the one with the least time: given times that favour a different form per kind of
/// product, every product gets its own, the forms not kept leave the graph and the weights, and
/// the compiled model equals the interpreter on the chosen graph.
#[test]
fn extraction_keeps_the_fastest_weight_form() {
    use kiln_passes::quantize::{apply, targets, Choice};
    let mut l = spec("gpt2.ron", GPT2);
    let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    let (ts, _) = targets(&l.graph, &[]);
    // Wide outputs (the MLP's first product, the merged projection, the LM head) favour int4,
    // wide inputs (the MLP's second product) int8, square ones f32.
    let mut time = |kernel: &str, n: usize, k: usize| -> Option<f64> {
        let best = if n > k {
            "int4:32"
        } else if k > n {
            "int8"
        } else {
            "f32"
        };
        Some(if kernel == best { 1.0 } else { 2.0 })
    };
    let scheme: Scheme = "int4:32".parse().unwrap();
    let r = apply(&mut l.graph, &mut w, &ts, scheme, None, Choice::Measured(&mut time)).unwrap();
    assert_eq!(r.forms.len(), ts.len(), "{:?}", r.skipped);
    for (t, (name, form, why)) in ts.iter().zip(&r.forms) {
        let want = if t.n > t.k {
            "int4:32"
        } else if t.k > t.n {
            "int8"
        } else {
            "f32"
        };
        assert_eq!((name, form.as_str()), (&t.name, want), "{why}");
    }
    assert!(!r.kept.is_empty() && r.quantized.iter().any(|q| q.4 == "int8"));
    assert!(r.quantized.iter().any(|q| q.4 == "int4:32"));
    kiln_ir::verify(&l.graph).unwrap();
    // Only the kept forms' weights remain, and every remaining weight is a parameter of the graph.
    let params: std::collections::BTreeSet<String> = l
        .graph
        .node_ids()
        .filter_map(|n| match &l.graph.node(n).op {
            Op::Param { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(params, w.keys().cloned().collect());
    let dequantized = l
        .graph
        .node_ids()
        .filter(|n| matches!(l.graph.node(*n).op, Op::Dequantize { .. }))
        .count();
    assert_eq!(dequantized, r.quantized.len());
    let (m, _) = model(&l, &w);
    let feed = kiln_cpu::quant::feed(&l.graph, &ids(2, 5, 4)).unwrap();
    let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
    let e = m.run(&feed).unwrap()[0].1.max_abs_diff(&want[0].1).unwrap();
    assert!(e <= 1e-4, "compiled differs from the interpreter by {e:e}");
}

/// Sparse encodings as forms: the chooser's measured candidates join the product's e-class and
/// the cheapest is kept, per product.
#[test]
fn extraction_keeps_the_fastest_sparse_encoding() {
    use kiln_passes::sparsity::{apply, Encoding, Pattern};
    let mut l = spec("gpt2.ron", GPT2);
    let mut w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors")).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    let (targets, _) = kiln_passes::quantize::targets(&l.graph, &[]);
    let csr = Encoding::Csr {
        sparse_rows: u64::MAX,
        block: [1, 1],
    };
    let two_four = Encoding::TwoFour { sparse_rows: u64::MAX };
    // Dense is dearest for the MLP, packed 2:4 cheapest for the attention products.
    let mut choose = |name: &str, _: &[f32], _: usize, _: usize| {
        let (d, c, t) = if name.contains("mlp") {
            (3.0, 1.0, 2.0)
        } else {
            (2.0, 3.0, 1.0)
        };
        (
            vec![(Encoding::Dense, d), (csr.clone(), c), (two_four.clone(), t)],
            String::new(),
        )
    };
    let r = apply(&mut l.graph, &mut w, &targets, Pattern::TwoFour, &mut choose).unwrap();
    assert_eq!(r.pruned.len(), targets.len());
    for p in &r.pruned {
        let want = if p.0.contains("mlp") { &csr } else { &two_four };
        assert_eq!(&p.5, want, "{}", p.0);
    }
    assert!(r.pruned.iter().any(|p| p.5 == csr) && r.pruned.iter().any(|p| p.5 == two_four));
    kiln_ir::verify(&l.graph).unwrap();
    let (m, _) = model(&l, &w);
    let feed = kiln_cpu::quant::feed(&l.graph, &ids(1, 6, 2)).unwrap();
    let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
    let e = m.run(&feed).unwrap()[0].1.max_abs_diff(&want[0].1).unwrap();
    assert!(e <= 1e-4, "compiled differs from the interpreter by {e:e}");
}
