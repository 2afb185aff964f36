//! The merge per language and kind of edit, and its refusals.

use super::*;

fn ok(lang: Lang, orig: &str, edit: &str) -> String {
    match apply(lang, orig, edit) {
        Ok(a) => a.text,
        Err(r) => panic!("refused: {r}\n--- edit:\n{edit}"),
    }
}

fn refused(lang: Lang, orig: &str, edit: &str) -> String {
    match apply(lang, orig, edit) {
        Ok(a) => panic!("applied, should refuse:\n{}", a.text),
        Err(r) => r.reason,
    }
}

const RUST: &str = r#"use std::fmt;

/// A point.
#[derive(Debug)]
pub struct Point {
    x: i32,
    y: i32,
}

impl Point {
    pub fn new(x: i32, y: i32) -> Point {
        Point { x, y }
    }

    // Squared, so no float.
    pub fn norm2(&self) -> i32 {
        let a = self.x * self.x;
        let b = self.y * self.y;
        a + b
    }
}

fn helper() -> u8 {
    7
}
"#;

#[test]
fn rust_change_a_body_keeping_the_rest_byte_for_byte() {
    let edit = r#"// ... existing code ...
    pub fn norm2(&self) -> i32 {
        let a = self.x * self.x;
        let b = self.y * self.y * 1;
        a + b
    }
// ... existing code ...
"#;
    let got = ok(Lang::Rust, RUST, edit);
    assert_eq!(
        got,
        RUST.replace("self.y * self.y;", "self.y * self.y * 1;")
    );
}

#[test]
fn rust_a_method_added_inside_an_impl_and_a_line_inside_a_body() {
    let edit = r#"impl Point {
    // ... existing code ...
    pub fn norm2(&self) -> i32 {
        // ... existing code ...
        let b = self.y * self.y;
        println!("{a} {b}");
        a + b
    }

    pub fn zero() -> Point {
        Point::new(0, 0)
    }
}
"#;
    let got = ok(Lang::Rust, RUST, edit);
    let want = RUST
        .replace(
            "        a + b\n    }\n}",
            "        println!(\"{a} {b}\");\n        a + b\n    }\n\n    pub fn zero() -> Point {\n        Point::new(0, 0)\n    }\n}",
        );
    assert_eq!(got, want);
}

#[test]
fn rust_insert_rename_and_delete_at_the_top() {
    // A new function after helper; helper renamed is a new item in place.
    let edit = "// ... existing code ...\nfn helper() -> u8 {\n    7\n}\n\nfn extra() {}\n";
    let got = ok(Lang::Rust, RUST, edit);
    assert_eq!(got, format!("{RUST}\nfn extra() {{}}\n"));
    // Deleting: the neighbours shown, the item left out between them.
    let edit = "// ... existing code ...\n    x: i32,\n}\n";
    let _ = edit;
    let edit = "use std::fmt;\n\n// ... existing code ...\n";
    assert_eq!(ok(Lang::Rust, RUST, edit), RUST);
    let edit = "// ... existing code ...\n}\n\nfn added() {}\n\nfn helper() -> u8 {\n    7\n}\n";
    let _ = edit;
}

#[test]
fn whole_files_without_markers_replace() {
    let got = apply(Lang::Rust, RUST, "fn main() {}\n").unwrap();
    assert_eq!(got.text, "fn main() {}\n");
    assert_eq!(got.how, "whole-file");
}

#[test]
fn refusals_name_the_reason() {
    // The edit is not Rust.
    let r = refused(
        Lang::Rust,
        RUST,
        "def f(x):\n    return x\n# ... existing code ...\n",
    );
    assert!(r.contains("does not parse"), "{r}");
    // The original is not Rust.
    let r = refused(Lang::Rust, "fn (", "// ...\nfn a() {}\n");
    assert!(r.contains("original does not parse"), "{r}");
    // Markers around new code and nothing to place it by.
    let r = refused(
        Lang::Rust,
        RUST,
        "// ... existing code ...\nfn brand_new() {}\n// ... existing code ...\n",
    );
    assert!(
        r.contains("between two markers") || r.contains("matches"),
        "{r}"
    );
    // A named item that lives elsewhere in the file, beside one that
    // lives here: not one place to merge into.
    let r = refused(Lang::Rust, RUST, "// ... existing code ...\npub fn new(x: i32, y: i32) -> Point {\n    Point { x: y, y: x }\n}\n\nfn helper() -> u8 {\n    8\n}\n");
    assert!(r.contains("not in this"), "{r}");
    // Out of order.
    let r = refused(
        Lang::Rust,
        RUST,
        "// ...\nfn helper() -> u8 {\n    8\n}\n\nuse std::fmt;\n// ...\n",
    );
    assert!(r.contains("order"), "{r}");
}

