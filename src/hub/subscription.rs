//! A gRPC subscriber's reader: where it starts (replay, resume, a restart), what its filters pick from the log, and batches of records or exact losses in stream order.
//!
//! A subscriber without filters reads the log directly. One with filters has a task of its
//! own that runs its filters over the log as records arrive, ahead of what the client
//! reads, and notes each block's matches; the subscriber then sends those. When the log
//! lets a block go before the client read it, the matches noted for it are exactly what
//! the subscriber lost. Only filters too costly to keep up with the stream itself leave
//! records unseen; those are reported before filters (`FiltersBehind`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use tokio::sync::{watch, Notify};

use crate::hub::log::{Block, Cursor, Gap, Run, Shared, Slot, Step, Tail};
use crate::hub::{Hub, SinkKind, BATCH_MAX_RECORDS};
use crate::record::encoding::RecordDecoder;
use crate::record::filter::{Selector, SubscribeOptions};
use crate::record::flow::FlowRecord;

/// A whole block of at least this many records is sent as a batch of its own (its frame
/// made once for every subscriber); smaller pieces are gathered into one batch.
pub const SHARE_MIN: usize = 256;

/// Filter evaluations a subscriber's filter task does before it lets other tasks run (about
/// 100 us), so a subscriber with a huge filter list cannot hold up the others on its worker.
const FILTER_BUDGET: usize = 4_000;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// In emission order, at most [`BATCH_MAX_RECORDS`].
    Records(Records),
    Lost(Lost),
    /// The request named another run: sent first.
    Restarted(Restart),
}

/// Records a subscriber missed, where in the stream it missed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    pub count: u64,
    pub reason: LostReason,
    pub first_seq: u64,
    pub last_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// It fell behind: the log let them go before it read them (after its filters).
    Behind,
    /// The records after its `after_seq` had left the log before it subscribed.
    NotRetained,
    /// Its filters could not keep up: they left the log unseen (before filters).
    FiltersBehind,
}

/// The run a request named is not this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    pub requested_run: u64,
    pub run: u64,
    pub started: SystemTime,
    /// The oldest record of this run the log held: the stream resumes there.
    pub first_seq: u64,
}

/// Records of one block a batch holds.
#[derive(Debug, Clone)]
enum Part {
    Run(Run),
    /// A filter's matches: indices into the block, ascending.
    Picked(Arc<Block>, Vec<u16>),
}

/// A batch for one subscriber, in emission order, referring to the log's blocks.
#[derive(Debug, Clone, Default)]
pub struct Records {
    parts: Vec<Part>,
    len: usize,
}

impl Records {
    fn push(&mut self, part: Part) {
        self.len += match &part {
            Part::Run(r) => r.len(),
            Part::Picked(_, p) => p.len(),
        };
        self.parts.push(part);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block it is, when it is one whole block: its frames are shared.
    pub fn whole_block(&self) -> Option<&Arc<Block>> {
        match self.parts.as_slice() {
            [Part::Run(r)] if r.is_whole() => Some(r.block()),
            _ => None,
        }
    }

    /// Its `FlowBatch.records` entries, in order, as few slices as there are.
    pub fn entries(&self) -> Vec<&[u8]> {
        let mut out = Vec::new();
        for p in &self.parts {
            match p {
                Part::Run(r) => out.push(r.entries()),
                Part::Picked(b, picks) => out.extend(picks.iter().map(|&i| {
                    let i = usize::from(i);
                    b.batch().entries(i, i + 1)
                })),
            }
        }
        out
    }

    /// Each record's seq and `FlowRecord` bytes.
    pub fn encoded(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.parts
            .iter()
            .flat_map(|p| -> Box<dyn Iterator<Item = (u64, &[u8])> + '_> {
                match p {
                    Part::Run(r) => Box::new(r.encoded()),
                    Part::Picked(b, picks) => Box::new(picks.iter().map(move |&i| {
                        let i = usize::from(i);
                        (b.first_seq() + i as u64, b.batch().record(i))
                    })),
                }
            })
    }
}

/// A filter task's notes on one block: which records its filters matched.
#[derive(Debug)]
struct Picks {
    block: Weak<Block>,
    first_seq: u64,
    end_seq: u64,
    picks: Vec<u16>,
}

