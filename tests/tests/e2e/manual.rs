//! What the CLI says about itself: shell completions and man pages, made
//! from its own definitions.

use std::process::Command;

use crate::harness::{scratch_dir, troupe, troupe_bin};

/// Bash completes troupe's commands and a command's flags with the script
/// `troupe completions bash` prints (run in a real bash).
#[test]
fn bash_completes_commands_and_flags() {
    let script = scratch_dir("completions").join("troupe.bash");
    let out = troupe(&["completions", "bash"]);
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |line: &str| -> Vec<String> {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; _troupe troupe \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            words.len() - 1,
            line.len(),
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(program)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let commands = complete("troupe no");
    assert!(commands.contains(&"node".to_owned()), "{commands:?}");
    assert!(commands.contains(&"nodes".to_owned()), "{commands:?}");
    let flags = complete("troupe nodes accept --");
    assert!(flags.contains(&"--key".to_owned()), "{flags:?}");

    for shell in ["zsh", "fish"] {
        let out = troupe(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("submit") && text.contains("idempotency-key"),
            "{shell}"
        );
    }
    let out = troupe(&["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values"),
        "{out:?}"
    );
}

/// `troupe man --out DIR` writes a page for troupe and for every command,
/// each naming its own usage; `troupe man` prints troupe(1).
#[test]
fn man_pages_for_every_command() {
    let dir = scratch_dir("man");
    let out = Command::new(troupe_bin())
        .args(["man", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for (page, usage) in [
        ("troupe.1", "troupe"),
        ("troupe-submit.1", "troupe submit"),
        ("troupe-nodes-accept.1", "troupe nodes accept"),
        ("troupe-tokens-create.1", "troupe tokens create"),
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
        assert!(
            text.contains(&usage.replace(' ', "\\ ")) || text.contains(usage),
            "{page} names its usage {usage:?}"
        );
    }
    let out = troupe(&["man"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(".TH troupe 1"));
}
