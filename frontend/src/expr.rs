//! Integer expressions over config names (`"hidden / heads"`), symbolic dim expressions
//! (`"batch * seq"`) and weight-name templates (`"encoder.layer.{i}.attention"`).

use std::collections::BTreeMap;

use kiln_ir::Dim;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Int(i64),
    Name(String),
    Op(char),
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let st = i;
            while i < cs.len() && cs[i].is_ascii_digit() {
                i += 1;
            }
            let txt: String = cs[st..i].iter().collect();
            out.push(Tok::Int(
                txt.parse().map_err(|_| format!("integer `{txt}` is too large"))?,
            ));
        } else if c.is_alphabetic() || c == '_' {
            let st = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            out.push(Tok::Name(cs[st..i].iter().collect()));
        } else if "+-*/%()".contains(c) {
            out.push(Tok::Op(c));
            i += 1;
        } else {
            return Err(format!("unexpected character `{c}` in expression `{s}`"));
        }
    }
    Ok(out)
}

/// A parsed expression.
#[derive(Clone, Debug)]
enum Ast {
    Int(i64),
    Name(String),
    Neg(Box<Ast>),
    Bin(char, Box<Ast>, Box<Ast>),
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn expr(&mut self) -> Result<Ast, String> {
        let mut lhs = self.term()?;
        while let Some(Tok::Op(c @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            lhs = Ast::Bin(c, Box::new(lhs), Box::new(self.term()?));
        }
        Ok(lhs)
    }
    fn term(&mut self) -> Result<Ast, String> {
        let mut lhs = self.factor()?;
        while let Some(Tok::Op(c @ ('*' | '/' | '%'))) = self.peek().cloned() {
            self.pos += 1;
            lhs = Ast::Bin(c, Box::new(lhs), Box::new(self.factor()?));
        }
        Ok(lhs)
    }
    fn factor(&mut self) -> Result<Ast, String> {
        let t = self.peek().cloned();
        self.pos += 1;
        match t {
            Some(Tok::Int(v)) => Ok(Ast::Int(v)),
            Some(Tok::Name(n)) => Ok(Ast::Name(n)),
            Some(Tok::Op('-')) => Ok(Ast::Neg(Box::new(self.factor()?))),
            Some(Tok::Op('(')) => {
                let e = self.expr()?;
                if self.peek() != Some(&Tok::Op(')')) {
                    return Err(format!("missing `)` in expression `{}`", self.src));
                }
                self.pos += 1;
                Ok(e)
            }
            Some(t) => Err(format!("unexpected `{}` in expression `{}`", tok_text(&t), self.src)),
            None => Err(format!("expression `{}` ends too early", self.src)),
        }
    }
}

fn tok_text(t: &Tok) -> String {
    match t {
        Tok::Int(v) => v.to_string(),
        Tok::Name(n) => n.clone(),
        Tok::Op(c) => c.to_string(),
    }
}

fn parse(src: &str) -> Result<Ast, String> {
    let toks = lex(src)?;
    if toks.is_empty() {
        return Err("empty expression".into());
    }
    let mut p = Parser { toks, pos: 0, src };
    let e = p.expr()?;
    if let Some(t) = p.peek() {
        return Err(format!("unexpected `{}` in expression `{src}`", tok_text(t)));
    }
    Ok(e)
}

/// What names mean while evaluating: integer config values and loop variables, float config
/// values (which integer expressions may not use), and symbolic dims.
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// Integer names.
    pub ints: BTreeMap<String, i64>,
    /// Float names.
    pub floats: BTreeMap<String, f64>,
    /// Symbolic dim names.
    pub dims: Vec<String>,
}

impl Env {
    fn unknown(&self, n: &str) -> String {
        let mut known: Vec<&str> = self.ints.keys().map(String::as_str).collect();
        known.extend(self.floats.keys().map(String::as_str));
        known.extend(self.dims.iter().map(String::as_str));
        match crate::suggest(n, known.iter().copied()) {
            Some(s) => format!("undefined name `{n}` (did you mean `{s}`?)"),
            None => format!("undefined name `{n}`"),
        }
    }

    /// Evaluates an integer expression.
    pub fn int(&self, src: &str) -> Result<i64, String> {
        eval_int(&parse(src)?, self, src)
    }

    /// Evaluates a float: a number literal, or a float/int name, or an integer expression.
    pub fn float(&self, src: &str) -> Result<f64, String> {
        let t = src.trim();
        if let Some(v) = self.floats.get(t) {
            return Ok(*v);
        }
        if let Ok(v) = t.parse::<f64>() {
            return Ok(v);
        }
        self.int(src).map(|v| v as f64)
    }

    /// Evaluates a dim expression: a product of symbolic dims and positive integers.
    pub fn dim(&self, src: &str) -> Result<Dim, String> {
        match eval_dim(&parse(src)?, self, src)? {
            D::Int(v) if v > 0 => Ok(Dim::known(v as u64)),
            D::Int(v) => Err(format!("`{src}` = {v}, but a dimension must be positive")),
            D::Dim(d) => Ok(d),
        }
    }

