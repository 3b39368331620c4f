//! `Conv`: PyTorch's `Conv1d`/`Conv2d` as primitive ops (im2col, then one matrix product).
//!
//! Each spatial axis `S` is padded with zeros, then turned into `[S_out, k]` window positions:
//! by a reshape when `stride == kernel` (patch embeddings: no copy beyond the layout change), or by
//! `k` strided slices joined on a new axis otherwise. The columns `[batch, S_out…, C·k…]` meet the
//! weight `[O, C·k…]` in one `MatMul` (grouped: one batched product per group), so the optimizer
//! packs and fuses it like any projection, and every backend runs it without a convolution kernel.

use kiln_ir::{BinaryOp, Dim, Literal, NodeId, Op, TensorType};

use super::{LResult, Lowerer, ParamRole, Scope};
use crate::ast::{BiasField, IntExpr, Layer, PerAxis};
use crate::diag::{Diagnostic, SpecPath};
use crate::expr::Env;

/// One spatial axis of a convolution.
#[derive(Clone, Copy, Debug)]
struct Axis {
    /// Extent of the input.
    size: u64,
    kernel: u64,
    stride: u64,
    padding: u64,
    /// Extent of the output.
    out: u64,
}

impl Lowerer<'_> {
    /// Lowers a `Layer::Conv`.
    pub(super) fn conv(&mut self, layer: &Layer, n: &str, path: &SpecPath, scope: &Scope) -> LResult<NodeId> {
        let Layer::Conv {
            x,
            param,
            weight,
            bias,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            groups,
        } = layer
        else {
            unreachable!("conv() is called for Conv layers");
        };
        let env = &scope.env;
        let c = self.pos(in_channels, env, path, "in_channels")?;
        let o = self.pos(out_channels, env, path, "out_channels")?;
        let g = match groups {
            Some(e) => self.pos(e, env, path, "groups")?,
            None => 1,
        };
        if c % g != 0 || o % g != 0 {
            return Err(Diagnostic::at(
                path.field("groups"),
                format!("groups = {g} must divide in_channels = {c} and out_channels = {o}"),
            )
            .into());
        }
        let xi = self.get(scope, path, "x", x)?;
        let t = self.float_input(xi, path, "x", "Conv")?;
        let axes = self.conv_axes((x, &t), c, kernel, stride, padding, env, path)?;
        let (wn, bn) = self.weight_names(param, weight, bias, path, "Conv")?;
        let wfield = if param.is_some() { "param" } else { "weight" };
        let mut wshape = vec![o, c / g];
        wshape.extend(axes.iter().map(|a| a.kernel));
        let w = self.param(&wn, &wshape, ParamRole::Matrix, env, path, wfield)?;
        let b = match bn {
            Some(bn) => {
                let f = if matches!(bias, Some(BiasField::Name(_))) {
                    "bias"
                } else {
                    wfield
                };
                Some(self.param(&bn, &[o], ParamRole::Bias, env, path, f)?)
            }
            None => None,
        };
        let cols = self.im2col(xi, &axes, n, path)?;
        self.conv_product(cols, w, b, (&t.shape[0], c, o, g), &axes, n, path)
    }

    /// Checks `x [batch, channels, spatial…]` and works out each spatial axis.
    #[allow(clippy::too_many_arguments)]
    fn conv_axes(
        &self,
        (x, t): (&str, &TensorType),
        c: u64,
        kernel: &PerAxis,
        stride: &Option<PerAxis>,
        padding: &Option<PerAxis>,
        env: &Env,
        path: &SpecPath,
    ) -> LResult<Vec<Axis>> {
        if !(3..=4).contains(&t.rank()) {
            return Err(Diagnostic::at(
                path.field("x"),
                format!("Conv takes [batch, channels, length] or [batch, channels, height, width], but `{x}` is {t}"),
            )
            .into());
        }
        if t.shape[1] != Dim::known(c) {
            return Err(Diagnostic::at(
                path.field("x"),
                format!("Conv expects axis 1 of its input to be in_channels = {c}, but `{x}` is {t}"),
            )
            .label("shape mismatch")
            .into());
        }
        let spatial = t.rank() - 2;
        let k = self.per_axis(kernel, spatial, 1, env, path, "kernel")?;
        let s = match stride {
            Some(p) => self.per_axis(p, spatial, 1, env, path, "stride")?,
            None => vec![1; spatial],
        };
        let p = match padding {
            Some(p) => self.per_axis(p, spatial, 0, env, path, "padding")?,
            None => vec![0; spatial],
        };
        let mut axes = Vec::new();
        for i in 0..spatial {
            let Some(size) = t.shape[2 + i].as_known() else {
                return Err(Diagnostic::at(
                    path.field("x"),
                    format!(
                        "Conv needs known spatial extents, but axis {} of `{x}` is symbolic ({t}); fix it in `inputs`",
                        2 + i
                    ),
                )
                .into());
            };
            if p[i] >= k[i] {
                return Err(Diagnostic::at(
                    path.field("padding"),
                    format!(
                        "padding {} is not smaller than kernel {}: windows of padding alone would only repeat the bias",
                        p[i], k[i]
                    ),
                )
                .into());
            }
            let padded = size + 2 * p[i];
            if k[i] > padded {
                return Err(Diagnostic::at(
                    path.field("kernel"),
                    format!(
                        "kernel {} is larger than axis {} of `{x}` with padding ({size} + 2·{} = {padded})",
                        k[i],
                        2 + i,
                        p[i]
                    ),
                )
                .into());
            }
            let out = (padded - k[i]) / s[i] + 1;
            // One window: the stride plays no part; as `kernel` it takes the reshape path rather
            // than padding zeros out to a stride longer than the axis.
            let stride = if out == 1 { k[i] } else { s[i] };
            axes.push(Axis {
                size,
                kernel: k[i],
                stride,
                padding: p[i],
                out,
            });
        }
        Ok(axes)
    }

    /// One value per spatial axis, each at least `min`.
    fn per_axis(
        &self,
        v: &PerAxis,
        spatial: usize,
        min: i64,
        env: &Env,
        path: &SpecPath,
        field: &str,
    ) -> LResult<Vec<u64>> {
        let exprs: Vec<&IntExpr> = match v {
            PerAxis::One(e) => vec![e; spatial],
            PerAxis::Each(es) if es.len() == spatial => es.iter().collect(),
            PerAxis::Each(es) => {
                return Err(Diagnostic::at(
                    path.field(field),
                    format!(
                        "`{field}` has {} values, but the input has {spatial} spatial axes",
                        es.len()
                    ),
                )
                .into())
            }
        };
        let mut out = Vec::new();
        for e in exprs {
            let x = self.int(e, env, path, field)?;
            if x < min {
                return Err(Diagnostic::at(
                    path.field(field),
                    format!("`{field}` is {x}, but must be at least {min}"),
                )
                .into());
            }
            out.push(x as u64);
        }
        Ok(out)
    }

    /// `x [b, c, s…]` as `[b, c, s_out₀, k₀, s_out₁, k₁, …]`: each window's elements, in place of
    /// each spatial axis.
    fn im2col(&mut self, x: NodeId, axes: &[Axis], n: &str, path: &SpecPath) -> LResult<NodeId> {
        let mut cur = x;
        for (i, a) in axes.iter().enumerate() {
            // The axis being windowed sits after batch, channels and the earlier axes' pairs.
            let ax = 2 + 2 * i;
            let name = format!("{n}/axis{i}");
            cur = self.pad(cur, ax, a, &name, path)?;
            cur = if a.stride == a.kernel {
                self.split_axis(cur, ax, a.out, a.kernel, &name, path)?
            } else {
                self.windows(cur, ax, a, &name, path)?
            };
        }
        Ok(cur)
    }

    /// Zero padding on both sides of `ax`, plus zeros on the right up to what the windows read
    /// (`(k - 1) + out·stride` when strided slices are used), or a slice down to it.
    fn pad(&mut self, x: NodeId, ax: usize, a: &Axis, n: &str, path: &SpecPath) -> LResult<NodeId> {
        let padded = a.size + 2 * a.padding;
        let need = if a.stride == a.kernel {
            a.out * a.kernel
        } else {
            (a.kernel - 1 + a.out * a.stride).max(padded)
        };
        let right = a.padding + need.saturating_sub(padded);
        let mut parts = Vec::new();
        if a.padding > 0 {
            parts.push(self.zeros(x, ax, a.padding, &format!("{n}/pad_left"), path)?);
        }
        parts.push(x);
        if right > 0 {
            parts.push(self.zeros(x, ax, right, &format!("{n}/pad_right"), path)?);
        }
        let mut y = x;
        if parts.len() > 1 {
            y = self.add(Op::Concat { axis: ax }, &parts, format!("{n}/pad"), path, "Conv")?;
        }
        if need < padded {
            let op = Op::Slice {
                axis: ax,
                start: 0,
                end: need,
            };
            y = self.add(op, &[y], format!("{n}/trim"), path, "Conv")?;
        }
        Ok(y)
    }

    /// Zeros shaped like `x` but `len` long on `ax`.
    fn zeros(&mut self, x: NodeId, ax: usize, len: u64, n: &str, path: &SpecPath) -> LResult<NodeId> {
        let t = self.ty(x);
        let mut shape = t.shape.clone();
        shape[ax] = Dim::known(len);
        let z = self.add(
            Op::Scalar {
                value: Literal::float(0.0),
                dtype: t.dtype,
            },
            &[],
            format!("{n}/zero"),
            path,
            "Conv",
        )?;
        self.add(Op::Broadcast { shape }, &[z], n.to_string(), path, "Conv")
    }

    /// Axis `ax` of extent `outer·inner` as two axes `[outer, inner]`.
    fn split_axis(
        &mut self,
        x: NodeId,
        ax: usize,
        outer: u64,
        inner: u64,
        n: &str,
        path: &SpecPath,
    ) -> LResult<NodeId> {
        let mut shape = self.ty(x).shape;
        shape.splice(ax..=ax, [Dim::known(outer), Dim::known(inner)]);
        self.add(Op::Reshape { shape }, &[x], format!("{n}/windows"), path, "Conv")
    }

    /// `[.., S, ..]` as `[.., out, k, ..]` from `k` strided slices: tap `j` reads
    /// `j, j + stride, …, j + (out - 1)·stride`.
    fn windows(&mut self, x: NodeId, ax: usize, a: &Axis, n: &str, path: &SpecPath) -> LResult<NodeId> {
        let mut taps = Vec::new();
        for j in 0..a.kernel {
            let tn = format!("{n}/tap{j}");
            let span = Op::Slice {
                axis: ax,
                start: j,
                end: j + a.out * a.stride,
            };
            let mut tap = self.add(span, &[x], format!("{tn}/span"), path, "Conv")?;
            // [.., out·stride, ..] → [.., out, stride, ..] → keep stride offset 0 → [.., out, 1, ..]
            tap = self.split_axis(tap, ax, a.out, a.stride, &tn, path)?;
            if a.stride > 1 {
                let first = Op::Slice {
                    axis: ax + 1,
                    start: 0,
                    end: 1,
                };
                tap = self.add(first, &[tap], format!("{tn}/stride"), path, "Conv")?;
            }
            taps.push(tap);
        }
        self.add(Op::Concat { axis: ax + 1 }, &taps, format!("{n}/taps"), path, "Conv")
    }

    /// Columns `[b, c, o₀, k₀, …]` times the weight `[O, C/g, k…]`, plus bias, as `[b, O, o…]`.
    #[allow(clippy::too_many_arguments)]
    fn conv_product(
        &mut self,
        cols: NodeId,
        w: NodeId,
        b: Option<NodeId>,
        (batch, c, o, g): (&Dim, u64, u64, u64),
        axes: &[Axis],
        n: &str,
        path: &SpecPath,
    ) -> LResult<NodeId> {
        let sp = axes.len();
        let windows: u64 = axes.iter().map(|a| a.out).product();
        let taps: u64 = axes.iter().map(|a| a.kernel).product();
        let per_group = c / g * taps;
        // [b, c, o₀, k₀, o₁, k₁] → [b, o₀, o₁, c, k₀, k₁]
        let mut perm = vec![0];
        perm.extend((0..sp).map(|i| 2 + 2 * i));
        perm.push(1);
        perm.extend((0..sp).map(|i| 3 + 2 * i));
        let cols = self.add(Op::Transpose { perm }, &[cols], format!("{n}/cols_t"), path, "Conv")?;
        let k = |v: u64| Dim::known(v);
        let mut y = if g == 1 {
            // [b, L, C·K] @ [O, C·K]ᵀ
            let cols = self.reshape(cols, vec![batch.clone(), k(windows), k(per_group)], n, "cols", path)?;
            let wm = self.reshape(w, vec![k(o), k(per_group)], n, "weight_matrix", path)?;
            self.matmul_t(cols, wm, n, path)?
        } else {
            let cols = self.reshape(
                cols,
                vec![batch.clone(), k(windows), k(g), k(per_group)],
                n,
                "cols",
                path,
            )?;
            let wm = self.reshape(w, vec![k(g), k(o / g), k(per_group)], n, "weight_matrix", path)?;
            // [b, L, g, Cg·K] → [b, g, L, Cg·K] @ [g, O/g, Cg·K]ᵀ → [b, g, L, O/g] → [b, L, g, O/g]
            let ct = self.add(
                Op::Transpose { perm: vec![0, 2, 1, 3] },
                &[cols],
                format!("{n}/groups"),
                path,
                "Conv",
            )?;
            let yg = self.matmul_t(ct, wm, n, path)?;
            let yt = self.add(
                Op::Transpose { perm: vec![0, 2, 1, 3] },
                &[yg],
                format!("{n}/ungroup"),
                path,
                "Conv",
            )?;
            self.reshape(yt, vec![batch.clone(), k(windows), k(o)], n, "joined", path)?
        };
        if let Some(b) = b {
            y = self.bin(BinaryOp::Add, y, b, format!("{n}/bias"), path, "Conv")?;
        }
        // [b, L, O] → [b, O, L] → [b, O, o₀, o₁]
        let yt = self.add(
            Op::Transpose { perm: vec![0, 2, 1] },
            &[y],
            format!("{n}/channels_first"),
            path,
            "Conv",
        )?;
        let mut shape = vec![batch.clone(), k(o)];
        shape.extend(axes.iter().map(|a| k(a.out)));
        self.reshape(yt, shape, n, "out", path)
    }

    fn reshape(&mut self, x: NodeId, shape: Vec<Dim>, n: &str, what: &str, path: &SpecPath) -> LResult<NodeId> {
        self.add(Op::Reshape { shape }, &[x], format!("{n}/{what}"), path, "Conv")
    }

    fn matmul_t(&mut self, a: NodeId, b: NodeId, n: &str, path: &SpecPath) -> LResult<NodeId> {
        let op = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        };
        self.add(op, &[a, b], format!("{n}/matmul"), path, "Conv")
    }
}
