//! Diagnostics: error messages that point into the user's spec file.
//!
//! serde gives positions only for syntax and structure errors. Errors found later (undefined
//! names, shape mismatches, checkpoint problems) carry a *path* into the spec (`body."q".x`);
//! [`Locator`] finds the path's text by scanning the RON source with nesting depth, so those
//! errors get a `file:line:col` and a snippet too.

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term;

/// One step of a path into a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A struct field, written `name:`.
    Field(String),
    /// A map key, written `"name":`.
    Key(String),
}

/// A path into a spec, like `blocks."layer".body."q".x`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecPath(pub Vec<Step>);

impl SpecPath {
    /// The path extended by a field.
    pub fn field(&self, f: &str) -> SpecPath {
        let mut p = self.clone();
        p.0.push(Step::Field(f.to_string()));
        p
    }

    /// The path extended by a map key.
    pub fn key(&self, k: &str) -> SpecPath {
        let mut p = self.clone();
        p.0.push(Step::Key(k.to_string()));
        p
    }
}

impl fmt::Display for SpecPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match s {
                Step::Field(n) => f.write_str(n)?,
                Step::Key(k) => write!(f, "{k:?}")?,
            }
        }
        Ok(())
    }
}

/// One problem in a spec.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    /// What is wrong.
    pub message: String,
    /// Where, as a path into the spec, when known.
    pub path: Option<SpecPath>,
    /// Where, as a byte range of the source, when known.
    pub span: Option<Range<usize>>,
    /// Text under the highlighted source.
    pub label: String,
    /// Extra lines: what was expected, hints.
    pub notes: Vec<String>,
}

impl Diagnostic {
    /// A diagnostic at a path.
    pub fn at(path: SpecPath, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            path: Some(path),
            span: None,
            label: String::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a note.
    pub fn note(mut self, n: impl Into<String>) -> Diagnostic {
        self.notes.push(n.into());
        self
    }

    /// Sets the label under the highlighted text.
    pub fn label(mut self, l: impl Into<String>) -> Diagnostic {
        self.label = l.into();
        self
    }
}

/// All the problems found in one spec (or in binding its checkpoint), rendered with snippets.
#[derive(Clone, Debug)]
pub struct SpecError {
    /// The spec's file name, as given by the user.
    pub file: String,
    /// The spec's text.
    pub source: String,
    /// Problems, in the order found.
    pub diagnostics: Vec<Diagnostic>,
}

impl SpecError {
    /// Builds the error, locating every diagnostic that has a path but no span.
    pub fn new(file: &str, source: &str, mut diagnostics: Vec<Diagnostic>) -> SpecError {
        let loc = Locator::new(source);
        for d in &mut diagnostics {
            if d.span.is_none() {
                if let Some(p) = &d.path {
                    d.span = loc.find(p);
                }
            }
        }
        SpecError {
            file: file.to_string(),
            source: source.to_string(),
            diagnostics,
        }
    }

    /// Renders every diagnostic as plain text with source snippets.
    pub fn render(&self) -> String {
        let file = SimpleFile::new(self.file.as_str(), self.source.as_str());
        let config = term::Config::default();
        let mut out = String::new();
        for d in &self.diagnostics {
            let mut cs = CsDiagnostic::error().with_message(&d.message);
            if let Some(span) = &d.span {
                cs = cs.with_labels(vec![Label::primary((), span.clone()).with_message(&d.label)]);
            }
            let mut notes = d.notes.clone();
            if let Some(p) = &d.path {
                notes.push(format!("in {p}"));
            }
            cs = cs.with_notes(notes);
            match term::emit_into_string(&config, &file, &cs) {
                Ok(s) => out.push_str(&s),
                Err(_) => out.push_str(&format!("error: {}\n", d.message)),
            }
        }
        let n = self.diagnostics.len();
        out.push_str(&format!(
            "{n} error{} in {}\n",
            if n == 1 { "" } else { "s" },
            self.file
        ));
        out
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for SpecError {}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Open,
    Close,
    Str,
    Ident,
    Colon,
    Other,
}

#[derive(Clone, Debug)]
struct Tok {
    kind: Kind,
    span: Range<usize>,
    depth: usize,
}

/// Finds the source text a [`SpecPath`] refers to.
pub struct Locator<'s> {
    src: &'s str,
    toks: Vec<Tok>,
}

impl<'s> Locator<'s> {
    /// Scans `src` (comments and strings aware).
    pub fn new(src: &'s str) -> Locator<'s> {
        let b = src.as_bytes();
        let mut toks = Vec::new();
        let mut depth = 0usize;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let start = i;
            let kind = match c {
                b'/' if b.get(i + 1) == Some(&b'/') => {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                    continue;
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    i += 2;
                    while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                        i += 1;
                    }
                    i += 2;
                    continue;
                }
                b'"' => {
                    i += 1;
                    while i < b.len() && b[i] != b'"' {
                        if b[i] == b'\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                    i += 1;
                    Kind::Str
                }
                b'(' | b'[' | b'{' => {
                    toks.push(Tok {
                        kind: Kind::Open,
                        span: i..i + 1,
                        depth,
                    });
                    depth += 1;
                    i += 1;
                    continue;
                }
                b')' | b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    i += 1;
                    Kind::Close
                }
                b':' => {
                    i += 1;
                    Kind::Colon
                }
                c if c.is_ascii_alphanumeric() || c == b'_' => {
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                    Kind::Ident
                }
                c if c.is_ascii_whitespace() => {
                    i += 1;
                    continue;
                }
                _ => {
                    i += 1;
                    Kind::Other
                }
            };
            toks.push(Tok {
                kind,
                span: start..i.min(b.len()),
                depth,
            });
        }
        Locator { src, toks }
    }

