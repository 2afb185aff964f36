//! The languages: their tree-sitter grammars, which nodes are comments,
//! which hold a list of items or statements (containers), and the key an
//! item is known by (its kind and name), so an edit's `fn parse` finds
//! the original's.

use tree_sitter::Node;

/// The languages the merge knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lang {
    Rust,
    Python,
    JavaScript,
    TypeScript,
    Tsx,
    Go,
}

impl Lang {
    pub const ALL: [Lang; 6] = [
        Lang::Rust,
        Lang::Python,
        Lang::JavaScript,
        Lang::TypeScript,
        Lang::Tsx,
        Lang::Go,
    ];

    /// The language of a file, from its name's extension.
    pub fn from_path(path: &str) -> Option<Lang> {
        let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
        Some(match ext.as_str() {
            "rs" => Lang::Rust,
            "py" | "pyi" => Lang::Python,
            "js" | "mjs" | "cjs" | "jsx" => Lang::JavaScript,
            "ts" | "mts" | "cts" => Lang::TypeScript,
            "tsx" => Lang::Tsx,
            "go" => Lang::Go,
            _ => return None,
        })
    }

    /// A language by the names people give it.
    pub fn from_name(name: &str) -> Option<Lang> {
        Some(match name.to_ascii_lowercase().as_str() {
            "rust" | "rs" => Lang::Rust,
            "python" | "py" => Lang::Python,
            "javascript" | "js" | "jsx" => Lang::JavaScript,
            "typescript" | "ts" => Lang::TypeScript,
            "tsx" => Lang::Tsx,
            "go" | "golang" => Lang::Go,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::JavaScript => "JavaScript",
            Lang::TypeScript => "TypeScript",
            Lang::Tsx => "TSX",
            Lang::Go => "Go",
        }
    }

    pub fn grammar(self) -> tree_sitter::Language {
        match self {
            Lang::Rust => tree_sitter_rust::LANGUAGE.into(),
            Lang::Python => tree_sitter_python::LANGUAGE.into(),
            Lang::JavaScript => tree_sitter_javascript::LANGUAGE.into(),
            Lang::TypeScript => tree_sitter_typescript::LANGUAGE_TYPESCRIPT.into(),
            Lang::Tsx => tree_sitter_typescript::LANGUAGE_TSX.into(),
            Lang::Go => tree_sitter_go::LANGUAGE.into(),
        }
    }

    /// Whether `node` is a comment.
    pub fn is_comment(self, node: &Node) -> bool {
        matches!(node.kind(), "comment" | "line_comment" | "block_comment")
    }

    /// Whether `node` is something that belongs to the item after it
    /// (Rust's attributes; comments are handled apart).
    pub fn is_prefix(self, node: &Node) -> bool {
        matches!(
            (self, node.kind()),
            (Lang::Rust, "attribute_item") | (Lang::Python, "decorator")
        )
    }

    /// Whether `node` holds a list of items or statements the merge goes
    /// into.
    pub fn is_container(self, node: &Node) -> bool {
        let k = node.kind();
        match self {
            Lang::Rust => matches!(
                k,
                "source_file"
                    | "declaration_list"
                    | "block"
                    | "field_declaration_list"
                    | "enum_variant_list"
            ),
            Lang::Python => matches!(k, "module" | "block"),
            Lang::JavaScript | Lang::TypeScript | Lang::Tsx => matches!(
                k,
                "program"
                    | "class_body"
                    | "statement_block"
                    | "interface_body"
                    | "object_type"
                    | "enum_body"
            ),
            Lang::Go => matches!(
                k,
                "source_file"
                    | "block"
                    | "statement_list"
                    | "field_declaration_list"
                    | "interface_type"
            ),
        }
    }

    /// The key an item is matched by: its kind and name, when it has one.
    pub fn key(self, node: &Node, src: &str) -> Option<String> {
        let text = |n: Node| n.utf8_text(src.as_bytes()).ok().map(str::to_string);
        let field = |name: &str| node.child_by_field_name(name).and_then(text);
        let k = node.kind();
        let named = |tag: &str, name: Option<String>| name.map(|n| format!("{tag} {n}"));
        match (self, k) {
            // Wrappers: the key of what they wrap.
            (Lang::Python, "decorated_definition") => node
                .child_by_field_name("definition")
                .and_then(|d| self.key(&d, src)),
            (Lang::JavaScript | Lang::TypeScript | Lang::Tsx, "export_statement") => node
                .child_by_field_name("declaration")
                .and_then(|d| self.key(&d, src))
                .map(|k| format!("export {k}")),
            (Lang::Rust, "impl_item") => {
                let ty = field("type")?;
                Some(match field("trait") {
                    Some(t) => format!("impl {t} for {ty}"),
                    None => format!("impl {ty}"),
                })
            }
            (Lang::Rust, "let_declaration") => named("let", field("pattern")),
            (Lang::Rust, "use_declaration") => named("use", field("argument")),
            (
                Lang::Rust,
                "mod_item"
                | "function_item"
                | "function_signature_item"
                | "struct_item"
                | "enum_item"
                | "union_item"
                | "trait_item"
                | "type_item"
                | "const_item"
                | "static_item"
                | "macro_definition",
            ) => named(k, field("name")),
            (Lang::Rust, "field_declaration" | "enum_variant") => named(k, field("name")),
            (Lang::Python, "function_definition" | "class_definition") => named(k, field("name")),
            (Lang::Python, "expression_statement") => {
                let inner = node.named_child(0)?;
                match inner.kind() {
                    "assignment" | "augmented_assignment" => {
                        named("assign", inner.child_by_field_name("left").and_then(text))
                    }
                    _ => None,
                }
            }
            (
                Lang::JavaScript | Lang::TypeScript | Lang::Tsx,
                "lexical_declaration" | "variable_declaration",
            ) => {
                let d = node
                    .named_children(&mut node.walk())
                    .find(|c| c.kind() == "variable_declarator")?;
                named("var", d.child_by_field_name("name").and_then(text))
            }
            (
                Lang::JavaScript | Lang::TypeScript | Lang::Tsx,
                "function_declaration"
                | "generator_function_declaration"
                | "class_declaration"
                | "abstract_class_declaration"
                | "method_definition"
                | "interface_declaration"
                | "type_alias_declaration"
                | "enum_declaration"
                | "public_field_definition"
                | "field_definition"
                | "property_signature"
                | "method_signature"
                | "abstract_method_signature"
                | "internal_module"
                | "module",
            ) => named(k, field("name").or_else(|| field("property"))),
            (Lang::Go, "function_declaration") => named(k, field("name")),
            (Lang::Go, "method_declaration") => {
                let recv = field("receiver").map(|r| {
                    r.split_whitespace()
                        .last()
                        .unwrap_or("")
                        .trim_matches(|c| c == '(' || c == ')' || c == '*')
                        .to_string()
                });
                Some(format!(
                    "method {} {}",
                    recv.unwrap_or_default(),
                    field("name")?
                ))
            }
            (Lang::Go, "type_declaration" | "const_declaration" | "var_declaration") => {
                let spec = node
                    .named_children(&mut node.walk())
                    .find(|c| c.kind().ends_with("_spec"))?;
                named(k, spec.child_by_field_name("name").and_then(text))
            }
            (Lang::Go, "field_declaration") => named(k, field("name")),
            (Lang::Go, "short_var_declaration") => named("var", field("left")),
            _ => None,
        }
    }

    /// The comment's text without its delimiters.
    pub fn comment_body(self, text: &str) -> String {
        let t = text.trim();
        let t = t
            .strip_prefix("///")
            .or_else(|| t.strip_prefix("//!"))
            .or_else(|| t.strip_prefix("//"))
            .or_else(|| t.strip_prefix('#'))
            .or_else(|| {
                t.strip_prefix("/*")
                    .map(|s| s.strip_suffix("*/").unwrap_or(s))
            })
            .unwrap_or(t);
        t.trim().to_string()
    }
}

/// Whether a comment's text is a lazy-edit marker: `... existing code
/// ...`, `... rest of the function ...`, `...`, `existing code here`.
pub fn is_marker_text(body: &str) -> bool {
    let b = body.trim().to_ascii_lowercase();
    let dots = b.starts_with("...") || b.starts_with('…') || b.ends_with("...") || b.ends_with('…');
    let bare: String = b
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect();
    let bare = bare.split_whitespace().collect::<Vec<_>>().join(" ");
    if bare.is_empty() {
        // `// ...`, `# …`
        return dots;
    }
    let words = [
        "existing",
        "rest of",
        "unchanged",
        "remaining",
        "previous",
        "same as before",
        "other",
        "keep",
        "omitted",
        "as before",
    ];
    let says = words
        .iter()
        .any(|w| bare.starts_with(w) || bare.contains(&format!(" {w}")) && bare.len() < 60);
    (dots && says && bare.len() < 80) || bare == "existing code" || bare == "existing code here"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_not_markers() {
        for m in [
            "... existing code ...",
            "...existing code...",
            "... rest of the function ...",
            "...",
            "…",
            "... keep existing imports ...",
            "existing code",
            "... other methods unchanged ...",
        ] {
            assert!(is_marker_text(m), "{m}");
        }
        for n in [
            "TODO: fix this",
            "the rest of the world",
            "see ... later? no",
            "returns the existing value",
            "",
        ] {
            assert!(!is_marker_text(n), "{n}");
        }
        assert_eq!(
            Lang::Rust.comment_body("// ... existing code ..."),
            "... existing code ..."
        );
        assert_eq!(Lang::Python.comment_body("# ..."), "...");
        assert_eq!(Lang::Go.comment_body("/* ... */"), "...");
        assert_eq!(Lang::from_path("src/a.tsx"), Some(Lang::Tsx));
        assert_eq!(Lang::from_path("Makefile"), None);
    }
}
