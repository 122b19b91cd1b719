//! A local sink's reader (stdout, an exporter): the log's records in emission order, a block at a time, and exact gaps when it fell behind.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hub::log::{Cursor, Gap, Run, Shared, Slot, Step, Tail};
use crate::hub::{Hub, SinkKind, BATCH_MAX_RECORDS};

/// What a local sink gets next.
#[derive(Debug)]
pub enum Next {
    /// Records in emission order (at most a block).
    Records(Run),
    /// These records left the log before the sink read them.
    Lost(Gap),
    /// Nothing within the wait.
    Idle,
    /// The hub closed and the sink read everything.
    End,
}

/// A local sink's end of the hub; dropping it unregisters.
pub struct SinkRx {
    log: Arc<Shared>,
    slot: Arc<Slot>,
    cursor: Cursor,
    tail: watch::Receiver<Tail>,
}

impl std::fmt::Debug for SinkRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkRx")
            .field("name", &self.slot.name)
            .field("next", &self.cursor.next)
            .finish()
    }
}

impl SinkRx {
    pub(crate) fn new(hub: &Hub, kind: SinkKind, name: &str) -> SinkRx {
        let log = hub.inner.clone();
        // From the tail on: what it will read is what is published from now.
        let (slot, _, tail, _) = log.register(kind, name, true, |_, tail, _| tail);
        SinkRx {
            tail: log.watch_tail(),
            log,
            slot,
            cursor: Cursor {
                next: tail,
                end: None,
            },
        }
    }

    /// What is there now, without waiting (`Idle` when nothing is).
    pub fn try_next(&mut self) -> Next {
        match self.cursor.step(&self.log, BATCH_MAX_RECORDS, None) {
            Step::Run(run) => {
                self.took(&run);
                Next::Records(run)
            }
            Step::Gap(gap) => {
                self.lost(gap);
                Next::Lost(gap)
            }
            Step::Wait => Next::Idle,
            Step::End => Next::End,
        }
    }

    /// Waits up to `wait` (None: for as long as it takes) for records. For sinks on std
    /// threads.
    pub fn next_blocking(&mut self, wait: Option<Duration>) -> Next {
        match self.try_next() {
            Next::Idle => {
                if self.log.wait_blocking(self.cursor.next, wait) {
                    self.try_next()
                } else {
                    Next::Idle
                }
            }
            other => other,
        }
    }

    /// Waits for records; never `Idle`.
    pub async fn next(&mut self) -> Next {
        loop {
            match self.try_next() {
                Next::Idle => {
                    let next = self.cursor.next;
                    if self
                        .tail
                        .wait_for(|t| t.next_seq > next || t.closed)
                        .await
                        .is_err()
                    {
                        return Next::End;
                    }
                }
                other => return other,
            }
        }
    }

    fn took(&self, run: &Run) {
        self.slot
            .delivered
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        self.log.moved(&self.slot, self.cursor.next);
    }

    fn lost(&self, gap: Gap) {
        self.slot.lost.fetch_add(gap.count(), Ordering::Relaxed);
    }
}

impl Drop for SinkRx {
    fn drop(&mut self) {
        let unreported = self.log.unregister(&self.slot);
        self.slot.lost.fetch_add(unreported, Ordering::Relaxed);
    }
}