    fn text(&self, t: &Tok) -> &str {
        &self.src[t.span.clone()]
    }

    /// The span of the last step of `path`: a field name, a key, or (for a final field) the
    /// field's value.
    pub fn find(&self, path: &SpecPath) -> Option<Range<usize>> {
        // Enter the top-level `Model(`.
        let first_open = self.toks.iter().position(|t| t.kind == Kind::Open && t.depth == 0)?;
        let mut lo = first_open + 1;
        let mut found = None;
        for (n, step) in path.0.iter().enumerate() {
            // Step n's field sits n + 1 levels inside `Model(`.
            let depth = n + 1;
            let mut j = lo;
            let hit = loop {
                let Some(t) = self.toks.get(j) else { return found };
                if t.depth < depth {
                    return found;
                }
                if t.depth == depth && self.toks.get(j + 1).map(|c| c.kind) == Some(Kind::Colon) {
                    let ok = match step {
                        Step::Field(f) => t.kind == Kind::Ident && self.text(t) == f,
                        Step::Key(k) => t.kind == Kind::Str && self.text(t).trim_matches('"') == k,
                    };
                    if ok {
                        break j;
                    }
                }
                j += 1;
            };
            let last = n + 1 == path.0.len();
            // A field's value is more useful to point at than its name.
            let value = hit + 2;
            found = Some(self.toks[hit].span.clone());
            if last {
                if let (Step::Field(_), Some(v)) = (step, self.toks.get(value)) {
                    let opens = |i: usize| self.toks.get(i).map(|t| t.kind) == Some(Kind::Open);
                    // A scalar value (`"name"`, `4`, `true`), not a container or `Variant(`.
                    if v.kind != Kind::Open && !(v.kind == Kind::Ident && opens(value + 1)) {
                        found = Some(v.span.clone());
                    }
                }
                break;
            }
            // Step into the value: `Name(`, `(`, `[` or `{`.
            let mut k = value;
            if self.toks.get(k).map(|t| t.kind) == Some(Kind::Ident) {
                k += 1;
            }
            if self.toks.get(k).map(|t| t.kind) != Some(Kind::Open) {
                return found;
            }
            lo = k + 1;
        }
        found
    }
}

/// The byte offset of a 1-based line and column (columns counted in characters).
pub fn offset_of(src: &str, line: usize, col: usize) -> usize {
    let mut off = 0;
    for (i, l) in src.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let c = l
                .char_indices()
                .nth(col.saturating_sub(1))
                .map(|(b, _)| b)
                .unwrap_or(l.len());
            return off + c;
        }
        off += l.len();
    }
    src.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"// a comment with "body": in it
Model(
    name: "m",
    blocks: {
        "layer": (body: { "q": Linear(x: "x", in_features: 4) }, output: "q"),
    },
    body: {
        "q": Gelu(x: "input"),
    },
)"#;

    fn text(p: SpecPath) -> &'static str {
        let l = Locator::new(SRC);
        &SRC[l.find(&p).expect("found")]
    }

    #[test]
    fn finds_paths_at_the_right_depth() {
        let top = SpecPath::default().field("body").key("q");
        assert_eq!(text(top.clone()), "\"q\"");
        let at = Locator::new(SRC).find(&top).unwrap().start;
        assert_eq!(offset_of(SRC, 8, 9), at);
        assert_eq!(text(top.field("x")), "\"input\"");
        let inner = SpecPath::default()
            .field("blocks")
            .key("layer")
            .field("body")
            .key("q")
            .field("in_features");
        assert_eq!(text(inner), "4");
        // A missing last step falls back to the nearest enclosing element.
        assert_eq!(text(SpecPath::default().field("body").key("nope")), "body");
    }
}
