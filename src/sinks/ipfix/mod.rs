//! IPFIX export (RFC 7011): a sink thread per collector that encodes flow records and sends
//! them over UDP or TCP, losing (and counting) records rather than ever holding up its feeder.
//!
//! # Two uniflow records per flow, not one biflow record
//!
//! Each flow record becomes one data record per direction that carried packets: the client's
//! (client -> server) and the server's (server -> client), both with the same `flowId`
//! (a stable hash of the flow key), so a collector can pair them. RFC 5103 biflows (reverse
//! `octetDeltaCount`/`packetDeltaCount` under PEN 29305) were tried against the collectors
//! of record: `nfcapd` 1.7.1 decodes them (as "out" bytes/packets of one flow), but `nfacctd`
//! 1.7.7 silently drops the reverse counters, so pmacct users would see only the client's
//! half of every conversation. Two uniflow records are decoded in full by nfcapd, nfacctd
//! and tshark alike (the test `biflow_reverse_counters_are_lost_by_nfacctd` keeps the proof).
//!
//! # Elements
//!
//! Standard IANA elements for everything that has one: `flowId` (148), source/destination
//! IPv4 (8, 12) or IPv6 (27, 28) address, transport ports (7, 11; not in ICMP records),
//! `protocolIdentifier` (4), `ingressInterface`/`egressInterface` (10, 14: the interface's
//! ifindex on the side the record's packets crossed it, 0 on the other) and `flowDirection`
//! (61), `flowStartMilliseconds`/`flowEndMilliseconds` (152, 153), `octetDeltaCount` (1) and
//! `packetDeltaCount` (2) (IP bytes, deltas since the flow's previous record), `flowEndReason`
//! (136), `ipTTL` (192, the last TTL or hop limit seen), `tcpControlBits` (6, the flags the
//! record's sender set) and `icmpTypeCodeIPv4`/`IPv6` (32, 139). Timing metrics with no IANA
//! element are exported only with `--ipfix-enterprise PEN`, under that PEN with the ids of
//! [`encode::pen`]. Templates: 256-258 IPv4 (ports, TCP, ICMP), 259-261 IPv6.
//!
//! # Sessions
//!
//! UDP: templates go with the first message and again every `--ipfix-template-refresh`, so
//! a restarted collector decodes data again after the next refresh. TCP: templates go first
//! on every connection, and the sequence number restarts with each connection (a new
//! transport session). The sequence number counts the data records of earlier messages;
//! UDP messages that failed to send still count, so the collector sees the gap.

pub mod encode;
pub mod transport;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};

use crate::hub::{Next, SinkRx};
use crate::record::encoding::RecordDecoder;
use crate::record::flow::FlowRecord;
use encode::{Encoder, Message};
use transport::{Link, Tcp, Udp};

/// The IANA-assigned IPFIX port, used when a destination names none.
pub const DEFAULT_PORT: u16 = 4739;
/// Smallest accepted `--ipfix-mtu`: the IPv4 minimum datagram every host must accept.
pub const MIN_MTU: u16 = 576;
pub const DEFAULT_MTU: u16 = 1400;
/// How long the thread waits for records before checking its connection again.
const TICK: Duration = Duration::from_millis(100);
/// Flow records encoded in one go, at most: a block of the hub's.
const MAX_BATCH: usize = crate::hub::BATCH_MAX_RECORDS;
/// UDP reports a refused datagram on a later send, so sends succeed in between while the
/// collector is down: it counts as back only after this long without an error.
const UDP_QUIET: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A collector: `udp://HOST:PORT` or `tcp://HOST:PORT` (IPv6 literals in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DestinationError {
    #[error("{0:?}: expected udp://HOST:PORT or tcp://HOST:PORT")]
    NoScheme(String),
    #[error("{0:?}: unknown transport {1:?} (udp or tcp)")]
    Scheme(String, String),
    #[error("{0:?}: no host")]
    NoHost(String),
    #[error("{0:?}: unclosed '[' in an IPv6 address")]
    Bracket(String),
    #[error("{0:?}: port {1:?} is not a number from 1 to 65535")]
    Port(String, String),
    #[error("{0:?}: unexpected {1:?} after the port (no path allowed)")]
    Trailing(String, String),
}

impl FromStr for Destination {
    type Err = DestinationError;

    fn from_str(s: &str) -> Result<Destination, DestinationError> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| DestinationError::NoScheme(s.into()))?;
        let transport = match scheme.to_ascii_lowercase().as_str() {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            _ => return Err(DestinationError::Scheme(s.into(), scheme.into())),
        };
        if let Some(i) = rest.find(['/', '?', '#']) {
            return Err(DestinationError::Trailing(s.into(), rest[i..].into()));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| DestinationError::Bracket(s.into()))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(DestinationError::Trailing(s.into(), after.into())),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(DestinationError::NoHost(s.into()));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(DestinationError::Port(s.into(), p.into())),
            },
        };
        Ok(Destination {
            transport,
            host: host.into(),
            port,
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// One exporter: where to, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpfixConfig {
    pub destination: Destination,
    pub observation_domain: u32,
    /// Path MTU: UDP messages are sized to fit it in one IP packet.
    pub mtu: u16,
    /// UDP: how often templates are sent again.
    pub template_refresh: Duration,
    /// Private enterprise number for the timing metrics; none: not exported.
    pub enterprise: Option<u32>,
}

impl IpfixConfig {
    /// Largest message to `to`: the MTU less the IP and UDP (or TCP) headers.
    pub fn max_message_len(&self, to: &SocketAddr) -> usize {
        let ip = if to.is_ipv4() { 20 } else { 40 };
        let l4 = match self.destination.transport {
            Transport::Udp => 8,
            Transport::Tcp => 20,
        };
        usize::from(self.mtu).saturating_sub(ip + l4)
    }
}

/// Counters of one exporter, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct IpfixStats {
    /// Flow records whose data records were sent.
    pub records_sent: AtomicU64,
    /// Flow records lost: collector unreachable, send failed, or dropped before the exporter.
    pub records_lost: AtomicU64,
    /// IPFIX data records sent (one per direction that carried packets).
    pub data_records_sent: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Messages that carried templates.
    pub template_messages_sent: AtomicU64,
    /// TCP connections made after the first.
    pub reconnects: AtomicU64,
    pub send_errors: AtomicU64,
}

