//! Whole CUDA plans on kiln's GPU emulator: `kiln_runtime::cuda::CudaModel::emulated` runs the
//! runtime exactly as on a GPU — memory plan, row offsets tables, GEMM argument packing, attention
//! strides, cache views and appends, quantized and sparse weights, host fallbacks — but each launch
//! goes to `tests/emulate.py`, which interprets the kernels' MLIR thread by thread and checks every
//! memory access against its buffer. Outputs are compared with the reference interpreter.
//!
//! The models are tiny (the emulator runs a few thousand GPU threads per second); the kernels
//! themselves are tested on their own, on larger shapes, in `kernels.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_frontend::{Lowered, Options};
use kiln_ir::Tensor;
use kiln_passes::OptLevel;
use kiln_runtime::cuda::CudaModel;
use kiln_runtime::{Decoder, Feed};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The emulator script, if python3 can run it (CI sets KILN_REQUIRE_EMULATOR: no silent skip).
fn emulator() -> Option<PathBuf> {
    let ok = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("KILN_REQUIRE_EMULATOR").is_none(),
            "no python3 for the GPU emulator"
        );
        eprintln!("skipped: no python3");
        return None;
    }
    Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/emulate.py"))
}

fn load(spec: &str, set: &[(&str, &str)], decode: bool, level: OptLevel) -> Lowered {
    let opts = Options {
        overrides: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        weight_prefix: None,
        decode,
    };
    let mut l = kiln_frontend::load(&root().join("specs").join(spec), &opts).unwrap_or_else(|e| panic!("{e}"));
    kiln_passes::optimize(&mut l.graph, level, true).unwrap();
    l
}

fn emulated(l: &Lowered, w: &BTreeMap<String, Tensor>, level: OptLevel, script: &std::path::Path) -> CudaModel {
    let opts = kiln_cpu::Options::for_level(if level == OptLevel::O0 { 0 } else { 2 });
    let (planned, mlir) = kiln_cuda::plan_mlir(&l.graph, w, &l.dims, &opts).unwrap();
    // The emulated device has the sm_90a kernels too (a GPU has them on compute capability 9.0).
    let mlir = mlir + &kiln_cuda::emit::wgmma_module();
    CudaModel::emulated(&planned.manifest, planned.weights, &mlir, script).unwrap_or_else(|e| panic!("{e}"))
}

/// Largest difference, relative to the reference's largest magnitude (at least 1).
fn rel_diff(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f64, |a, b| a.max(b.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale
}

fn ids(b: usize, s: usize, seed: usize, vocab: usize) -> Vec<Vec<i64>> {
    (0..b)
        .map(|r| {
            (0..s)
                .map(|j| ((r * 31 + j * 17 + seed * 7) % (vocab - 1) + 1) as i64)
                .collect()
        })
        .collect()
}

const MINILM: &[(&str, &str)] = &[
    ("layers", "1"),
    ("vocab", "60"),
    ("hidden", "32"),
    ("heads", "2"),
    ("ffn", "40"),
];
const GPT2: &[(&str, &str)] = &[
    ("layers", "1"),
    ("vocab", "60"),
    ("hidden", "32"),
    ("heads", "2"),
    ("max_pos", "16"),
];
const LLAMA: &[(&str, &str)] = &[
    ("layers", "1"),
    ("vocab", "60"),
    ("hidden", "32"),
    ("heads", "4"),
    ("kv_heads", "2"),
    ("ffn", "40"),
    ("max_pos", "16"),
];

/// An encoder with a padding mask (attention's mask prologue, gathers, layer norms, GELU) at -O0
/// and -O2, every output against the interpreter.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn minilm_runs_on_the_emulated_gpu() {
    let Some(script) = emulator() else { return };
    for level in [OptLevel::O2, OptLevel::O0] {
        let l = load("minilm.ron", MINILM, false, level);
        let w = kiln_frontend::weights::random(&l, 3);
        let model = emulated(&l, &w, level, &script);
        let (b, s) = (2, 5);
        let mut feed = kiln_cpu::quant::feed(&l.graph, &ids(b, s, 1, 60)).unwrap();
        // The second row is padded after 3 tokens.
        let mask: Vec<f64> = (0..b * s).map(|i| if i >= s + 3 { 0.0 } else { 1.0 }).collect();
        feed.insert(
            "attention_mask".into(),
            Tensor::from_f64(kiln_ir::DType::I64, vec![b, s], &mask).unwrap(),
        );
        let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
        let got = model.run(&feed).unwrap_or_else(|e| panic!("{level:?}: {e}"));
        assert_eq!(got.len(), want.len());
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            assert_eq!(g.shape(), w.shape(), "{level:?} {name}");
            let e = rel_diff(&g.to_f64_vec(), &w.to_f64_vec());
            eprintln!("minilm {level:?} {name}: relative difference {e:.2e}");
            assert!(e <= 1e-5, "minilm {level:?} {name}: {e:e}");
        }
        // Given input_ids only: attention_mask and token_type_ids take their defaults.
        feed.retain(|k, _| k == "input_ids");
        let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
        let got = model.run(&feed).unwrap_or_else(|e| panic!("{level:?}, defaults: {e}"));
        let e = rel_diff(&got[0].1.to_f64_vec(), &want[0].1.to_f64_vec());
        eprintln!("minilm {level:?}, optional inputs left out: relative difference {e:.2e}");
        assert!(e <= 1e-5, "minilm {level:?}, defaults: {e:e}");
    }
}

