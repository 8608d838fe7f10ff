//! Showing actions to people: the live step view of `--wait`, `status` and `list`.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::client::Client;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

fn elapsed(from: &Value, to: &Value) -> String {
    let parse = |v: &Value| v.as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
    match (parse(from), parse(to)) {
        (Some(a), Some(b)) => {
            let ms = (b - a).num_milliseconds();
            if ms < 1000 {
                format!("{ms} ms")
            } else {
                format!("{:.2} s", ms as f64 / 1000.0)
            }
        }
        _ => String::new(),
    }
}

fn mark(status: &str) -> &'static str {
    match status {
        "succeeded" => "ok  ",
        "failed" => "FAIL",
        "running" => ">>  ",
        "waiting" => "wait",
        "cancelled" => "stop",
        "skipped" => "skip",
        _ => "    ",
    }
}

/// How long `--wait` keeps trying to reach a server that went away (a
/// restart, a deploy) before giving up.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// Prints step changes as they happen until the action finishes. Exits
/// non-zero unless it ended `wanted` (`succeeded`; for a cancel,
/// `cancelled`). Rides over the server going away and
/// coming back (a restart), saying so on stderr.
/// With `logs`, what the steps logged follows the end (in `--json`, as the
/// action's `logs`).
pub(crate) async fn follow(
    client: &Client,
    mut action: Value,
    show: Show,
    wanted: &str,
) -> Result<ExitCode> {
    let Show { json, logs, full } = show;
    let id = action["id"].as_i64().unwrap_or_default();
    let mut seen: HashMap<u64, (String, u64)> = HashMap::new();
    let mut last_status = String::new();
    // Since when the server has been unreachable, if it is.
    let mut lost: Option<std::time::Instant> = None;
    // Ctrl-C stops the following, not the action: handled from here on.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    if !json {
        println!(
            "action {id}: {} on {}",
            s(&action["kind"]),
            s(&action["target"])
        );
    }
    loop {
        if !json {
            let status = s(&action["status"]).to_owned();
            for step in action["steps"].as_array().into_iter().flatten() {
                let seq = step["seq"].as_u64().unwrap_or_default();
                let key = (
                    s(&step["status"]).to_owned(),
                    step["attempt"].as_u64().unwrap_or_default(),
                );
                if key.0 == "pending" || seen.get(&seq) == Some(&key) {
                    continue;
                }
                println!("{}", step_line(step, full));
                seen.insert(seq, key);
            }
            if status != last_status && !is_terminal(&status) && status != "running" {
                println!("  {status}");
            }
            last_status = status;
        }
        if is_terminal(s(&action["status"])) {
            break;
        }
        let revision = action["revision"].as_i64().unwrap_or_default();
        let next = tokio::select! {
            next = client.wait(id, revision) => next,
            _ = interrupt.recv() => return Ok(let_go(&action)),
        };
        match next {
            Ok(next) => {
                if lost.take().is_some() {
                    eprintln!("reconnected; following action {id} again");
                }
                action = next;
            }
            Err(e) => {
                let Some(gone) = e.downcast_ref::<crate::client::Unavailable>() else {
                    return Err(e);
                };
                let since = *lost.get_or_insert_with(|| {
                    eprintln!(
                        "lost the server ({gone}); reconnecting to keep following action {id} (for up to {} min)",
                        RECONNECT_FOR.as_secs() / 60
                    );
                    std::time::Instant::now()
                });
                if since.elapsed() > RECONNECT_FOR {
                    return Err(e.context(format!(
                        "gave up following action {id}; it may still finish: see `troupe status {id}`"
                    )));
                }
                tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = interrupt.recv() => return Ok(let_go(&action)),
                }
            }
        }
    }
    if logs {
        action["logs"] = client.logs(id).await?["logs"].take();
    }
    let status = s(&action["status"]);
    if json {
        println!("{}", serde_json::to_string_pretty(&action)?);
    } else {
        let took = elapsed(&action["created_at"], &action["finished_at"]);
        match action["error"].as_str() {
            Some(err) => println!("action {id} {status} after {took}: {err}"),
            None => println!("action {id} {status} in {took}"),
        }
        if logs {
            print_logs(&action);
        }
    }
    Ok(if status == wanted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The exit status of a command stopped by Ctrl-C (128 + SIGINT), as a
/// shell reports it.
pub(crate) const INTERRUPTED: u8 = 130;

/// Ctrl-C while following: the action goes on; say so, and how to follow
/// it again or stop it.
fn let_go(action: &Value) -> ExitCode {
    let id = action["id"].as_i64().unwrap_or_default();
    let status = match s(&action["status"]) {
        "" => "running",
        status => status,
    };
    eprintln!(
        "stopped following action {id}; it is still {status} — `troupe status {id} --wait` to follow again, `troupe cancel {id}` to stop it"
    );
    ExitCode::from(INTERRUPTED)
}

/// An action and its steps; with `attempts`, under each step the attempts
/// that failed before its latest (when, where and why).
pub(crate) fn print_action(a: &Value, full: bool, attempts: bool) {
    println!(
        "action {}  {} on {}  {}",
        a["id"],
        s(&a["kind"]),
        s(&a["target"]),
        s(&a["status"])
    );
    println!("  bundle   {}", s(&a["bundle"]));
    if let Some(server) = a["server"].as_str() {
        println!("  server   {server}");
    }
    println!("  created  {}", s(&a["created_at"]));
    if let Some(t) = a["finished_at"].as_str() {
        println!(
            "  finished {t} ({})",
            elapsed(&a["created_at"], &a["finished_at"])
        );
    }
    if let Some(err) = a["error"].as_str() {
        println!("  error    {err}");
    }
    for step in a["steps"].as_array().into_iter().flatten() {
        println!("{}", step_line(step, full));
        if attempts {
            let latest = step["attempt"].as_u64();
            for attempt in step["attempts"].as_array().into_iter().flatten() {
                if attempt["status"] == "failed" && attempt["attempt"].as_u64() != latest {
                    println!("{}", attempt_line(attempt, full));
                }
            }
        }
    }
}

/// An earlier attempt of a step, under its line: `attempt 1 failed after
/// 12 ms on hv-17: BMC busy`.
fn attempt_line(attempt: &Value, full: bool) -> String {
    let mut line = format!(
        "         attempt {} {}",
        attempt["attempt"],
        s(&attempt["status"])
    );
    let took = elapsed(&attempt["started_at"], &attempt["finished_at"]);
    if !took.is_empty() {
        line.push_str(&format!(" after {took}"));
    }
    if let Some(node) = attempt["node"].as_str() {
        line.push_str(&format!(" on {node}"));
    }
    if let Some(err) = attempt["error"].as_str() {
        line.push_str(&format!(": {}", cut(err, ERROR_CUT, full)));
    }
    line
}

/// How a client command shows an action.
#[derive(Clone, Copy, Default)]
pub(crate) struct Show {
    /// The API's JSON instead of text.
    pub(crate) json: bool,
    /// What its steps logged, too.
    pub(crate) logs: bool,
    /// Outputs and errors whole, not cut to a line.
    pub(crate) full: bool,
}

/// Longest output and error shown on a step's line without `--full`.
const OUTPUT_CUT: usize = 100;
const ERROR_CUT: usize = 300;

/// One step as a line: its state, time, attempts, where it runs, and what
/// it returned or why it failed.
fn step_line(step: &Value, full: bool) -> String {
    let status = s(&step["status"]);
    let mut line = format!(
        "  [{}] {:<20} {:<10}",
        mark(status),
        s(&step["name"]),
        status
    );
    if !matches!(status, "running" | "waiting" | "pending") {
        line.push_str(&format!(
            " {}",
            elapsed(&step["started_at"], &step["finished_at"])
        ));
    }
    let attempt = step["attempt"].as_u64().unwrap_or_default();
    if attempt > 1 {
        line.push_str(&format!(" (attempt {attempt})"));
    }
    if let Some(wants) = step["waiting_for"].as_str() {
        line.push_str(&format!("  for {}", awaited(wants)));
    }
    if let Some(node) = step["node"].as_str() {
        line.push_str(&format!("  on {node}"));
    }
    if status == "succeeded" && !step["output"].is_null() {
        line.push_str(&format!(
            "  → {}",
            cut(&step["output"].to_string(), OUTPUT_CUT, full)
        ));
    }
    if let Some(err) = step["error"].as_str() {
        line.push_str(&format!("  {}", cut(err, ERROR_CUT, full)));
    }
    line.trim_end().to_owned()
}

/// `text` on one line, cut to `max` characters unless `full`.
fn cut(text: &str, max: usize, full: bool) -> String {
    if full {
        return text.to_owned();
    }
    let one_line = text.replace('\n', " ⏎ ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let kept: String = one_line.chars().take(max).collect();
    format!("{kept}… (--full for all)")
}

/// Prints the `logs` of `v` (an action or a log list), by step and attempt.
pub(crate) fn print_logs(v: &Value) {
    let logs = v["logs"].as_array().cloned().unwrap_or_default();
    if logs.is_empty() {
        println!("(no step logged anything)");
    }
    for log in logs {
        println!(
            "--- {} (step {}), attempt {} ---",
            s(&log["step"]),
            log["seq"],
            log["attempt"]
        );
        print!("{}", s(&log["log"]));
    }
}

/// The list as a table: relative times, or (`wide`) absolute ones and
/// more columns. The hint for the next page repeats `query`'s filters.
pub(crate) fn render_list(
    list: &Value,
    query: &[(&str, String)],
    wide: bool,
    now: DateTime<Utc>,
) -> String {
    let actions = list["actions"].as_array().cloned().unwrap_or_default();
    if actions.is_empty() {
        return "no actions\n".to_owned();
    }
    let time = |v: &Value| v.as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
    let or_dash = |t: &str| {
        if t.is_empty() {
            "-".to_owned()
        } else {
            t.to_owned()
        }
    };
    let mut rows = Vec::with_capacity(actions.len());
    for a in &actions {
        let created = time(&a["created_at"]);
        let started = time(&a["started_at"]);
        let finished = time(&a["finished_at"]);
        // How long it ran (or has run so far): from its start, or from its
        // submission if it never started.
        let took = match (started.or(created), finished) {
            (Some(from), Some(to)) => crate::table::took(to - from),
            (Some(from), None) if started.is_some() => crate::table::took(now - from),
            _ => "-".to_owned(),
        };
        let status = match (s(&a["status"]), a["waiting_for"].as_str()) {
            ("running", Some(wants)) if wide => format!("waiting for {}", awaited(wants)),
            ("running", Some(wants)) if is_limit(wants) => "waiting for a limit".to_owned(),
            ("running", Some(_)) => "waiting for a node".to_owned(),
            (status, _) => status.to_owned(),
        };
        // Cut to fit a row: `troupe status ID` has it whole.
        let error = match a["error"].as_str() {
            Some(err) => {
                let max = if wide { ERROR_CUT } else { LIST_ERROR_CUT };
                let one_line = err.replace('\n', " ⏎ ");
                match one_line.char_indices().nth(max) {
                    Some((end, _)) => format!("{}…", &one_line[..end]),
                    None => one_line,
                }
            }
            None => String::new(),
        };
        let at = |t: Option<DateTime<Utc>>| match t {
            Some(t) if wide => crate::table::absolute(t),
            Some(t) => crate::table::ago(t, now),
            None => "-".to_owned(),
        };
        let mut row = vec![
            a["id"].as_i64().unwrap_or_default().to_string(),
            s(&a["kind"]).to_owned(),
            s(&a["target"]).to_owned(),
            status,
            or_dash(s(&a["current_step"])),
            at(created),
        ];
        if wide {
            row.push(at(started));
            row.push(at(finished));
        }
        row.push(took);
        row.push(or_dash(s(&a["submitted_by"])));
        if wide {
            row.push(s(&a["bundle"]).chars().take(8).collect());
        }
        row.push(error);
        rows.push(row);
    }
    let header: &[&str] = if wide {
        &[
            "ID",
            "KIND",
            "TARGET",
            "STATUS",
            "STEP",
            "SUBMITTED",
            "STARTED",
            "FINISHED",
            "TOOK",
            "BY",
            "BUNDLE",
            "ERROR",
        ]
    } else {
        &[
            "ID",
            "KIND",
            "TARGET",
            "STATUS",
            "STEP",
            "SUBMITTED",
            "TOOK",
            "BY",
            "ERROR",
        ]
    };
    let mut out = crate::table::render(header, &["ID"], &rows);
    if let Some(next) = list["next_before"].as_i64() {
        let mut hint = String::from("more: troupe list");
        for (k, v) in query.iter().filter(|(k, _)| *k != "before") {
            let flag = k.replace('_', "-");
            let safe = v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:/,".contains(c));
            if safe {
                hint.push_str(&format!(" --{flag} {v}"));
            } else {
                hint.push_str(&format!(" --{flag} '{}'", v.replace('\'', "'\\''")));
            }
        }
        if wide {
            hint.push_str(" --output wide");
        }
        out.push_str(&format!("{hint} --before {next}\n"));
    }
    out
}

/// Longest error shown in a list's row (`--output wide`: [`ERROR_CUT`]).
const LIST_ERROR_CUT: usize = 40;

/// How often `list --watch` asks again.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Clears a terminal before a redraw (cursor home, erase the screen).
const CLEAR: &str = "\x1b[H\x1b[2J";

/// `list --watch`: asks every [`WATCH_EVERY`] and draws the list again when
/// it changed (on a terminal, every time, over the last one, so relative
/// times stay true), until Ctrl-C. A server that goes away is said once on
/// stderr and asked again.
pub(crate) async fn watch_list(
    client: &Client,
    query: &[(&str, String)],
    wide: bool,
) -> Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut last: Option<Value> = None;
    let mut lost = false;
    loop {
        match client.list(query).await {
            Ok(list) => {
                if lost {
                    eprintln!("reconnected");
                    lost = false;
                }
                if tty || last.as_ref() != Some(&list) {
                    let table = render_list(&list, query, wide, Utc::now());
                    let mut out = std::io::stdout().lock();
                    if tty {
                        write!(out, "{CLEAR}")?;
                    } else if last.is_some() {
                        writeln!(out)?;
                    }
                    writeln!(
                        out,
                        "every {}s, at {} (Ctrl-C to stop)",
                        WATCH_EVERY.as_secs(),
                        crate::table::absolute(Utc::now())
                    )?;
                    write!(out, "{table}")?;
                    out.flush()?;
                    last = Some(list);
                }
            }
            // A bad filter stays bad: say so once and stop.
            Err(e) if last.is_none() => return Err(e),
            Err(e) => {
                if e.downcast_ref::<crate::client::Unavailable>().is_none() {
                    return Err(e);
                }
                if !lost {
                    eprintln!(
                        "lost the server ({e}); asking again every {}s",
                        WATCH_EVERY.as_secs()
                    );
                    lost = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = interrupt.recv() => return Ok(ExitCode::from(INTERRUPTED)),
        }
    }
}

/// `status ID --watch`: the whole action drawn again each time it changes
/// (long-polled, so nothing is asked in a loop), until it finishes or
/// Ctrl-C. Exits as `--wait` does: non-zero unless it succeeded.
pub(crate) async fn watch_action(
    client: &Client,
    mut action: Value,
    show: Show,
) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let id = action["id"].as_i64().unwrap_or_default();
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut drawn = -1;
    let mut lost = false;
    loop {
        let revision = action["revision"].as_i64().unwrap_or_default();
        if revision != drawn {
            if tty {
                print!("{CLEAR}");
            } else if drawn >= 0 {
                println!();
            }
            print_action(&action, show.full, show.full || show.logs);
            drawn = revision;
        }
        if is_terminal(s(&action["status"])) {
            if show.logs {
                action["logs"] = client.logs(id).await?["logs"].take();
                print_logs(&action);
            }
            return Ok(if action["status"] == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        action = tokio::select! {
            next = client.wait(id, revision) => match next {
                Ok(next) => {
                    if std::mem::take(&mut lost) {
                        eprintln!("reconnected");
                    }
                    next
                }
                Err(e) if e.downcast_ref::<crate::client::Unavailable>().is_some() => {
                    if !std::mem::replace(&mut lost, true) {
                        eprintln!("lost the server ({e}); asking again every {}s", WATCH_EVERY.as_secs());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WATCH_EVERY) => {}
                        _ = interrupt.recv() => return Ok(let_go(&action)),
                    }
                    action
                }
                Err(e) => return Err(e),
            },
            _ = interrupt.recv() => return Ok(let_go(&action)),
        };
    }
}

/// Whether a step's `waiting_for` names a concurrency limit (`bmc limit
/// https://10.0.0.5`) rather than what a node must have (`oob=dc1`).
fn is_limit(waiting_for: &str) -> bool {
    waiting_for
        .split_once(" limit ")
        .is_some_and(|(name, _)| !name.contains(['=', ',', ' ']))
}

/// What a waiting step waits for, as a phrase: `a node with oob=dc1`, or
/// the limit as it is.
fn awaited(waiting_for: &str) -> String {
    if is_limit(waiting_for) {
        waiting_for.to_owned()
    } else {
        format!("a node with {waiting_for}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_told_from_a_placement() {
        assert_eq!(
            awaited("bmc limit https://10.0.0.5"),
            "bmc limit https://10.0.0.5"
        );
        assert_eq!(awaited("power limit dc1"), "power limit dc1");
        assert_eq!(awaited("oob=dc1"), "a node with oob=dc1");
        assert_eq!(awaited("dc=ams3, gpu=*"), "a node with dc=ams3, gpu=*");
        // A capability value may hold the words; its name holds '='.
        assert_eq!(
            awaited("note=no limit here"),
            "a node with note=no limit here"
        );
    }
}
