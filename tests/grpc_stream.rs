//! gRPC streaming: replay then follow, batch bounds, a stalled subscriber's losses, stream ends on poller exit and shutdown, resuming after a seq.

mod common;

use common::grpc::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_follow() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 20,
        ..HubConfig::default()
    });
    for i in 1..=30 {
        agent.hub.publish(rec(i));
    }

    // The ring keeps the newest 20.
    let all = ids_for(&agent, vec![], vec![]).await;
    assert_eq!(all, (11..=30).collect::<Vec<_>>());

    // Last N, then live records with neither gap nor overlap.
    let mut s = agent
        .subscribe(proto::SubscribeRequest {
            replay: 5,
            ..Default::default()
        })
        .await;
    for i in 31..=35 {
        agent.hub.publish(rec(i));
    }
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.ids.len() >= 10).await;
    assert_eq!(got.ids, (26..=35).collect::<Vec<_>>());

    // No replay unless asked.
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    agent.hub.publish(rec(36));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| !r.ids.is_empty()).await;
    assert_eq!(got.ids, vec![36]);

    // Replay counts only matching records.
    let even: Vec<u32> = {
        let agent2 = Agent::start();
        for i in 1..=10 {
            let mut r = rec(i);
            r.interface = if i % 2 == 0 { "even" } else { "odd" }.into();
            agent2.hub.publish(r);
        }
        let req = proto::SubscribeRequest {
            include: vec![proto::Filter {
                interface: Some("even".into()),
                ..Default::default()
            }],
            replay: 3,
            follow: Some(false),
            ..Default::default()
        };
        drain(agent2.subscribe(req).await).await.ids
    };
    assert_eq!(even, vec![6, 8, 10]);

    // `since` selects by emission time (rec(i) was emitted at t(i + 2), its last packet
    // was at t(i + 1)), alone or with a count.
    let since = |replay| proto::SubscribeRequest {
        since: Some(t(33).into()),
        replay,
        follow: Some(false),
        ..Default::default()
    };
    assert_eq!(
        drain(agent.subscribe(since(0)).await).await.ids,
        vec![31, 32, 33, 34, 35, 36]
    );
    assert_eq!(
        drain(agent.subscribe(since(2)).await).await.ids,
        vec![35, 36]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded() {
    let agent = Agent::start();
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    for i in 1..=2500 {
        agent.hub.publish(rec(i));
    }
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.ids.len() >= 2500).await;
    assert_eq!(got.ids, (1..=2500).collect::<Vec<_>>());
    assert!(
        got.batches.iter().all(|&n| (1..=1000).contains(&n)),
        "{:?}",
        got.batches
    );
    assert!(got.batches.len() >= 3, "{:?}", got.batches);
    assert!(got.lost.is_empty());

    // A lone record is not held back waiting for a full batch.
    agent.hub.publish(rec(2501));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| !r.ids.is_empty()).await;
    assert_eq!(got.batches, vec![1]);

    // Replay is batched the same way.
    let replayed = drain(
        agent
            .subscribe(proto::SubscribeRequest {
                replay: 2501,
                follow: Some(false),
                ..Default::default()
            })
            .await,
    )
    .await;
    assert_eq!(replayed.batches, vec![1000, 1000, 501]);

    // Records published together, more than a batch holds, are split across batches.
    agent.hub.publish_all((2502..=5001).map(rec));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.ids.len() >= 2500).await;
    assert_eq!(got.ids, (2502..=5001).collect::<Vec<_>>());
    assert_eq!(got.batches, vec![1000, 1000, 500]);
}

