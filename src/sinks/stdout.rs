//! The agent's stdout as a hub sink: records are rendered on a thread of their own, so a slow or blocked terminal or pipe loses records (counted) instead of holding up the poller or any subscriber.

use std::io::{self, BufWriter, Write};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::warn;

use crate::hub::SinkRx;
use crate::record::render::{Format, Renderer, TableStyle};

/// Records rendered per write batch; a flush follows each batch.
const BATCH: usize = 1024;

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
    // stdout closed (piped into `head`): keep draining so the hub counts nothing as lost.
    let mut open = renderer.header(out).and_then(|()| out.flush()).is_ok();
    let mut buf = Vec::with_capacity(BATCH);
    let mut losing = false;
    while rx.blocking_recv_many(&mut buf, BATCH).is_some() {
        if open {
            open = buf
                .iter()
                .try_for_each(|r| renderer.record(out, r.record()))
                .and_then(|()| out.flush())
                .is_ok();
        }
        buf.clear();
        let lost = rx.take_lost();
        if lost > 0 && !losing {
            warn!(
                "stdout is not keeping up: {lost} records not printed (counted in flowlens_sink_lost_records_total); gRPC subscribers are not affected"
            );
        }
        losing = lost > 0;
    }
}
