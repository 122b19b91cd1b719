//! The agent's stdout as a hub sink: records are rendered on a thread of their own from the hub's log, so a slow terminal or pipe reads at its own pace (and a blocked one loses records, counted, once it is the log's bound behind) instead of holding up the poller or any subscriber.
//!
//! Records reach stdout whole or not at all: the thread writes whole lines only, in chunks
//! a pipe takes atomically, and shutdown waits for it as long as stdout keeps taking them.

use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::warn;

use crate::hub::{Next, SinkRx};
use crate::record::encoding::RecordDecoder;
use crate::record::render::{Format, Renderer, TableStyle};

/// Bytes a pipe takes in one write or not at all (`PIPE_BUF`, POSIX): the most a write to
/// a pipe carries, so that a writer left blocked at exit never leaves half a line in it.
const PIPE_ATOMIC: usize = libc::PIPE_BUF;
/// The most a write to anything else (a file, a terminal, a socket) carries.
const CHUNK: usize = 64 << 10;

/// What the stdout sink did, for the agent's last words.
#[derive(Debug, Default)]
pub struct OutputCounts {
    /// Records whose lines were written whole.
    pub written: AtomicU64,
    /// Records that left the log before stdout read them.
    pub lost: AtomicU64,
}

/// How the stdout sink ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSummary {
    pub written: u64,
    pub lost: u64,
    /// It wrote everything it read (false: stdout stopped taking lines and was left).
    pub finished: bool,
}

/// The running stdout sink.
#[derive(Debug)]
pub struct OutputHandle {
    thread: Option<JoinHandle<()>>,
    done: Receiver<()>,
    counts: Arc<OutputCounts>,
}

impl OutputHandle {
    /// Waits for every queued record to be written (the hub must be closed first), for as
    /// long as stdout keeps taking lines: a slow pipe is waited for, one that took nothing
    /// for `stall` (nobody reads it) is left behind rather than holding up the agent's
    /// exit. Either way no line is left half written in a pipe.
    pub fn finish(mut self, stall: Duration) -> OutputSummary {
        let mut seen = self.counts.written.load(Ordering::Relaxed);
        let finished = loop {
            match self.done.recv_timeout(stall) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    if let Some(t) = self.thread.take() {
                        let _ = t.join();
                    }
                    break true;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.counts.written.load(Ordering::Relaxed);
                    if now == seen {
                        warn!(
                            "stdout took no record for {stall:?}; not waiting for it \
                             ({now} records written)"
                        );
                        break false;
                    }
                    seen = now;
                }
            }
        };
        OutputSummary {
            written: self.counts.written.load(Ordering::Relaxed),
            lost: self.counts.lost.load(Ordering::Relaxed),
            finished,
        }
    }
}

/// Starts writing the records `rx` receives to stdout in `format`.
pub fn spawn(rx: SinkRx, format: Format, style: TableStyle) -> io::Result<OutputHandle> {
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let counts = Arc::new(OutputCounts::default());
    let c = counts.clone();
    let thread = std::thread::Builder::new()
        .name("flowlens-output".into())
        .spawn(move || {
            let mut out = WholeLines::stdout(c.clone());
            write_all(rx, format, style, &mut out, &c);
            let _ = done_tx.send(());
        })?;
    Ok(OutputHandle {
        thread: Some(thread),
        done,
        counts,
    })
}

/// Rendered lines gathered and written to fd 1 a group of whole records at a time, never
/// through std's `Stdout`: its line buffer would hold the start of a line that the exit
/// flushes if the process ends while this thread is still writing.
struct WholeLines {
    // Not closed on drop: fd 1 stays the process's stdout.
    fd: ManuallyDrop<File>,
    /// `buf[..whole]` holds whole records not written yet; after it, the one being rendered.
    buf: Vec<u8>,
    whole: usize,
    /// Records in `buf[..whole]`.
    records: u64,
    chunk: usize,
    counts: Arc<OutputCounts>,
}