/// Decoding with the key/value cache on the (emulated) GPU: a batch of two prompts, then steps,
/// each step's logits against the interpreter with its own cache. GPT-2 (learned positions, GELU)
/// and Llama (rotary positions, grouped-query attention, SiLU gate, RMS norm), Mistral (Llama
/// with a sliding window) and Mixtral (Llama with a mixture of 4 experts, top 2, in place of the
/// MLP: routed on the host).
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn decoders_generate_on_the_emulated_gpu() {
    let Some(script) = emulator() else { return };
    // Mistral: Llama's shape with a sliding window of 2, shorter than the prompts and the steps.
    let mistral: Vec<(&str, &str)> = LLAMA.iter().copied().chain([("window", "2")]).collect();
    let mixtral: Vec<(&str, &str)> = LLAMA.iter().copied().chain([("experts", "4")]).collect();
    let decoders = [
        ("gpt2.ron", GPT2),
        ("llama.ron", LLAMA),
        ("mistral.ron", &mistral),
        ("mixtral.ron", &mixtral),
    ];
    for (spec, set) in decoders {
        let l = load(spec, set, true, OptLevel::O2);
        let w = kiln_frontend::weights::random(&l, 5);
        let model = emulated(&l, &w, OptLevel::O2, &script);
        let next = |step: usize| (0..2).map(|r| ((step * 13 + r * 7) % 59 + 1) as i64).collect();
        let len = decode_against_interpreter(&model, (&l, &w), &ids(2, 3, 2, 60), next, 1e-5, spec);
        assert_eq!(len, 6);
    }
}

/// Prefills `prompts` on a session of `model`, then takes three decode steps (`next(step)`'s
/// tokens); the logits of the prefill and of each step against the interpreter with its own
/// cache, within `tol` relative. Returns the session's length.
fn decode_against_interpreter(
    model: &CudaModel,
    (l, w): (&Lowered, &BTreeMap<String, Tensor>),
    prompts: &[Vec<i64>],
    next: impl Fn(usize) -> Vec<i64>,
    tol: f64,
    label: &str,
) -> usize {
    let mut session = model.session().unwrap();
    let mut feed = Feed::new("input_ids", session.capacity());
    let mut cache = kiln_interp::KvCache::default();
    let mut got = session
        .prefill(prompts)
        .unwrap_or_else(|e| panic!("{label} prefill: {e}"));
    let mut inputs = feed.prefill(prompts).unwrap();
    for step in 0..3 {
        let want = kiln_interp::run_with_cache(&l.graph, w, &inputs, &mut cache).unwrap();
        let wv = want[0].1.to_f64_vec();
        let gv: Vec<f64> = got.iter().flatten().map(|x| *x as f64).collect();
        let e = rel_diff(&gv, &wv);
        eprintln!("{label} step {step}: relative difference {e:.2e}");
        assert!(e <= tol, "{label} step {step}: {e:e}");
        let next = next(step);
        got = session
            .step(&next)
            .unwrap_or_else(|e| panic!("{label} step {step}: {e}"));
        inputs = feed.step(&next).unwrap();
    }
    session.len()
}

