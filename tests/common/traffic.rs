//! Known traffic between the two test namespaces.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use super::netns::NetPair;

/// One TCP connection from a to b: `up` bytes to b, b answers `down` bytes once a is done
/// sending, both sides close. Returns (b's port, a's port) once both saw everything.
pub fn tcp_transfer(net: &NetPair, v6: bool, up: usize, down: usize) -> (u16, u16) {
    let (_, b) = net.addrs(v6);
    let listener = net.listen_b(v6, 0);
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        s.write_all(&vec![7u8; down]).expect("write");
        got.len()
    });
    let client_port = net
        .in_ns(&net.a, move || {
            let mut c = TcpStream::connect(SocketAddr::new(b, port)).expect("connect");
            c.write_all(&vec![1u8; up]).expect("send");
            c.shutdown(Shutdown::Write).expect("shutdown");
            let mut back = Vec::new();
            c.read_to_end(&mut back).expect("read back");
            assert_eq!(back.len(), down);
            c.local_addr().expect("local").port()
        })
        .join()
        .expect("client");
    assert_eq!(server.join().expect("server"), up);
    (port, client_port)
}
