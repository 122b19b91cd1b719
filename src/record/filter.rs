//! Subscriber filters: CIDRs, port ranges and the include/exclude selector a subscriber's records must pass.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use regex::Regex;

use crate::record::flow::{EndReason, FlowRecord};

/// A pattern that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

/// A name pattern: `/regex/` (anchored), a glob (`veth*`), or a literal name; `run
/// --interface` and the subscribers' `interface` and `unit` filters read the same grammar.
#[derive(Debug, Clone)]
pub enum NamePattern {
    Regex(Regex, String),
    Glob(glob::Pattern),
}

impl NamePattern {
    pub fn parse(s: &str) -> Result<NamePattern, PatternError> {
        let err = |reason: String| PatternError {
            pattern: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(err("empty pattern".into()));
        }
        if s.len() >= 2 && s.starts_with('/') && s.ends_with('/') {
            let re = Regex::new(&format!("^(?:{})$", &s[1..s.len() - 1]))
                .map_err(|e| err(e.to_string()))?;
            return Ok(NamePattern::Regex(re, s.to_owned()));
        }
        glob::Pattern::new(s)
            .map(NamePattern::Glob)
            .map_err(|e| err(e.to_string()))
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Regex(r, _) => r.is_match(name),
            NamePattern::Glob(g) => g.matches(name),
        }
    }

    /// A plain interface name, not a glob or regex.
    pub fn is_literal(&self) -> bool {
        match self {
            NamePattern::Regex(..) => false,
            NamePattern::Glob(g) => !g.as_str().contains(['*', '?', '[']),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        match self {
            NamePattern::Regex(_, s) => s,
            NamePattern::Glob(g) => g.as_str(),
        }
    }
}

impl PartialEq for NamePattern {
    fn eq(&self, other: &NamePattern) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for NamePattern {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("not an IP address")]
    Address,
    #[error("prefix length is not a number")]
    PrefixSyntax,
    #[error("prefix length {len} exceeds {max}")]
    PrefixTooLong { len: u32, max: u8 },
}

/// An address block; host bits are cleared on parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, CidrError> {
        let max = max_prefix(addr);
        if len > max {
            return Err(CidrError::PrefixTooLong {
                len: u32::from(len),
                max,
            });
        }
        Ok(Cidr {
            net: mask(addr, len),
            len,
        })
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.net.is_ipv4() && mask(addr, self.len) == self.net
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| CidrError::Address)?;
        let max = max_prefix(addr);
        let len = match len {
            None => max,
            Some(l) => {
                let l: u32 = l.trim().parse().map_err(|_| CidrError::PrefixSyntax)?;
                u8::try_from(l)
                    .ok()
                    .filter(|&l| l <= max)
                    .ok_or(CidrError::PrefixTooLong { len: l, max })?
            }
        };
        Cidr::new(addr, len)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// Inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

/// One filter: matches when every set field matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Client (initiator) address.
    pub src: Option<Cidr>,
    /// Server address.
    pub dst: Option<Cidr>,
    /// Either address.
    pub addr: Option<Cidr>,
    pub src_port: Option<PortRange>,
    pub dst_port: Option<PortRange>,
    pub port: Option<PortRange>,
    pub protocol: Option<u8>,
    pub ip_version: Option<u8>,
    /// Interface name, glob or /regex/.
    pub interface: Option<NamePattern>,
    /// Bits that must all appear in client_flags | server_flags.
    pub tcp_flags: Option<u8>,
    pub end_reason: Option<EndReason>,
    /// Minimum client.bytes + server.bytes.
    pub min_bytes: Option<u64>,
    /// Either side's systemd unit: a name, glob or /regex/.
    pub unit: Option<NamePattern>,
    /// Either side's cgroup is this path or below it (from the root, no trailing `/`).
    pub cgroup: Option<String>,
    /// Either side's local process.
    pub pid: Option<u32>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        fn opt<T>(f: &Option<T>, pred: impl FnOnce(&T) -> bool) -> bool {
            f.as_ref().is_none_or(pred)
        }
        opt(&self.src, |c| c.contains(r.client_addr))
            && opt(&self.dst, |c| c.contains(r.server_addr))
            && opt(&self.addr, |c| {
                c.contains(r.client_addr) || c.contains(r.server_addr)
            })
            && opt(&self.src_port, |p| p.contains(r.client_port))
            && opt(&self.dst_port, |p| p.contains(r.server_port))
            && opt(&self.port, |p| {
                p.contains(r.client_port) || p.contains(r.server_port)
            })
            && opt(&self.protocol, |&p| p == r.protocol)
            && opt(&self.ip_version, |&v| v == r.ip_version)
            && opt(&self.interface, |i| i.matches(&r.interface))
            && opt(&self.tcp_flags, |&want| {
                r.tcp
                    .as_ref()
                    .is_some_and(|t| (t.client_flags | t.server_flags) & want == want)
            })
            && opt(&self.end_reason, |&e| e == r.end_reason)
            && opt(&self.min_bytes, |&m| r.total_bytes() >= m)
            && opt(&self.unit, |u| {
                r.processes()
                    .any(|p| p.unit.as_deref().is_some_and(|n| u.matches(n)))
            })
            && opt(&self.cgroup, |c| r.processes().any(|p| p.in_cgroup(c)))
            && opt(&self.pid, |&pid| r.processes().any(|p| p.pid == Some(pid)))
    }
}

/// Which records a subscriber wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Any must match; empty means all records.
    pub include: Vec<Filter>,
    /// None may match.
    pub exclude: Vec<Filter>,
}

impl Selector {
    /// Number of filters, the cost of one `matches` at worst.
    pub fn len(&self) -> usize {
        self.include.len() + self.exclude.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        (self.include.is_empty() || self.include.iter().any(|f| f.matches(r)))
            && !self.exclude.iter().any(|f| f.matches(r))
    }
}

/// What a subscriber asks for: its filters and how much of the recent past to replay.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub selector: Selector,
    /// Replay at most this many recent matching records (0: no limit).
    pub replay: usize,
    /// Replay the matching records with `emitted >= since`.
    pub since: Option<SystemTime>,
    /// Replay the matching records numbered after this one (of run `run`).
    pub after_seq: Option<u64>,
    /// The run `after_seq` counts in; another run than the hub's: the agent restarted.
    pub run: Option<u64>,
    /// Stream new records after the replay.
    pub follow: bool,
    /// Remote address, for status.
    pub peer: String,
}

impl SubscribeOptions {
    pub fn wants_replay(&self) -> bool {
        self.replay > 0 || self.since.is_some() || self.after_seq.is_some()
    }
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            selector: Selector::default(),
            replay: 0,
            since: None,
            after_seq: None,
            run: None,
            follow: true,
            peer: String::new(),
        }
    }
}