/// Every output of `model` against the interpreter on `feed`: the largest difference relative to
/// the reference's largest magnitude, and the relative L2 error.
fn compare(
    model: &CudaModel,
    l: &Lowered,
    w: &BTreeMap<String, Tensor>,
    feed: &BTreeMap<String, Tensor>,
) -> (f64, f64) {
    let want = kiln_interp::run(&l.graph, w, feed).unwrap();
    let got = model.run(feed).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), want.len());
    let (mut worst, mut l2) = (0.0f64, 0.0f64);
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert_eq!(g.shape(), w.shape(), "{name}");
        let (gv, wv) = (g.to_f64_vec(), w.to_f64_vec());
        worst = worst.max(rel_diff(&gv, &wv));
        let num: f64 = gv.iter().zip(&wv).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f64 = wv.iter().map(|b| b * b).sum();
        l2 = l2.max((num / den.max(1e-30)).sqrt());
    }
    (worst, l2)
}

/// Weight-only int8 and int4 products (`QMatMul`: codes, scales, minimums) and pruned weights
/// (block CSR and packed 2:4, densified at load) through the runtime's argument packing.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn quantized_and_sparse_weights_on_the_emulated_gpu() {
    use kiln_passes::quantize::Scheme;
    use kiln_passes::sparsity::{apply, Encoding, Pattern};
    let Some(script) = emulator() else { return };
    let feed_ids = ids(2, 5, 4, 60);
    for variant in ["int8", "int4:32", "csr 0.5", "block 8x8 0.5", "2:4"] {
        let mut l = load("gpt2.ron", GPT2, false, OptLevel::O2);
        let mut w = kiln_frontend::weights::random(&l, 7);
        if let Ok(scheme) = variant.parse::<Scheme>() {
            let r = kiln_cpu::quant::quantize(&mut l.graph, &mut w, &l.dims, scheme, &[], &[]).unwrap();
            assert!(!r.quantized.is_empty(), "{variant}: nothing quantized");
        } else {
            let (pattern, encoding) = match variant {
                "csr 0.5" => (
                    Pattern::Unstructured(0.5),
                    Encoding::Csr {
                        sparse_rows: u64::MAX,
                        block: [1, 1],
                    },
                ),
                "block 8x8 0.5" => (
                    "block:8x8:0.5".parse().unwrap(),
                    Encoding::Csr {
                        sparse_rows: u64::MAX,
                        block: [8, 8],
                    },
                ),
                _ => (Pattern::TwoFour, Encoding::TwoFour { sparse_rows: u64::MAX }),
            };
            let (targets, _) = kiln_passes::quantize::targets(&l.graph, &[]);
            let mut choose = |_: &str, _: &[f32], _: usize, _: usize| (vec![(encoding.clone(), 0.0)], String::new());
            let r = apply(&mut l.graph, &mut w, &targets, pattern, &mut choose).unwrap();
            assert!(!r.pruned.is_empty(), "{variant}: nothing pruned");
        }
        let model = emulated(&l, &w, OptLevel::O2, &script);
        // 10 rows (tiled GEMMs) and 3 rows (matrix–vector kernels).
        for rows in [feed_ids.clone(), ids(1, 3, 5, 60)] {
            let feed = kiln_cpu::quant::feed(&l.graph, &rows).unwrap();
            let (e, _) = compare(&model, &l, &w, &feed);
            eprintln!(
                "gpt2 {variant} {}x{}: relative difference {e:.2e}",
                rows.len(),
                rows[0].len()
            );
            assert!(e <= 1e-5, "gpt2 {variant}: {e:e}");
        }
    }
}

