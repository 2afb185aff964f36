//! `hangar apply`: a lazy edit merged into a file, printed or written in
//! place; a refusal exits 2 with its reason and leaves the file as it was.

use std::fs;

use crate::support::*;

#[test]
fn apply_prints_writes_in_place_and_refuses_with_exit_2() {
    let h = Hangar::new();
    let dir = h.dir.path();
    let file = dir.join("lib.rs");
    let orig = "use std::fmt;\n\nfn a() -> u8 {\n    1\n}\n\nfn b() -> u8 {\n    2\n}\n";
    fs::write(&file, orig).unwrap();
    let edit = dir.join("edit.rs");
    fs::write(
        &edit,
        "// ... existing code ...\nfn b() -> u8 {\n    3\n}\n",
    )
    .unwrap();
    let (f, e) = (file.to_str().unwrap(), edit.to_str().unwrap());
    let want = orig.replace("    2\n", "    3\n");
    assert_eq!(h.ok(&["apply", f, e]), want);
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        orig,
        "printing leaves the file"
    );
    h.ok(&["apply", f, e, "--in-place"]);
    assert_eq!(fs::read_to_string(&file).unwrap(), want);

    // Refused: new code between two markers; exit 2, file untouched.
    fs::write(
        &edit,
        "// ... existing code ...\nfn c() {}\n// ... existing code ...\n",
    )
    .unwrap();
    let out = h.run(&["apply", f, e, "--in-place"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("between two markers"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), want);
    // An edit in another language.
    fs::write(&edit, "def f():\n    return 1\n# ...\n").unwrap();
    let out = h.run(&["apply", f, e]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not parse as Rust"));
    // No language for the file: a clear error naming the way out.
    let txt = dir.join("notes.txt");
    fs::write(&txt, "x").unwrap();
    let err = h.fails(&["apply", txt.to_str().unwrap(), e]);
    assert!(err.contains("--lang"), "{err}");
}
