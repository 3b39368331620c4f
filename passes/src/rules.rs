//! Algebraic rewrite rules over [`TensorLang`], with their conditions as small named functions.
//!
//! Every rule keeps the matched e-class's type (conditions check it where broadcasting could
//! change a shape) and is checked by execution: `tests/rules.rs` evaluates both sides of each rule
//! with the reference interpreter on random tensors.

use std::sync::Arc;

use egg::{rewrite as rw, Applier, Id, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};

use crate::egraph::{TensorAnalysis, TensorEGraph, TensorLang};

/// A rewrite rule over the tensor language.
pub type Rule = Rewrite<TensorLang, TensorAnalysis>;

fn konst(eg: &TensorEGraph, s: &Subst, v: &str) -> Option<f64> {
    let var: Var = v.parse().expect("pattern variable");
    eg[s[var]].data.konst
}

/// `?v` is the constant `c`.
fn is_const_value(v: &'static str, c: f64) -> impl Fn(&mut TensorEGraph, Id, &Subst) -> bool {
    move |eg, _, s| konst(eg, s, v) == Some(c)
}

/// `?v` is a rank-0 constant.
fn is_const(v: &'static str) -> impl Fn(&mut TensorEGraph, Id, &Subst) -> bool {
    move |eg, _, s| konst(eg, s, v).is_some()
}

/// `?v` is a non-zero rank-0 float constant.
fn is_nonzero_float(v: &'static str) -> impl Fn(&mut TensorEGraph, Id, &Subst) -> bool {
    move |eg, _, s| {
        let var: Var = v.parse().expect("pattern variable");
        let float = eg[s[var]].data.ty.as_ref().is_some_and(|t| t.dtype.is_float());
        float && konst(eg, s, v).is_some_and(|c| c != 0.0)
    }
}

/// Replacing the match by `?v` keeps its type (no broadcast is lost).
fn keeps_type(v: &'static str) -> impl Fn(&mut TensorEGraph, Id, &Subst) -> bool {
    move |eg, id, s| {
        let var: Var = v.parse().expect("pattern variable");
        eg[id].data.ty.is_some() && eg[id].data.ty == eg[s[var]].data.ty
    }
}

fn both(
    a: impl Fn(&mut TensorEGraph, Id, &Subst) -> bool,
    b: impl Fn(&mut TensorEGraph, Id, &Subst) -> bool,
) -> impl Fn(&mut TensorEGraph, Id, &Subst) -> bool {
    move |eg, id, s| a(eg, id, s) && b(eg, id, s)
}

/// A rule's searcher, shared.
struct Search(Arc<dyn Searcher<TensorLang, TensorAnalysis> + Send + Sync>);

impl Searcher<TensorLang, TensorAnalysis> for Search {
    fn search_eclass_with_limit(
        &self,
        eg: &TensorEGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, TensorLang>> {
        self.0.search_eclass_with_limit(eg, eclass, limit)
    }
    fn search_with_limit(&self, eg: &TensorEGraph, limit: usize) -> Vec<SearchMatches<'_, TensorLang>> {
        self.0.search_with_limit(eg, limit)
    }
    fn get_pattern_ast(&self) -> Option<&PatternAst<TensorLang>> {
        self.0.get_pattern_ast()
    }
    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }
}

/// A rule's applier that records the rule on every e-class it changes (node provenance).
struct Tracked(Arc<dyn Applier<TensorLang, TensorAnalysis> + Send + Sync>);

impl Applier<TensorLang, TensorAnalysis> for Tracked {
    fn apply_matches(&self, eg: &mut TensorEGraph, matches: &[SearchMatches<TensorLang>], rule: Symbol) -> Vec<Id> {
        let changed = self.0.apply_matches(eg, matches, rule);
        for id in &changed {
            eg.analysis.provenance.entry(*id).or_default().insert(rule.to_string());
        }
        changed
    }
    fn apply_one(
        &self,
        eg: &mut TensorEGraph,
        eclass: Id,
        subst: &Subst,
        ast: Option<&PatternAst<TensorLang>>,
        rule: Symbol,
    ) -> Vec<Id> {
        self.0.apply_one(eg, eclass, subst, ast, rule)
    }
    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }
}

fn tracked(r: Rule) -> Rule {
    Rewrite::new(r.name, Search(r.searcher), Tracked(r.applier)).expect("same variables as the rule")
}

/// A rule given as pattern text alone, without conditions: how tests plant a deliberately wrong
/// rule (`PipelineOptions::extra_rules`) for `kiln bisect` to find.
#[derive(Clone, Debug)]
pub struct PatternRule {
    /// Its name.
    pub name: String,
    /// What it matches, e.g. `(exp ?a)`.
    pub lhs: String,
    /// What it adds to the match's e-class, e.g. `?a`.
    pub rhs: String,
}

impl PatternRule {
    /// The rule, or why its patterns do not parse.
    pub fn rule(&self) -> Result<Rule, String> {
        let l: egg::Pattern<TensorLang> = self.lhs.parse().map_err(|e| format!("{}: {e}", self.lhs))?;
        let r: egg::Pattern<TensorLang> = self.rhs.parse().map_err(|e| format!("{}: {e}", self.rhs))?;
        Ok(tracked(Rewrite::new(self.name.as_str(), l, r)?))
    }
}

/// Every rule of the `simplify` pass: [`algebraic`] and the layout rules.
pub fn all() -> Vec<Rule> {
    let mut v = algebraic();
    v.extend(crate::layout::layout());
    v
}

/// The algebraic rule set: identities, constant reassociation and canonical constant placement,
/// division by a constant as multiplication, and small strength reductions. Constant folding is
/// done by the analysis, not by rules.
pub fn algebraic() -> Vec<Rule> {
    let rules = vec![
        rw!("mul-one"; "(mul ?a ?b)" => "?a" if both(is_const_value("?b", 1.0), keeps_type("?a"))),
        rw!("div-one"; "(div ?a ?b)" => "?a" if both(is_const_value("?b", 1.0), keeps_type("?a"))),
        rw!("add-zero"; "(add ?a ?b)" => "?a" if both(is_const_value("?b", 0.0), keeps_type("?a"))),
        rw!("sub-zero"; "(sub ?a ?b)" => "?a" if both(is_const_value("?b", 0.0), keeps_type("?a"))),
        rw!("const-right-mul"; "(mul ?c ?a)" => "(mul ?a ?c)" if is_const("?c")),
        rw!("const-right-add"; "(add ?c ?a)" => "(add ?a ?c)" if is_const("?c")),
        rw!("sub-const-to-add"; "(sub ?a ?c)" => "(add ?a (neg ?c))" if is_const("?c")),
        rw!("div-const-to-mul"; "(div ?a ?c)" => "(mul ?a (recip ?c))" if is_nonzero_float("?c")),
        rw!("mul-const-assoc"; "(mul (mul ?a ?c1) ?c2)" => "(mul ?a (mul ?c1 ?c2))" if both(is_const("?c1"), is_const("?c2"))),
        rw!("add-const-assoc"; "(add (add ?a ?c1) ?c2)" => "(add ?a (add ?c1 ?c2))" if both(is_const("?c1"), is_const("?c2"))),
        rw!("neg-neg"; "(neg (neg ?a))" => "?a"),
        rw!("recip-sqrt"; "(recip (sqrt ?a))" => "(rsqrt ?a)"),
        rw!("recip-recip"; "(recip (recip ?a))" => "?a"),
    ];
    rules.into_iter().map(tracked).collect()
}