/// Products of 32 rows or more run on the tensor-core kernels (bf16 operands, f32 accumulation):
/// within bf16's rounding of the interpreter, and exact again with tensor cores off. Products by a
/// weight take `to_bf16` + `gemm_bf16` (the weight's bf16 copy made at first use). Partial tiles in every direction and rows padded to 8 (hidden 36, ffn
/// 70, 2x20 rows).
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn tensor_core_products_on_the_emulated_gpu() {
    let Some(script) = emulator() else { return };
    let set: &[(&str, &str)] = &[
        ("layers", "1"),
        ("vocab", "60"),
        ("hidden", "36"),
        ("heads", "2"),
        ("ffn", "70"),
    ];
    let l = load("minilm.ron", set, false, OptLevel::O2);
    let w = kiln_frontend::weights::random(&l, 9);
    let mut model = emulated(&l, &w, OptLevel::O2, &script);
    let feed = kiln_cpu::quant::feed(&l.graph, &ids(2, 20, 5, 60)).unwrap();
    model.set_tensor_cores(true);
    model.set_fused_attention(false);
    let (e, l2) = compare(&model, &l, &w, &feed);
    let runs = model.launch_counts();
    eprintln!("minilm, tensor cores: relative difference {e:.2e}, relative L2 {l2:.2e}; launches {runs:?}");
    // bf16 operands move the outputs by about 1e-3: proof the tensor-core kernels ran.
    assert!(l2 <= 1e-2 && e > 1e-5, "tensor cores: relative L2 {l2:e}, max {e:e}");
    // The products by weights (-O2 merges Q, K and V into one): 4 on 40 rows. Attention's two
    // products have 20 rows per head, too few for tensor cores.
    assert_eq!(runs.get("gemm_bf16"), Some(&4), "{runs:?}");
    assert_eq!(runs.get("to_bf16"), Some(&4), "{runs:?}");
    assert_eq!(runs.get("gemm_f32"), Some(&2), "{runs:?}");
    // A run that leaves its outputs on the device launches the same kernels.
    model.run_on_device(&feed).unwrap();
    assert_eq!(model.launch_counts().get("gemm_bf16"), Some(&8));
    // Profiling times every launch (and restarts the counts).
    model.set_profiling(true);
    model.run(&feed).unwrap();
    model.set_profiling(false);
    let stats = model.kernel_stats();
    let bf = stats["gemm_bf16"];
    assert!(bf.launches == 4 && bf.seconds > 0.0, "{stats:?}");
    // Hopper's warpgroup MMA instead (opt-in): the same products through gemm_wgmma.
    assert!(model.set_wgmma(true));
    let (e, l2) = compare(&model, &l, &w, &feed);
    let runs = model.kernel_stats();
    eprintln!("minilm, wgmma: relative difference {e:.2e}, relative L2 {l2:.2e}");
    assert!(l2 <= 1e-2 && e > 1e-5, "wgmma: relative L2 {l2:e}, max {e:e}");
    assert_eq!(runs.get("gemm_wgmma").map(|s| s.launches), Some(4), "{runs:?}");
    model.set_wgmma(false);
    model.set_tensor_cores(false);
    let (e, _) = compare(&model, &l, &w, &feed);
    eprintln!("minilm, f32: relative difference {e:.2e}");
    assert!(e <= 1e-5, "f32: {e:e}");
    assert_eq!(
        model.launch_counts().get("gemm_bf16"),
        Some(&4),
        "no tensor cores when off"
    );
}

