//! Quantization end to end on this backend: calibration statistics collected by running the
//! compiled f32 model, the rewrite (`kiln_passes::quantize`), and the accuracy report that compares
//! the quantized model with the f32 one on held-out samples.
//!
//! Samples are token-id rows. A graph's integer `[batch, seq]` inputs are fed from them: an input
//! whose name contains `mask` gets 1 for real tokens and 0 for padding, one containing `type` gets
//! zeros, any other gets the ids; rows are right-padded with id 0. Decoding graphs are fed through
//! a generation session instead (prefill, then one token at a time).

use kiln_runtime::Decoder;
use std::collections::BTreeMap;

use kiln_ir::{Graph, Op, Tensor};
use kiln_passes::quantize::{self, Hessian, QuantReport, Scheme, Target};
use kiln_runtime::Model;

fn model(graph: &Graph, weights: &BTreeMap<String, Tensor>, dims: &[(String, u64)]) -> Result<Model, String> {
    model_with(graph, weights, dims, &crate::Options::for_level(2))
}

fn model_with(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    opts: &crate::Options,
) -> Result<Model, String> {
    let c = crate::compile(graph, weights, dims, opts).map_err(|e| e.to_string())?;
    let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code)?;
    Model::from_bytes(&bytes).map_err(|e| e.to_string())
}

