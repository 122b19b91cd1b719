//! An in-memory `FlowTable`: the maps as plain collections, so the poller's lifecycle rules run without a kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::decode::{addr_key, ext_id, key_bytes, meta, owner_key, ExtKind, KeyBytes, RawFlow};
use super::scan::{
    due, ended_of, is_closed, is_tcp_flow, mark_reported, may_evict, take_identity, take_need,
    wants_identity, ScanKind, ScanSummary,
};
use super::table::{join, ExtMap, FlowSink, FlowTable, Joined};
use super::PollError;
use crate::kernel::bpf::types;
use crate::record::flow::{EndReason, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP};

/// Connections the memory of ended connections (`ended`) keeps, as the kernel's.
pub const ENDED_CAPACITY: usize = crate::kernel::datapath::ENDED_CONNECTIONS as usize;

/// The three flow maps, keyed like the kernel's. Tests put entries in, poll, and look at
/// what is left.
#[derive(Debug, Default)]
pub struct MemTable {
    pub base: BTreeMap<KeyBytes, (types::flow_key, types::flow_base)>,
    /// Extension entries by the id their base entry holds.
    pub tcp: BTreeMap<u64, types::flow_tcp>,
    pub icmp: BTreeMap<u64, types::flow_icmp>,
    /// Owners of flows' local ends, by `owner_key`.
    pub owner: BTreeMap<u64, types::flow_owner>,
    /// The last extension id handed out.
    last_id: u64,
    pub capacity: [u64; 3],
    pub counters: BTreeMap<String, u64>,
    /// The memory of ended connections, with when each was last used: the least
    /// recently used goes first when it is full, as in the kernel's LRU map.
    pub ended: BTreeMap<KeyBytes, (types::flow_ended, u64)>,
    uses: u64,
    /// The time of the latest full scan (`last_scan`).
    pub last_scan: Option<u64>,
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
        // As the datapath does: the base says which protocol part it carries, and the
        // id of the extension entry, when the flow has one.
        let fragment = key.flags & types::flow_key_flags::KEY_FRAGMENT.0 as u8 != 0;
        let ext = match key.proto {
            // A fragment flow has no transport header to keep state from.
            _ if fragment => 0,
            IPPROTO_TCP => types::flow_ext::EXT_TCP.0,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => types::flow_ext::EXT_ICMP.0,
            _ => 0,
        };
        base.meta = (base.meta & !meta::EXT) | ext << meta::EXT_SHIFT;
        if tcp.is_some() || icmp.is_some() {
            self.last_id += 1;
            base.ext_id = self.last_id;
        }
        if let Some(t) = tcp {
            self.tcp.insert(base.ext_id, t);
        }
        if let Some(i) = icmp {
            self.icmp.insert(base.ext_id, i);
        }
        self.base.insert(kb, (key, base));
        kb
    }

    /// Gives a flow's key endpoint `end` (0: addr_lo, 1: addr_hi) an owner, as the
    /// datapath does at its first packet (with an ext_id when it has none).
    pub fn put_owner(&mut self, kb: &KeyBytes, end: usize, owner: types::flow_owner) {
        let Some((_, b)) = self.base.get_mut(kb) else {
            return;
        };
        if b.ext_id == 0 {
            self.last_id += 1;
            b.ext_id = self.last_id;
        }
        self.owner.insert(owner_key(b.ext_id, end), owner);
    }

    /// The owners a flow's local ends have, by key endpoint.
    fn owners(&self, b: &types::flow_base) -> [Option<types::flow_owner>; 2] {
        if b.ext_id == 0 {
            return [None, None];
        }
        [0, 1].map(|end| self.owner.get(&owner_key(b.ext_id, end)).copied())
    }

    /// Changes the TCP state a flow's base entry holds.
    pub fn set_tcp_hot(&mut self, kb: &KeyBytes, f: impl FnOnce(&mut types::tcp_hot)) {
        if let Some(b) = self.base_mut(kb) {
            // SAFETY: both union arms are plain integers; every bit pattern is valid.
            let mut hot = unsafe { b.l4.tcp };
            f(&mut hot);
            b.l4.tcp = hot;
        }
    }

    /// The base entry of a flow, to change its counters between polls.
    pub fn base_mut(&mut self, kb: &KeyBytes) -> Option<&mut types::flow_base> {
        self.base.get_mut(kb).map(|(_, b)| b)
    }

    /// Takes a flow out of every map, as the scan does.
    fn take(&mut self, kb: &KeyBytes) -> Option<RawFlow> {
        let (key, base) = self.base.remove(kb)?;
        let tcp = ext_id(&base, ExtKind::Tcp).and_then(|id| self.tcp.remove(&id));
        let icmp = ext_id(&base, ExtKind::Icmp).and_then(|id| self.icmp.remove(&id));
        let owner = self.owners(&base);
        if base.ext_id != 0 {
            for end in 0..2 {
                self.owner.remove(&owner_key(base.ext_id, end));
            }
        }
        Some(RawFlow {
            key,
            base,
            tcp,
            icmp,
            owner,
        })
    }

    pub fn entries(&self) -> [usize; 3] {
        [self.base.len(), self.tcp.len(), self.icmp.len()]
    }

    /// Remembers an ended connection, forgetting the least recently used when full.
    fn remember(&mut self, kb: KeyBytes, e: types::flow_ended) {
        if !self.ended.contains_key(&kb) && self.ended.len() >= ENDED_CAPACITY {
            let oldest = self.ended.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(k) = oldest.map(|(k, _)| *k) {
                self.ended.remove(&k);
            }
        }
        self.uses += 1;
        self.ended.insert(kb, (e, self.uses));
    }

    /// `scan_identify` of scan.h: a TCP flow about to get a record takes back the identity
    /// of the connection it resumes, once.
    fn identify(&mut self, kb: &KeyBytes, active_ns: u64) {
        let Some((_, b)) = self.base.get_mut(kb) else {
            return;
        };
        if !wants_identity(b) {
            b.meta |= meta::IDENTIFIED;
            return;
        }
        b.meta |= meta::IDENTIFIED;
        if let Some((e, _)) = self.ended.remove(kb) {
            take_identity(b, &e, active_ns);
        }
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
        let joined = join(
            self.base.values().copied(),
            self.tcp.iter().map(|(k, v)| (*k, *v)).collect(),
            self.icmp.iter().map(|(k, v)| (*k, *v)).collect(),
            self.owner.iter().map(|(k, v)| (*k, *v)).collect(),
        );
        Ok(joined)
    }

    fn scan(
        &mut self,
        args: &types::scan_args,
        _threads: u32,
        sink: &mut FlowSink<'_>,
    ) -> Result<ScanSummary, PollError> {
        let mut a = *args;
        if a.evict_age_ns != 0 {
            let n = self.entries();
            a.evict_need = std::array::from_fn(|i| (n[i] as u64).saturating_sub(a.evict_keep[i]));
        }
        let mut picked: Vec<(KeyBytes, ScanKind)> = Vec::new();
        for (kb, (key, base)) in &self.base {
            // Every closed flow stands for one the datapath noted.
            if a.closing_only != 0 && !is_closed(base) {
                continue;
            }
            if let Some(kind) = due(key, base, &a) {
                picked.push((*kb, kind));
            } else if may_evict(base, &a) {
                let tcp = ext_id(base, ExtKind::Tcp).is_some_and(|id| self.tcp.contains_key(&id));
                let icmp =
                    ext_id(base, ExtKind::Icmp).is_some_and(|id| self.icmp.contains_key(&id));
                if take_need(&mut a, tcp, icmp) {
                    picked.push((*kb, ScanKind::Ended(EndReason::Evicted)));
                }
            }
        }
        let mut flows = Vec::with_capacity(picked.len());
        for (kb, kind) in picked {
            let (key, base) = &self.base[&kb];
            if kind != ScanKind::Ended(EndReason::Evicted) && is_tcp_flow(key, base) {
                self.identify(&kb, a.active_ns);
            }
            if kind != ScanKind::Active {
                let Some(f) = self.take(&kb) else {
                    continue;
                };
                if kind == ScanKind::Ended(EndReason::IdleTimeout) && f.key.proto == IPPROTO_TCP {
                    if let Some(e) = ended_of(&f.base, a.now_ns) {
                        self.remember(kb, e);
                    }
                }
                flows.push((kind, f));
                continue;
            }
            let Some((key, base)) = self.base.get(&kb).copied() else {
                continue;
            };
            flows.push((
                kind,
                RawFlow {
                    key,
                    base,
                    tcp: ext_id(&base, ExtKind::Tcp).and_then(|id| self.tcp.get(&id).copied()),
                    icmp: ext_id(&base, ExtKind::Icmp).and_then(|id| self.icmp.get(&id).copied()),
                    owner: self.owners(&base),
                },
            ));
            let Some(base) = self.base_mut(&kb) else {
                continue;
            };
            // What the record carries is gone from the entry.
            base.packets = [0, 0];
            base.bytes = [0, 0];
            mark_reported(base, a.now_ns, a.active_ns);
        }
        if a.closing_only == 0 && a.flush == 0 {
            self.last_scan = Some(a.now_ns);
        }
        // In batches, as the kernel's records come off its ring.
        let mut flows = flows.into_iter().peekable();
        while flows.peek().is_some() {
            sink(flows.by_ref().take(super::OUT_BATCH).collect())?;
        }
        Ok(ScanSummary {
            entries: self.entries().map(|n| n as u64),
            evict_left: a.evict_need,
            passes: 1,
            split: false,
            probation: None,
        })
    }

    fn last_scan(&self) -> Option<u64> {
        self.last_scan
    }

    fn remove_orphan(&mut self, ext: ExtMap, id: u64) -> Result<bool, PollError> {
        Ok(match ext {
            ExtMap::Tcp => self.tcp.remove(&id).is_some(),
            ExtMap::Icmp => self.icmp.remove(&id).is_some(),
            ExtMap::Owner => self.owner.remove(&id).is_some(),
        })
    }

    fn capacities(&self) -> [u64; 3] {
        self.capacity
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.counters.clone()
    }
}