/// GPT-2's weights are `[in, out]` (n-contiguous): their bf16 copies are transposed at first use.
/// Pruned weights (block CSR, 2:4) reach `gemm_bf16` through their dense copy. 2x16 rows.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn gpt2_dense_and_sparse_weights_on_tensor_cores() {
    use kiln_passes::sparsity::{apply, Encoding, Pattern};
    let Some(script) = emulator() else { return };
    for variant in ["dense", "block 8x8 0.5", "2:4"] {
        let mut l = load("gpt2.ron", GPT2, false, OptLevel::O2);
        let mut w = kiln_frontend::weights::random(&l, 13);
        if variant != "dense" {
            let (pattern, encoding) = if variant == "2:4" {
                (Pattern::TwoFour, Encoding::TwoFour { sparse_rows: u64::MAX })
            } else {
                (
                    "block:8x8:0.5".parse().unwrap(),
                    Encoding::Csr {
                        sparse_rows: u64::MAX,
                        block: [8, 8],
                    },
                )
            };
            let (targets, _) = kiln_passes::quantize::targets(&l.graph, &[]);
            let mut choose = |_: &str, _: &[f32], _: usize, _: usize| (vec![(encoding.clone(), 0.0)], String::new());
            assert!(!apply(&mut l.graph, &mut w, &targets, pattern, &mut choose)
                .unwrap()
                .pruned
                .is_empty());
        }
        let model = emulated(&l, &w, OptLevel::O2, &script);
        let sparse = model.manifest().steps.iter().filter(|s| {
            matches!(
                s,
                kiln_runtime::plan::Step::SpMatMul { .. } | kiln_runtime::plan::Step::SpMatMul24 { .. }
            )
        });
        assert_eq!(sparse.count() > 0, variant != "dense", "{variant}");
        let feed = kiln_cpu::quant::feed(&l.graph, &ids(2, 16, 3, 60)).unwrap();
        let (e, l2) = compare(&model, &l, &w, &feed);
        let runs = model.launch_counts();
        eprintln!("gpt2 {variant} 2x16, tensor cores: relative difference {e:.2e}, relative L2 {l2:.2e}; {runs:?}");
        assert!(l2 <= 1e-2 && e > 1e-5, "{variant}: relative L2 {l2:e}, max {e:e}");
        assert!(runs.get("gemm_bf16").copied().unwrap_or(0) >= 4, "{variant}: {runs:?}");
    }
}

/// Fused attention over several key steps and query blocks (70 positions: 3 steps of 32 keys, 5
/// blocks of 16 rows), with a padded row, against the interpreter — and the three-launch form
/// (scores GEMM, softmax kernel, GEMM) too. Causal attention over 40 prompt positions in GPT-2.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn fused_attention_on_the_emulated_gpu() {
    let Some(script) = emulator() else { return };
    let l = load("minilm.ron", MINILM, false, OptLevel::O2);
    let w = kiln_frontend::weights::random(&l, 11);
    let mut model = emulated(&l, &w, OptLevel::O2, &script);
    let (b, s) = (2, 70);
    let mut feed = kiln_cpu::quant::feed(&l.graph, &ids(b, s, 6, 60)).unwrap();
    let mask: Vec<f64> = (0..b * s).map(|i| if i >= s + 45 { 0.0 } else { 1.0 }).collect();
    feed.insert(
        "attention_mask".into(),
        Tensor::from_f64(kiln_ir::DType::I64, vec![b, s], &mask).unwrap(),
    );
    for fused in [true, false] {
        model.set_fused_attention(fused);
        model.set_tensor_cores(false);
        let (e, _) = compare(&model, &l, &w, &feed);
        eprintln!("minilm 2x70, fused attention {fused}: relative difference {e:.2e}");
        assert!(e <= 1e-5, "fused attention {fused}: {e:e}");
    }
    let set: &[(&str, &str)] = &[
        ("layers", "1"),
        ("vocab", "60"),
        ("hidden", "32"),
        ("heads", "2"),
        ("max_pos", "48"),
    ];
    let l = load("gpt2.ron", set, false, OptLevel::O2);
    let w = kiln_frontend::weights::random(&l, 12);
    let mut model = emulated(&l, &w, OptLevel::O2, &script);
    model.set_tensor_cores(false);
    let feed = kiln_cpu::quant::feed(&l.graph, &ids(1, 40, 8, 60)).unwrap();
    let (e, _) = compare(&model, &l, &w, &feed);
    eprintln!("gpt2 1x40, fused attention: relative difference {e:.2e}");
    assert!(e <= 1e-5, "gpt2 causal fused attention: {e:e}");
}

