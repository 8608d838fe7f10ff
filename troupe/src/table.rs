//! Tables for people: a header row and columns as wide as their widest
//! cell, and the times and durations in them.

use chrono::{DateTime, Utc};

/// Prints `rows` under `header`, each column as wide as its widest cell
/// (two spaces apart); columns named in `right` are aligned right (ids,
/// counts). Trailing blanks are cut.
pub(crate) fn print(header: &[&str], right: &[&str], rows: &[Vec<String>]) {
    print!("{}", render(header, right, rows));
}

pub(crate) fn render(header: &[&str], right: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right.contains(&header[i]) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// How long ago `t` was, in the largest unit that fits: `12s ago`,
/// `3m ago`, `5h ago`, `2d ago`.
pub(crate) fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..172_800 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// A duration to read at a glance: `350 ms`, `4.20 s`, `3m12s`, `2h05m`.
pub(crate) fn took(d: chrono::Duration) -> String {
    let ms = d.num_milliseconds().max(0);
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{:.2} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// A time to the second, in UTC (`2026-01-31T08:00:00Z`).
pub(crate) fn absolute(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell() {
        let rows = vec![
            vec!["7".to_owned(), "a long cell".to_owned(), "x".to_owned()],
            vec!["123".to_owned(), "b".to_owned(), String::new()],
        ];
        assert_eq!(
            render(&["ID", "NAME", "NOTE"], &["ID"], &rows),
            " ID  NAME         NOTE\n  7  a long cell  x\n123  b\n"
        );
    }

    #[test]
    fn times_read_at_a_glance() {
        let now = Utc::now();
        assert_eq!(ago(now - chrono::Duration::seconds(12), now), "12s ago");
        assert_eq!(ago(now - chrono::Duration::seconds(200), now), "3m ago");
        assert_eq!(ago(now - chrono::Duration::hours(5), now), "5h ago");
        assert_eq!(ago(now - chrono::Duration::days(3), now), "3d ago");
        assert_eq!(ago(now + chrono::Duration::seconds(2), now), "0s ago");
        assert_eq!(took(chrono::Duration::milliseconds(350)), "350 ms");
        assert_eq!(took(chrono::Duration::milliseconds(4200)), "4.20 s");
        assert_eq!(took(chrono::Duration::seconds(192)), "3m12s");
        assert_eq!(took(chrono::Duration::minutes(125)), "2h05m");
    }
}
