//! `kiln compile --quantize`: reading calibration samples, quantizing, and the accuracy report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use kiln_ir::{Graph, Tensor};
use kiln_passes::quantize::Scheme;

/// The quantization and sparsity options of `kiln compile`.
pub struct QuantArgs {
    pub scheme: Option<Scheme>,
    pub sparsity: Option<kiln_passes::sparsity::Pattern>,
    pub calib: Option<PathBuf>,
    pub exclude: Vec<String>,
    /// Prefill products quantize their activations too (`--int8-prefill`).
    pub int8_prefill: bool,
    /// Every eligible product takes the scheme (`--quant-strict`).
    pub strict: bool,
    /// The CPU the artifact is for, where forms are measured (`None`: another target).
    pub cpu: Option<kiln_runtime::cpu::CpuArg>,
}

/// Token-id rows from a text file (one sample per line) or an integer .npy.
pub fn samples(path: &Path, tokenizer: Option<&str>) -> Result<Vec<Vec<i64>>> {
    if path.extension().is_some_and(|e| e == "npy") {
        let t = kiln_runtime::npy::read(path)?;
        if !t.dtype().is_int() || t.shape().len() != 2 {
            bail!(
                "{}: calibration ids must be an integer [n, seq] array, got {} {:?}",
                path.display(),
                t.dtype(),
                t.shape()
            );
        }
        let seq = t.shape()[1];
        let v: Vec<i64> = t.to_f64_vec().into_iter().map(|x| x as i64).collect();
        return Ok(v
            .chunks(seq.max(1))
            .map(|r| r.iter().copied().filter(|x| *x >= 0).collect::<Vec<_>>())
            .filter(|r: &Vec<i64>| !r.is_empty())
            .collect());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(json) = tokenizer else {
        bail!(
            "--calib {}: text samples need a tokenizer; give --tokenizer FILE (tokenizer.json)",
            path.display()
        );
    };
    let mut tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow!("tokenizer: {e}"))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| anyhow!("tokenizer: {e}"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            tok.encode(l, true)
                .map(|e| e.get_ids().iter().map(|i| *i as i64).collect())
                .map_err(|e| anyhow!("tokenizing {l:?}: {e}"))
        })
        .collect()
}

