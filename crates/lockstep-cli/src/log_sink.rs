//! Where log lines go: standard error, with the gateway's access log buffered.
//!
//! Why: the access log is one line per proxied request. Written as it comes, that is one
//! `write` call per request, which costs more CPU than the rest of the proxying. Like
//! nginx's `access_log … buffer=`, access lines are gathered and written together: when
//! the buffer passes [`FLUSH_AT`] bytes, every [`FLUSH_EVERY`] from a background thread,
//! and before any other line (so lines keep their order). Every other line — warnings,
//! errors, the registry's own log — is written at once. A process killed with `kill -9`
//! can lose at most the last [`FLUSH_EVERY`] of access lines; a normal exit loses none
//! ([`flush`] runs at the end of `main`).

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// Target of the gateway's access log lines.
const ACCESS_TARGET: &str = "lockstep_gateway::access";
/// Buffered access lines are written once they pass this size.
const FLUSH_AT: usize = 32 * 1024;
/// ... or after this long.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// The writer `tracing_subscriber::fmt` is given.
#[derive(Clone, Copy)]
pub struct Stderr;

/// One formatted line on its way out (the formatter writes each line with one call).
pub struct Line {
    buffered: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = BUFFER.lock().unwrap_or_else(|p| p.into_inner());
        if self.buffered {
            // The flusher runs only in processes that write access lines.
            static FLUSHER: std::sync::Once = std::sync::Once::new();
            FLUSHER.call_once(start_flusher);
            pending.extend_from_slice(buf);
            if pending.len() >= FLUSH_AT {
                write_out(&mut pending);
            }
        } else {
            write_out(&mut pending);
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes what is pending; a failed write drops it (standard error is gone).
fn write_out(pending: &mut Vec<u8>) {
    if !pending.is_empty() {
        let _ = std::io::stderr().write_all(pending);
        pending.clear();
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { buffered: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            buffered: meta.target() == ACCESS_TARGET,
        }
    }
}

/// Starts the thread that writes buffered lines every [`FLUSH_EVERY`].
fn start_flusher() {
    let _ = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            }
        });
}

/// Writes every buffered line now.
pub fn flush() {
    let mut pending = BUFFER.lock().unwrap_or_else(|p| p.into_inner());
    write_out(&mut pending);
}
