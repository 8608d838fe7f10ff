//! The step host: the process side. `troupe` runs this in a hidden mode, one
//! process per bundle hash, so a plugin that crashes takes down only its host.
//!
//! It loads the library, says `HELLO` with the ABI and exported steps, then
//! runs each `CALL` on its own thread until stdin closes.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use troupe_bundle::plugin::Plugin;

use super::protocol::{self, CALL, CANCEL, DONE, FAILED, HELLO, LOG, MAX_CALL_LOG, PING, WATCH};

/// The protocol channel to the engine, shared by the calls' threads.
#[derive(Clone)]
struct Channel(Arc<Mutex<BufWriter<std::fs::File>>>);

impl Channel {
    fn send(&self, frame: &[u8]) {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The engine going away closes the pipe; the read loop ends too.
        let _ = protocol::write_sync(&mut *out, frame);
    }
}

/// One call's log: its lines go to the engine as `LOG` frames, ahead of the
/// call's `DONE`, up to [`MAX_CALL_LOG`] bytes; past that, one line says so.
struct CallLog {
    id: u64,
    channel: Channel,
    /// Bytes sent so far (with a newline each), and whether the cut was.
    kept: Mutex<(usize, bool)>,
}

impl CallLog {
    fn line(&self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        // Held while sending, so lines from the step's threads keep order.
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, cut) = &mut *kept;
        if *cut {
            return;
        }
        if *bytes + line.len() < MAX_CALL_LOG {
            *bytes += line.len() + 1;
            self.channel.send(&protocol::encode(LOG, self.id, &[line]));
        } else {
            *cut = true;
            let note = format!(
                "[log cut: the step logged more than {} KiB]",
                MAX_CALL_LOG >> 10
            );
            self.channel
                .send(&protocol::encode(LOG, self.id, &[note.as_bytes()]));
        }
    }
}

/// Runs a step host for the library at `path`, reading calls on stdin and
/// answering on stdout. Returns the process exit code.
///
/// Plugins print: before the library loads, the protocol moves to a private
/// copy of stdout and fd 1 is pointed at stderr, so whatever a plugin writes
/// to either ends up in the engine's log, never among the frames.
pub fn serve(path: &Path) -> i32 {
    // Mark what plugins start, so it can be found and ended with the host
    // (see `session`).
    // SAFETY: the process is still single-threaded: nothing else reads or
    // writes the environment.
    unsafe {
        std::env::set_var(
            super::session::MARK,
            super::session::mark(std::process::id()),
        );
    }
    let channel = match take_stdout() {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("step host: cannot set aside the protocol channel: {e}");
            return 4;
        }
    };
    let channel = Channel(Arc::new(Mutex::new(BufWriter::new(channel))));
    let plugin = match Plugin::load(path) {
        Ok(plugin) => {
            let steps = serde_json::to_vec(plugin.steps()).unwrap_or_default();
            let abi = plugin.abi().to_le_bytes();
            channel.send(&protocol::encode(HELLO, 0, &[&abi, &steps]));
            Arc::new(plugin)
        }
        Err(message) => {
            channel.send(&protocol::encode(FAILED, 0, &[message.as_bytes()]));
            return 2;
        }
    };

    let in_flight: Arc<Mutex<HashMap<u64, Arc<AtomicU32>>>> = Arc::default();
    let workers = Workers::new();
    let heard = Arc::new(Heard::new());
    let mut stdin = BufReader::new(std::io::stdin().lock());
    loop {
        let frame = match protocol::read_sync(&mut stdin) {
            Ok(Some(frame)) => {
                heard.now();
                frame
            }
            // The engine closed the pipe or went away: nothing will collect
            // the results, so stop everything the calls started.
            Ok(None) => {
                super::session::kill_marked(std::process::id());
                return 0;
            }
            Err(e) => {
                eprintln!("step host: reading from the engine failed: {e}");
                super::session::kill_marked(std::process::id());
                return 3;
            }
        };
        match frame.kind {
            CALL => {
                let flag = Arc::new(AtomicU32::new(0));
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(frame.id, flag.clone());
                let (plugin, in_flight) = (plugin.clone(), in_flight.clone());
                let log = CallLog {
                    id: frame.id,
                    channel: channel.clone(),
                    kept: Mutex::default(),
                };
                workers.run(Box::new(move || {
                    let (status, body) = match protocol::parse_call(&frame.payload) {
                        Some((function, input)) => {
                            plugin.call(function, input, &flag, &|line| log.line(line))
                        }
                        None => (
                            troupe_sdk::ffi::STATUS_FATAL,
                            b"malformed call frame".to_vec(),
                        ),
                    };
                    in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&frame.id);
                    // An output too big for one frame fails this call only.
                    let frame_len = 4 + 9 + 4 + body.len();
                    let (status, body) = match protocol::too_large("output", frame_len, body.len())
                    {
                        Some(message) => (troupe_sdk::ffi::STATUS_FATAL, message.into_bytes()),
                        None => (status, body),
                    };
                    log.channel.send(&protocol::encode(
                        DONE,
                        frame.id,
                        &[&status.to_le_bytes(), &body],
                    ));
                }));
            }
            PING => {}
            WATCH => match frame.payload.get(..8).and_then(|b| b.try_into().ok()) {
                Some(ms) => heard.watch(std::time::Duration::from_millis(u64::from_le_bytes(ms))),
                None => eprintln!("step host: ignoring a malformed watch frame"),
            },
            CANCEL => {
                if let Some(flag) = in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&frame.id)
                {
                    flag.store(1, Ordering::Relaxed);
                }
            }
            other => {
                eprintln!("step host: ignoring unknown frame kind {other}");
            }
        }
        let _ = channel.0.lock().map(|mut o| o.flush());
    }
}