#[derive(Debug)]
enum Noted {
    Picks(Picks),
    Lost(Lost),
}

impl Noted {
    fn first_seq(&self) -> u64 {
        match self {
            Noted::Picks(p) => p.first_seq,
            Noted::Lost(l) => l.first_seq,
        }
    }
}

#[derive(Debug, Default)]
struct NotesState {
    items: VecDeque<Noted>,
    /// Where the filter task is: everything before it is noted.
    filtered_to: u64,
    /// The filter task finished (the stream's end) or stopped.
    done: bool,
    /// The subscription is gone: the filter task stops.
    dropped: bool,
}

/// What a filter task hands its subscriber.
#[derive(Debug, Default)]
struct Notes {
    state: Mutex<NotesState>,
    /// The task noted something, or finished.
    noted: Notify,
    /// The subscription went away.
    stop: Notify,
}

impl Notes {
    fn lock(&self) -> MutexGuard<'_, NotesState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the log is read from for this subscriber.
enum Source {
    Direct(Cursor),
    Filtered(Arc<Notes>),
}

/// One subscriber's view of the hub; dropping it unsubscribes.
pub struct Subscription {
    log: Arc<Shared>,
    slot: Arc<Slot>,
    notices: VecDeque<Event>,
    source: Source,
    tail: watch::Receiver<Tail>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.slot.id)
            .finish()
    }
}

impl Subscription {
    /// Registers a subscriber; with filters (or `since`) it starts its filter task on the
    /// current tokio runtime, so this must then be called within one. Where it starts is
    /// taken atomically with registration: replayed and live records neither overlap nor
    /// leave a gap.
    pub(crate) fn new(hub: &Hub, opts: SubscribeOptions) -> Subscription {
        let log = hub.inner.clone();
        let filtered = !opts.selector.is_empty() || opts.since.is_some();
        let restarted_from = opts.run.filter(|r| *r != log.run);
        let mut notices = VecDeque::new();
        let mut start = Start::default();
        let (slot, front, tail, closed) = log.register(
            SinkKind::Subscriber,
            &opts.peer,
            !filtered,
            |front, tail, _| {
                start = Start::of(&opts, restarted_from.is_some(), filtered, front, tail);
                start.seq
            },
        );
        if let Some(requested_run) = restarted_from {
            notices.push_back(Event::Restarted(Restart {
                requested_run,
                run: log.run,
                started: log.started,
                first_seq: front,
            }));
        }
        if let Some(gap) = start.not_retained {
            notices.push_back(Event::Lost(Lost {
                count: gap.count(),
                reason: LostReason::NotRetained,
                first_seq: gap.first_seq,
                last_seq: gap.last_seq,
            }));
        }
        let end = (!opts.follow || closed).then_some(tail);
        let cursor = Cursor {
            next: start.seq,
            end,
        };
        let source = if filtered {
            let notes = Arc::new(Notes::default());
            notes.lock().filtered_to = start.seq;
            let task = FilterTask {
                log: log.clone(),
                slot: slot.clone(),
                notes: notes.clone(),
                cursor,
                selector: opts.selector,
                replay: Replay {
                    end: tail,
                    from: start.seq,
                    last: if restarted_from.is_some() {
                        0
                    } else {
                        opts.replay
                    },
                    since: opts.since,
                },
                tail: log.watch_tail(),
                dec: RecordDecoder::default(),
                spent: 0,
            };
            tokio::spawn(task.run());
            Source::Filtered(notes)
        } else {
            Source::Direct(cursor)
        };
        Subscription {
            tail: log.watch_tail(),
            log,
            slot,
            notices,
            source,
        }
    }

    pub fn id(&self) -> u64 {
        self.slot.id
    }

    /// The next batch or notice; None at the end of the stream (the replay is over without
    /// follow, or the hub closed and everything was sent). Cancel-safe.
    pub async fn next_event(&mut self) -> Option<Event> {
        if let Some(ev) = self.notices.pop_front() {
            return Some(ev);
        }
        let ev = match &mut self.source {
            Source::Direct(_) => self.next_direct().await,
            Source::Filtered(notes) => {
                let notes = notes.clone();
                self.next_filtered(&notes).await
            }
        }?;
        match &ev {
            Event::Records(r) => {
                self.slot
                    .delivered
                    .fetch_add(r.len() as u64, Ordering::Relaxed);
            }
            Event::Lost(l) => {
                self.slot.lost.fetch_add(l.count, Ordering::Relaxed);
                self.log.lost_total.fetch_add(l.count, Ordering::Relaxed);
            }
            Event::Restarted(_) => {}
        }
        Some(ev)
    }

