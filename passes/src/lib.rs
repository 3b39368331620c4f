//! kiln's graph passes and the pass manager.
//!
//! Each pass is a plain function `fn(&mut Graph) -> PassStats` in its own module. A pipeline
//! ([`OptLevel`]) runs passes in a fixed order, times each one, and — in tests and debug builds,
//! or when asked — runs [`kiln_ir::verify`] after each, so a broken invariant is caught at the
//! pass that broke it. `simplify` runs the e-graph (algebraic and layout rules); `narrow`,
//! `merge-projections` and the weight rewrites (`quantize`, `sparsity`, `shrink`, which need weight
//! values and run after the pipeline) are plain graph passes.

#![deny(missing_docs)]

pub mod cost;
pub mod cse;
pub mod dce;
pub mod egraph;
pub mod forms;
pub mod fuse;
pub mod fuse_attention;
pub mod fuse_gemm;
pub mod fuse_kernel;
pub mod layout;
pub mod merge_projections;
pub mod narrow;
pub mod quantize;
pub mod rules;
pub mod shrink;
pub mod simplify;
pub mod sparsity;

use std::time::{Duration, Instant};

use kiln_ir::{verify, Graph, VerifyError};

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Nodes removed.
    pub removed: usize,
    /// Nodes whose uses were redirected to an equivalent node.
    pub merged: usize,
    /// What else the pass reports (rules fired, saturation stop reason).
    pub notes: Vec<String>,
    /// The rewrite rules that fired, by name (what `kiln bisect` searches).
    pub fired: Vec<String>,
}

/// One line of a pipeline report.
#[derive(Clone, Debug)]
pub struct PassReport {
    /// Pass name.
    pub pass: &'static str,
    /// Live nodes before.
    pub nodes_before: usize,
    /// Live nodes after.
    pub nodes_after: usize,
    /// What it did.
    pub stats: PassStats,
    /// Wall time.
    pub time: Duration,
}

/// Why a pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// A pass left the graph invalid: a compiler bug.
    #[error("internal compiler error: the graph is invalid after pass `{pass}`: {source}")]
    Verify {
        /// The pass that ran last.
        pass: &'static str,
        /// The broken invariant.
        #[source]
        source: VerifyError,
    },
    /// An IR dump could not be written.
    #[error("writing {path}: {source}")]
    Dump {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `--disable-rule` named no rule.
    #[error("no rewrite rule is called `{name}` (rules: {known})")]
    UnknownRule {
        /// The name given.
        name: String,
        /// Every rule's name.
        known: String,
    },
    /// An added rule's patterns do not parse.
    #[error("rule `{name}`: {msg}")]
    BadRule {
        /// The rule.
        name: String,
        /// What is wrong with it.
        msg: String,
    },
}

/// How to run a pipeline.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    /// Run the verifier after every pass (tests and debug builds should).
    pub verify_each: bool,
    /// Rewrite rules not to apply, by name.
    pub disabled_rules: Vec<String>,
    /// Write the text IR before the first pass and after every pass into this directory.
    pub dump_dir: Option<std::path::PathBuf>,
    /// The target whose cost model drives extraction (`cpu` when unset).
    pub target: Option<&'static str>,
    /// Rules added to the rule set (tests plant deliberately wrong ones for `kiln bisect`).
    pub extra_rules: Vec<rules::PatternRule>,
}

impl PipelineOptions {
    /// The cost model of the target.
    pub fn cost_model(&self) -> cost::CostModel {
        self.target
            .and_then(cost::CostModel::for_target)
            .unwrap_or_else(cost::CostModel::cpu)
    }
}

/// Optimization pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptLevel {
    /// Only remove dead code.
    O0,
    /// Dead code and common subexpressions.
    O1,
    /// O1 plus algebraic and layout rewrites by equality saturation, early narrowing, and merged
    /// projections.
    O2,
}

type PassFn = fn(&mut Graph, &PipelineOptions) -> PassStats;

fn pipeline(level: OptLevel) -> &'static [(&'static str, PassFn)] {
    match level {
        OptLevel::O0 => &[("dce", dce::run)],
        OptLevel::O1 => &[("dce", dce::run), ("cse", cse::run), ("dce", dce::run)],
        OptLevel::O2 => &[
            ("dce", dce::run),
            ("cse", cse::run),
            ("dce", dce::run),
            ("simplify", simplify::run),
            ("narrow", narrow::run),
            ("dce", dce::run),
            ("cse", cse::run),
            ("merge-projections", merge_projections::run),
            ("dce", dce::run),
        ],
    }
}

/// Runs the pipeline for `level`; verifies after every pass when `verify_each` is set.
pub fn optimize(graph: &mut Graph, level: OptLevel, verify_each: bool) -> Result<Vec<PassReport>, PassError> {
    optimize_with(
        graph,
        level,
        &PipelineOptions {
            verify_each,
            ..PipelineOptions::default()
        },
    )
}

/// Runs the pipeline for `level` with options (rule switches, IR dumps).
pub fn optimize_with(graph: &mut Graph, level: OptLevel, opts: &PipelineOptions) -> Result<Vec<PassReport>, PassError> {
    let known: Vec<String> = rules::all()
        .iter()
        .chain(fuse::rules().iter())
        .map(|r| r.name.to_string())
        .chain(opts.extra_rules.iter().map(|r| r.name.clone()))
        .collect();
    for r in &opts.extra_rules {
        r.rule().map_err(|msg| PassError::BadRule {
            name: r.name.clone(),
            msg,
        })?;
    }
    for name in &opts.disabled_rules {
        if !known.contains(name) {
            return Err(PassError::UnknownRule {
                name: name.clone(),
                known: known.join(", "),
            });
        }
    }
    let dump = |step: usize, pass: &str, g: &Graph| -> Result<(), PassError> {
        let Some(dir) = &opts.dump_dir else { return Ok(()) };
        let path = dir.join(format!("{step:02}-{pass}.txt"));
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&path, g.to_text()))
            .map_err(|source| PassError::Dump {
                path: path.display().to_string(),
                source,
            })
    };
    dump(0, "input", graph)?;
    let mut reports = Vec::new();
    for (i, (name, pass)) in pipeline(level).iter().enumerate() {
        let nodes_before = graph.len();
        let start = Instant::now();
        let stats = pass(graph, opts);
        let time = start.elapsed();
        log::debug!("pass {name}: {nodes_before} -> {} nodes in {time:?}", graph.len());
        if opts.verify_each {
            verify(graph).map_err(|source| PassError::Verify { pass: name, source })?;
        }
        dump(i + 1, name, graph)?;
        reports.push(PassReport {
            pass: name,
            nodes_before,
            nodes_after: graph.len(),
            stats,
            time,
        });
    }
    Ok(reports)
}
