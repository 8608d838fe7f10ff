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
mod manual;
mod node_cmd;
mod profiles;
mod scaffold;
mod serve;
mod table;
mod targets_cmd;
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
        end_quietly_on_a_closed_stdout();
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

/// Lets a closed stdout (`troupe list | head`) end the process as it ends
/// any Unix tool, by SIGPIPE, instead of `println!` panicking. SIGPIPE
/// itself stays ignored (as Rust sets it): a write to a socket the server
/// closed (an https:// URL for a plain-HTTP server) must fail as an error
/// the client reports, not kill it.
fn end_quietly_on_a_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // What std's print macros panic with when the reader is gone.
        if message.starts_with("failed printing to stdout")
            && message.ends_with(&format!("(os error {})", libc::EPIPE))
        {
            die_of_sigpipe();
        }
        default(info)
    }));
}

#[allow(unsafe_code)]
fn die_of_sigpipe() {
    // SAFETY: restoring a signal's default disposition and raising it
    // touches no memory of ours; the process ends here.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
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