    async fn next_direct(&mut self) -> Option<Event> {
        let Source::Direct(cursor) = &mut self.source else {
            unreachable!("a direct subscription")
        };
        loop {
            match cursor.step(&self.log, BATCH_MAX_RECORDS, None) {
                Step::Run(run) => {
                    let alone = run.is_whole() && run.len() >= SHARE_MIN;
                    let mut recs = Records::default();
                    recs.push(Part::Run(run));
                    // Smaller pieces already there go with it, up to a batch.
                    while !alone && recs.len() < BATCH_MAX_RECORDS {
                        let room = BATCH_MAX_RECORDS - recs.len();
                        match cursor.step(&self.log, room, Some(SHARE_MIN)) {
                            Step::Run(more) => recs.push(Part::Run(more)),
                            _ => break,
                        }
                    }
                    self.log.moved(&self.slot, cursor.next);
                    return Some(Event::Records(recs));
                }
                Step::Gap(gap) => {
                    self.log.moved(&self.slot, cursor.next);
                    return Some(Event::Lost(Lost {
                        count: gap.count(),
                        reason: LostReason::Behind,
                        first_seq: gap.first_seq,
                        last_seq: gap.last_seq,
                    }));
                }
                Step::Wait => {
                    let next = cursor.next;
                    if self
                        .tail
                        .wait_for(|t| t.next_seq > next || t.closed)
                        .await
                        .is_err()
                    {
                        return None;
                    }
                }
                Step::End => return None,
            }
        }
    }

    async fn next_filtered(&mut self, notes: &Notes) -> Option<Event> {
        loop {
            let noted = notes.noted.notified();
            tokio::pin!(noted);
            noted.as_mut().enable();
            {
                let mut st = notes.lock();
                let ev = take_noted(&mut st);
                let next = st.items.front().map_or(st.filtered_to, Noted::first_seq);
                let done = st.done && st.items.is_empty();
                drop(st);
                self.log.moved(&self.slot, next);
                if ev.is_some() {
                    return ev;
                }
                if done {
                    return None;
                }
            }
            noted.await;
        }
    }
}

/// The next event from a filter task's notes: a loss, or the matches of as many blocks as
/// fit a batch (a block its matches cover whole, of `SHARE_MIN` records or more, alone).
fn take_noted(st: &mut NotesState) -> Option<Event> {
    let mut recs = Records::default();
    while let Some(front) = st.items.front_mut() {
        match front {
            Noted::Lost(_) => {
                if !recs.is_empty() {
                    break;
                }
                let Some(Noted::Lost(l)) = st.items.pop_front() else {
                    unreachable!()
                };
                return Some(Event::Lost(l));
            }
            Noted::Picks(p) => {
                let Some(block) = p.block.upgrade() else {
                    if !recs.is_empty() {
                        break;
                    }
                    return Some(Event::Lost(lose_gone(&mut st.items)));
                };
                let whole = p.picks.len() == block.len();
                let alone = whole && block.len() >= SHARE_MIN;
                if !recs.is_empty() && (alone || recs.len() + p.picks.len() > BATCH_MAX_RECORDS) {
                    break;
                }
                let Some(Noted::Picks(p)) = st.items.pop_front() else {
                    unreachable!()
                };
                if whole {
                    let len = block.len();
                    recs.push(Part::Run(Run::head(block, len)));
                } else {
                    recs.push(Part::Picked(block, p.picks));
                }
                if alone {
                    break;
                }
            }
        }
    }
    (!recs.is_empty()).then_some(Event::Records(recs))
}

/// The matches noted for the blocks at the front whose blocks the log let go, as one loss.
fn lose_gone(items: &mut VecDeque<Noted>) -> Lost {
    let mut lost: Option<Lost> = None;
    while let Some(Noted::Picks(p)) = items.front() {
        if p.block.strong_count() > 0 {
            break;
        }
        let Some(Noted::Picks(p)) = items.pop_front() else {
            unreachable!()
        };
        let l = lost.get_or_insert(Lost {
            count: 0,
            reason: LostReason::Behind,
            first_seq: p.first_seq,
            last_seq: p.end_seq - 1,
        });
        l.count += p.picks.len() as u64;
        l.last_seq = p.end_seq - 1;
    }
    lost.expect("a gone block at the front")
}

