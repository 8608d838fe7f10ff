//! Zip safety: what an archive must be before anything in it is read,
//! unpacked or trusted. The central directory is walked record by record
//! here, whatever the end record says, and must list exactly what the zip
//! reader reads; only regular files and directories at plain relative
//! paths pass.

use std::collections::BTreeSet;
use std::io::{Cursor, Read};

use super::{
    Invalid, MAX_ENTRIES, MAX_ENTRY_BYTES, MAX_NAME_BYTES, MAX_NAME_PART_BYTES, MAX_TOTAL_BYTES,
};

/// Reads every entry, refusing anything but regular files and directories
/// at safe relative paths, and stopping any entry that inflates past the
/// limits. Directories are checked, not returned.
pub(super) fn read_entries(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, Invalid> {
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| Invalid::NotZip(e.to_string()))?;
    let listed = central_directory(bytes, &archive)?;
    check_names(&listed)?;
    let mut total = 0u64;
    let mut out = Vec::with_capacity(listed.len());
    for entry in &listed {
        if entry.is_dir() {
            continue;
        }
        let name = entry.name.clone();
        let mut file = archive
            .by_name(&name)
            .map_err(|e| Invalid::NotZip(e.to_string()))?;
        if file.is_symlink() || file.is_dir() {
            return Err(Invalid::UnsafeEntry {
                name,
                why: "the archive reader sees this entry as a link or a directory",
            });
        }
        let limit = MAX_ENTRY_BYTES.min(MAX_TOTAL_BYTES - total);
        let mut data = Vec::new();
        (&mut file)
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|e| Invalid::NotZip(format!("entry {name:?} is corrupt: {e}")))?;
        if data.len() as u64 > limit {
            return Err(Invalid::TooLarge { name, limit });
        }
        total += data.len() as u64;
        out.push((name, data));
    }
    Ok(out)
}

/// One record of the central directory, as this module reads it.
struct Listed {
    name: String,
    /// The Unix file type bits (`S_IFMT`), when the record carries a Unix mode.
    file_type: Option<u32>,
    /// Where its central directory record starts.
    record: u64,
}