/// A plain copy of [`IpfixStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpfixCounts {
    pub records_sent: u64,
    pub records_lost: u64,
    pub data_records_sent: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub template_messages_sent: u64,
    pub reconnects: u64,
    pub send_errors: u64,
}

impl IpfixStats {
    pub fn snapshot(&self) -> IpfixCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IpfixCounts {
            records_sent: get(&self.records_sent),
            records_lost: get(&self.records_lost),
            data_records_sent: get(&self.data_records_sent),
            messages_sent: get(&self.messages_sent),
            bytes_sent: get(&self.bytes_sent),
            template_messages_sent: get(&self.template_messages_sent),
            reconnects: get(&self.reconnects),
            send_errors: get(&self.send_errors),
        }
    }

    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: cannot resolve the collector address: {1}")]
    Resolve(Destination, std::io::Error),
    #[error("{0}: the host resolves to no address")]
    NoAddress(Destination),
    #[error("{0}: --ipfix-mtu {1}: {2}")]
    Mtu(Destination, u16, encode::TooSmall),
    #[error("{0}: {1}")]
    Io(Destination, std::io::Error),
}

impl From<SpawnError> for std::io::Error {
    fn from(e: SpawnError) -> std::io::Error {
        std::io::Error::other(e.to_string())
    }
}

/// Starts the exporter thread on a hub sink. It exports what the sink reads until the
/// hub closes, sends what is left, closes the session and returns. Records the hub's log
/// let go before the exporter read them (it fell behind) are counted as lost like
/// unreachable ones.
pub fn spawn(
    cfg: IpfixConfig,
    mut rx: SinkRx,
    stats: Arc<IpfixStats>,
) -> std::io::Result<JoinHandle<()>> {
    let mut exporter = Exporter::new(cfg, stats.clone())?;
    std::thread::Builder::new()
        .name("flowlens-ipfix".into())
        .spawn(move || {
            let mut dec = RecordDecoder::default();
            // Decoded into again and again: no allocation per record once it is full.
            let mut batch: Vec<FlowRecord> = Vec::with_capacity(MAX_BATCH);
            loop {
                match rx.next_blocking(Some(TICK)) {
                    Next::Records(run) => {
                        let n = run.decode_into(&mut dec, &mut batch);
                        IpfixStats::add(&stats.records_lost, (run.len() - n) as u64);
                        exporter.send(batch[..n].iter());
                    }
                    Next::Lost(gap) => IpfixStats::add(&stats.records_lost, gap.count()),
                    Next::Idle => exporter.upkeep(),
                    Next::End => break,
                }
            }
            exporter.finish();
        })
}

enum Sink {
    Udp(Udp),
    Tcp(Tcp),
}

/// One collector's exporting process, for a sink loop of any kind to drive: [`spawn`] runs
/// it on a hub sink; anything else can call [`Exporter::send`] with its own batches.
pub struct Exporter {
    cfg: IpfixConfig,
    enc: Encoder,
    link: Sink,
    stats: Arc<IpfixStats>,
    /// When templates last went out (UDP).
    templates_at: Option<Instant>,
    losing: Option<Episode>,
}

/// An episode of an unreachable collector.
struct Episode {
    lost: u64,
    last_error: Instant,
}

