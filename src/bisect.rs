//! `kiln bisect`: the command-line side of `kiln_cpu::bisect`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use kiln_passes::{OptLevel, PipelineOptions};

use crate::{load_spec, load_weights, split_pair, SpecOpts, WeightOpts};

/// What `kiln bisect` was given besides the spec.
pub struct Args<'a> {
    pub inputs: &'a [String],
    pub opt: u8,
    pub cpu: kiln_runtime::cpu::CpuArg,
    pub tol: f64,
    pub disabled: &'a [String],
}

/// Runs the bisection and prints what it found; fails (exit 1) when a mismatch remains
/// unexplained or is found, so scripts can use it.
pub fn run(spec: &Path, o: &SpecOpts, w: &WeightOpts, a: &Args) -> Result<()> {
    if a.inputs.is_empty() {
        bail!("give the model's inputs: --input NAME=FILE.npy for each");
    }
    let l = load_spec(spec, o)?;
    let weights = load_weights(spec, &l, w)?;
    let mut inputs = BTreeMap::new();
    for s in a.inputs {
        let (k, f) = split_pair(s, "--input")?;
        inputs.insert(k.to_string(), kiln_runtime::npy::read(f)?);
    }
    let level = [OptLevel::O0, OptLevel::O1, OptLevel::O2][a.opt.min(2) as usize];
    let case = kiln_cpu::bisect::Case {
        graph: &l.graph,
        weights: &weights,
        dims: &l.dims,
        inputs: &inputs,
        level,
        pipeline: PipelineOptions {
            disabled_rules: a.disabled.to_vec(),
            ..PipelineOptions::default()
        },
        options: kiln_cpu::Options {
            cpu: a.cpu.level,
            vnni: a.cpu.vnni,
            disabled_rules: a.disabled.to_vec(),
            ..kiln_cpu::Options::for_level(a.opt)
        },
        tol: a.tol,
    };
    let r = kiln_cpu::bisect::bisect(&case).map_err(|e| anyhow!(e))?;
    print(&r, a.tol);
    if r.mismatch.is_some() {
        bail!("the compiled model disagrees with the interpreter");
    }
    Ok(())
}

fn print(r: &kiln_cpu::bisect::Report, tol: f64) {
    println!(
        "rules fired: {}",
        if r.fired.is_empty() {
            "none".into()
        } else {
            r.fired.join(", ")
        }
    );
    let Some(m) = &r.mismatch else {
        println!(
            "no mismatch: every output within {tol:e} · (1 + |reference|) of the interpreter ({} run)",
            r.runs
        );
        return;
    };
    println!(
        "mismatch: output `{}` element {}: interpreter {:.6e}, compiled {:.6e}",
        m.output, m.index, m.values.0, m.values.1
    );
    if r.culprits.is_empty() {
        println!(
            "no rule is to blame: the mismatch stays with every fired rule disabled (a kernel or the planner; {} runs)",
            r.runs
        );
        return;
    }
    println!("culprit rules ({} runs): {}", r.runs, r.culprits.join(", "));
    match &r.divergence {
        Some(d) => println!("first diverging node: `{}` (max |diff| {:.3e})", d.node, d.max_diff),
        None => println!("no node of the optimized graph diverges on the interpreter: the compiled kernels do"),
    }
    println!(
        "recompile with --disable-rule {} to avoid it",
        r.culprits.join(" --disable-rule ")
    );
}