/// Fused attention on tensor cores (`fa*_tc32`, `fa*_tc64`: bf16 `mma.sync` for both products,
/// K and V fragments by `ldmatrix`, V's transposed): MiniLM with head dimension 32 over 70
/// positions with a padded row (two 64-key steps, two 64-row blocks), GPT-2 with head dimension
/// 64, causal over 40, and Llama with 128 (grouped-query). Within bf16's rounding of the
/// interpreter.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn tensor_core_attention_on_the_emulated_gpu() {
    let Some(script) = emulator() else { return };
    let set: &[(&str, &str)] = &[
        ("layers", "1"),
        ("vocab", "60"),
        ("hidden", "64"),
        ("heads", "2"),
        ("ffn", "64"),
    ];
    let l = load("minilm.ron", set, false, OptLevel::O2);
    let w = kiln_frontend::weights::random(&l, 14);
    let model = emulated(&l, &w, OptLevel::O2, &script);
    let (b, s) = (2, 70);
    let mut feed = kiln_cpu::quant::feed(&l.graph, &ids(b, s, 6, 60)).unwrap();
    let mask: Vec<f64> = (0..b * s).map(|i| if i >= s + 45 { 0.0 } else { 1.0 }).collect();
    feed.insert(
        "attention_mask".into(),
        Tensor::from_f64(kiln_ir::DType::I64, vec![b, s], &mask).unwrap(),
    );
    let (e, l2) = compare(&model, &l, &w, &feed);
    let runs = model.launch_counts();
    eprintln!("minilm d=32 2x70, tensor-core attention: relative difference {e:.2e}, relative L2 {l2:.2e}; {runs:?}");
    // bf16 rounding gives ~9e-4; dropping the online softmax's rescale gives 5e-2 and 1e-2.
    assert!(l2 <= 3e-3 && e <= 1e-2, "relative L2 {l2:e}, max {e:e}");
    assert!(runs.keys().any(|k| k.ends_with("_tc32")), "{runs:?}");
    // On CUDA cores instead (KILN_CUDA_TC_ATTENTION=off); products by weights below 256 rows
    // register-staged (KILN_CUDA_BF16_MIN_ROWS=256): no bf16 conversions.
    let mut model = model;
    model.set_tc_attention(false);
    model.set_bf16_min_rows(256);
    model.set_profiling(true);
    let (e2, l2b) = compare(&model, &l, &w, &feed);
    let runs = model.launch_counts();
    eprintln!("minilm d=32 2x70, CUDA-core attention: relative difference {e2:.2e}, relative L2 {l2b:.2e}");
    assert!(l2b <= 3e-3 && e2 <= 1e-2, "relative L2 {l2b:e}, max {e2:e}");
    assert!(runs.keys().all(|k| !k.ends_with("_tc32") && k != "to_bf16"), "{runs:?}");
    assert_eq!(runs.get("gemm_tc_f32"), Some(&4), "{runs:?}");
    let set: &[(&str, &str)] = &[
        ("layers", "1"),
        ("vocab", "60"),
        ("hidden", "128"),
        ("heads", "2"),
        ("max_pos", "48"),
    ];
    let l = load("gpt2.ron", set, false, OptLevel::O2);
    let w = kiln_frontend::weights::random(&l, 15);
    let model = emulated(&l, &w, OptLevel::O2, &script);
    let feed = kiln_cpu::quant::feed(&l.graph, &ids(1, 40, 8, 60)).unwrap();
    let (e, l2) = compare(&model, &l, &w, &feed);
    let runs = model.launch_counts();
    eprintln!(
        "gpt2 d=64 1x40 causal, tensor-core attention: relative difference {e:.2e}, relative L2 {l2:.2e}; {runs:?}"
    );
    assert!(l2 <= 1e-2 && e <= 1e-2, "relative L2 {l2:e}, max {e:e}");
    assert!(runs.keys().any(|k| k.ends_with("_tc64")), "{runs:?}");
    // A batch of one sequence is one matrix of rows too: the products by weights take gemm_bf16.
    assert_eq!(runs.get("gemm_bf16"), Some(&5), "{runs:?}");
    // Llama: head dimension 128, grouped-query attention (2 query heads share one key/value head),
    // rotary positions, causal over 36.
    let set: &[(&str, &str)] = &[
        ("layers", "1"),
        ("vocab", "60"),
        ("hidden", "256"),
        ("heads", "2"),
        ("kv_heads", "1"),
        ("ffn", "64"),
        ("max_pos", "48"),
    ];
    let l = load("llama.ron", set, false, OptLevel::O2);
    let w = kiln_frontend::weights::random(&l, 16);
    let model = emulated(&l, &w, OptLevel::O2, &script);
    let feed = kiln_cpu::quant::feed(&l.graph, &ids(1, 36, 9, 60)).unwrap();
    let (e, l2) = compare(&model, &l, &w, &feed);
    let runs = model.launch_counts();
    eprintln!("llama d=128 1x36 causal GQA, tensor-core attention: relative difference {e:.2e}, relative L2 {l2:.2e}; {runs:?}");
    assert!(l2 <= 1e-2 && e <= 1e-2, "relative L2 {l2:e}, max {e:e}");
    assert!(runs.keys().any(|k| k.ends_with("_tc128")), "{runs:?}");
}

