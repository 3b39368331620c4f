//! Layers that make, join or cut whole tensors: `Param` (a learned tensor as it is), `Concat`,
//! `SoftCap` (Gemma 2's logit soft-capping), and `Slice` along a symbolic axis.

use kiln_ir::{BinaryOp, DType, Dim, NodeId, Op, UnaryOp};

use super::{LResult, Lowerer, ParamRole, Scope};
use crate::ast::{FloatExpr, IntExpr};
use crate::diag::{Diagnostic, SpecPath};

impl Lowerer<'_> {
    /// `Param(weight, shape)`: the checkpoint tensor `weight`, of exactly `shape`.
    pub(super) fn param_layer(
        &mut self,
        weight: &str,
        shape: &[IntExpr],
        path: &SpecPath,
        scope: &Scope,
    ) -> LResult<NodeId> {
        if shape.is_empty() {
            return Err(Diagnostic::at(path.field("shape"), "Param needs a shape with at least one axis").into());
        }
        let mut dims = Vec::new();
        for d in shape {
            dims.push(self.pos(d, &scope.env, path, "shape")?);
        }
        self.param(weight, &dims, ParamRole::Tensor, &scope.env, path, "weight")
    }

    /// `Concat(xs, axis)`: joins along `axis`; on every other axis, an extent of 1 stretches to
    /// the others' extent (a `[1, 1, d]` class token joins `[batch, n, d]` patches).
    pub(super) fn concat(
        &mut self,
        xs: &[String],
        axis: i64,
        n: &str,
        path: &SpecPath,
        scope: &Scope,
    ) -> LResult<NodeId> {
        if xs.is_empty() {
            return Err(Diagnostic::at(path.field("xs"), "Concat needs at least one tensor").into());
        }
        let mut ids = Vec::new();
        for x in xs {
            ids.push(self.get(scope, path, "xs", x)?);
        }
        let tys: Vec<_> = ids.iter().map(|&i| self.ty(i)).collect();
        let rank = tys[0].rank();
        if let Some((x, t)) = xs
            .iter()
            .zip(&tys)
            .find(|(_, t)| t.rank() != rank || t.dtype != tys[0].dtype)
        {
            return Err(Diagnostic::at(
                path.field("xs"),
                format!(
                    "Concat joins tensors of one rank and dtype: `{}` is {}, but `{x}` is {t}",
                    xs[0], tys[0]
                ),
            )
            .into());
        }
        let ax = self.axis(axis, rank, path, "axis")?;
        for (x, t) in xs.iter().zip(&tys) {
            if t.shape[ax].as_known().is_none() {
                return Err(Diagnostic::at(
                    path.field("axis"),
                    format!("Concat along a symbolic axis is not supported: axis {ax} of `{x}` is {t}"),
                )
                .into());
            }
        }
        let mut target = tys[0].shape.clone();
        for i in (0..rank).filter(|&i| i != ax) {
            let mut d = Dim::known(1);
            for (x, t) in xs.iter().zip(&tys) {
                let e = &t.shape[i];
                if e.is_one() || *e == d {
                    continue;
                }
                if !d.is_one() {
                    return Err(Diagnostic::at(
                        path.field("xs"),
                        format!("Concat: axis {i} of `{x}` is {e}, but an earlier tensor's is {d} (only an extent of 1 stretches)"),
                    )
                    .label("shape mismatch")
                    .into());
                }
                d = e.clone();
            }
            target[i] = d;
        }
        let mut parts = Vec::new();
        for (k, (&id, t)) in ids.iter().zip(&tys).enumerate() {
            let mut shape = target.clone();
            shape[ax] = t.shape[ax].clone();
            parts.push(if shape == t.shape {
                id
            } else {
                self.add(
                    Op::Broadcast { shape },
                    &[id],
                    format!("{n}/stretch{k}"),
                    path,
                    "Concat",
                )?
            });
        }
        self.add(Op::Concat { axis: ax }, &parts, n.to_string(), path, "Concat")
    }

    /// `SoftCap(x, cap)`: `cap · tanh(x / cap)`.
    pub(super) fn soft_cap(
        &mut self,
        x: &str,
        cap: &FloatExpr,
        n: &str,
        path: &SpecPath,
        scope: &Scope,
    ) -> LResult<NodeId> {
        let c = self.float(cap, &scope.env, path, "cap")?;
        if !(c.is_finite() && c > 0.0) {
            return Err(Diagnostic::at(
                path.field("cap"),
                format!("`cap` is {c}, but must be a positive number"),
            )
            .into());
        }
        let xi = self.get(scope, path, "x", x)?;
        let t = self.float_input(xi, path, "x", "SoftCap")?;
        let inv = self.scalar(1.0 / c, t.dtype, n);
        let s = self.bin(BinaryOp::Mul, xi, inv, format!("{n}/scaled"), path, "SoftCap")?;
        let th = self.un(UnaryOp::Tanh, s, format!("{n}/tanh"), path, "SoftCap")?;
        let cv = self.scalar(c, t.dtype, n);
        self.bin(BinaryOp::Mul, th, cv, n.to_string(), path, "SoftCap")
    }

    /// `start..end` of a symbolic axis (BERT's pooler reads position 0 of `seq`): a gather of
    /// the constant positions, which checks them against the extent at run time — a sequence
    /// shorter than `end` is an index error, never a read past the tensor.
    pub(super) fn slice_symbolic(
        &mut self,
        x: NodeId,
        axis: usize,
        (start, end): (u64, u64),
        n: &str,
        path: &SpecPath,
    ) -> LResult<NodeId> {
        let iota = Op::Iota {
            len: Dim::known(end - start),
            dtype: DType::I64,
        };
        let mut idx = self.add(iota, &[], format!("{n}/positions"), path, "Slice")?;
        if start > 0 {
            let s = self.scalar(start as f64, DType::I64, n);
            idx = self.bin(BinaryOp::Add, idx, s, format!("{n}/from"), path, "Slice")?;
        }
        self.add(Op::Gather { axis }, &[x, idx], n.to_string(), path, "Slice")
    }
}
