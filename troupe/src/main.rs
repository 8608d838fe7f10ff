//! The `troupe` command: runs the server, talks to it, and builds bundles.

use std::process::ExitCode;

use clap::Parser;

mod admin_cmd;
mod args;
mod bench;
mod bundle_cmd;
mod cli;
mod client;
mod demo;
mod fleet;
mod goons_cmd;
mod host_token;
mod node_cmd;
mod scaffold;
mod serve;
mod watch;

/// The hidden mode in which `troupe` runs as a step host (see engine::host).
pub(crate) const STEP_HOST_ARG: &str = "__step-host";

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == STEP_HOST_ARG) {
        let Some(library) = args.next() else {
            eprintln!("usage: troupe {STEP_HOST_ARG} LIBRARY");
            return ExitCode::from(2);
        };
        return ExitCode::from(engine::host::server::serve(library.as_ref()) as u8);
    }
    // The one TLS crypto provider (ring), for the CLI's HTTPS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = cli::Cli::parse();
    if cli.prints_only() {
        restore_sigpipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.default_log_filter())),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only, never into a log file or journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    engine::failpoints::arm();
    let runtime = if cli.single_threaded() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Lets a closed stdout end the process, instead of `println!` panicking.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called before any thread starts; setting a signal's
    // disposition to the default touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// An error and its causes on one line, leaving out a cause whose text the
/// message already holds (most errors repeat their source's text).
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}