/// Quantizes when asked; returns the report lines for `kiln compile`.
pub fn run(
    q: &QuantArgs,
    graph: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    tokenizer: Option<&str>,
    verbose: bool,
) -> Result<Vec<String>> {
    if q.scheme.is_some() && q.sparsity.is_some() {
        bail!("--quantize and --sparsity cannot be combined yet: quantized codes have no sparse encoding");
    }
    if q.strict && q.scheme.is_none() {
        bail!("--quant-strict applies to --quantize");
    }
    if q.scheme.is_none() && q.sparsity.is_none() {
        if q.calib.is_some() || !q.exclude.is_empty() {
            bail!("--calib and --quant-exclude apply to --quantize and --sparsity");
        }
        return Ok(Vec::new());
    }
    let all = match &q.calib {
        Some(p) => samples(p, tokenizer)?,
        None => Vec::new(),
    };
    if let Some(p) = &q.calib {
        if all.is_empty() {
            bail!("--calib {}: no samples", p.display());
        }
    }
    let held = if all.len() >= 4 { all.len() / 4 } else { all.len() };
    let (calib, heldout) = if all.len() >= 4 {
        all.split_at(all.len() - held)
    } else {
        (&all[..], &all[..])
    };
    let reference = (graph.clone(), weights.clone());
    let mut lines = Vec::new();
    if let Some(p) = q.sparsity {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let r = kiln_cpu::quant::sparsify(graph, weights, p, &q.exclude, 128, threads)
            .map_err(|e| anyhow!("--sparsity {p}: {e}"))?;
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for x in &r.pruned {
            *kinds.entry(x.5.kind()).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        lines.push(format!(
            "sparsity {p}: {} products pruned, stored as {} (sparse only where measured faster), {} left as they were",
            r.pruned.len(),
            kinds.join(", "),
            r.skipped.len()
        ));
        for (name, n, k, density, rel, enc, why) in &r.pruned {
            if verbose {
                lines.push(format!(
                    "sparsity   {name} [{n}, {k}]: density {density:.3}, relative weight change {rel:.3}, {enc} ({why})"
                ));
            }
        }
        for (name, why) in &r.skipped {
            lines.push(format!("sparsity   unchanged: {name} ({why})"));
        }
        for (name, before, after) in &r.shrunk {
            lines.push(format!(
                "sparsity   {name}: {} all-zero input columns removed with the features feeding them ({before} -> {after})",
                before - after
            ));
        }
    }
    let Some(scheme) = q.scheme else {
        return report_accuracy(
            lines,
            (&reference.0, &reference.1),
            graph,
            weights,
            dims,
            (heldout, q.int8_prefill),
        );
    };
    // --int8-prefill names the prefill kernel: its products are not measured against others.
    let fastest = q.cpu.filter(|_| !q.strict && !q.int8_prefill);
    let r = kiln_cpu::quant::quantize_with(graph, weights, dims, (scheme, fastest), &q.exclude, calib)
        .map_err(|e| anyhow!("--quantize {scheme}: {e}"))?;
    let mib = |b: usize| b as f64 / 1048576.0;
    let mut by_form: BTreeMap<&str, usize> = BTreeMap::new();
    for x in &r.quantized {
        *by_form.entry(&x.4).or_default() += 1;
    }
    let by_form: Vec<String> = by_form.iter().map(|(f, n)| format!("{n} {f}")).collect();
    lines.push(format!(
        "quant    {scheme}: {} products quantized ({}), {} left in f32; their weights {:.1} MiB -> {:.1} MiB{}",
        r.quantized.len(),
        if by_form.is_empty() {
            "none".into()
        } else {
            by_form.join(", ")
        },
        r.skipped.len() + r.kept.len(),
        mib(r.bytes.0),
        mib(r.bytes.1),
        if matches!(scheme, Scheme::Gptq4 { .. }) {
            format!(" (GPTQ on {} calibration samples)", calib.len())
        } else {
            String::new()
        }
    ));
    if !r.forms.is_empty() {
        lines.push(format!(
            "quant      forms chosen by measured time at {} on {}: {} kept f32 (--quant-strict quantizes every one)",
            match kiln_cpu::quant::measured_rows(&reference.0) {
                1 => "1 row (a decoder's step)".to_string(),
                r => format!("{r} rows"),
            },
            fastest.map(|c| c.to_string()).unwrap_or_default(),
            r.kept.len()
        ));
    }
    if verbose {
        for (name, n, k, rel, form) in &r.quantized {
            lines.push(format!(
                "quant      {name} [{n}, {k}]: {form}, relative weight error {rel:.4}"
            ));
        }
        for (name, form, why) in &r.forms {
            lines.push(format!("quant      {name}: {form} ({why})"));
        }
    }
    for (name, why) in &r.skipped {
        lines.push(format!("quant      kept f32: {name} ({why})"));
    }
    report_accuracy(
        lines,
        (&reference.0, &reference.1),
        graph,
        weights,
        dims,
        (heldout, q.int8_prefill),
    )
}

fn report_accuracy(
    mut lines: Vec<String>,
    reference: (&Graph, &BTreeMap<String, Tensor>),
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    (heldout, int8_prefill): (&[Vec<i64>], bool),
) -> Result<Vec<String>> {
    if heldout.is_empty() {
        lines.push("accuracy not measured: give --calib samples for a report against f32".into());
        return Ok(lines);
    }
    let acc = kiln_cpu::quant::evaluate(reference, (graph, weights), dims, heldout, int8_prefill)
        .map_err(|e| anyhow!("accuracy report: {e}"))?;
    lines.push(format!("accuracy against f32 on {} held-out samples:", heldout.len()));
    for o in &acc.outputs {
        lines.push(format!(
            "           {}: cosine mean {:.6}, min {:.6} over {} rows; max abs diff {:.3e}",
            o.name, o.mean_cos, o.min_cos, o.rows, o.max_abs
        ));
    }
    if let Some(lm) = &acc.lm {
        lines.push(format!(
            "           next-token KL {:.5} nats over {} positions; perplexity {:.3} (f32 {:.3})",
            lm.kl, lm.tokens, lm.ppl_quantized, lm.ppl_f32
        ));
    }
    Ok(lines)
}
