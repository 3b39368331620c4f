//! MatFormer's nested weights: a `Linear` with `full: [..]` binds the checkpoint tensor at its
//! stored (larger) shape and uses its leading block, so one checkpoint serves every width
//! (`--set ffn=1024`). The slices depend on weights only: the compiler folds them into the
//! artifact, which then holds just the block the chosen width uses.

use kiln_ir::{NodeId, Op};

use super::{LResult, Lowerer};
use crate::ast::IntExpr;
use crate::diag::{Diagnostic, SpecPath};
use crate::expr::Env;

impl Lowerer<'_> {
    /// The stored shape of a weight used as `used` (`full` when given, at least `used` on every
    /// axis).
    pub(super) fn full_shape(
        &self,
        full: &Option<Vec<IntExpr>>,
        used: [u64; 2],
        env: &Env,
        path: &SpecPath,
    ) -> LResult<[u64; 2]> {
        let Some(full) = full else { return Ok(used) };
        if full.len() != 2 {
            return Err(Diagnostic::at(
                path.field("full"),
                format!("`full` is the stored weight's shape, two axes; this has {}", full.len()),
            )
            .into());
        }
        let stored = [
            self.pos(&full[0], env, path, "full")?,
            self.pos(&full[1], env, path, "full")?,
        ];
        if stored[0] < used[0] || stored[1] < used[1] {
            return Err(Diagnostic::at(
                path.field("full"),
                format!("the stored weight {stored:?} is smaller than the block the layer uses, {used:?}"),
            )
            .into());
        }
        Ok(stored)
    }

    /// The leading `used` block of `w` (itself when it is that size).
    pub(super) fn leading(&mut self, w: NodeId, used: &[u64], n: &str, path: &SpecPath) -> LResult<NodeId> {
        let mut cur = w;
        for (axis, &u) in used.iter().enumerate() {
            let have = self.ty(cur).shape[axis].as_known();
            if have != Some(u) {
                let op = Op::Slice { axis, start: 0, end: u };
                cur = self.add(op, &[cur], format!("{n}/leading{axis}"), path, "Linear")?;
            }
        }
        Ok(cur)
    }
}