/// A generation session whose prompt is long enough (34 positions, head dimension 64) for the
/// tensor-core attention kernel: its keys and values are read in place from the cache on the
/// device (strides of the cache's capacity). Then two decode steps on the matrix–vector path.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn tensor_core_attention_over_the_cache_on_the_emulated_gpu() {
    let Some(script) = emulator() else { return };
    let set: &[(&str, &str)] = &[
        ("layers", "1"),
        ("vocab", "60"),
        ("hidden", "128"),
        ("heads", "2"),
        ("max_pos", "48"),
    ];
    let l = load("gpt2.ron", set, true, OptLevel::O2);
    let w = kiln_frontend::weights::random(&l, 17);
    let model = emulated(&l, &w, OptLevel::O2, &script);
    let next = |step: usize| vec![((step * 11) % 59 + 1) as i64];
    // The prompt's products and attention ran in bf16; later steps read its cache.
    let label = "gpt2 d=64, prompt of 34,";
    decode_against_interpreter(&model, (&l, &w), &ids(1, 34, 3, 60), next, 5e-3, label);
    let runs = model.launch_counts();
    assert!(runs.keys().any(|k| k.ends_with("_tc64")), "{runs:?}");
}

/// Reductions of a value computed on the GPU, over every axis set of a rank-3 shape and with every
/// op: the last axis runs as a fused kernel, other contiguous axis runs as `reduce_axis_*`, and
/// non-contiguous ones ([0, 2]) on the host in place (synchronise, download, evaluate, upload).
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn reductions_on_the_emulated_gpu() {
    use kiln_ir::{BinaryOp, DType, Dim, Graph, Op, ReduceOp, TensorType};
    let Some(script) = emulator() else { return };
    let shape = [3usize, 5, 6];
    let x: Vec<f64> = (0..90).map(|i| ((i * 37 % 17) as f64 - 8.0) / 3.0).collect();
    let feed: BTreeMap<String, Tensor> = [(
        "x".to_string(),
        Tensor::from_f64(DType::F32, shape.to_vec(), &x).unwrap(),
    )]
    .into();
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        for axes in [vec![0], vec![1], vec![2], vec![0, 1], vec![1, 2], vec![0, 2]] {
            let mut g = Graph::new("reduce");
            let ty = TensorType::new(DType::F32, shape.iter().map(|d| Dim::known(*d as u64)).collect());
            let xi = g.add(Op::input("x", ty), &[], "x").unwrap();
            let sq = g.add(Op::Binary(BinaryOp::Mul), &[xi, xi], "sq").unwrap();
            let r = g
                .add(
                    Op::Reduce {
                        op,
                        axes: axes.clone(),
                        keep_dims: false,
                    },
                    &[sq],
                    "r",
                )
                .unwrap();
            g.add_output("r", r).unwrap();
            let w = BTreeMap::new();
            let (planned, mlir) = kiln_cuda::plan_mlir(&g, &w, &[], &kiln_cpu::Options::for_level(2)).unwrap();
            let model = CudaModel::emulated(&planned.manifest, planned.weights, &mlir, &script)
                .unwrap_or_else(|e| panic!("{e}"));
            let want = kiln_interp::run(&g, &w, &feed).unwrap();
            let got = model.run(&feed).unwrap_or_else(|e| panic!("{op:?} {axes:?}: {e}"));
            assert_eq!(got[0].1.shape(), want[0].1.shape(), "{op:?} {axes:?}");
            let e = rel_diff(&got[0].1.to_f64_vec(), &want[0].1.to_f64_vec());
            assert!(e <= 1e-6, "{op:?} over {axes:?}: {e:e}");
        }
    }
}

