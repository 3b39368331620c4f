//! Fused kernels as ops: [`Fused`], what a fusion rule (`kiln-passes`' `fuse*.rs`) puts in the
//! graph. Its meaning is its body — a small graph over the operands, evaluated node by node, the
//! last node being the result — so the interpreter runs a fused op exactly as it runs the ops it
//! replaced, and a backend lowers it to one kernel or library call.
//!
//! [`Fused::gemm`] reads the one body shape fusion makes around a matrix product
//! (`acc + bias + scale · (a @ b)`), for the rules and the planner alike.

use crate::op::{Op, TypeError};
use crate::{BinaryOp, DType, Literal, TensorType};

/// Where a body node reads an operand from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Arg {
    /// The fused op's operand of that index.
    Operand(u32),
    /// An earlier body node.
    Node(u32),
}

/// One node of a fused op's body.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BodyNode {
    /// The op (never an input, a parameter, a cache or another fused op).
    pub op: Op,
    /// Its operands.
    pub args: Vec<Arg>,
}

/// A fused kernel: the rule that made it, how many operands it takes, and its body.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Fused {
    /// The fusion rule that made it (kebab-case), reported with the plan.
    pub rule: String,
    /// Number of operands.
    pub operands: u32,
    /// The body, in evaluation order; the last node is the result.
    pub body: Vec<BodyNode>,
}

/// A matrix product with its epilogue, `acc + bias + scale · (a @ b)`, read from a fused body.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// `a`'s last two axes swapped.
    pub transpose_a: bool,
    /// `b`'s last two axes swapped.
    pub transpose_b: bool,
    /// Multiplies the product (1 when the body has no scale).
    pub scale: f32,
    /// The operand added as a bias row, if any.
    pub bias: Option<u32>,
    /// The operand added element for element, if any.
    pub acc: Option<u32>,
}

impl Fused {
    /// The body nodes' types, given the operands' types.
    pub fn types(&self, args: &[&TensorType]) -> Result<Vec<TensorType>, TypeError> {
        if args.len() != self.operands as usize {
            return Err(TypeError(format!(
                "fused `{}` takes {} operand(s), got {}",
                self.rule,
                self.operands,
                args.len()
            )));
        }
        if self.body.is_empty() {
            return Err(TypeError(format!("fused `{}` has an empty body", self.rule)));
        }
        let mut tys: Vec<TensorType> = Vec::with_capacity(self.body.len());
        for (i, n) in self.body.iter().enumerate() {
            if matches!(
                n.op,
                Op::Input { .. } | Op::Param { .. } | Op::CacheAppend { .. } | Op::Fused(_)
            ) {
                return Err(TypeError(format!(
                    "fused `{}`: body node {i} is a {}, which a body cannot hold",
                    self.rule,
                    n.op.mnemonic()
                )));
            }
            let mut at = Vec::with_capacity(n.args.len());
            for a in &n.args {
                at.push(match *a {
                    Arg::Operand(o) if (o as usize) < args.len() => args[o as usize],
                    Arg::Node(j) if (j as usize) < i => &tys[j as usize],
                    _ => {
                        return Err(TypeError(format!(
                            "fused `{}`: body node {i} reads {a:?}, which does not exist before it",
                            self.rule
                        )))
                    }
                });
            }
            let t =
                n.op.infer(&at)
                    .map_err(|e| TypeError(format!("fused `{}`, body node {i}: {e}", self.rule)))?;
            tys.push(t);
        }
        Ok(tys)
    }

    /// The result type.
    pub fn infer(&self, args: &[&TensorType]) -> Result<TensorType, TypeError> {
        Ok(self.types(args)?.pop().expect("types checks the body is not empty"))
    }

