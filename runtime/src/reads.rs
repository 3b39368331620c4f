//! The weight bytes a run reads (`RunStats::weight_bytes_read`), worked out once per model: every
//! weight operand of a step, once; a lookup in a weight table only the rows it gathers (known per
//! run); a mixture of experts' expert weights are left to its step, which counts the experts it
//! routed to as it runs.

use std::collections::HashSet;

use crate::plan::{Manifest, Step, Storage};

/// What a model's steps read of its weights.
#[derive(Clone, Debug, Default)]
pub(crate) struct WeightReads {
    /// Bytes read by every run whatever its shapes.
    fixed: usize,
    /// Per table lookup: the table's bytes and the value the lookup writes.
    lookups: Vec<(usize, u32)>,
}

impl WeightReads {
    pub(crate) fn of(m: &Manifest) -> WeightReads {
        let weight = |mut v: u32| loop {
            match m.values[v as usize].storage {
                Storage::Weight { len, .. } => return len as usize,
                Storage::Alias(src) => v = src,
                _ => return 0,
            }
        };
        let mut seen = HashSet::new();
        let mut r = WeightReads::default();
        for step in &m.steps {
            if let Step::Gather { table, out, .. } = step {
                r.lookups.push((weight(*table), *out));
                continue;
            }
            let reads = step.inputs();
            let reads = match step {
                Step::Fallback {
                    op: kiln_ir::Op::Moe { .. },
                    ..
                } => &reads[..2],
                _ => &reads[..],
            };
            for v in reads {
                if seen.insert(*v) {
                    r.fixed += weight(*v);
                }
            }
        }
        r
    }

    /// The bytes a run with values of `sizes` bytes reads (expert weights aside).
    pub(crate) fn bytes(&self, sizes: &[usize]) -> usize {
        self.fixed
            + self
                .lookups
                .iter()
                .map(|(t, out)| (*t).min(sizes[*out as usize]))
                .sum::<usize>()
    }
}
