//! Packets that land while their flow is being ended: all but the rare one the README's race allows are in some record (a measurement of that race, bounded to one run).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::agent::{fast_config, Agent};
use common::netns::NetPair;
use flowlens::kernel::datapath::Capacities;

const FLOWS: u16 = 400;
const ROUNDS: u64 = 12;

/// Each flow sends its next datagram just after its idle timeout (1 s) ran out, within
/// the poll (100 ms) that ends it: the worst case for a packet racing its flow's end.
#[test]
fn packets_landing_as_their_flow_ends_are_all_recorded() {
    let net = NetPair::new();
    let agent = Agent::start(&net, fast_config(), Capacities::default());
    let (_, b) = net.addrs(false);
    let sent = net
        .in_ns(&net.a, move || {
            let socks: Vec<UdpSocket> = (0..FLOWS)
                .map(|_| UdpSocket::bind("0.0.0.0:0").expect("bind"))
                .collect();
            let to = SocketAddr::new(b, 9);
            let start = Instant::now();
            // Flow i's k-th datagram at k * 1.05 s plus a spread over one poll.
            let mut schedule: Vec<(Duration, usize)> = (0..ROUNDS)
                .flat_map(|k| {
                    (0..usize::from(FLOWS)).map(move |i| {
                        let us = k * 1_050_000 + (i as u64 * 100_000 / u64::from(FLOWS));
                        (Duration::from_micros(us), i)
                    })
                })
                .collect();
            schedule.sort();
            let mut n = 0u64;
            for (at, i) in schedule {
                if let Some(wait) = at.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                socks[i].send_to(b"x", to).expect("send");
                n += 1;
            }
            let ports: Vec<u16> = socks
                .iter()
                .map(|s| s.local_addr().expect("addr").port())
                .collect();
            (n, ports)
        })
        .join()
        .expect("sender");
    let (n, ports) = sent;
    assert_eq!(n, u64::from(FLOWS) * ROUNDS);
    let ours = |port: u16| ports.contains(&port);
    // The idle ends of the last round, then the shutdown flush of anything left.
    std::thread::sleep(Duration::from_millis(1500));
    let recs = agent.stop();
    let udp: Vec<_> = recs
        .iter()
        .filter(|f| f.protocol == 17 && ours(f.client_port))
        .collect();
    let recorded: u64 = udp.iter().map(|f| f.client.packets).sum();
    assert!(recorded <= n, "{recorded} datagrams recorded, {n} sent");
    // The window the README describes (a program that looked the entry up just before the
    // scan's delete adds just after it) is narrowed, not closed: on an idle machine no
    // datagram is lost, and a vCPU the host stalls inside that window can lose one. More
    // than one per thousand ends would be a wider window, not that race.
    let lost = n - recorded;
    let ends = udp.len() as u64;
    assert!(
        lost * 1000 <= ends,
        "{lost} of {n} datagrams lost between a flow's read and its end, over {ends} ends"
    );
    eprintln!("{n} datagrams in {ends} flow records, {lost} lost");
}
