//! Stage 1: RON text to the syntax tree. serde reports one error at a time, with a position.

use crate::ast::Spec;
use crate::diag::{offset_of, Diagnostic, SpecError};

/// Parses spec text.
pub fn parse(file: &str, src: &str) -> Result<Spec, SpecError> {
    // Optional fields are written bare (`bias: false`, `mask: "m"`), not wrapped in `Some(..)`.
    let opts = ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    opts.from_str::<Spec>(src).map_err(|e| {
        let start = offset_of(src, e.span.start.line, e.span.start.col);
        let mut end = offset_of(src, e.span.end.line, e.span.end.col);
        if end <= start {
            end = (start + 1).min(src.len());
        }
        let (message, notes) = explain(&e.code);
        let mut d = Diagnostic {
            message,
            path: None,
            span: Some(start..end),
            label: String::new(),
            notes,
        };
        if start >= src.len() {
            d.span = Some(src.len().saturating_sub(1)..src.len());
        }
        SpecError::new(file, src, vec![d])
    })
}

/// Turns ron's error into a message and hints in the spec's own terms.
fn explain(code: &ron::Error) -> (String, Vec<String>) {
    use ron::Error as E;
    match code {
        E::NoSuchEnumVariant { expected, found, .. } => {
            let hint = crate::suggest(found, expected.iter().copied())
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_default();
            let mut notes = vec![format!("expected one of: {}", expected.join(", "))];
            if !hint.is_empty() {
                notes.insert(0, hint);
            }
            let what = if expected.contains(&"Linear") { "op" } else { "value" };
            (format!("unknown {what} `{found}`"), notes)
        }
        E::NoSuchStructField { expected, found, outer } => {
            let mut notes = vec![format!("expected one of: {}", expected.join(", "))];
            if let Some(s) = crate::suggest(found, expected.iter().copied()) {
                notes.insert(0, format!("did you mean `{s}`?"));
            }
            let within = outer.as_ref().map(|o| format!(" in `{o}`")).unwrap_or_default();
            (format!("unknown field `{found}`{within}"), notes)
        }
        E::MissingStructField { field, outer } => {
            let within = outer.as_ref().map(|o| format!(" in `{o}`")).unwrap_or_default();
            (format!("missing field `{field}`{within}"), vec![])
        }
        E::DuplicateStructField { field, outer } => {
            let within = outer.as_ref().map(|o| format!(" in `{o}`")).unwrap_or_default();
            (format!("field `{field}` is given twice{within}"), vec![])
        }
        E::Message(m) => (m.clone(), vec![]),
        other => (
            format!("syntax error: {other}"),
            vec!["see specs/ for complete examples".into()],
        ),
    }
}
