//! The kernel side: the BPF skeletons built from `src/bpf/`, loading and pinning the flow maps, attaching the programs, and the start-up checks of the host.
//!
//! Everything that talks to libbpf or the kernel's BPF and link APIs lives here, apart from
//! the poller's reads of the maps. It may import `status` (map usage) and nothing else of
//! the crate: the poller and everything downstream import from it, never the reverse.

pub mod attach;
pub mod bpf;
pub mod cgroup;
pub mod datapath;
pub mod packet;
pub mod preflight;