impl WholeLines {
    fn stdout(counts: Arc<OutputCounts>) -> WholeLines {
        let out = io::stdout();
        // SAFETY: fd 1 is open for the life of the process; ManuallyDrop never closes it.
        let fd = ManuallyDrop::new(unsafe { File::from_raw_fd(out.as_raw_fd()) });
        let chunk = match fd.metadata() {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()) => PIPE_ATOMIC,
            _ => CHUNK,
        };
        WholeLines::new(fd, chunk, counts)
    }

    fn new(fd: ManuallyDrop<File>, chunk: usize, counts: Arc<OutputCounts>) -> WholeLines {
        WholeLines {
            fd,
            buf: Vec::with_capacity(2 * chunk),
            whole: 0,
            records: 0,
            chunk,
            counts,
        }
    }

    /// What was rendered since the last call is whole: `records` records (0: a header).
    /// Writes what came before when the two would not fit one chunk.
    fn commit(&mut self, records: u64) -> io::Result<()> {
        if self.buf.len() > self.chunk && self.whole > 0 {
            self.write_whole()?;
        }
        self.whole = self.buf.len();
        self.records += records;
        if self.whole >= self.chunk {
            self.write_whole()?;
        }
        Ok(())
    }

    /// Forgets a record rendered in part.
    fn discard(&mut self) {
        self.buf.truncate(self.whole);
    }

    fn write_whole(&mut self) -> io::Result<()> {
        if self.whole == 0 {
            return Ok(());
        }
        self.fd.write_all(&self.buf[..self.whole])?;
        self.buf.drain(..self.whole);
        self.whole = 0;
        self.counts
            .written
            .fetch_add(std::mem::take(&mut self.records), Ordering::Relaxed);
        Ok(())
    }
}

impl Write for WholeLines {
    /// Renders into the buffer; only `commit` and `flush` write.
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    /// Writes the whole records gathered (never a record rendered in part).
    fn flush(&mut self) -> io::Result<()> {
        self.write_whole()
    }
}

fn write_all(
    mut rx: SinkRx,
    format: Format,
    style: TableStyle,
    out: &mut WholeLines,
    counts: &OutputCounts,
) {
    let mut renderer = Renderer::styled(format, style);
    let mut dec = RecordDecoder::default();
    // stdout closed (piped into `head`): keep reading so the hub counts nothing as lost.
    let mut open = renderer
        .header(out)
        .and_then(|()| out.commit(0))
        .and_then(|()| out.flush())
        .is_ok();
    let mut losing = false;
    loop {
        // Flushed when nothing more is there: once per burst, not per block.
        let next = match rx.try_next() {
            Next::Idle => {
                open = open && out.flush().is_ok();
                rx.next_blocking(None)
            }
            other => other,
        };
        match next {
            Next::Records(run) => {
                losing = false;
                if open {
                    open = run
                        .decode(&mut dec)
                        .try_for_each(|r| match r {
                            Ok((at, r)) => match renderer.record_at(out, at, &r) {
                                Ok(()) => out.commit(1),
                                Err(e) => {
                                    out.discard();
                                    Err(e)
                                }
                            },
                            Err(e) => {
                                warn!("stdout: skipping a record: {e}");
                                Ok(())
                            }
                        })
                        .is_ok();
                }
            }
            Next::Lost(gap) => {
                counts.lost.fetch_add(gap.count(), Ordering::Relaxed);
                if !losing {
                    warn!(
                        "stdout is not keeping up: records {}..={} ({}) left the buffer \
                         (--buffer-memory) before they were printed (counted in \
                         flowlens_sink_lost_records_total); gRPC subscribers are not affected",
                        gap.first_seq,
                        gap.last_seq,
                        gap.count()
                    );
                }
                losing = true;
            }
            Next::Idle => {}
            Next::End => break,
        }
    }
    if open {
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors of the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are new and owned by the Files from here on.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn writes_whole_lines_in_chunks_a_pipe_takes_at_once() {
        let (mut r, w) = pipe();
        let reader = std::thread::spawn(move || {
            let mut got = String::new();
            r.read_to_string(&mut got).expect("read");
            got
        });
        let counts = Arc::new(OutputCounts::default());
        let mut out = WholeLines::new(ManuallyDrop::new(w), PIPE_ATOMIC, counts.clone());
        let line = |i: usize| format!("{i:05} {}\n", "x".repeat(700 + i % 300));
        let long = format!("{}\n", "y".repeat(3 * PIPE_ATOMIC));
        let mut want = String::new();
        for i in 0..200 {
            let l = if i == 100 { long.clone() } else { line(i) };
            out.write_all(l.as_bytes()).expect("render");
            out.commit(1).expect("commit");
            want.push_str(&l);
            // What is left to write is less than a chunk: each write carried at most one.
            assert!(out.whole < out.chunk);
        }
        // Half a record rendered when the output fails: never written.
        out.write_all(b"half a li").expect("render");
        out.discard();
        out.flush().expect("flush");
        assert_eq!(counts.written.load(Ordering::Relaxed), 200);
        drop(ManuallyDrop::into_inner(out.fd));
        assert_eq!(reader.join().expect("reader"), want);
    }
}
