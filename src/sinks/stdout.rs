//! The agent's stdout as a hub sink: records are rendered on a thread of their own from the hub's log, so a slow terminal or pipe reads at its own pace (and a blocked one loses records, counted, once it is the log's bound behind) instead of holding up the poller or any subscriber.

use std::io::{self, BufWriter, Write};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::warn;

use crate::hub::{Next, SinkRx};
use crate::record::encoding::RecordDecoder;
use crate::record::render::{Format, Renderer, TableStyle};

/// The running stdout sink.
#[derive(Debug)]
pub struct OutputHandle {
    thread: Option<JoinHandle<()>>,
    done: Receiver<()>,
}

impl OutputHandle {
    /// Waits up to `grace` for every queued record to be written (the hub must be closed
    /// first). A writer stuck on a blocked stdout is left behind rather than holding up
    /// the agent's exit; returns whether it finished.
    pub fn finish(mut self, grace: Duration) -> bool {
        match self.done.recv_timeout(grace) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
                true
            }
            Err(RecvTimeoutError::Timeout) => {
                warn!("stdout did not take the last records within {grace:?}; not waiting for it");
                false
            }
        }
    }
}

/// Starts writing the records `rx` receives to stdout in `format`.
pub fn spawn(rx: SinkRx, format: Format, style: TableStyle) -> io::Result<OutputHandle> {
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name("flowlens-output".into())
        .spawn(move || {
            write_all(rx, format, style, &mut BufWriter::new(io::stdout()));
            let _ = done_tx.send(());
        })?;
    Ok(OutputHandle {
        thread: Some(thread),
        done,
    })
}

fn write_all(mut rx: SinkRx, format: Format, style: TableStyle, out: &mut impl Write) {
    let mut renderer = Renderer::styled(format, style);
    let mut dec = RecordDecoder::default();
    // stdout closed (piped into `head`): keep reading so the hub counts nothing as lost.
    let mut open = renderer.header(out).and_then(|()| out.flush()).is_ok();
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
                            Ok((at, r)) => renderer.record_at(out, at, &r),
                            Err(e) => {
                                warn!("stdout: skipping a record: {e}");
                                Ok(())
                            }
                        })
                        .is_ok();
                }
            }
            Next::Lost(gap) => {
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
    let _ = out.flush();
}
