//! `BlockLinear`: a block-diagonal product (Monarch Mixer's building block). `x [.., in]` is cut
//! into `blocks` consecutive slices; slice `b` meets weight block `b` (`[out/blocks, in/blocks]`,
//! PyTorch's `Linear` layout). Lowered as one batched product over the blocks: the rows become
//! `[blocks, rows, in/blocks]`, so each block is a full-height GEMM rather than a product per row.

use kiln_ir::{BinaryOp, Dim, NodeId, Op};

use super::{LResult, Lowerer, ParamRole, Scope};
use crate::ast::{BiasField, Layer};
use crate::diag::{Diagnostic, SpecPath};

impl Lowerer<'_> {
    /// Lowers a `Layer::BlockLinear`.
    pub(super) fn block_linear(&mut self, layer: &Layer, n: &str, path: &SpecPath, scope: &Scope) -> LResult<NodeId> {
        let Layer::BlockLinear {
            x,
            param,
            weight,
            bias,
            blocks,
            in_features,
            out_features,
        } = layer
        else {
            unreachable!("block_linear() is called for BlockLinear layers");
        };
        let env = &scope.env;
        let nb = self.pos(blocks, env, path, "blocks")?;
        let fin = self.pos(in_features, env, path, "in_features")?;
        let fout = self.pos(out_features, env, path, "out_features")?;
        if fin % nb != 0 || fout % nb != 0 {
            return Err(Diagnostic::at(
                path.field("blocks"),
                format!("blocks = {nb} must divide in_features = {fin} and out_features = {fout}"),
            )
            .into());
        }
        let xi = self.get(scope, path, "x", x)?;
        let t = self.float_input(xi, path, "x", "BlockLinear")?;
        self.check_last(xi, fin, path, "x", "BlockLinear", "in_features")?;
        let (wn, bn) = self.weight_names(param, weight, bias, path, "BlockLinear")?;
        let wfield = if param.is_some() { "param" } else { "weight" };
        let w = self.param(&wn, &[nb, fout / nb, fin / nb], ParamRole::Matrix, env, path, wfield)?;
        let lead = &t.shape[..t.rank() - 1];
        let rows = Dim::product(lead);
        let k = Dim::known;
        let step =
            |me: &mut Self, op: Op, a: &[NodeId], what: &str| me.add(op, a, format!("{n}/{what}"), path, "BlockLinear");
        let x3 = step(
            self,
            Op::Reshape {
                shape: vec![rows.clone(), k(nb), k(fin / nb)],
            },
            &[xi],
            "blocks",
        )?;
        let xb = step(self, Op::Transpose { perm: vec![1, 0, 2] }, &[x3], "by_block")?;
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        let yb = step(self, mm, &[xb, w], "matmul")?;
        let y3 = step(self, Op::Transpose { perm: vec![1, 0, 2] }, &[yb], "by_row")?;
        let mut shape = lead.to_vec();
        shape.push(k(fout));
        let mut y = step(self, Op::Reshape { shape }, &[y3], "joined")?;
        if let Some(bn) = bn {
            let f = if matches!(bias, Some(BiasField::Name(_))) {
                "bias"
            } else {
                wfield
            };
            let b = self.param(&bn, &[fout], ParamRole::Bias, env, path, f)?;
            y = self.bin(BinaryOp::Add, y, b, format!("{n}/bias"), path, "BlockLinear")?;
        }
        Ok(y)
    }
}