/// Inputs of a (non-decoding) graph for a batch of token-id rows.
pub fn feed(graph: &Graph, rows: &[Vec<i64>]) -> Result<BTreeMap<String, Tensor>, String> {
    let seq = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let b = rows.len();
    let mut out = BTreeMap::new();
    for &i in graph.inputs() {
        let Op::Input { name, ty, .. } = &graph.node(i).op else {
            continue;
        };
        if !ty.dtype.is_int() || ty.rank() != 2 {
            return Err(format!("cannot feed input `{name}` ({ty}) from token ids"));
        }
        let v: Vec<i64> = rows
            .iter()
            .flat_map(|r| {
                (0..seq).map(move |j| match r.get(j) {
                    Some(id) if name.contains("mask") => {
                        let _ = id;
                        1
                    }
                    Some(_) if name.contains("type") => 0,
                    Some(id) => *id,
                    None => 0,
                })
            })
            .collect();
        let t = Tensor::from_f64(ty.dtype, vec![b, seq], &v.iter().map(|x| *x as f64).collect::<Vec<_>>())
            .map_err(|e| e.to_string())?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

fn is_decoding(graph: &Graph) -> bool {
    graph
        .node_ids()
        .any(|n| matches!(graph.node(n).op, Op::CacheAppend { .. }))
}

/// `Σ x xᵀ` of every target's input over the calibration samples (one sample per run, so no padding
/// enters the statistics; each sample's rows weighted by 1/length).
pub fn calibrate(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    targets: &[Target],
    samples: &[Vec<i64>],
) -> Result<Vec<Hessian>, String> {
    let cg = quantize::calibration_graph(graph, targets);
    let m = model(&cg, weights, dims)?;
    let mut hs: Vec<Hessian> = targets.iter().map(|t| Hessian::new(t.k)).collect();
    // An encoder's sample rows count 1/length, so every sample weighs the same whatever its length,
    // as it does in a pooled embedding (MiniLM gptq4:128, short queries: cosine 0.9851 -> 0.9868;
    // long sentences unchanged). A decoder's positions each predict a token: they count 1.
    let decoding = is_decoding(graph);
    let mut absorb = |outs: Vec<(String, Tensor)>, sample: &[i64]| -> Result<(), String> {
        let real = sample.iter().filter(|t| **t >= 0).count().max(1);
        let w = if decoding { 1.0 } else { 1.0 / real as f64 };
        for (name, t) in outs {
            if let Some(i) = name.strip_prefix("calib.").and_then(|i| i.parse::<usize>().ok()) {
                hs[i].add_weighted(&t, w)?;
            }
        }
        Ok(())
    };
    let progress = kiln_ir::progress::Progress::new("calibration samples", samples.len());
    if decoding {
        for s in samples {
            progress.tick();
            let mut sess = m.session().map_err(|e| e.to_string())?;
            absorb(
                sess.prefill_outputs(std::slice::from_ref(s))
                    .map_err(|e| e.to_string())?,
                s,
            )?;
        }
    } else {
        // One sample per run: padding positions would add activations the model never uses.
        for chunk in samples.chunks(1) {
            progress.tick();
            absorb(m.run(&feed(graph, chunk)?).map_err(|e| e.to_string())?, &chunk[0])?;
        }
    }
    Ok(hs)
}

/// Quantizes `graph`'s eligible products in place as `scheme` (see `kiln_passes::quantize`); GPTQ
/// calibrates on `calib` first.
pub fn quantize(
    graph: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    scheme: Scheme,
    exclude: &[String],
    calib: &[Vec<i64>],
) -> Result<QuantReport, String> {
    quantize_with(graph, weights, dims, (scheme, None), exclude, calib)
}

/// Rows a product is measured at when choosing its form: 1 for a decoding graph (its generation
/// time is in one-token steps), [`ENCODER_ROWS`] otherwise.
pub fn measured_rows(graph: &Graph) -> usize {
    if is_decoding(graph) {
        1
    } else {
        ENCODER_ROWS
    }
}

/// The rows an encoder's products are measured at (a 128-token sequence).
pub const ENCODER_ROWS: usize = 128;

/// [`quantize`], or with `fastest` (the CPU the artifact is for, which this machine must run),
/// each product's f32, int8 and `scheme` forms measured there and the fastest kept.
pub fn quantize_with(
    graph: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    (scheme, fastest): (Scheme, Option<kiln_runtime::cpu::CpuArg>),
    exclude: &[String],
    calib: &[Vec<i64>],
) -> Result<QuantReport, String> {
    let (targets, skipped) = quantize::targets(graph, exclude);
    let hessians = match scheme {
        Scheme::Gptq4 { .. } => {
            if calib.is_empty() {
                return Err("gptq4 needs calibration samples (--calib)".into());
            }
            // All Hessians from the f32 model in one pass: quantizing sequentially (each product's
            // Hessian from the model with the earlier ones quantized) measured the same on MiniLM
            // (0.98851 vs 0.98849) at 2.5x the compile time.
            Some(calibrate(graph, weights, dims, &targets, calib)?)
        }
        _ => None,
    };
    let rows = measured_rows(graph);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut time = |kernel: &str, n: usize, k: usize| -> Option<f64> {
        let cpu = fastest?;
        crate::costs::product_ns(kernel, [rows, n, k], threads, cpu).ok()
    };
    let choice = match fastest {
        Some(cpu) if cpu.level.runs_here() => quantize::Choice::Measured(&mut time),
        _ => quantize::Choice::Strict,
    };
    let mut r = quantize::apply(graph, weights, &targets, scheme, hessians.as_deref(), choice)?;
    r.skipped.extend(skipped);
    kiln_ir::verify(graph).map_err(|e| format!("internal compiler error after quantization: {e}"))?;
    Ok(r)
}

/// How far one output moved.
#[derive(Clone, Debug)]
pub struct OutputAccuracy {
    /// Output name.
    pub name: String,
    /// Rows compared (all axes but the last flattened).
    pub rows: usize,
    /// Mean cosine similarity of the rows.
    pub mean_cos: f64,
    /// Smallest cosine similarity of a row.
    pub min_cos: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
}

/// Language-model metrics on the held-out text (teacher forcing).
#[derive(Clone, Debug)]
pub struct LmAccuracy {
    /// Positions compared (the perplexities score those with a next token).
    pub tokens: usize,
    /// Mean KL(p_f32 ‖ p_quantized) of the next-token distributions, nats.
    pub kl: f64,
    /// Perplexity of the f32 model.
    pub ppl_f32: f64,
    /// Perplexity of the quantized model.
    pub ppl_quantized: f64,
}

/// The quantized model against the f32 one.
#[derive(Clone, Debug, Default)]
pub struct Accuracy {
    /// Per output.
    pub outputs: Vec<OutputAccuracy>,
    /// For language models (an output called `logits`).
    pub lm: Option<LmAccuracy>,
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    let s: f64 = x.iter().map(|v| (*v as f64 - m).exp()).sum();
    let l = s.ln() + m;
    x.iter().map(|v| *v as f64 - l).collect()
}

#[derive(Default)]
struct LmSums {
    kl: f64,
    nll_f: f64,
    nll_q: f64,
    n: usize,
    scored: usize,
}

impl LmSums {
    fn add(&mut self, f: &[f32], q: &[f32], target: Option<i64>) {
        let (lf, lq) = (log_softmax(f), log_softmax(q));
        self.kl += lf.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
        if let Some(t) = target.filter(|t| (*t as usize) < lf.len()) {
            self.nll_f -= lf[t as usize];
            self.nll_q -= lq[t as usize];
            self.scored += 1;
        }
        self.n += 1;
    }

    fn finish(&self) -> Option<LmAccuracy> {
        (self.n > 0).then(|| LmAccuracy {
            tokens: self.n,
            kl: self.kl / self.n as f64,
            ppl_f32: (self.nll_f / self.scored.max(1) as f64).exp(),
            ppl_quantized: (self.nll_q / self.scored.max(1) as f64).exp(),
        })
    }
}

/// Runs both models on `samples` and compares every output.
pub fn evaluate(
    f32_model: (&Graph, &BTreeMap<String, Tensor>),
    quantized: (&Graph, &BTreeMap<String, Tensor>),
    dims: &[(String, u64)],
    samples: &[Vec<i64>],
    int8_prefill: bool,
) -> Result<Accuracy, String> {
    let qopts = crate::Options {
        int8_prefill,
        ..crate::Options::for_level(2)
    };
    let (mf, mq) = (
        model(f32_model.0, f32_model.1, dims)?,
        model_with(quantized.0, quantized.1, dims, &qopts)?,
    );
    let mut lm = LmSums::default();
    let mut acc: BTreeMap<String, (usize, f64, f64, f64)> = BTreeMap::new();
    let mut compare = |name: &str, a: &[f32], b: &[f32], width: usize| {
        let e = acc.entry(name.to_string()).or_insert((0, 0.0, f64::INFINITY, 0.0));
        for (ra, rb) in a.chunks(width.max(1)).zip(b.chunks(width.max(1))) {
            let dot: f64 = ra.iter().zip(rb).map(|(x, y)| *x as f64 * *y as f64).sum();
            let na: f64 = ra.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = rb.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let cos = if na == 0.0 && nb == 0.0 {
                1.0
            } else {
                dot / (na * nb).max(f64::MIN_POSITIVE)
            };
            e.0 += 1;
            e.1 += cos;
            e.2 = e.2.min(cos);
            e.3 = ra.iter().zip(rb).fold(e.3, |m, (x, y)| m.max((x - y).abs() as f64));
        }
    };
    let f32s = |t: &Tensor| -> Vec<f32> { t.to_f64_vec().into_iter().map(|x| x as f32).collect() };
    if is_decoding(f32_model.0) {
        let progress = kiln_ir::progress::Progress::new("accuracy report samples", samples.len());
        for s in samples.iter().filter(|s| !s.is_empty()) {
            progress.tick();
            let (mut sf, mut sq) = (
                mf.session().map_err(|e| e.to_string())?,
                mq.session().map_err(|e| e.to_string())?,
            );
            let (mut lf, mut lq) = (
                sf.prefill(&[vec![s[0]]]).map_err(|e| e.to_string())?,
                sq.prefill(&[vec![s[0]]]).map_err(|e| e.to_string())?,
            );
            for pos in 0..s.len() {
                let v = lf[0].len();
                compare("logits", &lf[0], &lq[0], v);
                lm.add(&lf[0], &lq[0], s.get(pos + 1).copied());
                if pos + 1 == s.len() || sf.len() >= sf.capacity() {
                    break;
                }
                lf = sf.step(&[s[pos + 1]]).map_err(|e| e.to_string())?;
                lq = sq.step(&[s[pos + 1]]).map_err(|e| e.to_string())?;
            }
        }
    } else {
        let progress = kiln_ir::progress::Progress::new("accuracy report batches", samples.len().div_ceil(8));
        for chunk in samples.chunks(8) {
            progress.tick();
            let inputs = feed(f32_model.0, chunk)?;
            let (of, oq) = (
                mf.run(&inputs).map_err(|e| e.to_string())?,
                mq.run(&inputs).map_err(|e| e.to_string())?,
            );
            for ((name, tf), (_, tq)) in of.iter().zip(&oq) {
                let width = tf.shape().last().copied().unwrap_or(1);
                let (a, b) = (f32s(tf), f32s(tq));
                compare(name, &a, &b, width);
                if name == "logits" && tf.shape().len() == 3 {
                    let (bn, sn, v) = (tf.shape()[0], tf.shape()[1], tf.shape()[2]);
                    for (bi, row) in chunk.iter().enumerate().take(bn) {
                        for p in 0..row.len().min(sn) {
                            let o = (bi * sn + p) * v;
                            lm.add(&a[o..o + v], &b[o..o + v], row.get(p + 1).copied());
                        }
                    }
                }
            }
        }
    }
    Ok(Accuracy {
        outputs: acc
            .into_iter()
            .map(|(name, (rows, sum, min, max_abs))| OutputAccuracy {
                name,
                rows,
                mean_cos: sum / rows.max(1) as f64,
                min_cos: min,
                max_abs,
            })
            .collect(),
        lm: lm.finish(),
    })
}

/// Prunes the eligible products' weights by `pattern` and stores each in CSR where this machine
/// runs the sparse product faster than the dense one, measured at 1 row and at `rows` rows. An
/// encoder (every product sees many rows) keeps CSR only if it wins at `rows`; a decoding graph
/// (its steps are 1-row products) keeps it if it wins at 1 row, and densifies tiles of it for
/// longer prefills.
pub fn sparsify(
    graph: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    pattern: kiln_passes::sparsity::Pattern,
    exclude: &[String],
    rows: usize,
    threads: usize,
) -> Result<kiln_passes::sparsity::SparsityReport, String> {
    use kiln_passes::sparsity::Encoding;
    let decoding = is_decoding(graph);
    // Measured with the kernels of the best level this machine runs.
    let level = kiln_runtime::cpu::Level::host();
    let (targets, skipped) = quantize::targets(graph, exclude);
    // Candidate encodings: CSR; block patterns also their blocks (block CSR); 2:4 also packed 2:4.
    // `None` is packed 2:4, `Some(block)` (block) CSR.
    let candidates: Vec<Option<[usize; 2]>> = match pattern {
        kiln_passes::sparsity::Pattern::Block { rows, cols, .. } => vec![Some([1, 1]), Some([rows, cols])],
        kiln_passes::sparsity::Pattern::TwoFour => vec![Some([1, 1]), None],
        _ => vec![Some([1, 1])],
    };
    let progress = kiln_ir::progress::Progress::new("measuring sparse kernels (products)", targets.len());
    let cpu = kiln_runtime::cpu::CpuArg::host();
    let mut choose = |_: &str, w: &[f32], n: usize, k: usize| -> (Vec<(Encoding, f64)>, String) {
        progress.tick();
        let nnz = w.iter().filter(|v| **v != 0.0).count();
        let dense = |m| crate::costs::product_ns("f32", [m, n, k], threads, cpu);
        let (d1, dm) = match (dense(1), dense(rows)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return (vec![(Encoding::Dense, 0.0)], format!("not measured: {e}")),
        };
        let mut forms = vec![(Encoding::Dense, if decoding { d1 } else { dm })];
        let mut notes = Vec::new();
        for &cand in &candidates {
            let label = match cand {
                Some([1, 1]) => "CSR".to_string(),
                Some([r, c]) => format!("{r}x{c} blocks"),
                None => "packed 2:4".to_string(),
            };
            let time = |m: usize| {
                let key = crate::costs::key(cpu, threads, &label, [m, n, k], nnz);
                crate::costs::cached(key, || match cand {
                    Some(block) => {
                        let c = kiln_passes::sparsity::Csr::blocked(w, n, k, block);
                        kiln_runtime::measure_sparse(w, &c.row_ptr, &c.cols, &c.vals, block, n, k, m, threads, level)
                            .map(|t| t.1)
                    }
                    None => {
                        let (vals, idx) = kiln_passes::sparsity::pack24(w, n, k)?;
                        kiln_runtime::measure_sparse24(w, &vals, &idx, n, k, m, threads, level).map(|t| t.1)
                    }
                })
            };
            let (s1, sm) = match (time(1), time(rows)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    notes.push(format!("{label} not measured: {e}"));
                    continue;
                }
            };
            notes.push(format!("{label} {:.1} / {:.1} µs", s1 / 1e3, sm / 1e3));
            // Sparse wherever it wins; a decoder that wins only at 1 row densifies tiles beyond 4.
            let sparse_rows = if sm < dm {
                u64::MAX
            } else if decoding && s1 < d1 {
                4
            } else {
                continue;
            };
            let encoding = match cand {
                Some(b) => Encoding::Csr {
                    sparse_rows,
                    block: [b[0] as u64, b[1] as u64],
                },
                None => Encoding::TwoFour { sparse_rows },
            };
            forms.push((encoding, if decoding { s1 } else { sm }));
        }
        let why = format!(
            "1 / {rows} rows: dense {:.1} / {:.1} µs, {}",
            d1 / 1e3,
            dm / 1e3,
            notes.join(", ")
        );
        (forms, why)
    };
    let mut r = kiln_passes::sparsity::apply(graph, weights, &targets, pattern, &mut choose)?;
    r.skipped.extend(skipped);
    kiln_ir::verify(graph).map_err(|e| format!("internal compiler error after pruning: {e}"))?;
    Ok(r)
}