/// Turns the notes of the oldest blocks the log let go (unread, past any losses already
/// noted) into one loss.
fn compact(items: &mut VecDeque<Noted>) {
    let Some(i) = items.iter().position(|n| matches!(n, Noted::Picks(_))) else {
        return;
    };
    if !matches!(&items[i], Noted::Picks(p) if p.block.strong_count() == 0) {
        return;
    }
    let mut rest = items.split_off(i);
    let lost = lose_gone(&mut rest);
    push_lost(items, lost);
    items.append(&mut rest);
}

/// Adds a loss after the notes, merged with a loss of the same reason just before it (the
/// records between them were not wanted anyway).
fn push_lost(items: &mut VecDeque<Noted>, lost: Lost) {
    match items.back_mut() {
        Some(Noted::Lost(prev)) if prev.reason == lost.reason => {
            prev.count += lost.count;
            prev.last_seq = lost.last_seq;
        }
        _ => items.push_back(Noted::Lost(lost)),
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Source::Filtered(notes) = &self.source {
            notes.lock().dropped = true;
            notes.stop.notify_one();
        }
        let unreported = self.log.unregister(&self.slot);
        self.log.lost_total.fetch_add(unreported, Ordering::Relaxed);
    }
}

/// Where a subscriber begins.
#[derive(Debug, Default)]
struct Start {
    seq: u64,
    not_retained: Option<Gap>,
}

impl Start {
    fn of(
        opts: &SubscribeOptions,
        restarted: bool,
        filtered: bool,
        front: u64,
        tail: u64,
    ) -> Start {
        if restarted {
            // Everything this run still holds: none of it was seen.
            return Start {
                seq: front,
                not_retained: None,
            };
        }
        if !opts.wants_replay() {
            return Start {
                seq: tail,
                not_retained: None,
            };
        }
        let mut seq = front;
        let mut not_retained = None;
        if let Some(after) = opts.after_seq {
            let want = after.saturating_add(1);
            if want < front {
                not_retained = Some(Gap {
                    first_seq: want,
                    last_seq: front - 1,
                });
            }
            seq = want.clamp(front, tail);
        }
        if opts.replay > 0 && !filtered {
            seq = seq.max(tail.saturating_sub(opts.replay as u64));
        }
        Start { seq, not_retained }
    }
}

/// The part of a filtered subscriber's stream that is replay: records before `end` (the
/// tail when it subscribed) must also be after the last `last` matching ones and emitted
/// at or after `since`.
#[derive(Debug)]
struct Replay {
    end: u64,
    /// Where the replay starts: raised to the first of the last `last` matches.
    from: u64,
    /// 0: no count limit.
    last: usize,
    since: Option<SystemTime>,
}

/// A filtered subscriber's task: notes which records of each block its filters match.
struct FilterTask {
    log: Arc<Shared>,
    slot: Arc<Slot>,
    notes: Arc<Notes>,
    cursor: Cursor,
    selector: Selector,
    replay: Replay,
    tail: watch::Receiver<Tail>,
    dec: RecordDecoder,
    /// Filter evaluations since the task last yielded.
    spent: usize,
}

impl FilterTask {
    async fn run(mut self) {
        if self.replay.last > 0 && self.replay.from < self.replay.end {
            self.replay.from = self.last_matches_start().await;
        }
        loop {
            if self.notes.lock().dropped {
                return;
            }
            match self.cursor.step(&self.log, BATCH_MAX_RECORDS, None) {
                Step::Run(run) => {
                    let picks = self.pick(&run).await;
                    self.note(run.end_seq(), |items| {
                        if !picks.is_empty() {
                            items.push_back(Noted::Picks(Picks {
                                block: Arc::downgrade(run.block()),
                                first_seq: run.first_seq(),
                                end_seq: run.end_seq(),
                                picks,
                            }));
                        }
                    });
                }
                Step::Gap(gap) => self.note(self.cursor.next, |items| {
                    push_lost(
                        items,
                        Lost {
                            count: gap.count(),
                            reason: LostReason::FiltersBehind,
                            first_seq: gap.first_seq,
                            last_seq: gap.last_seq,
                        },
                    )
                }),
                Step::Wait => {
                    let next = self.cursor.next;
                    let stop = self.notes.stop.notified();
                    tokio::select! {
                        changed = self.tail.wait_for(|t| t.next_seq > next || t.closed) => {
                            if changed.is_err() {
                                break;
                            }
                        }
                        _ = stop => {}
                    }
                }
                Step::End => break,
            }
        }
        self.notes.lock().done = true;
        self.notes.noted.notify_one();
    }

