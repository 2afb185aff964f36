//! The shared set-up step (`scripts/lib.sh`, `ensure_commands`): it checks
//! every command again after apt has run, so a package apt did not install
//! (or removed) stops the script with a line naming it, instead of a test
//! failing later. Runs the real apt-get, as root, on a package that is
//! installed already (so nothing on the machine changes).

use std::path::Path;
use std::process::Command;

fn ensure(pairs: &str) -> std::process::Output {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lib.sh");
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". {} && ensure_commands {pairs}",
            scripts.display()
        ))
        .output()
        .unwrap()
}

#[test]
fn a_command_still_missing_after_apt_stops_the_setup_naming_its_package() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the set-up test runs apt-get and needs root (CI runs as root)"
    );
    // `hostname` is installed on every Debian machine and provides no
    // command of this name: apt succeeds, and the command is still missing.
    let out = ensure("hangar-no-such-command:hostname bash:bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("still missing"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line for the one missing command: {stderr}"
    );
    assert!(
        lines[0].contains("hangar-no-such-command") && lines[0].contains("package hostname"),
        "{stderr}"
    );
    // What apt said of the package is in the line ("hostname is already
    // the newest version", or "set to manually installed" the first time).
    assert!(lines[0].contains("(apt: hostname "), "{stderr}");

    // Commands that are there pass, without apt.
    let out = ensure("bash:bash sh:dash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
