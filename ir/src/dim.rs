//! Symbolic dimensions.

use std::collections::BTreeMap;
use std::fmt;

/// Values of the symbolic dimensions for one execution (`batch = 2`, `seq = 128`).
pub type Bindings = BTreeMap<String, usize>;

/// A shape: one [`Dim`] per axis, outermost first.
pub type Shape = Vec<Dim>;

/// The extent of one axis: a constant times a product of named symbols.
///
/// `384`, `seq`, `batch*seq` and `12*seq` are all dims. Symbols are kept sorted, so two dims are
/// equal exactly when they denote the same product for every binding of the symbols. Sums are not
/// representable yet; ops that would need them (concatenating along a symbolic axis) are rejected
/// by type inference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Dim {
    coeff: u64,
    syms: Vec<String>,
}

impl Dim {
    /// A constant extent.
    pub fn known(n: u64) -> Dim {
        Dim {
            coeff: n,
            syms: Vec::new(),
        }
    }

    /// A named symbolic extent.
    pub fn sym(name: impl Into<String>) -> Dim {
        Dim {
            coeff: 1,
            syms: vec![name.into()],
        }
    }

    /// The constant value, if the dim has no symbols.
    pub fn as_known(&self) -> Option<u64> {
        self.syms.is_empty().then_some(self.coeff)
    }

    /// The constant factor (the whole value when there are no symbols).
    pub fn coeff(&self) -> u64 {
        self.coeff
    }

    /// Whether the dim is the constant 1 (the broadcastable extent).
    pub fn is_one(&self) -> bool {
        self.as_known() == Some(1)
    }

    /// The symbols this dim mentions, sorted, with repetition.
    pub fn symbols(&self) -> &[String] {
        &self.syms
    }

    /// The product of two dims.
    pub fn mul(&self, other: &Dim) -> Dim {
        let mut syms: Vec<String> = self.syms.iter().chain(&other.syms).cloned().collect();
        syms.sort();
        let coeff = self.coeff.saturating_mul(other.coeff);
        if coeff == 0 {
            return Dim::known(0);
        }
        Dim { coeff, syms }
    }

    /// Exact division by a constant, if the constant divides the coefficient.
    pub fn div_known(&self, d: u64) -> Option<Dim> {
        (d != 0 && self.coeff.is_multiple_of(d)).then(|| Dim {
            coeff: self.coeff / d,
            syms: self.syms.clone(),
        })
    }

    /// Exact division by another dim, if it divides this one symbolically.
    pub fn div(&self, other: &Dim) -> Option<Dim> {
        let mut syms = self.syms.clone();
        for s in &other.syms {
            let pos = syms.iter().position(|x| x == s)?;
            syms.remove(pos);
        }
        let mut d = Dim {
            coeff: self.coeff,
            syms,
        };
        d = d.div_known(other.coeff)?;
        Some(d)
    }

    /// The product of a list of dims (1 for an empty list).
    pub fn product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
        dims.into_iter().fold(Dim::known(1), |acc, d| acc.mul(d))
    }

    /// The concrete extent under `bindings`, or the name of the first unbound symbol.
    pub fn eval(&self, bindings: &Bindings) -> Result<usize, String> {
        let mut v = self.coeff as usize;
        for s in &self.syms {
            let b = bindings.get(s).ok_or_else(|| s.clone())?;
            v = v.saturating_mul(*b);
        }
        Ok(v)
    }
}

impl From<u64> for Dim {
    fn from(n: u64) -> Dim {
        Dim::known(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.syms.is_empty() {
            return write!(f, "{}", self.coeff);
        }
        let mut first = true;
        if self.coeff != 1 {
            write!(f, "{}", self.coeff)?;
            first = false;
        }
        for s in &self.syms {
            if !first {
                f.write_str("*")?;
            }
            f.write_str(s)?;
            first = false;
        }
        Ok(())
    }
}

/// Evaluates a whole shape under `bindings`.
pub(crate) fn eval_shape(shape: &[Dim], bindings: &Bindings) -> Result<Vec<usize>, String> {
    shape.iter().map(|d| d.eval(bindings)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_are_canonical() {
        let a = Dim::sym("seq").mul(&Dim::sym("batch")).mul(&Dim::known(12));
        let b = Dim::known(12).mul(&Dim::sym("batch")).mul(&Dim::sym("seq"));
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "12*batch*seq");
        assert_eq!(a.div(&Dim::sym("batch")).unwrap().to_string(), "12*seq");
        assert_eq!(a.div(&Dim::sym("heads")), None);
        assert_eq!(Dim::known(384).div_known(12), Some(Dim::known(32)));
        assert_eq!(Dim::known(384).div_known(5), None);
    }

    #[test]
    fn eval_reports_unbound_symbol() {
        let mut b = Bindings::new();
        b.insert("batch".into(), 2);
        assert_eq!(Dim::sym("batch").mul(&Dim::known(3)).eval(&b), Ok(6));
        assert_eq!(Dim::sym("seq").eval(&b), Err("seq".to_string()));
    }
}