    /// The body in the text form: `%0 = matmul tb(#0, #1); %1 = add(%0, #2)`.
    pub fn attrs(&self) -> String {
        let arg = |a: &Arg| match a {
            Arg::Operand(o) => format!("#{o}"),
            Arg::Node(n) => format!("%{n}"),
        };
        let nodes: Vec<String> = self
            .body
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let attrs = n.op.attrs();
                let args: Vec<String> = n.args.iter().map(arg).collect();
                let sep = if attrs.is_empty() { "" } else { " " };
                format!("%{i} = {}{sep}{attrs}({})", n.op.mnemonic(), args.join(", "))
            })
            .collect();
        format!("{} {{{}}}", self.rule, nodes.join("; "))
    }

    /// A product of operands 0 and 1, with no epilogue yet.
    pub fn gemm_of(rule: &str, transpose_a: bool, transpose_b: bool) -> Fused {
        Fused {
            rule: rule.to_string(),
            operands: 2,
            body: vec![BodyNode {
                op: Op::MatMul {
                    transpose_a,
                    transpose_b,
                },
                args: vec![Arg::Operand(0), Arg::Operand(1)],
            }],
        }
    }

    /// This product times the constant `c`.
    pub fn with_scale(&self, c: f32) -> Fused {
        let mut f = self.clone();
        let last = f.last();
        f.body.push(BodyNode {
            op: Op::Scalar {
                value: Literal::float(c as f64),
                dtype: DType::F32,
            },
            args: vec![],
        });
        f.body.push(BodyNode {
            op: Op::Binary(BinaryOp::Mul),
            args: vec![Arg::Node(last), Arg::Node(last + 1)],
        });
        f
    }

    /// This result plus a new last operand.
    pub fn with_added(&self) -> Fused {
        let mut f = self.clone();
        let last = f.last();
        f.body.push(BodyNode {
            op: Op::Binary(BinaryOp::Add),
            args: vec![Arg::Node(last), Arg::Operand(f.operands)],
        });
        f.operands += 1;
        f
    }

    fn last(&self) -> u32 {
        self.body.len() as u32 - 1
    }

    /// The product and epilogue, when the body is `matmul(#0, #1)` followed by at most a
    /// multiplication by a constant, then at most a bias, then at most an element-wise addend
    /// (the operands given the types to tell the two additions apart).
    pub fn gemm(&self, args: &[&TensorType]) -> Option<Gemm> {
        let tys = self.types(args).ok()?;
        let (first, rest) = self.body.split_first()?;
        let Op::MatMul {
            transpose_a,
            transpose_b,
        } = first.op
        else {
            return None;
        };
        if first.args != [Arg::Operand(0), Arg::Operand(1)] {
            return None;
        }
        let mut g = Gemm {
            transpose_a,
            transpose_b,
            scale: 1.0,
            bias: None,
            acc: None,
        };
        let mut i = 1;
        let mut prev = 0u32;
        while i < self.body.len() {
            let n = &rest[i - 1];
            match (&n.op, n.args.as_slice()) {
                (Op::Scalar { value, .. }, []) if g.scale == 1.0 && g.bias.is_none() && g.acc.is_none() => {
                    let mul = self.body.get(i + 1)?;
                    let want = [Arg::Node(prev), Arg::Node(i as u32)];
                    if mul.op != Op::Binary(BinaryOp::Mul) || mul.args != want {
                        return None;
                    }
                    g.scale = value.as_f64() as f32;
                    prev = i as u32 + 1;
                    i += 2;
                    continue;
                }
                (Op::Binary(BinaryOp::Add), [Arg::Node(p), Arg::Operand(o)]) if *p == prev && g.acc.is_none() => {
                    let (pt, ot) = (&tys[prev as usize], args[*o as usize]);
                    if ot == pt {
                        g.acc = Some(*o);
                    } else if g.bias.is_none() && ot.rank() == 1 && ot.shape.last() == pt.shape.last() {
                        g.bias = Some(*o);
                    } else {
                        return None;
                    }
                }
                _ => return None,
            }
            prev = i as u32;
            i += 1;
        }
        Some(g)
    }
}
