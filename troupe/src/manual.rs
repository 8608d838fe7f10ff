//! What the CLI says about itself, made from its clap definitions so it
//! cannot drift: shell completions (`troupe completions bash|zsh|fish`)
//! and man pages (`troupe man`, or one page per command with `--out DIR`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::Cli;

/// Prints the completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "troupe", &mut script);
    print(&script)
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) ends the
/// command quietly.
fn print(bytes: &[u8]) -> Result<ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        other => {
            other.context("writing to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints `troupe(1)`, or writes it and a page for every command
/// (`troupe-submit.1`, `troupe-nodes-accept.1`, …) into `out`.
pub(crate) fn man(out: Option<&Path>) -> Result<ExitCode> {
    let command = Cli::command();
    let Some(dir) = out else {
        let mut page = Vec::new();
        clap_mangen::Man::new(command).render(&mut page)?;
        return print(&page);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = 0;
    write_pages(command, dir, "troupe", "troupe", &mut written)?;
    eprintln!("wrote {written} man pages to {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `name` is the page's (`troupe-nodes-accept`), `usage` how the command
/// is typed (`troupe nodes accept`).
fn write_pages(
    command: clap::Command,
    dir: &Path,
    name: &str,
    usage: &str,
    written: &mut usize,
) -> Result<()> {
    let command = command
        .display_name(name.to_owned())
        .bin_name(usage.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    *written += 1;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = format!("{name}-{}", sub.get_name());
        let typed = format!("{usage} {}", sub.get_name());
        write_pages(sub.clone(), dir, &page, &typed, written)?;
    }
    Ok(())
}