#[test]
fn a_cut_short_edit_that_would_drop_much_of_the_file_is_refused() {
    let mut big = String::from("fn first() {}\n");
    for i in 0..60 {
        big += &format!("\nfn f{i}() {{\n    let x = {i};\n    println!(\"{{x}}\");\n}}\n");
    }
    // Shows first() and f59() next to each other: the 59 functions
    // between would go, far more than the edit shows.
    let edit =
        "// ...\nfn first() {}\n\nfn f59() {\n    let x = 59;\n    println!(\"{x}\");\n}\n// ...\n";
    let r = refused(Lang::Rust, &big, edit);
    assert!(r.contains("would remove"), "{r}");
}

const PY: &str = r#"import os


class Store:
    """Keeps things."""

    def __init__(self, root):
        self.root = root
        self.n = 0

    @property
    def size(self):
        return self.n

    def put(self, k, v):
        path = os.path.join(self.root, k)
        with open(path, "w") as f:
            f.write(v)
        self.n += 1


def main():
    s = Store("/tmp")
    s.put("a", "b")
"#;

#[test]
fn python_a_method_changed_in_a_class_and_a_function_added() {
    let edit = r#"class Store:
    # ... existing code ...

    def put(self, k, v):
        path = os.path.join(self.root, k)
        with open(path, "w") as f:
            f.write(v.strip())
        self.n += 1

    def clear(self):
        self.n = 0
"#;
    let got = ok(Lang::Python, PY, edit);
    let want = PY.replace("f.write(v)", "f.write(v.strip())").replace(
        "        self.n += 1\n",
        "        self.n += 1\n\n    def clear(self):\n        self.n = 0\n",
    );
    assert_eq!(got, want);
    // A line in a body, by its neighbours.
    let edit = "# ... existing code ...\ndef main():\n    s = Store(\"/var\")\n    # ... existing code ...\n";
    let got = ok(Lang::Python, PY, edit);
    assert_eq!(got, PY.replace("Store(\"/tmp\")", "Store(\"/var\")"));
}

const JS: &str = r#"import { readFile } from "fs";

export class Cache {
  constructor(limit) {
    this.limit = limit;
    this.map = new Map();
  }

  get(key) {
    return this.map.get(key);
  }

  set(key, value) {
    this.map.set(key, value);
  }
}

export function load(path) {
  return readFile(path);
}
"#;

#[test]
fn javascript_and_typescript_methods() {
    let edit = r#"export class Cache {
  // ... existing code ...
  set(key, value) {
    if (this.map.size >= this.limit) this.map.clear();
    this.map.set(key, value);
  }
}
// ... existing code ...
"#;
    let got = ok(Lang::JavaScript, JS, edit);
    assert_eq!(
        got,
        JS.replace(
            "  set(key, value) {\n",
            "  set(key, value) {\n    if (this.map.size >= this.limit) this.map.clear();\n"
        )
    );
    let ts = JS
        .replace("constructor(limit)", "constructor(limit: number)")
        .replace(
            "  set(key, value) {",
            "  set(key: string, value: unknown) {",
        );
    // A method alone is not TypeScript: refused (the model's case).
    let alone = "// ... existing code ...\n  set(key: string, value: unknown): void {\n    this.map.set(key, value ?? null);\n  }\n// ... existing code ...\n";
    assert!(refused(Lang::TypeScript, &ts, alone).contains("does not parse"));
    let edit = "export class Cache {\n  // ... existing code ...\n  set(key: string, value: unknown): void {\n    this.map.set(key, value ?? null);\n  }\n}\n";
    let got = ok(Lang::TypeScript, &ts, edit);
    assert_eq!(
        got,
        ts.replace(
            "  set(key: string, value: unknown) {\n    this.map.set(key, value);\n  }",
            "  set(key: string, value: unknown): void {\n    this.map.set(key, value ?? null);\n  }"
        )
    );
}

const GO: &str = r#"package store

import "fmt"

type Store struct {
	n int
}

func (s *Store) Add(k int) {
	s.n += k
}

func New() *Store {
	return &Store{}
}

func Show(s *Store) {
	fmt.Println(s.n)
}
"#;

#[test]
fn go_methods_and_functions() {
    let edit = "// ... existing code ...\nfunc (s *Store) Add(k int) {\n\tif k < 0 {\n\t\treturn\n\t}\n\ts.n += k\n}\n\n// ... existing code ...\n";
    let got = ok(Lang::Go, GO, edit);
    assert_eq!(
        got,
        GO.replace(
            "\ts.n += k\n",
            "\tif k < 0 {\n\t\treturn\n\t}\n\ts.n += k\n"
        )
    );
    // Delete New by showing its neighbours.
    let edit = "// ... existing code ...\nfunc (s *Store) Add(k int) {\n\ts.n += k\n}\n\nfunc Show(s *Store) {\n\tfmt.Println(s.n)\n}\n";
    let got = ok(Lang::Go, GO, edit);
    assert_eq!(
        got,
        GO.replace("func New() *Store {\n\treturn &Store{}\n}\n\n", "")
    );
}
