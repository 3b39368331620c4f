//! `Positions(of, padding_idx)`: RoBERTa's position ids, which count only the real tokens and
//! start after the padding id: `cumsum(ids != pad) · (ids != pad) + pad`. Padding takes position
//! `pad`; the first real token `pad + 1`, wherever padding sits (left or right). The running count
//! is a product with a triangular matrix of ones — exact in f32 for any sequence kiln accepts.

use kiln_ir::{BinaryOp, CmpOp, DType, Dim, NodeId, Op};

use super::{LResult, Lowerer};
use crate::diag::{Diagnostic, SpecPath};

impl Lowerer<'_> {
    /// Position ids of `ids [batch, seq]` that skip padding tokens equal to `pad`.
    pub(super) fn padded_positions(&mut self, ids: NodeId, pad: i64, n: &str, path: &SpecPath) -> LResult<NodeId> {
        let t = self.ty(ids);
        if t.rank() != 2 || !t.dtype.is_int() {
            let msg = format!("positions with `padding_idx` count the tokens of integer ids [batch, seq]; this is {t}");
            return Err(Diagnostic::at(path.field("of"), msg).into());
        }
        if self.decode.is_some() {
            let msg = "positions with `padding_idx` (RoBERTa) are for encoders; decoding supplies its own positions";
            return Err(Diagnostic::at(path.field("padding_idx"), msg).into());
        }
        let seq = t.shape[1].clone();
        let step =
            |me: &mut Self, op: Op, a: &[NodeId], what: &str| me.add(op, a, format!("{n}/{what}"), path, "Positions");
        let pad_id = self.scalar(pad as f64, t.dtype, &format!("{n}/pad_id"));
        let real = step(self, Op::Compare(CmpOp::Ne), &[ids, pad_id], "real")?;
        let real = step(self, Op::Cast { to: DType::F32 }, &[real], "real_f32")?;
        // upper[j, i] = (j <= i): row `real` times it sums the real tokens up to position i.
        let iota = Op::Iota {
            len: seq.clone(),
            dtype: DType::I64,
        };
        let idx = step(self, iota, &[], "index")?;
        let col = step(
            self,
            Op::Reshape {
                shape: vec![seq.clone(), Dim::known(1)],
            },
            &[idx],
            "as_column",
        )?;
        let row = step(
            self,
            Op::Reshape {
                shape: vec![Dim::known(1), seq],
            },
            &[idx],
            "as_row",
        )?;
        let upper = step(self, Op::Compare(CmpOp::Le), &[col, row], "upper")?;
        let upper = step(self, Op::Cast { to: DType::F32 }, &[upper], "upper_f32")?;
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        };
        let count = step(self, mm, &[real, upper], "count")?;
        let counted = step(self, Op::Binary(BinaryOp::Mul), &[count, real], "counted")?;
        let pad_f = self.scalar(pad as f64, DType::F32, &format!("{n}/pad"));
        let pos = step(self, Op::Binary(BinaryOp::Add), &[counted, pad_f], "offset")?;
        self.add(Op::Cast { to: DType::I64 }, &[pos], n.to_string(), path, "Positions")
    }
}
