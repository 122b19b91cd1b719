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
            agent: AgentAddr {
                server: agent.addr.to_string(),
                ..Default::default()
            },
            proto: vec!["tcp".into()],
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
    assert!(lines[0].starts_with("TIME     FIRST "), "{text}");
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
    // fits the table's width.
    assert_eq!(lines[2].find(" > "), lines[3].find(" > "));
    assert!(lines.iter().all(|l| l.chars().count() <= 120), "{text}");

    let args = WatchArgs {
        json: true,
        query: FlowQuery {
            proto: vec![],
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
                    port: vec!["90-80".into()],
                    ..Default::default()
                },
                ..Default::default()
            },
            "--port",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    src: vec!["10.0.0.0/40".into()],
                    ..Default::default()
                },
                ..Default::default()
            },
            "--src",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    proto: vec!["sctp".into()],
                    ..Default::default()
                },
                ..Default::default()
            },
            "--proto",
        ),
        (
            WatchArgs {
                end_reason: vec!["finished".into()],
                ..Default::default()
            },
            "--end-reason",
        ),
        (
            WatchArgs {
                query: FlowQuery {
                    tcp_flags: vec!["syn,bogus".into()],
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
            agent: AgentAddr {
                server: url,
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let err = watch::watch_to(&args, &mut Vec::new(), std::future::pending())
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("no flowlens agent at") && err.contains("start it"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_flags_build_the_request() {
    let args = WatchArgs {
        query: FlowQuery {
            src: vec!["10.0.0.0/8".into()],
            dport: vec!["8000-8100".into()],
            proto: vec!["udp".into()],
            ip_version: Some("6".into()),
            tcp_flags: vec!["syn,ack".into()],
            min_bytes: Some(10),
            exclude_port: vec!["22".into(), "53".into()],
            ..Default::default()
        },
        end_reason: vec!["tcp-rst".into()],
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

    // Repeated include flags are alternatives: one filter per combination of values;
    // --end-reason takes the table's labels too.
    let args = WatchArgs {
        query: FlowQuery {
            port: vec!["80".into(), "443".into()],
            proto: vec!["tcp".into(), "udp".into()],
            interface: vec!["veth*".into()],
            ..Default::default()
        },
        end_reason: vec!["idle".into(), "rst".into(), "refused".into()],
        ..Default::default()
    };
    let req = watch::subscribe_request(&args).unwrap();
    assert_eq!(req.include.len(), 2 * 2 * 2, "{:#?}", req.include);
    let mut seen: Vec<(u32, u32, i32)> = req
        .include
        .iter()
        .map(|f| (f.port.unwrap().lo, f.protocol.unwrap(), f.end_reason))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8);
    assert!(req
        .include
        .iter()
        .all(|f| f.interface.as_deref() == Some("veth*")));
    let bad = WatchArgs {
        query: FlowQuery {
            interface: vec!["/([/".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let err = watch::subscribe_request(&bad).unwrap_err();
    assert!(format!("{err:#}").contains("--interface"), "{err:#}");

    // --since and --until take durations, RFC 3339 times, zone-less times and Unix
    // seconds.
    use flowlens::record::render::TimeFormat;
    let at = |s: &str| watch::time_arg(s, "--since", TimeFormat::Utc).unwrap();
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_637_000);
    assert_eq!(at("2026-11-25T20:03:20Z"), t);
    assert_eq!(at("2026-11-25T21:03:20+01:00"), t);
    assert_eq!(at("2026-11-25 20:03:20"), t);
    assert_eq!(at("1795637000"), t);
    let err = watch::time_arg("yesterday", "--until", TimeFormat::Utc).unwrap_err();
    assert!(format!("{err:#}").contains("--until"), "{err:#}");

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
    assert_eq!(w.query.dport, ["80-90"]);
    assert_eq!(w.replay, 5);
    assert_eq!(w.query.exclude_port, vec!["22", "53"]);
    assert_eq!(w.query.agent.server, "unix:/run/flowlens.sock");
    assert!(WatchCli::try_parse_from(["watch", "--ip-version", "5"]).is_err());
    std::env::remove_var("FLOWLENS_WATCH_SERVER");
    let w = WatchCli::try_parse_from(["watch"]).unwrap().watch;
    assert_eq!(w.query.agent.server, "unix:/run/flowlens/flowlens.sock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnect_follows_a_restarted_agent_without_gaps_or_repeats() {
    let first = Agent::start();
    let listen = first.addr.to_string();
    let args = WatchArgs {
        query: FlowQuery {
            agent: AgentAddr {
                server: listen.clone(),
                ..Default::default()
            },
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_until_ends_by_itself_and_reset_labels_pick_resets() {
    let agent = Agent::start();
    // rec(i) is emitted at t(i + 2); the even ones are resets, 2 and 6 refused connections.
    for i in 1..=8u32 {
        let mut r = rec(i);
        if i % 2 == 0 {
            r.end_reason = EndReason::TcpRst;
            if i % 4 == 2 {
                tcp_flags(&mut r, SYN, RST | ACK);
            } else {
                tcp_flags(&mut r, SYN | ACK, SYN | ACK | RST);
            }
        }
        agent.hub.publish(r);
    }
    let until = humantime::format_rfc3339(t(6)).to_string();
    let args = WatchArgs {
        query: FlowQuery {
            agent: AgentAddr {
                server: agent.addr.to_string(),
                ..Default::default()
            },
            ..Default::default()
        },
        json: true,
        replay: 100,
        until: Some(until),
        ..Default::default()
    };
    // Following, yet it ends: the records passed --until.
    let mut out = Vec::new();
    tokio::time::timeout(
        WAIT,
        watch::watch_to(&args, &mut out, std::future::pending()),
    )
    .await
    .expect("watch --until ends by itself")
    .unwrap();
    assert_eq!(ids(out), [1, 2, 3, 4]);

    let args = WatchArgs {
        query: args.query.clone(),
        json: true,
        replay: 100,
        no_follow: true,
        end_reason: vec!["refused".into()],
        ..Default::default()
    };
    let mut out = Vec::new();
    watch::watch_to(&args, &mut out, std::future::pending())
        .await
        .unwrap();
    assert_eq!(ids(out), [2, 6]);
    let args = WatchArgs {
        end_reason: vec!["rst-s".into()],
        ..args
    };
    let mut out = Vec::new();
    watch::watch_to(&args, &mut out, std::future::pending())
        .await
        .unwrap();
    assert_eq!(ids(out), [4, 8]);
}

/// `--unit`, `--cgroup` and `--pid` select flows by the owner of either local socket, on
/// the agent's side, for `watch` (Subscribe) and `flows`/`top` (ListFlows) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_flows_select_by_unit_cgroup_and_pid() {
    let agent = Agent::start();
    let owner = |cgroup: &str, unit: Option<&str>, pid: u32| {
        Some(Box::new(LocalProcess {
            cgroup_id: Some(u64::from(pid)),
            cgroup: Some(cgroup.into()),
            unit: unit.map(Into::into),
            pid: Some(pid),
            comm: Some("x".into()),
            uid: Some(0),
        }))
    };
    let mut flows = Vec::new();
    for i in 1..=5u32 {
        let mut r = rec(i);
        match i {
            1 => r.server_process = owner("/system.slice/nginx.service", Some("nginx.service"), 10),
            2 => {
                r.client_process = owner(
                    "/system.slice/nginx.service/worker",
                    Some("nginx.service"),
                    11,
                )
            }
            3 => r.client_process = owner("/system.slice/sshd.service", Some("sshd.service"), 12),
            4 => {
                r.client_process = owner(
                    "/user.slice/user-1000.slice/session-4.scope",
                    Some("session-4.scope"),
                    13,
                )
            }
            _ => {} // forwarded: no local socket
        }
        flows.push(r);
    }
    for r in flows.clone() {
        agent.hub.publish(r);
    }
    let query = |unit: &[&str], cgroup: &[&str], pid: &[u32]| FlowQuery {
        agent: AgentAddr {
            server: agent.addr.to_string(),
            ..Default::default()
        },
        unit: unit.iter().map(|s| s.to_string()).collect(),
        cgroup: cgroup.iter().map(|s| s.to_string()).collect(),
        pid: pid.to_vec(),
        ..Default::default()
    };
    let cases: [(FlowQuery, &[u64]); 7] = [
        (query(&["nginx.service"], &[], &[]), &[1, 2]),
        (query(&["nginx*", "/s(sh|x)d\\..*/"], &[], &[]), &[1, 2, 3]),
        (query(&[], &["/system.slice"], &[]), &[1, 2, 3]),
        (query(&[], &["/system.slice/nginx.service/"], &[]), &[1, 2]),
        (query(&[], &["/system"], &[]), &[]),
        (query(&[], &[], &[12, 13]), &[3, 4]),
        (query(&["nginx.service"], &[], &[11]), &[2]),
    ];
    let in_progress: Vec<FlowRecord> = flows
        .into_iter()
        .map(|mut r| {
            r.end_reason = EndReason::InProgress;
            r
        })
        .collect();
    agent.snapshots.publish(t(50), in_progress);
    let mut client = agent.client().await;
    for (q, want) in cases {
        let args = WatchArgs {
            query: q.clone(),
            json: true,
            replay: 100,
            no_follow: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        watch::watch_to(&args, &mut out, std::future::pending())
            .await
            .unwrap();
        assert_eq!(ids(out), want, "watch {q:?}");
        let req = flowlens::cli::flows::list_request(&q).unwrap();
        let listed = client.list_flows(req).await.unwrap().into_inner();
        let got: Vec<u64> = listed.flows.iter().map(|f| u64::from(f.ifindex)).collect();
        assert_eq!(got, want, "flows {q:?}");
    }
    // Bad values are refused by flag name before any request.
    for (q, flag) in [
        (query(&[], &["system.slice"], &[]), "--cgroup"),
        (query(&["/([/"], &[], &[]), "--unit"),
    ] {
        let err = flowlens::cli::flows::list_request(&q).unwrap_err();
        assert!(format!("{err:#}").contains(flag), "{err:#}");
    }
    // And by field name when a request comes from elsewhere.
    let bad = client
        .list_flows(proto::ListFlowsRequest {
            include: vec![proto::Filter {
                pid: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        bad.message().contains("include[0].pid"),
        "{}",
        bad.message()
    );
}

/// The ifindex of each JSON line `watch` printed: the tests' records are told apart by it.
fn ids(out: Vec<u8>) -> Vec<u64> {
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["ifindex"]
                .as_u64()
                .unwrap()
        })
        .collect()
}
