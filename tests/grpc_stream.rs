//! gRPC streaming: replay then follow, batch bounds, a stalled subscriber's losses, stream ends on poller exit and shutdown.

mod common;

use common::grpc::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_follow() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 20,
        subscriber_queue: 4096,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_loses_records_others_get_all() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 100,
        subscriber_queue: 64,
        ..HubConfig::default()
    });
    // A small HTTP/2 window makes the stalled client's transport fill up quickly.
    let slow_channel = Endpoint::from_shared(agent.url())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow = FlowLensClient::new(slow_channel)
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
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
        // Paced so the fast subscriber (queue of 64) can keep up; the slow one never reads.
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

    // Once it reads again it gets what was queued, then a Lost event covering the gap.
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
async fn a_run_larger_than_the_queue_loses_its_tail_and_says_so() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 1000,
        subscriber_queue: 8,
        ..HubConfig::default()
    });
    let mut s = agent.subscribe(proto::SubscribeRequest::default()).await;
    // One publish call: the queue takes what fits of the run, the rest is lost at once.
    agent.hub.publish_all((1..=100).map(rec));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| {
        r.ids.len() as u64 + r.total_lost() >= 100
    })
    .await;
    assert_eq!(got.ids, (1..=8).collect::<Vec<_>>());
    assert_eq!(got.lost, vec![92]);
    let seqs: Vec<u64> = got.records.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());

    // Later runs flow again, numbered after the lost ones; every record is either
    // delivered in order or counted.
    for chunk in 0..20u32 {
        agent
            .hub
            .publish_all((0..10).map(|i| rec(101 + chunk * 10 + i)));
    }
    read_until(&mut s, &mut got, |r| {
        r.ids.len() as u64 + r.total_lost() >= 300
    })
    .await;
    assert_eq!(got.ids.len() as u64 + got.total_lost(), 300);
    assert!(got.ids.windows(2).all(|w| w[0] < w[1]), "{:?}", got.ids);
    assert!(got.records.iter().all(|p| p.seq == u64::from(p.ifindex)));
    assert_eq!(agent.hub.stats().lost_total, got.total_lost());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_keeps_the_newest_records_across_the_pollers_batches() {
    let agent = Agent::with_config(HubConfig {
        ring_capacity: 10,
        ..HubConfig::default()
    });
    let batch = |ids: std::ops::RangeInclusive<u32>| ids.map(rec).collect::<Vec<_>>();
    let ring = || async { ids_for(&agent, vec![], vec![]).await };
    // A batch larger than the ring leaves only its tail there.
    agent.hub.publish_batches([batch(1..=14)]);
    assert_eq!(ring().await, (5..=14).collect::<Vec<_>>());
    // Later batches push the oldest records out, part of a batch at a time.
    agent.hub.publish_batches([batch(15..=17), batch(18..=18)]);
    assert_eq!(ring().await, (9..=18).collect::<Vec<_>>());
    assert_eq!(agent.hub.stats().ring_len, 10);
    agent.hub.publish_batches([batch(19..=20), batch(21..=40)]);
    assert_eq!(ring().await, (31..=40).collect::<Vec<_>>());
    assert_eq!(agent.hub.stats().ring_len, 10);
}
