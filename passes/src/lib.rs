//! kiln's graph passes and the pass manager.
//!
//! Each pass is a plain function `fn(&mut Graph) -> PassStats` in its own module. A pipeline
//! ([`OptLevel`]) runs passes in a fixed order, times each one, and — in tests and debug builds,
//! or when asked — runs [`kiln_ir::verify`] after each, so a broken invariant is caught at the
//! pass that broke it. The e-graph optimizer (algebraic, layout and fusion rewrites) will be
//! further passes in this crate.

#![deny(missing_docs)]

pub mod cse;
pub mod dce;
pub mod egraph;
pub mod rules;
pub mod simplify;

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

/// A pass left the graph invalid: a compiler bug.
#[derive(Debug, thiserror::Error)]
#[error("internal compiler error: the graph is invalid after pass `{pass}`: {source}")]
pub struct PassError {
    /// The pass that ran last.
    pub pass: &'static str,
    /// The broken invariant.
    #[source]
    pub source: VerifyError,
}

/// Optimization pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptLevel {
    /// Only remove dead code.
    O0,
    /// Dead code and common subexpressions.
    O1,
    /// O1 plus algebraic simplification by equality saturation.
    O2,
}

type PassFn = fn(&mut Graph) -> PassStats;

fn pipeline(level: OptLevel) -> &'static [(&'static str, PassFn)] {
    match level {
        OptLevel::O0 => &[("dce", dce::run)],
        OptLevel::O1 => &[("dce", dce::run), ("cse", cse::run), ("dce", dce::run)],
        OptLevel::O2 => &[("dce", dce::run), ("cse", cse::run), ("dce", dce::run), ("simplify", simplify::run), ("dce", dce::run)],
    }
}

/// Runs the pipeline for `level`; verifies after every pass when `verify_each` is set (tests and
/// debug builds should set it).
pub fn optimize(graph: &mut Graph, level: OptLevel, verify_each: bool) -> Result<Vec<PassReport>, PassError> {
    let mut reports = Vec::new();
    for (name, pass) in pipeline(level) {
        let nodes_before = graph.len();
        let start = Instant::now();
        let stats = pass(graph);
        let time = start.elapsed();
        log::debug!("pass {name}: {nodes_before} -> {} nodes in {time:?}", graph.len());
        if verify_each {
            verify(graph).map_err(|source| PassError { pass: name, source })?;
        }
        reports.push(PassReport { pass: name, nodes_before, nodes_after: graph.len(), stats, time });
    }
    Ok(reports)
}