impl Listed {
    fn is_dir(&self) -> bool {
        self.name.ends_with('/')
    }
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// Walks the central directory record by record, whatever the end record
/// says it holds, and checks it lists exactly what the zip reader will
/// read: a name the reader would collapse (a duplicate) or never see (past
/// the count an end record declares) is refused, not resolved.
fn central_directory(
    bytes: &[u8],
    archive: &zip::ZipArchive<Cursor<&[u8]>>,
) -> Result<Vec<Listed>, Invalid> {
    const RECORD: [u8; 4] = [0x50, 0x4b, 0x01, 0x02];
    const FIXED: usize = 46;
    let corrupt = |why: &str| Invalid::NotZip(format!("the central directory is corrupt: {why}"));
    let unsafe_entry = |name: &str, why| Invalid::UnsafeEntry {
        name: name.to_owned(),
        why,
    };
    let mut at = usize::try_from(archive.central_directory_start())
        .map_err(|_| corrupt("it starts past the end"))?;
    let mut listed: Vec<Listed> = Vec::new();
    let mut names = BTreeSet::new();
    while bytes.get(at..at + 4) == Some(&RECORD[..]) {
        if listed.len() == MAX_ENTRIES {
            return Err(Invalid::OverLimit(format!(
                "the archive holds more than {MAX_ENTRIES} entries"
            )));
        }
        let header = bytes
            .get(at..at + FIXED)
            .ok_or_else(|| corrupt("a record is cut short"))?;
        let u16_at = |i: usize| usize::from(u16::from_le_bytes([header[i], header[i + 1]]));
        let made_by_unix = matches!(header[5], 3 | 19);
        let external = u32::from_le_bytes(header[38..42].try_into().expect("4 bytes"));
        let (name_len, extra_len, comment_len) = (u16_at(28), u16_at(30), u16_at(32));
        let raw_name = bytes
            .get(at + FIXED..at + FIXED + name_len)
            .ok_or_else(|| corrupt("a name is cut short"))?;
        let name = std::str::from_utf8(raw_name)
            .map_err(|_| {
                unsafe_entry(
                    &format!("entry #{}", listed.len()),
                    "the entry name is not valid UTF-8",
                )
            })?
            .to_owned();
        if !names.insert(name.clone()) {
            return Err(unsafe_entry(&name, "duplicate entry name"));
        }
        let file_type = (made_by_unix && external >> 16 != 0).then_some((external >> 16) & S_IFMT);
        listed.push(Listed {
            name,
            file_type,
            record: at as u64,
        });
        at += FIXED + name_len + extra_len + comment_len;
    }
    if listed.len() != archive.len() || archive.has_duplicate_names() {
        return Err(unsafe_entry(
            "",
            "the end record's entry count does not match the central directory",
        ));
    }
    // The reader must know each record by its name, at its place.
    for entry in &listed {
        let seen = archive
            .index_for_name(&entry.name)
            .and_then(|i| archive.by_index_data(i).ok())
            .map(|e| e.central_header_start());
        if seen != Some(entry.record) {
            return Err(unsafe_entry(
                &entry.name,
                "the zip reader does not list this central directory record",
            ));
        }
    }
    Ok(listed)
}

/// Checks every name and type in the archive before anything is read: only
/// regular files and directories, at relative paths without `.`, `..` or
/// empty parts, none of them both a file and a directory.
fn check_names(listed: &[Listed]) -> Result<(), Invalid> {
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for entry in listed {
        let name = entry.name.as_str();
        let refuse = |why| {
            Err(Invalid::UnsafeEntry {
                name: name.to_owned(),
                why,
            })
        };
        match (entry.file_type, entry.is_dir()) {
            (None | Some(0), _) | (Some(S_IFREG), false) | (Some(S_IFDIR), true) => {}
            (Some(S_IFLNK), _) => return refuse("symbolic links are not allowed"),
            (Some(S_IFREG | S_IFDIR), _) => {
                return refuse(
                    "the entry's mode and its name disagree on whether it is a directory",
                );
            }
            (Some(_), _) => {
                return refuse(
                    "only regular files and directories are allowed (this is a device, pipe or socket)",
                );
            }
        }
        if name.starts_with('/') || name.contains(':') {
            return refuse("absolute paths are not allowed");
        }
        if name.contains('\\') {
            return refuse("backslashes are not allowed in paths");
        }
        if name.chars().any(char::is_control) {
            return refuse("control characters are not allowed in paths");
        }
        if name.len() > MAX_NAME_BYTES {
            return refuse("the path is longer than 1024 bytes");
        }
        let path = name.strip_suffix('/').unwrap_or(name);
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|part| *part == ".." || *part == ".") {
            return refuse("'..' and '.' are not allowed in paths");
        }
        if parts.iter().any(|part| part.is_empty()) {
            return refuse("empty path parts ('//') are not allowed");
        }
        if parts.iter().any(|part| part.len() > MAX_NAME_PART_BYTES) {
            return refuse("a part of the path is longer than 255 bytes");
        }
        for i in 1..parts.len() {
            dirs.insert(parts[..i].join("/"));
        }
        if entry.is_dir() {
            dirs.insert(path.to_owned());
        } else {
            files.insert(path.to_owned());
        }
    }
    if let Some(both) = files.intersection(&dirs).next() {
        return Err(Invalid::UnsafeEntry {
            name: both.clone(),
            why: "the path is both a file and a directory",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(entries: &[(&str, u32)]) -> Vec<Listed> {
        entries
            .iter()
            .map(|(name, mode)| Listed {
                name: (*name).to_owned(),
                file_type: (*mode != 0).then_some(mode & S_IFMT),
                record: 0,
            })
            .collect()
    }

    #[test]
    fn names_and_types_are_checked_before_anything_is_read() {
        let ok = listed(&[
            ("manifest.toml", 0o100644),
            ("lib/", 0o040755),
            ("lib/t/libt.so", 0),
        ]);
        assert!(check_names(&ok).is_ok());
        let long = format!("lib/{}", "a".repeat(256));
        for (entries, says) in [
            (vec![("dev", 0o020644)], "device"),
            (vec![("fifo", 0o010644)], "device, pipe or socket"),
            (vec![("link", 0o120777)], "symbolic links"),
            (vec![("dir/", 0o100644)], "disagree"),
            (
                vec![("x", 0o100644), ("x/y", 0o100644)],
                "both a file and a directory",
            ),
            (
                vec![("x/y", 0o100644), ("x", 0o100644)],
                "both a file and a directory",
            ),
            (
                vec![("x/", 0o040755), ("x", 0o100644)],
                "both a file and a directory",
            ),
            (vec![("lib//x", 0o100644)], "empty path parts"),
            (vec![("lib\\x", 0o100644)], "backslashes"),
            (vec![("a/../b", 0o100644)], "'..'"),
            (vec![("/etc/x", 0o100644)], "absolute"),
            (vec![("x\u{0}y", 0o100644)], "control characters"),
            (vec![(long.as_str(), 0o100644)], "255 bytes"),
        ] {
            match check_names(&listed(&entries)) {
                Err(e @ Invalid::UnsafeEntry { .. }) => {
                    assert!(e.to_string().contains(says), "{entries:?}: {e}")
                }
                other => panic!("{entries:?}: {other:?}"),
            }
        }
    }
}