impl Exporter {
    /// Resolves the collector and opens the socket (TCP starts connecting, never blocking).
    pub fn new(cfg: IpfixConfig, stats: Arc<IpfixStats>) -> Result<Exporter, SpawnError> {
        let dest = cfg.destination.clone();
        let to = (dest.host.as_str(), dest.port)
            .to_socket_addrs()
            .map_err(|e| SpawnError::Resolve(dest.clone(), e))?
            .next()
            .ok_or_else(|| SpawnError::NoAddress(dest.clone()))?;
        let enc = Encoder::new(
            cfg.observation_domain,
            cfg.max_message_len(&to),
            cfg.enterprise,
        )
        .map_err(|e| SpawnError::Mtu(dest.clone(), cfg.mtu, e))?;
        let link = match dest.transport {
            Transport::Udp => Sink::Udp(Udp::connect(to).map_err(|e| SpawnError::Io(dest, e))?),
            Transport::Tcp => Sink::Tcp(Tcp::new(to)),
        };
        Ok(Exporter {
            cfg,
            enc,
            link,
            stats,
            templates_at: None,
            losing: None,
        })
    }

    /// Exports a batch now, or counts it lost when the collector is unreachable. Waits at
    /// most one tick for a TCP connect in progress, and a write timeout per message.
    pub fn send<'r, I>(&mut self, records: I)
    where
        I: ExactSizeIterator<Item = &'r FlowRecord>,
    {
        match self.link_up(TICK) {
            Some(fresh) => self.export(records, fresh),
            None => self.lose(records.len() as u64, None),
        }
    }

    /// Between batches: advances a TCP connect or notices a closed connection.
    pub fn upkeep(&mut self) {
        self.link_up(Duration::ZERO);
    }

    /// Ends the session: TCP sends its FIN after what was written.
    pub fn finish(mut self) {
        if let Sink::Tcp(t) = &mut self.link {
            t.close();
        }
    }

    /// Some(templates needed) when messages can go out now.
    fn link_up(&mut self, wait: Duration) -> Option<bool> {
        match &mut self.link {
            Sink::Udp(_) => {
                let due = self
                    .templates_at
                    .is_none_or(|t| t.elapsed() >= self.cfg.template_refresh);
                Some(due)
            }
            Sink::Tcp(t) => {
                let before = t.connects;
                let link = t.poll(wait);
                if t.connects > before && before > 0 {
                    IpfixStats::add(&self.stats.reconnects, 1);
                }
                match link {
                    Link::Up { fresh } => {
                        if fresh {
                            self.enc.reset_sequence();
                        }
                        Some(fresh)
                    }
                    Link::Down => None,
                }
            }
        }
    }

    fn export<'r>(&mut self, batch: impl Iterator<Item = &'r FlowRecord>, templates: bool) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        let (link, stats) = (&mut self.link, &self.stats);
        let mut lost = 0u64;
        let mut first_error = None;
        let mut templates_ok = None;
        self.enc
            .encode(batch, now, templates, &mut |m: Message<'_>| {
                let res = match link {
                    Sink::Udp(u) => u.send(m.bytes),
                    Sink::Tcp(t) => t.send(m.bytes),
                };
                match res {
                    Ok(()) => {
                        IpfixStats::add(&stats.messages_sent, 1);
                        IpfixStats::add(&stats.bytes_sent, m.bytes.len() as u64);
                        IpfixStats::add(&stats.records_sent, m.flows as u64);
                        IpfixStats::add(&stats.data_records_sent, m.data_records.into());
                        if m.has_templates {
                            IpfixStats::add(&stats.template_messages_sent, 1);
                            templates_ok.get_or_insert(true);
                        }
                    }
                    Err(e) => {
                        IpfixStats::add(&stats.send_errors, 1);
                        lost += m.flows as u64;
                        if m.has_templates {
                            templates_ok = Some(false);
                        }
                        first_error.get_or_insert(e);
                    }
                }
            });
        // UDP templates that did not go out are due again with the next message.
        if templates_ok == Some(true) {
            self.templates_at = Some(Instant::now());
        }
        if lost > 0 || first_error.is_some() {
            self.lose(lost, first_error);
        } else if let Some(ep) = self.losing.take_if(|ep| match self.link {
            Sink::Udp(_) => ep.last_error.elapsed() >= UDP_QUIET,
            Sink::Tcp(_) => true,
        }) {
            info!(
                "IPFIX collector {} reachable again; {} flow records were lost",
                self.cfg.destination, ep.lost
            );
        }
    }

    /// Counts lost records and logs once per episode of an unreachable collector.
    fn lose(&mut self, n: u64, err: Option<std::io::Error>) {
        IpfixStats::add(&self.stats.records_lost, n);
        if let Some(ep) = &mut self.losing {
            ep.lost += n;
            ep.last_error = Instant::now();
            return;
        }
        self.losing = Some(Episode {
            lost: n,
            last_error: Instant::now(),
        });
        let why = err
            .map(|e| e.to_string())
            .or_else(|| match &self.link {
                Sink::Tcp(t) => t.last_error.as_ref().map(|e| e.to_string()),
                Sink::Udp(_) => None,
            })
            .unwrap_or_else(|| "not connected".into());
        warn!(
            "IPFIX collector {} unreachable ({why}): losing flow records until it is back",
            self.cfg.destination
        );
    }
}
