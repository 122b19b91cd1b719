use super::*;
use crate::record::encoding::RecordDecoder;
use crate::record::filter::{Filter, Selector};
use crate::record::flow::IPPROTO_TCP;

/// `n` UDP records, every tenth TCP; the client port tells them apart.
fn batch(n: usize) -> Vec<FlowRecord> {
    (0..n)
        .map(|i| {
            let mut r = FlowRecord::example();
            r.client_port = i as u16;
            if i % 10 == 0 {
                r.protocol = IPPROTO_TCP;
            }
            r
        })
        .collect()
}

fn small(ring: usize) -> HubConfig {
    HubConfig {
        buffer_memory: MIN_BUFFER_MEMORY,
        ring_capacity: ring,
    }
}

fn tcp_only() -> Selector {
    Selector {
        include: vec![Filter {
            protocol: Some(IPPROTO_TCP),
            ..Filter::default()
        }],
        exclude: Vec::new(),
    }
}

/// Everything a local sink reads now: (seq, client port) of each record, and losses.
fn read_sink(rx: &mut SinkRx) -> (Vec<(u64, u16)>, Vec<Gap>) {
    let (mut recs, mut gaps) = (Vec::new(), Vec::new());
    let mut dec = RecordDecoder::default();
    loop {
        match rx.try_next() {
            Next::Records(run) => recs.extend(
                run.decode(&mut dec)
                    .map(|r| r.unwrap())
                    .map(|(at, r)| (at.seq, r.client_port)),
            ),
            Next::Lost(g) => gaps.push(g),
            Next::Idle | Next::End => return (recs, gaps),
        }
    }
}

/// Every event until the stream ends: records as seqs (and batch sizes), and losses.
async fn drain(sub: &mut Subscription) -> (Vec<u64>, Vec<usize>, Vec<Lost>) {
    let (mut seqs, mut batches, mut lost) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(ev) = sub.next_event().await {
        match ev {
            Event::Records(r) => {
                batches.push(r.len());
                seqs.extend(r.encoded().map(|(s, _)| s));
            }
            Event::Lost(l) => lost.push(l),
            Event::Restarted(r) => panic!("unexpected {r:?}"),
        }
    }
    (seqs, batches, lost)
}

#[test]
fn batches_are_numbered_into_blocks_of_up_to_a_thousand() {
    let hub = Hub::with_run(HubConfig::default(), 77);
    let mut rx = hub.add_sink(SinkKind::Output, "test");
    hub.publish_batches([batch(1024), batch(16), batch(1500)]);
    let mut sizes = Vec::new();
    let mut next = 1;
    let mut dec = RecordDecoder::default();
    while let Next::Records(run) = rx.try_next() {
        assert!(run.is_whole());
        sizes.push(run.len());
        for r in run.decode(&mut dec) {
            let (at, _) = r.unwrap();
            assert_eq!(at, Stamp { run: 77, seq: next });
            next += 1;
        }
    }
    assert_eq!(sizes, [1000, 1000, 540]);
    let stats = hub.stats();
    assert_eq!(
        (stats.published, stats.ring_len, stats.oldest_seq),
        (2540, 2540, 1)
    );
    assert_eq!(stats.sinks[0].queued, 0);
    assert_eq!(stats.sinks[0].delivered, 2540);
}

#[test]
fn a_burst_far_beyond_the_old_queues_reaches_a_reader_that_catches_up() {
    let hub = Hub::new(HubConfig::default());
    let mut rx = hub.add_sink(SinkKind::Output, "stdout");
    // 200,000 records while the reader reads nothing: the old sink queue held 65,536.
    for _ in 0..200 {
        hub.publish_batches([batch(1000)]);
    }
    let (recs, gaps) = read_sink(&mut rx);
    assert!(gaps.is_empty(), "{gaps:?}");
    assert_eq!(recs.len(), 200_000);
    assert!(recs.iter().enumerate().all(|(i, r)| r.0 == i as u64 + 1));
    // Once read, the log keeps the replay ring's worth, in whole blocks.
    let st = hub.stats();
    assert_eq!(st.ring_len, 10_000, "{st:?}");
    assert_eq!(st.oldest_seq, 190_001);
    assert!(st.buffer_bytes < 10_000 * 400, "{st:?}");
}