    /// Expands `{expr}` holes in a weight-name template.
    pub fn template(&self, t: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in weight name `{t}`"))?;
            let v = self.int(&rest[open + 1..open + close])?;
            out.push_str(&v.to_string());
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in weight name `{t}`"));
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn eval_int(e: &Ast, env: &Env, src: &str) -> Result<i64, String> {
    match e {
        Ast::Int(v) => Ok(*v),
        Ast::Name(n) => {
            if let Some(v) = env.ints.get(n) {
                Ok(*v)
            } else if env.floats.contains_key(n) {
                Err(format!("`{n}` is a float, but `{src}` must be an integer"))
            } else if env.dims.contains(n) {
                Err(format!("`{n}` is a symbolic dim, which `{src}` cannot use here"))
            } else {
                Err(env.unknown(n))
            }
        }
        Ast::Neg(x) => Ok(-eval_int(x, env, src)?),
        Ast::Bin(op, a, b) => {
            let (a, b) = (eval_int(a, env, src)?, eval_int(b, env, src)?);
            let r = match op {
                '+' => a.checked_add(b),
                '-' => a.checked_sub(b),
                '*' => a.checked_mul(b),
                '/' | '%' if b == 0 => return Err(format!("division by zero in `{src}`")),
                '/' if a % b != 0 => return Err(format!("`{src}` is {a} / {b}, which is not a whole number")),
                '/' => Some(a / b),
                _ => Some(a % b),
            };
            r.ok_or_else(|| format!("`{src}` overflows"))
        }
    }
}

enum D {
    Int(i64),
    Dim(Dim),
}

fn eval_dim(e: &Ast, env: &Env, src: &str) -> Result<D, String> {
    match e {
        Ast::Name(n) if env.dims.contains(n) => Ok(D::Dim(Dim::sym(n.clone()))),
        Ast::Bin(op, a, b) => {
            let (x, y) = (eval_dim(a, env, src)?, eval_dim(b, env, src)?);
            match (x, y) {
                (D::Int(x), D::Int(y)) => {
                    eval_int(&Ast::Bin(*op, Box::new(Ast::Int(x)), Box::new(Ast::Int(y))), env, src).map(D::Int)
                }
                (x, y) => {
                    let as_dim = |v: D| -> Result<Dim, String> {
                        match v {
                            D::Dim(d) => Ok(d),
                            D::Int(i) if i > 0 => Ok(Dim::known(i as u64)),
                            D::Int(i) => Err(format!("`{src}` multiplies a dim by {i}")),
                        }
                    };
                    match op {
                        '*' => Ok(D::Dim(as_dim(x)?.mul(&as_dim(y)?))),
                        '/' => {
                            let (x, y) = (as_dim(x)?, as_dim(y)?);
                            x.div(&y)
                                .map(D::Dim)
                                .ok_or_else(|| format!("`{src}`: {x} is not divisible by {y}"))
                        }
                        _ => Err(format!("`{src}`: symbolic dims can only be multiplied and divided")),
                    }
                }
            }
        }
        other => eval_int(other, env, src).map(D::Int),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        let mut e = Env::default();
        e.ints.insert("hidden".into(), 384);
        e.ints.insert("heads".into(), 12);
        e.ints.insert("i".into(), 3);
        e.floats.insert("eps".into(), 1e-12);
        e.dims = vec!["batch".into(), "seq".into()];
        e
    }

    #[test]
    fn integer_expressions() {
        let e = env();
        assert_eq!(e.int("hidden / heads"), Ok(32));
        assert_eq!(e.int("(hidden + 2*heads) % 100"), Ok(8));
        assert_eq!(e.int("-heads + 1"), Ok(-11));
        assert!(e.int("hidden / 5").unwrap_err().contains("not a whole number"));
        assert!(e.int("hiden").unwrap_err().contains("did you mean `hidden`"));
        assert!(e.int("eps").unwrap_err().contains("is a float"));
        assert!(e.int("hidden *").unwrap_err().contains("ends too early"));
        assert!(e.int("(hidden").unwrap_err().contains("missing `)`"));
    }

    #[test]
    fn dims_and_templates() {
        let e = env();
        assert_eq!(e.dim("batch * seq").unwrap().to_string(), "batch*seq");
        assert_eq!(e.dim("heads").unwrap(), Dim::known(12));
        assert!(e.dim("seq + 1").is_err());
        assert_eq!(e.template("layer.{i}.q").unwrap(), "layer.3.q");
        assert_eq!(e.template("h.{i + 1}").unwrap(), "h.4");
        assert!(e.template("h.{i").is_err());
        assert_eq!(e.float("eps"), Ok(1e-12));
        assert_eq!(e.float("1e-5"), Ok(1e-5));
    }
}
