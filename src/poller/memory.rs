//! An in-memory `FlowTable`: the maps as plain collections, so the poller's lifecycle rules run without a kernel.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::decode::{addr_key, key_bytes, KeyBytes, RawFlow};
use super::table::{ExtMap, FlowTable, Joined};
use super::PollError;
use crate::bpf::types;

/// The three flow maps, keyed like the kernel's. Tests put entries in, poll, and look at
/// what is left.
#[derive(Debug, Default)]
pub struct MemTable {
    pub base: BTreeMap<KeyBytes, (types::flow_key, types::flow_base)>,
    pub tcp: BTreeMap<KeyBytes, types::flow_tcp>,
    pub icmp: BTreeMap<KeyBytes, types::flow_icmp>,
    pub capacity: [u64; 3],
    pub counters: BTreeMap<String, u64>,
}

impl MemTable {
    pub fn new(capacity: [u64; 3]) -> MemTable {
        MemTable {
            capacity,
            ..MemTable::default()
        }
    }

    /// Inserts (or replaces) a flow and its extensions, as the datapath would have.
    pub fn put(
        &mut self,
        key: types::flow_key,
        base: types::flow_base,
        tcp: Option<types::flow_tcp>,
        icmp: Option<types::flow_icmp>,
    ) -> KeyBytes {
        let kb = key_bytes(&key);
        let mut base = base;
        // The datapath names the extension a flow has in its base entry.
        if tcp.is_some() {
            base.ext |= types::flow_ext::EXT_TCP.0 as u8;
        }
        if icmp.is_some() {
            base.ext |= types::flow_ext::EXT_ICMP.0 as u8;
        }
        self.base.insert(kb, (key, base));
        if let Some(t) = tcp {
            self.tcp.insert(kb, t);
        }
        if let Some(i) = icmp {
            self.icmp.insert(kb, i);
        }
        kb
    }

    /// The base entry of a flow, to change its counters between polls.
    pub fn base_mut(&mut self, kb: &KeyBytes) -> Option<&mut types::flow_base> {
        self.base.get_mut(kb).map(|(_, b)| b)
    }

    pub fn entries(&self) -> [usize; 3] {
        [self.base.len(), self.tcp.len(), self.icmp.len()]
    }
}

/// A key as the datapath builds it: addresses ordered low/high, ports following them.
pub fn flow_key(
    proto: u8,
    a: (IpAddr, u16),
    b: (IpAddr, u16),
    ifindex: u32,
) -> (types::flow_key, bool) {
    let (ka, kb) = (addr_key(a.0), addr_key(b.0));
    let a_is_lo = (ka, a.1) <= (kb, b.1);
    let (lo, hi) = if a_is_lo { (a, b) } else { (b, a) };
    let key = types::flow_key {
        addr_lo: addr_key(lo.0),
        addr_hi: addr_key(hi.0),
        port_lo: lo.1,
        port_hi: hi.1,
        ifindex,
        proto,
        ip_version: if a.0.is_ipv4() { 4 } else { 6 },
        ..Default::default()
    };
    (key, a_is_lo)
}

impl FlowTable for MemTable {
    fn read(&mut self) -> Result<Joined, PollError> {
        let mut tcp: HashMap<KeyBytes, types::flow_tcp> =
            self.tcp.iter().map(|(k, v)| (*k, *v)).collect();
        let mut icmp: HashMap<KeyBytes, types::flow_icmp> =
            self.icmp.iter().map(|(k, v)| (*k, *v)).collect();
        let entries = [self.base.len() as u64, tcp.len() as u64, icmp.len() as u64];
        let flows = self
            .base
            .iter()
            .map(|(kb, (key, base))| RawFlow {
                key: *key,
                base: *base,
                tcp: tcp.remove(kb),
                icmp: icmp.remove(kb),
            })
            .collect();
        let unjoined = tcp
            .into_keys()
            .map(|k| (ExtMap::Tcp, k))
            .chain(icmp.into_keys().map(|k| (ExtMap::Icmp, k)))
            .collect();
        Ok(Joined {
            flows,
            entries,
            unjoined,
        })
    }

    fn take(&mut self, kb: &KeyBytes) -> Result<Option<RawFlow>, PollError> {
        let Some((key, base)) = self.base.remove(kb) else {
            return Ok(None);
        };
        let has = |e: types::flow_ext| u32::from(base.ext) & e.0 != 0;
        let tcp = if has(types::flow_ext::EXT_TCP) {
            self.tcp.remove(kb)
        } else {
            None
        };
        let icmp = if has(types::flow_ext::EXT_ICMP) {
            self.icmp.remove(kb)
        } else {
            None
        };
        Ok(Some(RawFlow {
            key,
            base,
            tcp,
            icmp,
        }))
    }

    fn remove_orphan(&mut self, ext: ExtMap, kb: &KeyBytes) -> Result<bool, PollError> {
        if self.base.contains_key(kb) {
            return Ok(false);
        }
        Ok(match ext {
            ExtMap::Tcp => self.tcp.remove(kb).is_some(),
            ExtMap::Icmp => self.icmp.remove(kb).is_some(),
        })
    }

    fn capacities(&self) -> [u64; 3] {
        self.capacity
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.counters.clone()
    }
}