#[test]
fn a_reader_that_falls_a_whole_buffer_behind_is_told_exactly_what_it_lost() {
    let hub = Hub::new(small(0));
    let mut rx = hub.add_sink(SinkKind::Export, "collector");
    for _ in 0..50 {
        hub.publish_batches([batch(100)]);
    }
    let st = hub.stats();
    assert!(
        st.buffer_bytes <= MIN_BUFFER_MEMORY,
        "the bound holds: {} bytes",
        st.buffer_bytes
    );
    let held = st.ring_len as u64;
    assert!((100..5000).contains(&held), "{st:?}");
    // Its loss shows before it reads again (a reader stuck on a blocked output).
    assert_eq!(st.sinks[0].lost, 5000 - held);
    let (recs, gaps) = read_sink(&mut rx);
    assert_eq!(
        gaps,
        [Gap {
            first_seq: 1,
            last_seq: 5000 - held
        }]
    );
    assert_eq!(recs.len() as u64, held);
    assert_eq!(recs[0].0, 5000 - held + 1);
    assert_eq!(hub.stats().sinks[0].lost, 5000 - held);
}

#[test]
fn the_log_keeps_what_a_reader_has_not_read_and_the_ring_beyond() {
    let hub = Hub::new(HubConfig {
        ring_capacity: 150,
        ..HubConfig::default()
    });
    let mut slow = hub.add_sink(SinkKind::Output, "slow");
    for _ in 0..10 {
        hub.publish_batches([batch(100)]);
    }
    assert_eq!(hub.stats().ring_len, 1000, "all unread");
    assert_eq!(read_sink(&mut slow).0.len(), 1000);
    // Read: the newest 150 records stay, in whole blocks of 100.
    assert_eq!(hub.stats().ring_len, 200);
    drop(slow);
    hub.publish_batches([batch(100)]);
    assert_eq!(hub.stats().ring_len, 200);
    assert_eq!(hub.stats().oldest_seq, 901);
}

#[tokio::test]
async fn subscribers_get_whole_blocks_alone_and_small_pieces_together() {
    let hub = Hub::new(HubConfig::default());
    let mut sub = hub.subscribe(SubscribeOptions::default());
    hub.publish_batches([batch(2500)]);
    for _ in 0..300 {
        hub.publish(FlowRecord::example());
    }
    hub.publish_batches([batch(300)]);
    hub.close();
    let (seqs, batches, lost) = drain(&mut sub).await;
    assert!(lost.is_empty());
    assert_eq!(seqs, (1..=3100).collect::<Vec<_>>());
    // 1000 and 1000 alone (shared frames), 500 (a whole block, alone too), the 300 lone
    // records together, then the block of 300 alone.
    assert_eq!(batches, [1000, 1000, 500, 300, 300]);
}

#[tokio::test]
async fn a_stalled_subscriber_with_filters_loses_exactly_its_matches() {
    let hub = Hub::new(small(0));
    let mut tcp = hub.subscribe(SubscribeOptions {
        selector: tcp_only(),
        ..SubscribeOptions::default()
    });
    let mut all = hub.subscribe(SubscribeOptions::default());
    // Neither reads while 5,000 records go by: the buffer keeps a few blocks of 100.
    for _ in 0..50 {
        hub.publish_batches([batch(100)]);
        // The filter task notes matches as records come, as it would on a live agent.
        tokio::task::yield_now().await;
    }
    let held = hub.stats().ring_len as u64;
    hub.close();
    let (seqs, _, lost) = drain(&mut tcp).await;
    // Every tenth record is TCP: of those that left the buffer unread, a tenth are lost.
    assert_eq!(
        lost,
        [Lost {
            count: (5000 - held) / 10,
            reason: LostReason::Behind,
            first_seq: 1,
            last_seq: 5000 - held,
        }]
    );
    assert_eq!(seqs.len() as u64, held / 10);
    assert!(seqs.iter().all(|s| (s - 1) % 10 == 0), "{seqs:?}");
    let (seqs, _, lost) = drain(&mut all).await;
    assert_eq!(lost.iter().map(|l| l.count).sum::<u64>(), 5000 - held);
    assert_eq!(seqs.len() as u64, held);
    assert_eq!(hub.stats().lost_total, (5000 - held) / 10 + 5000 - held);
}