const VIT: &[(&str, &str)] = &[
    ("layers", "1"),
    ("hidden", "16"),
    ("heads", "2"),
    ("ffn", "24"),
    ("image", "16"),
    ("patch", "8"),
];

/// A strided, padded, grouped convolution (the strided-slice im2col path; ViT's patch embedding
/// takes the reshape path).
const CONV: &str = r#"Model(
    name: "conv",
    dims: { "batch": 4 },
    inputs: { "x": (dtype: f32, shape: ["batch", 4, 7, 5]) },
    body: { "y": Conv(x: "x", param: "c", in_channels: 4, out_channels: 6, kernel: 3, stride: [2, 1], padding: 1, groups: 2) },
    outputs: { "y": "y" },
)"#;

/// Vision layers on the emulated GPU: ViT (patch embedding, class token concatenated, position
/// table, pooler over a slice) and a grouped strided convolution, against the interpreter.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn vision_on_the_emulated_gpu() {
    let Some(script) = emulator() else { return };
    let pixels: Vec<f64> = (0..2 * 3 * 16 * 16)
        .map(|i| ((i * 37 % 101) as f64 / 50.0) - 1.0)
        .collect();
    let vit = load("vit.ron", VIT, false, OptLevel::O2);
    let px = Tensor::from_f64(kiln_ir::DType::F32, vec![2, 3, 16, 16], &pixels).unwrap();
    let mut conv = kiln_frontend::lower_source("conv.ron", CONV, &Options::default()).unwrap();
    kiln_passes::optimize(&mut conv.graph, OptLevel::O2, true).unwrap();
    let xs: Vec<f64> = (0..2 * 4 * 7 * 5)
        .map(|i| ((i * 13 % 29) as f64 / 14.0) - 1.0)
        .collect();
    let x = Tensor::from_f64(kiln_ir::DType::F32, vec![2, 4, 7, 5], &xs).unwrap();
    for (name, l, feed) in [("vit", &vit, ("pixel_values", px)), ("conv", &conv, ("x", x))] {
        let w = kiln_frontend::weights::random(l, 5);
        let model = emulated(l, &w, OptLevel::O2, &script);
        let feed: BTreeMap<String, Tensor> = [(feed.0.to_string(), feed.1)].into_iter().collect();
        let (worst, _) = compare(&model, l, &w, &feed);
        eprintln!("{name} on the emulated GPU: relative difference {worst:.2e}");
        assert!(worst <= 1e-5, "{name}: {worst:e}");
    }
}
