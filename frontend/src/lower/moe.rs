//! `Moe`: a mixture of experts. The router's logits are an ordinary tensor of the spec (usually a
//! `Linear`); the layer binds every expert's three weights through its `{e}` name templates and
//! becomes one `Op::Moe`, whose routing is decided at run time.

use kiln_ir::{ExpertAct, Gating, NodeId, Op};

use super::{LResult, Lowerer, ParamRole, Scope};
use crate::ast::{Layer, MoeAct, MoeScores};
use crate::diag::{Diagnostic, SpecPath};

/// More experts than this is almost certainly a wrong config value.
const MAX_EXPERTS: u64 = 4096;

impl Lowerer<'_> {
    /// Lowers a `Layer::Moe`.
    pub(super) fn moe(&mut self, layer: &Layer, n: &str, path: &SpecPath, scope: &Scope) -> LResult<NodeId> {
        let Layer::Moe {
            x,
            logits,
            experts,
            top_k,
            dim,
            ffn,
            gate,
            up,
            down,
            scores,
            renormalize,
            act,
        } = layer
        else {
            unreachable!("moe() is called for Moe layers");
        };
        let env = &scope.env;
        let ne = self.pos(experts, env, path, "experts")?;
        if ne > MAX_EXPERTS {
            let msg = format!("`experts` is {ne}, more than the {MAX_EXPERTS} a mixture of experts may have");
            return Err(Diagnostic::at(path.field("experts"), msg).into());
        }
        let k = self.pos(top_k, env, path, "top_k")?;
        if k > ne {
            let msg = format!("`top_k` is {k}, but there are only {ne} experts");
            return Err(Diagnostic::at(path.field("top_k"), msg).into());
        }
        let d = self.pos(dim, env, path, "dim")?;
        let f = self.pos(ffn, env, path, "ffn")?;
        let xi = self.get(scope, path, "x", x)?;
        self.float_input(xi, path, "x", "Moe")?;
        self.check_last(xi, d, path, "x", "Moe", "dim")?;
        let li = self.get(scope, path, "logits", logits)?;
        self.check_logits(xi, li, ne, path)?;
        let mut args = vec![xi, li];
        for e in 0..ne {
            let mut env = env.clone();
            env.ints.insert("e".into(), e as i64);
            for (field, template, shape) in [("gate", gate, [f, d]), ("up", up, [f, d]), ("down", down, [d, f])] {
                if !template.contains("{e}") {
                    let msg = format!("`{field}` names one weight for every expert; write the expert's index as `{{e}}` (e.g. `…experts.{{e}}.w1.weight`)");
                    return Err(Diagnostic::at(path.field(field), msg).into());
                }
                args.push(self.param(template, &shape, ParamRole::Matrix, &env, path, field)?);
            }
        }
        let op = Op::Moe {
            experts: ne as u32,
            top_k: k as u32,
            gating: match scores {
                MoeScores::Softmax => Gating::Softmax,
                MoeScores::Sigmoid => Gating::Sigmoid,
            },
            renormalize: *renormalize,
            act: match act {
                MoeAct::Silu => ExpertAct::Silu,
                MoeAct::Gelu => ExpertAct::Gelu,
                MoeAct::GeluTanh => ExpertAct::GeluTanh,
                MoeAct::Relu => ExpertAct::Relu,
            },
        };
        self.add(op, &args, n.to_string(), path, "Moe")
    }

    /// Router logits must be f32 `[.., experts]` with `x`'s leading axes.
    fn check_logits(&self, x: NodeId, l: NodeId, experts: u64, path: &SpecPath) -> LResult<()> {
        let (xt, lt) = (self.ty(x), self.ty(l));
        let mut want = xt.shape.clone();
        want.pop();
        want.push(kiln_ir::Dim::known(experts));
        if lt.dtype != kiln_ir::DType::F32 || xt.dtype != kiln_ir::DType::F32 || lt.shape != want {
            let want = kiln_ir::TensorType::new(kiln_ir::DType::F32, want);
            let msg =
                format!("Moe expects router logits {want} (x's leading axes, then one per expert), but this is {lt}");
            return Err(Diagnostic::at(path.field("logits"), msg).label("shape mismatch").into());
        }
        Ok(())
    }
}