#[tokio::test]
async fn resuming_after_a_seq_the_log_no_longer_holds_names_the_gap() {
    let hub = Hub::with_run(small(100), 5);
    for _ in 0..50 {
        hub.publish_batches([batch(100)]);
    }
    let oldest = hub.stats().oldest_seq;
    assert!(oldest > 11);
    let mut sub = hub.subscribe(SubscribeOptions {
        after_seq: Some(10),
        run: Some(5),
        follow: false,
        ..SubscribeOptions::default()
    });
    let Some(Event::Lost(l)) = sub.next_event().await else {
        panic!("a loss first")
    };
    assert_eq!(
        l,
        Lost {
            count: oldest - 11,
            reason: LostReason::NotRetained,
            first_seq: 11,
            last_seq: oldest - 1
        }
    );
    let (seqs, _, lost) = drain(&mut sub).await;
    assert!(lost.is_empty());
    assert_eq!(seqs, (oldest..=5000).collect::<Vec<_>>());

    // Within what the log holds: exactly the records after it, on the same run.
    let mut sub = hub.subscribe(SubscribeOptions {
        after_seq: Some(4990),
        run: Some(5),
        follow: false,
        ..SubscribeOptions::default()
    });
    assert_eq!(drain(&mut sub).await.0, (4991..=5000).collect::<Vec<_>>());
}

#[tokio::test]
async fn another_runs_seq_gets_a_restart_notice_and_the_whole_log() {
    let hub = Hub::with_run(HubConfig::default(), 2);
    hub.publish_batches([batch(30)]);
    let mut sub = hub.subscribe(SubscribeOptions {
        after_seq: Some(500),
        run: Some(1),
        ..SubscribeOptions::default()
    });
    let Some(Event::Restarted(r)) = sub.next_event().await else {
        panic!("a restart notice first")
    };
    assert_eq!((r.requested_run, r.run, r.first_seq), (1, 2, 1));
    hub.publish_batches([batch(5)]);
    hub.close();
    assert_eq!(drain(&mut sub).await.0, (1..=35).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_filtered_replay_takes_the_last_matches() {
    let hub = Hub::new(HubConfig::default());
    hub.publish_batches([batch(100), batch(100)]);
    let mut sub = hub.subscribe(SubscribeOptions {
        selector: tcp_only(),
        replay: 3,
        follow: false,
        ..SubscribeOptions::default()
    });
    assert_eq!(drain(&mut sub).await.0, [171, 181, 191]);
}

#[test]
fn derived_forms_count_against_the_bound_while_the_block_is_held() {
    let hub = Hub::new(HubConfig::default());
    let mut rx = hub.add_sink(SinkKind::Output, "test");
    hub.publish_batches([batch(100)]);
    let before = hub.stats().buffer_bytes;
    let Next::Records(run) = rx.try_next() else {
        panic!("a block")
    };
    let made = run
        .block()
        .derived(0, |_| bytes::Bytes::from(vec![0u8; 1234]));
    assert_eq!(made.len(), 1234);
    // Made once: a second ask shares it.
    let again = run.block().derived(0, |_| unreachable!("made twice"));
    assert_eq!(again.as_ptr(), made.as_ptr());
    assert_eq!(hub.stats().buffer_bytes, before + 1234);
}
