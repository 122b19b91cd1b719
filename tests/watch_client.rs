//! The `watch` client against a real server: table and JSON output, flags into requests, flags from the command line and the environment, reconnecting to a restarted agent.

mod common;

use common::grpc::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_table_and_json() {
    let agent = Agent::start();
    for r in corpus() {
        agent.hub.publish(r);
    }
    let args = WatchArgs {
        query: FlowQuery {
            server: agent.addr.to_string(),
            proto: Some("tcp".into()),
            exclude_interface: vec!["eth1".into()],
            ..Default::default()
        },
        replay: 100,
        no_follow: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    watch::watch_to(&args, &mut out, std::future::pending())
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Header, the date line, two flows.
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("TIME "), "{text}");
    assert_eq!(lines[1], "--- 2023-11-14 (UTC) ---");
    assert!(
        lines[2].contains("10.0.0.1:40001 > 192.168.1.10:443"),
        "{text}"
    );
    assert!(lines[2].contains(" fin "), "{text}");
    assert!(lines[2].contains("srv 50µs"), "{text}");
    assert!(
        lines[3].contains("192.168.1.20:33000 > 10.0.0.2:22"),
        "{text}"
    );
    // Columns line up: the arrow sits at the same offset in every row, and every line
    // fits 100 columns.
    assert_eq!(lines[2].find(" > "), lines[3].find(" > "));
    assert!(lines.iter().all(|l| l.chars().count() <= 100), "{text}");

    let args = WatchArgs {
        json: true,
        query: FlowQuery {
            proto: None,
            exclude_interface: vec![],
            ..args.query.clone()
        },
        ..args
    };
    let mut out = Vec::new();
    watch::watch_to(&args, &mut out, std::future::pending())
        .await
        .unwrap();
    let objs: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), 6);
    assert_eq!(objs[0]["client_addr"], "10.0.0.1");
    assert_eq!(objs[0]["end_reason"], "tcp_fin");
    assert_eq!(objs[3]["icmp"]["echo_id"], 77);
    assert!(objs[3]["tcp"].is_null());

    // Bad flags are reported by flag name before connecting.
    for (args, flag) in [
        (
            WatchArgs {
                query: FlowQuery {
                    port: Some("90-80".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--port",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    src: Some("10.0.0.0/40".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--src",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    proto: Some("sctp".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--proto",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    end_reason: Some("timeout".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--end-reason",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    tcp_flags: Some("syn,bogus".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "--tcp-flags",
        ),
    ] {
        let err = watch::subscribe_request(&args).unwrap_err();
        assert!(format!("{err:#}").contains(flag), "{err:#}");
    }

    // A server that is gone is an error, not a silent exit.
    let url = agent.url();
    agent.shutdown();
    let args = WatchArgs {
        query: FlowQuery {
            server: url,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = watch::watch_to(&args, &mut Vec::new(), std::future::pending())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("connecting"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_flags_build_the_request() {
    let args = WatchArgs {
        query: FlowQuery {
            src: Some("10.0.0.0/8".into()),
            dport: Some("8000-8100".into()),
            proto: Some("udp".into()),
            ip_version: Some("6".into()),
            tcp_flags: Some("syn,ack".into()),
            end_reason: Some("tcp-rst".into()),
            min_bytes: Some(10),
            exclude_port: vec!["22".into(), "53".into()],
            ..Default::default()
        },
        replay: 7,
        since: Some("5m".into()),
        no_follow: true,
        ..Default::default()
    };
    let req = watch::subscribe_request(&args).unwrap();
    assert_eq!(req.include.len(), 1);
    let f = &req.include[0];
    assert_eq!(f.src_cidr.as_deref(), Some("10.0.0.0/8"));
    assert_eq!(f.dst_port, ports(8000, Some(8100)));
    assert_eq!(f.protocol, Some(17));
    assert_eq!(f.ip_version(), proto::IpVersion::IpVersion6);
    assert_eq!(f.tcp_flags, Some(u32::from(SYN | ACK)));
    assert_eq!(f.end_reason(), proto::EndReason::TcpRst);
    assert_eq!(f.min_bytes, Some(10));
    assert_eq!(req.exclude.len(), 2);
    assert_eq!(req.exclude[1].port, ports(53, Some(53)));
    assert_eq!(req.replay, 7);
    assert_eq!(req.follow, Some(false));
    let since = SystemTime::try_from(req.since.unwrap()).unwrap();
    let ago = SystemTime::now().duration_since(since).unwrap();
    assert!(
        ago >= Duration::from_secs(299) && ago < Duration::from_secs(400),
        "{ago:?}"
    );

    // No flags: no include filter at all (everything), follow on.
    let req = watch::subscribe_request(&WatchArgs::default()).unwrap();
    assert!(req.include.is_empty() && req.exclude.is_empty());
    assert_eq!(req.follow, Some(true));
}

#[derive(Debug, clap::Parser)]
struct WatchCli {
    #[command(flatten)]
    watch: WatchArgs,
}

#[test]
fn watch_flags_parse_from_command_line_and_env() {
    use clap::Parser;
    // Only this test reads these variables.
    std::env::set_var("FLOWLENS_WATCH_NO_FOLLOW", "true");
    std::env::set_var("FLOWLENS_WATCH_EXCLUDE_PORT", "22,53");
    std::env::set_var("FLOWLENS_WATCH_SERVER", "unix:/run/flowlens.sock");
    let cli =
        WatchCli::try_parse_from(["watch", "--json", "--dport", "80-90", "--replay", "5"]).unwrap();
    let w = cli.watch;
    assert!(w.json && w.no_follow);
    assert_eq!(w.query.dport.as_deref(), Some("80-90"));
    assert_eq!(w.replay, 5);
    assert_eq!(w.query.exclude_port, vec!["22", "53"]);
    assert_eq!(w.query.server, "unix:/run/flowlens.sock");
    assert!(WatchCli::try_parse_from(["watch", "--ip-version", "5"]).is_err());
    std::env::remove_var("FLOWLENS_WATCH_SERVER");
    let w = WatchCli::try_parse_from(["watch"]).unwrap().watch;
    assert_eq!(w.query.server, "http://127.0.0.1:50051");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnect_follows_a_restarted_agent_without_gaps_or_repeats() {
    let first = Agent::start();
    let listen = first.addr.to_string();
    let args = WatchArgs {
        query: FlowQuery {
            server: listen.clone(),
            ..Default::default()
        },
        json: true,
        reconnect: true,
        ..Default::default()
    };
    let watch = WatchTask::spawn(args);
    let out = watch.out.clone();
    let publish = |a: &Agent, port: u16| {
        let mut r = rec(1);
        r.client_port = port;
        a.hub.publish(r);
    };
    wait_subscribers(&first.hub, 1).await;
    publish(&first, 1);
    assert_eq!(out.wait_for(1).await, [1]);

    // The agent restarts on the same address; what it emits before watch is back is
    // replayed, what it emits after is followed.
    first.shutdown();
    let second = Agent::on(&listen, HubConfig::default());
    publish(&second, 2);
    assert_eq!(out.wait_for(2).await, [1, 2]);
    publish(&second, 3);
    assert_eq!(out.wait_for(3).await, [1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(out.ports(), [1, 2, 3], "nothing twice");
    watch.stop().await;
}