/// A subscriber on a connection with a small HTTP/2 window, so that its transport fills
/// up quickly while it does not read.
async fn small_window_subscriber(agent: &Agent) -> Streaming<proto::SubscribeResponse> {
    let channel = Endpoint::from_shared(agent.url())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    FlowLensClient::new(channel)
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_loses_records_others_get_all() {
    // The smallest buffer: a few hundred records.
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 100,
        buffer_memory: flowlens::hub::MIN_BUFFER_MEMORY,
    });
    let mut slow = small_window_subscriber(&agent).await;
    let mut fast = agent.subscribe(proto::SubscribeRequest::default()).await;
    let slow_id = agent.hub.stats().subscribers().next().unwrap().id;

    let slow_lost = |hub: &Hub| {
        hub.stats()
            .subscribers()
            .find(|s| s.id == slow_id)
            .map(|s| s.lost)
            .unwrap()
    };
    let mut fast_got = Received::default();
    let mut published = 0u32;
    let mut extra_chunks = 2;
    while extra_chunks > 0 {
        // Paced so the fast subscriber can keep up; the slow one never reads.
        for _ in 0..50 {
            published += 1;
            agent.hub.publish(rec(published));
        }
        let want = published as usize;
        read_until(&mut fast, &mut fast_got, |r| r.ids.len() >= want).await;
        if slow_lost(&agent.hub) > 0 {
            extra_chunks -= 1;
        }
        assert!(
            published < 400_000,
            "the stalled subscriber never lost anything"
        );
    }
    assert_eq!(fast_got.ids, (1..=published).collect::<Vec<_>>());
    assert!(
        fast_got.lost.is_empty(),
        "fast subscriber lost {:?}",
        fast_got.lost
    );

    let lost = slow_lost(&agent.hub);
    let status = agent.status().await;
    assert_eq!(status.subscribers.len(), 2);
    assert_eq!(status.lost_total, lost);
    assert!(status.subscribers.iter().any(|s| s.lost == lost));

    // Once it reads again it gets what was in flight, then a Lost event covering the gap.
    let mut slow_got = Received::default();
    let total = u64::from(published);
    read_until(&mut slow, &mut slow_got, |r| {
        r.ids.len() as u64 + r.total_lost() >= total
    })
    .await;
    assert_eq!(slow_got.total_lost(), lost);
    assert!(!slow_got.lost.is_empty());
    assert!(
        slow_got.ids.windows(2).all(|w| w[0] < w[1]),
        "out of order or duplicated"
    );
    assert_eq!(slow_got.ids[0], 1);

    // Records after the gap flow normally again.
    agent.hub.publish(rec(published + 1));
    read_until(&mut slow, &mut slow_got, |r| {
        r.ids.last() == Some(&(published + 1))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_thread_ends_streams_when_the_poller_goes() {
    let agent = Agent::start();
    let (tx, rx) = crossbeam_channel::bounded(16);
    let fanout = agent.hub.spawn_fanout(rx).unwrap();
    let s = agent.subscribe(proto::SubscribeRequest::default()).await;
    // The poller's batches, of any size, come out as one numbered stream.
    tx.send(vec![rec(1)]).unwrap();
    tx.send(vec![rec(2), rec(3)]).unwrap();
    drop(tx);
    let got = drain(s).await;
    assert_eq!(got.ids, vec![1, 2, 3]);
    tokio::task::spawn_blocking(move || fanout.join())
        .await
        .unwrap()
        .unwrap();

    // Later subscribers still get the replay, then end-of-stream.
    let late = agent
        .subscribe(proto::SubscribeRequest {
            replay: 10,
            ..Default::default()
        })
        .await;
    assert_eq!(drain(late).await.ids, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_following_streams() {
    let agent = Agent::start();
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    agent.hub.publish(rec(1));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| !r.ids.is_empty()).await;
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || agent.shutdown())
        .await
        .unwrap();
    // Well under the forced-drop grace period: streams ended instead of being cut off.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let end = tokio::time::timeout(WAIT, s.message()).await.unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seq_is_received_once_or_named_in_one_loss() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 0,
        buffer_memory: flowlens::hub::MIN_BUFFER_MEMORY,
    });
    let mut s = small_window_subscriber(&agent).await;
    // 20,000 records, far more than the buffer holds, while the client reads nothing.
    for chunk in 0..200u32 {
        agent
            .hub
            .publish_all((1..=100).map(|i| rec(chunk * 100 + i)));
    }
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| {
        r.ids.len() as u64 + r.total_lost() >= 20_000
    })
    .await;
    assert!(got.total_lost() > 0, "the buffer cannot have held 20,000");
    // In stream order: records, and losses naming exactly the seqs they cover.
    let mut seen = vec![0u8; 20_001];
    for p in &got.records {
        assert_eq!(p.seq, u64::from(p.ifindex));
        seen[p.seq as usize] += 1;
    }
    for l in &got.losses {
        assert_eq!(l.reason(), proto::LostReason::QueueFull);
        assert_eq!(l.count, l.last_seq + 1 - l.first_seq, "{l:?}");
        for seq in l.first_seq..=l.last_seq {
            seen[seq as usize] += 1;
        }
    }
    assert!(seen[1..].iter().all(|&n| n == 1), "every seq once");
    assert!(got.ids.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(agent.hub.stats().lost_total, got.total_lost());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_the_newest_records_in_whole_blocks() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 10,
        ..HubConfig::default()
    });
    let batch = |ids: std::ops::RangeInclusive<u32>| ids.map(rec).collect::<Vec<_>>();
    let held = || async { ids_for(&agent, vec![], vec![]).await };
    // A block larger than the ring stays whole.
    agent.hub.publish_batches([batch(1..=14)]);
    assert_eq!(held().await, (1..=14).collect::<Vec<_>>());
    // The poller's batches published together make one block; the oldest block goes
    // once the newer ones hold the ring's 10 records without it.
    agent.hub.publish_batches([batch(15..=17), batch(18..=18)]);
    assert_eq!(held().await, (1..=18).collect::<Vec<_>>());
    agent.hub.publish_batches([batch(19..=20), batch(21..=40)]);
    assert_eq!(held().await, (19..=40).collect::<Vec<_>>());
    assert_eq!(agent.hub.stats().ring_len, 22);
    assert_eq!(agent.hub.stats().oldest_seq, 19);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_on_the_same_run_sends_each_record_once() {
    let agent = Agent::start();
    let run = agent.hub.run();
    agent.hub.publish_all((1..=50).map(rec));
    let resume = |after: u64, run: u64| proto::SubscribeRequest {
        after_seq: Some(after),
        run: Some(run),
        follow: Some(false),
        ..Default::default()
    };
    let got = drain(agent.subscribe(resume(30, run)).await).await;
    assert_eq!(got.ids, (31..=50).collect::<Vec<_>>());
    assert!(got.restarts.is_empty() && got.losses.is_empty());
    assert!(got.records.iter().all(|p| p.run == run));

    // Another run's seq: the agent says it restarted, and sends all it holds.
    let got = drain(agent.subscribe(resume(30, run ^ 1)).await).await;
    assert_eq!(got.restarts.len(), 1);
    let r = &got.restarts[0];
    assert_eq!((r.requested_run, r.run, r.first_seq), (run ^ 1, run, 1));
    assert_eq!(got.ids, (1..=50).collect::<Vec<_>>());

    // Records after after_seq that the agent no longer holds: named first, then the rest.
    let small = Agent::with_config(HubConfig {
        ring_capacity: 10,
        ..HubConfig::default()
    });
    for i in 1..=50 {
        small.hub.publish(rec(i));
    }
    let got = drain(small.subscribe(resume(30, small.hub.run())).await).await;
    assert_eq!(got.losses.len(), 1);
    let l = &got.losses[0];
    assert_eq!(l.reason(), proto::LostReason::NotRetained);
    assert_eq!((l.count, l.first_seq, l.last_seq), (10, 31, 40));
    assert_eq!(got.ids, (41..=50).collect::<Vec<_>>());
}
