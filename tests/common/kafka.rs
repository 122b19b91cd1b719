//! Kafka test tools: a tansu broker started in a test namespace (stopped on drop), a consumer that reads a whole topic, Kafka's murmur2 partitioner, and where `make test-deps` put tansu and the Python with chdb.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::netns::enter;

/// Where `make test-deps` installs the test tools (the Makefile's `TOOLS_DIR`).
pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLOWLENS_TOOLS_DIR") {
        return d.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/flowlens-tools")
}

fn tool(rel: &str) -> PathBuf {
    let p = tools_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run `make test-deps` (it builds tansu and installs chdb once)",
        p.display()
    );
    p
}

/// The tansu binary (a Kafka-protocol broker).
pub fn tansu() -> PathBuf {
    tool("tansu/bin/tansu")
}

/// The Python interpreter of the venv that has chdb.
pub fn python() -> PathBuf {
    tool("py/bin/python")
}

/// A port nobody listens on in namespace `ns` (loopback).
pub fn free_port(ns: &str) -> u16 {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    })
    .join()
    .expect("port thread")
}

/// A tansu broker with in-memory storage on 127.0.0.1 of namespace `ns`: a restart starts
/// it empty (topics included).
pub struct Broker {
    ns: String,
    pub port: u16,
    /// The port it tells clients to use (a proxy's, or its own).
    advertised: u16,
    child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start(ns: &str) -> Broker {
        Broker::advertising(ns, None)
    }

    /// A broker that tells its clients to connect to `advertised` (a proxy in front of it)
    /// instead of its own port.
    pub fn advertising(ns: &str, advertised: Option<u16>) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port(ns);
        let mut b = Broker {
            ns: ns.to_owned(),
            port,
            advertised: advertised.unwrap_or(port),
            child: None,
            log: dir.path().join("tansu.log"),
            _dir: dir,
        };
        b.spawn();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("broker log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(tansu())
            .args(["broker", "--listener-url", &self.url()])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.advertised),
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let path = format!("/run/netns/{}", self.ns);
        let to: SocketAddr = self.addr().parse().expect("addr");
        let up = std::thread::spawn(move || {
            enter(&path);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
        .join()
        .expect("wait thread");
        assert!(up, "tansu did not listen on {to}:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates `topic` with `partitions` partitions (tansu creates none by itself).
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(tansu())
            .args(["topic", "create", "--broker", &self.url()])
            .args(["--partitions", &partitions.to_string(), topic])
            .output()
            .expect("tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {topic}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.try_wait().expect("wait").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Starts it again on the same port (empty: the storage is in memory).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads `topic` (all `partitions`, from the beginning) in namespace `ns` until `want`
/// messages came, then half a second more for any extra; panics after `timeout`. `settings`
/// are more librdkafka settings (TLS).
pub fn consume(
    ns: &str,
    brokers: &str,
    topic: &str,
    (partitions, want, timeout): (i32, usize, Duration),
    settings: &[(&str, &str)],
) -> Vec<Msg> {
    let (path, brokers, topic) = (
        format!("/run/netns/{ns}"),
        brokers.to_owned(),
        topic.to_owned(),
    );
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    std::thread::spawn(move || {
        // librdkafka's threads start in the namespace of the thread that makes the client.
        enter(&path);
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &brokers)
            .set("group.id", "flowlens-test")
            .set("enable.auto.commit", "false")
            .set("log_level", "3");
        for (k, v) in &settings {
            cfg.set(k, v);
        }
        let c: BaseConsumer = cfg.create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .expect("partition");
        }
        c.assign(&tpl).expect("assign");
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut extra_until: Option<Instant> = None;
        while Instant::now() < deadline && extra_until.is_none_or(|t| Instant::now() < t) {
            let Some(m) = c.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.expect("consume");
            got.push(Msg {
                partition: m.partition(),
                key: m.key().unwrap_or_default().to_vec(),
                value: m.payload().unwrap_or_default().to_vec(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
            if got.len() >= want && extra_until.is_none() {
                extra_until = Some(Instant::now() + Duration::from_millis(500));
            }
        }
        assert!(
            got.len() >= want,
            "{} of {want} messages from {topic} within {timeout:?}",
            got.len()
        );
        got
    })
    .join()
    .expect("consumer thread")
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), as the `murmur2_random` partitioner
/// uses it.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client (and librdkafka's `murmur2_random`) gives `key`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// A TLS front for a broker in namespace `ns`: accepts TLS on 127.0.0.1:`port` with the
/// server certificate `cert`/`key`, requires a client certificate from `client_ca`, and
/// relays each connection to `to` in cleartext. Stops when dropped.
pub struct TlsProxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsProxy {
    pub fn start(
        ns: &str,
        port: u16,
        to: u16,
        cert: PathBuf,
        key: PathBuf,
        client_ca: PathBuf,
    ) -> TlsProxy {
        let tls = flowlens::tls::ServerTls::from_config(&flowlens::config::GrpcConfig {
            tls_cert: Some(cert),
            tls_key: Some(key),
            client_ca: Some(client_ca),
            ..flowlens::config::GrpcConfig::default()
        })
        .expect("TLS config")
        .expect("TLS on");
        let path = format!("/run/netns/{ns}");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&path);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("proxy listen");
                ready_tx.send(()).expect("ready");
                let acceptor = tls.acceptor();
                let serve = async {
                    loop {
                        let Ok((c, _)) = l.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            // A client that fails the handshake just goes away.
                            let Ok(mut c) = acceptor.accept(c).await else {
                                return;
                            };
                            let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                            else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        ready.recv().expect("proxy started");
        TlsProxy {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
