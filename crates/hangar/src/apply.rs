//! `hangar apply FILE EDIT`: merge a lazy edit (changed code with
//! `// ... existing code ...` markers) into a file, deterministically
//! (`hangar-apply`). It prints the merged file or, with `--in-place`,
//! replaces the file (a new file beside it, renamed over it); a refusal exits 2 with
//! the reason, the file untouched.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use hangar_apply::Lang;

#[derive(Args)]
pub struct ApplyArgs {
    /// The file to change
    file: PathBuf,
    /// The lazy edit (a file; - for standard input)
    edit: String,
    /// What the edit is meant to do (kept for a model fallback; the
    /// deterministic merge goes by the code alone)
    #[arg(long)]
    instruction: Option<String>,
    /// Write the merged file over FILE instead of printing it
    #[arg(long)]
    in_place: bool,
    /// The language (default: from FILE's extension): rust, python,
    /// javascript, typescript, tsx, go
    #[arg(long)]
    lang: Option<String>,
}

pub fn run(a: ApplyArgs) -> Result<()> {
    let name = a.file.to_string_lossy().to_string();
    let lang = match &a.lang {
        Some(l) => Lang::from_name(l).with_context(|| {
            format!("--lang {l}: not one of rust, python, javascript, typescript, tsx, go")
        })?,
        None => match Lang::from_path(&name) {
            Some(l) => l,
            None => bail!(
                "{name}: no language known for its extension (.rs .py .js .ts .tsx .go); give --lang"
            ),
        },
    };
    let original = std::fs::read_to_string(&a.file).with_context(|| format!("reading {name}"))?;
    let edit = if a.edit == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the edit from standard input")?
    } else {
        std::fs::read_to_string(&a.edit).with_context(|| format!("reading the edit {}", a.edit))?
    };
    let _ = &a.instruction;
    match hangar_apply::apply(lang, &original, &edit) {
        Ok(applied) => {
            if a.in_place {
                let mut tmp = a.file.clone().into_os_string();
                tmp.push(".hangar-apply.tmp");
                let tmp = PathBuf::from(tmp);
                std::fs::write(&tmp, &applied.text)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                if let Ok(meta) = std::fs::metadata(&a.file) {
                    std::fs::set_permissions(&tmp, meta.permissions())?;
                }
                std::fs::rename(&tmp, &a.file).with_context(|| format!("replacing {name}"))?;
                eprintln!("{name}: applied ({})", applied.how);
            } else {
                print!("{}", applied.text);
            }
            Ok(())
        }
        Err(refusal) => {
            eprintln!("hangar apply: refused: {refusal}");
            std::process::exit(2);
        }
    }
}