    /// Adds to the notes and moves the task's place to `to`. Blocks the log let go before
    /// the subscriber read them turn into one loss, so the notes of a client that stopped
    /// reading stay as few as the log's blocks.
    fn note(&self, to: u64, add: impl FnOnce(&mut VecDeque<Noted>)) {
        let mut st = self.notes.lock();
        compact(&mut st.items);
        add(&mut st.items);
        st.filtered_to = to;
        let next = st.items.front().map_or(to, Noted::first_seq);
        drop(st);
        self.log.moved(&self.slot, next);
        self.notes.noted.notify_one();
    }

    /// The records of `run` the subscriber wants.
    async fn pick(&mut self, run: &Run) -> Vec<u16> {
        let mut picks = Vec::new();
        let (start, _) = run.range();
        for (k, (seq, bytes)) in run.encoded().enumerate() {
            let Ok((_, r)) = self.dec.decode(bytes) else {
                continue;
            };
            if self.wanted(seq, &r).await {
                picks.push((start + k) as u16);
            }
        }
        picks
    }

    async fn wanted(&mut self, seq: u64, r: &FlowRecord) -> bool {
        if seq < self.replay.end
            && (seq < self.replay.from || self.replay.since.is_some_and(|t| r.emitted < t))
        {
            return false;
        }
        self.matches(r).await
    }

    async fn matches(&mut self, r: &FlowRecord) -> bool {
        if self.selector.len() <= FILTER_BUDGET {
            self.spend(self.selector.len().max(1)).await;
            return self.selector.matches(r);
        }
        // More filters than one go may evaluate: in slices, letting others run between.
        let mut included = self.selector.include.is_empty();
        for i in (0..self.selector.include.len()).step_by(FILTER_BUDGET) {
            let end = (i + FILTER_BUDGET).min(self.selector.include.len());
            if self.selector.include[i..end].iter().any(|f| f.matches(r)) {
                included = true;
                break;
            }
            self.spend(end - i).await;
        }
        if !included {
            return false;
        }
        for i in (0..self.selector.exclude.len()).step_by(FILTER_BUDGET) {
            let end = (i + FILTER_BUDGET).min(self.selector.exclude.len());
            if self.selector.exclude[i..end].iter().any(|f| f.matches(r)) {
                return false;
            }
            self.spend(end - i).await;
        }
        true
    }

    /// Counts `n` filter evaluations, yielding once the budget is spent.
    async fn spend(&mut self, n: usize) {
        self.spent += n;
        if self.spent >= FILTER_BUDGET {
            self.spent = 0;
            tokio::task::yield_now().await;
        }
    }

    /// The seq of the first of the last `replay.last` records before `replay.end` the
    /// replay would send, looking back from the end; where the replay starts when there are
    /// fewer.
    async fn last_matches_start(&mut self) -> u64 {
        let (mut at, mut found) = (self.replay.end, 0);
        let since = self.replay.since;
        while at > self.replay.from {
            let Some(block) = self.log.block_before(at) else {
                break;
            };
            let stop = (at - block.first_seq()) as usize;
            let run = Run::head(block, stop);
            let recs: Vec<(u64, FlowRecord)> = run
                .encoded()
                .filter_map(|(seq, b)| Some((seq, self.dec.decode(b).ok()?.1)))
                .collect();
            for (seq, r) in recs.iter().rev() {
                if *seq < self.replay.from {
                    break;
                }
                if since.is_none_or(|t| r.emitted >= t) && self.matches(r).await {
                    found += 1;
                    if found == self.replay.last {
                        return *seq;
                    }
                }
            }
            at = run.first_seq();
        }
        self.replay.from
    }
}
