//! The framed protocol between the engine and a step host, over the host's
//! stdin and stdout.
//!
//! Every frame is `len: u32 LE | kind: u8 | id: u64 LE | payload`, where `len`
//! counts the bytes after itself. Payloads:
//!
//! | kind | direction | payload |
//! | --- | --- | --- |
//! | `CALL` | engine → host | `name_len: u16 LE`, function name, input JSON |
//! | `CANCEL` | engine → host | none; sets the call's cancel flag |
//! | `WATCH` | engine → host | `silence_ms: u64 LE`; from now on the host ends itself, and what its steps started, after hearing nothing for that long |
//! | `PING` | engine → host | none; the engine is alive (sent while a `WATCH` holds) |
//! | `HELLO` | host → engine | `abi: u32 LE`, JSON array of exported steps |
//! | `DONE` | host → engine | `status: i32 LE` (`troupe_sdk::ffi::STATUS_*`), output JSON or message |
//! | `FAILED` | host → engine | a message; the host could not start and exits |
//! | `LOG` | host → engine | one line of the call's log (`troupe_sdk::Context::log`), before its `DONE` |

use std::io::{self, Read, Write};

pub(crate) const CALL: u8 = 1;
pub(crate) const CANCEL: u8 = 2;
pub(crate) const HELLO: u8 = 3;
pub(crate) const DONE: u8 = 4;
pub(crate) const FAILED: u8 = 5;
pub(crate) const LOG: u8 = 6;
pub(crate) const WATCH: u8 = 7;
pub(crate) const PING: u8 = 8;

/// The most of one call's log a host sends (the rest is cut, saying so),
/// and the most the engine keeps of one attempt's log.
pub(crate) const MAX_CALL_LOG: usize = 64 << 10;

/// Frames larger than this are refused as corrupt. Neither side sends one:
/// a call whose input or output would not fit fails on its own instead (see
/// [`too_large`]).
pub(crate) const MAX_FRAME: usize = 64 << 20;

/// Why a call's input or output of `len` bytes cannot be sent, if it cannot.
pub(crate) fn too_large(what: &str, frame_len: usize, len: usize) -> Option<String> {
    (frame_len > MAX_FRAME).then(|| {
        format!(
            "the step's {what} is {len} bytes, over the limit of {} MiB a step call may carry",
            MAX_FRAME >> 20
        )
    })
}

#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) id: u64,
    pub(crate) payload: Vec<u8>,
}

pub(crate) fn encode(kind: u8, id: u64, parts: &[&[u8]]) -> Vec<u8> {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(4 + 9 + body);
    out.extend_from_slice(&((9 + body) as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

pub(crate) fn call(id: u64, function: &str, input: &[u8]) -> Vec<u8> {
    encode(
        CALL,
        id,
        &[
            &(function.len() as u16).to_le_bytes(),
            function.as_bytes(),
            input,
        ],
    )
}

/// Splits a `CALL` payload into function name and input.
pub(crate) fn parse_call(payload: &[u8]) -> Option<(&str, &[u8])> {
    let n = u16::from_le_bytes(payload.get(..2)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(payload.get(2..2 + n)?).ok()?;
    Some((name, &payload[2 + n..]))
}

fn parse_header(header: [u8; 13]) -> io::Result<(usize, u8, u64)> {
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    if !(9..=MAX_FRAME).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad frame length {len}"),
        ));
    }
    Ok((
        len - 9,
        header[4],
        u64::from_le_bytes(header[5..].try_into().unwrap()),
    ))
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub(crate) fn read_sync(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut header = [0u8; 13];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (len, kind, id) = parse_header(header)?;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload)?;
    Ok(Some(Frame { kind, id, payload }))
}

pub(crate) async fn read_async(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> io::Result<Option<Frame>> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 13];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (len, kind, id) = parse_header(header)?;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame { kind, id, payload }))
}

pub(crate) fn write_sync(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let bytes = call(7, "noop", b"{}");
        let f = read_sync(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!((f.kind, f.id), (CALL, 7));
        assert_eq!(parse_call(&f.payload), Some(("noop", &b"{}"[..])));
        assert!(read_sync(&mut &[][..]).unwrap().is_none());
        let mut bad = bytes.clone();
        bad[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_sync(&mut &bad[..]).is_err());
    }
}
