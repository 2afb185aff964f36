//! `hangar-apply`: fast apply. A coding agent writes a lazy edit, the
//! changed code with markers (`// ... existing code ...`) standing for
//! what stays; this crate merges it into the file by the two syntax trees
//! (tree-sitter grammars for Rust, Python, JavaScript, TypeScript and Go),
//! keeping the original's bytes wherever they are not changed.
//!
//! It owns the merge ([`apply`]) and its refusals: when the edit is
//! ambiguous, the result does not parse, or the change removes far more
//! than the edit shows, it says why instead of guessing. It must not
//! call models or do I/O: a model fallback, the CLI and the service are
//! built on it, and check a model's answer with [`check`].

#![forbid(unsafe_code)]

mod lang;
mod merge;

use std::collections::HashMap;

pub use lang::{is_marker_text, Lang};

/// Why an edit was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub reason: String,
}

impl Refusal {
    pub fn new(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
        }
    }
}

/// A merged file, and how it was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub text: String,
    /// `whole-file` (no markers: the edit is the file) or `merge`.
    pub how: &'static str,
}

/// Files and edits larger than this are refused (bytes).
pub const MAX_INPUT: usize = 4 << 20;

fn parse(lang: Lang, text: &str) -> Result<tree_sitter::Tree, Refusal> {
    let mut p = tree_sitter::Parser::new();
    p.set_language(&lang.grammar())
        .map_err(|e| Refusal::new(format!("the {} grammar did not load: {e}", lang.name())))?;
    p.parse(text, None)
        .ok_or_else(|| Refusal::new(format!("the {} parser gave up", lang.name())))
}

/// The first syntax error in `tree`, as `line N`.
fn first_error(tree: &tree_sitter::Tree) -> Option<String> {
    fn find(n: tree_sitter::Node) -> Option<tree_sitter::Node> {
        if n.is_error() || n.is_missing() {
            return Some(n);
        }
        if !n.has_error() {
            return None;
        }
        let mut c = n.walk();
        let kids: Vec<tree_sitter::Node> = n.children(&mut c).collect();
        kids.into_iter().find_map(find).or(Some(n))
    }
    let root = tree.root_node();
    if !root.has_error() {
        return None;
    }
    find(root).map(|n| format!("line {}", n.start_position().row + 1))
}

/// Whether `text` parses as `lang` with no error: the check a model's
/// merged file must pass too.
pub fn check(lang: Lang, text: &str) -> Result<(), Refusal> {
    let tree = parse(lang, text)?;
    match first_error(&tree) {
        None => Ok(()),
        Some(at) => Err(Refusal::new(format!(
            "the result does not parse as {} ({at})",
            lang.name()
        ))),
    }
}

/// Merge `edit` into `original`, both `lang`.
pub fn apply(lang: Lang, original: &str, edit: &str) -> Result<Applied, Refusal> {
    for (what, t) in [("file", original), ("edit", edit)] {
        if t.len() > MAX_INPUT {
            return Err(Refusal::new(format!(
                "the {what} is {} bytes; the most is {MAX_INPUT}",
                t.len()
            )));
        }
    }
    let ot = parse(lang, original)?;
    if let Some(at) = first_error(&ot) {
        return Err(Refusal::new(format!(
            "the original does not parse as {} ({at}): fix it first, or name the right language",
            lang.name()
        )));
    }
    let et = parse(lang, edit)?;
    if let Some(at) = first_error(&et) {
        return Err(Refusal::new(format!(
            "the edit does not parse as {} ({at}): is it for another language, or cut short?",
            lang.name()
        )));
    }
    let mut ctx = merge::Ctx {
        lang,
        orig: original,
        edit,
        orig_keys: HashMap::new(),
        deleted_lines: 0,
        anchors: 0,
    };
    let (oroot, eroot) = (ot.root_node(), et.root_node());
    if !ctx.contains_marker(&eroot, edit) {
        check(lang, edit)?;
        return Ok(Applied {
            text: edit.to_string(),
            how: "whole-file",
        });
    }
    ctx.index_keys(&oroot);
    let mut text = ctx.merge_list(&oroot, &eroot, true, false)?;
    if ctx.anchors == 0 {
        return Err(Refusal::new(
            "nothing in the edit matches the file: its markers stand for nothing".to_string(),
        ));
    }
    let shown = edit.lines().filter(|l| !l.trim().is_empty()).count();
    if ctx.deleted_lines > 3 * shown + 10 {
        return Err(Refusal::new(format!(
            "the edit would remove {} lines of the file while showing {shown}: put a marker where code stays",
            ctx.deleted_lines
        )));
    }
    if original.ends_with('\n') && !text.ends_with('\n') {
        text.push('\n');
    }
    check(lang, &text)?;
    Ok(Applied { text, how: "merge" })
}

#[cfg(test)]
mod tests;