/// When the host last heard from its engine, and the watch that ends the
/// host after too long a silence.
struct Heard {
    start: std::time::Instant,
    /// Milliseconds since `start`.
    last: std::sync::atomic::AtomicU64,
    watching: std::sync::atomic::AtomicBool,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            start: std::time::Instant::now(),
            last: Default::default(),
            watching: Default::default(),
        }
    }

    fn now(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// From now on, a silence of `silence` ends the host and whatever its
    /// steps started: its engine stopped or hung, and another server may
    /// run these steps again, so they must not go on beside that.
    fn watch(self: &Arc<Self>, silence: std::time::Duration) {
        if self.watching.swap(true, Ordering::Relaxed) {
            return;
        }
        let heard = self.clone();
        std::thread::spawn(move || {
            let limit = silence.as_millis() as u64;
            loop {
                std::thread::sleep((silence / 4).max(std::time::Duration::from_millis(10)));
                let quiet = (heard.start.elapsed().as_millis() as u64)
                    .saturating_sub(heard.last.load(Ordering::Relaxed));
                if quiet > limit {
                    eprintln!(
                        "step host: heard nothing from the server for {quiet} ms (it stopped or hung): \
                         ending its steps, which another server may run again"
                    );
                    super::session::kill_marked(std::process::id());
                    std::process::exit(6);
                }
            }
        });
    }
}

/// Returns a private copy of stdout for the protocol and points fd 1 at
/// stderr.
fn take_stdout() -> std::io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    let channel = std::io::stdout().as_fd().try_clone_to_owned()?;
    rustix::stdio::dup2_stdout(std::io::stderr())?;
    Ok(std::fs::File::from(channel))
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run calls. A call takes an idle thread if there is one and
/// starts a new one otherwise, so steps never wait for each other; threads
/// beyond `MAX_IDLE` exit when done instead of idling.
#[derive(Clone)]
struct Workers {
    idle: Arc<Mutex<Vec<std::sync::mpsc::Sender<Job>>>>,
}

const MAX_IDLE: usize = 64;

impl Workers {
    fn new() -> Workers {
        Workers {
            idle: Arc::default(),
        }
    }

    fn run(&self, job: Job) {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let job = match idle {
            Some(worker) => match worker.send(job) {
                Ok(()) => return,
                Err(returned) => returned.0,
            },
            None => job,
        };
        let idle = self.idle.clone();
        std::thread::spawn(move || {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let mut job = job;
            loop {
                job();
                {
                    let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                    if idle.len() >= MAX_IDLE {
                        return;
                    }
                    idle.push(tx.clone());
                }
                match rx.recv() {
                    Ok(next) => job = next,
                    Err(_) => return,
                }
            }
        });
    }
}
