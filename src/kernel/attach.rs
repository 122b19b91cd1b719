//! Attaches the flow programs to selected interfaces (TCX, or clsact TC on older kernels) and follows interfaces as they come and go.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use libbpf_rs::{TcHook, TcHookBuilder, TC_EGRESS, TC_INGRESS};
use log::{debug, info, warn};
use thiserror::Error;

use crate::kernel::datapath::Datapath;

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("invalid interface pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("listing network interfaces: {0}")]
    List(#[source] std::io::Error),
    #[error("attaching to {iface} (ifindex {ifindex}) with {mode}: {source}")]
    Attach {
        iface: String,
        ifindex: u32,
        mode: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("link pin directory {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Untrusted(#[from] crate::kernel::preflight::PreflightError),
    #[error("duplicating a program fd: {0}")]
    Fd(#[source] std::io::Error),
}

/// An interface name pattern, as `--interface` takes it: the same grammar filters use.
pub use crate::record::filter::NamePattern as Pattern;

impl From<crate::record::filter::PatternError> for AttachError {
    fn from(e: crate::record::filter::PatternError) -> AttachError {
        AttachError::Pattern {
            pattern: e.pattern,
            reason: e.reason,
        }
    }
}

/// Which interfaces to attach to.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Empty: every interface that is up, except loopback.
    pub include: Vec<Pattern>,
    pub exclude: Vec<Pattern>,
}

impl Selector {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Selector, AttachError> {
        Ok(Selector {
            include: include
                .iter()
                .map(|s| Pattern::parse(s))
                .collect::<Result<_, _>>()?,
            exclude: exclude
                .iter()
                .map(|s| Pattern::parse(s))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn wants(&self, iface: &Interface) -> bool {
        if self.exclude.iter().any(|p| p.matches(&iface.name)) {
            return false;
        }
        if self.include.is_empty() {
            return iface.up && !iface.loopback;
        }
        self.include.iter().any(|p| p.matches(&iface.name))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub up: bool,
    pub loopback: bool,
}

/// Interfaces of the calling thread's network namespace, by ifindex.
///
/// Uses if_nameindex(3) and SIOCGIFFLAGS rather than /sys/class/net,
/// which shows the namespace sysfs was mounted in, not the caller's.
pub fn list_interfaces() -> Result<BTreeMap<u32, Interface>, AttachError> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(AttachError::List(std::io::Error::last_os_error()));
    }
    // SAFETY: sock is a fresh, valid fd.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: if_nameindex returns a NULL-terminated array or NULL.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(AttachError::List(std::io::Error::last_os_error()));
    }
    let mut out = BTreeMap::new();
    let mut i = 0;
    loop {
        // SAFETY: within the array, which ends with a zeroed entry.
        let e = unsafe { &*list.add(i) };
        if e.if_index == 0 || e.if_name.is_null() {
            break;
        }
        i += 1;
        // SAFETY: if_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(e.if_name) };
        // SAFETY: ifreq is plain data; zero is a valid start.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.to_bytes();
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(bytes.iter().take(libc::IF_NAMESIZE - 1))
        {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads ifr_name and writes ifr_flags.
        let flags = if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } == 0 {
            // SAFETY: the union member the ioctl filled.
            i32::from(unsafe { req.ifr_ifru.ifru_flags })
        } else {
            // removed while we looked: skip it
            continue;
        };
        out.insert(
            e.if_index,
            Interface {
                name: name.to_string_lossy().into_owned(),
                ifindex: e.if_index,
                up: flags & libc::IFF_UP != 0,
                loopback: flags & libc::IFF_LOOPBACK != 0,
            },
        );
    }
    // SAFETY: list came from if_nameindex and is freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(out)
}

/// Attachment mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TCX links (kernel >= 6.6), falling back to TC.
    Auto,
    Tcx,
    Tc,
}

/// What is attached to one interface. Loopback gets egress only: every
/// packet on it passes egress and then ingress of the same device, and
/// would otherwise be counted twice in one flow.
enum Hooks {
    /// Link fds: closing them detaches (once their pins are gone too).
    Tcx {
        _ingress: Option<OwnedFd>,
        _egress: OwnedFd,
        pins: Vec<PathBuf>,
    },
    Tc {
        ingress: Option<TcHook>,
        egress: TcHook,
    },
}

impl Hooks {
    fn kind(&self) -> &'static str {
        match self {
            Hooks::Tcx { .. } => "tcx",
            Hooks::Tc { .. } => "tc",
        }
    }
}

struct Attachment {
    name: String,
    hooks: Hooks,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        match &mut self.hooks {
            // Filters outlive the process unless removed; a vanished
            // interface took them with it, so errors are expected then.
            Hooks::Tc { ingress, egress } => {
                if let Some(i) = ingress {
                    let _ = i.detach();
                }
                let _ = egress.detach();
            }
            // A pinned link stays attached until its pin goes as well.
            Hooks::Tcx { pins, .. } => {
                for p in pins {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

/// Interface names by ifindex, as the attacher saw them in its namespace.
/// Shared with the poller, which may run in another namespace (tests) and
/// must name flows of interfaces that are already gone.
pub type IfNames = Arc<RwLock<HashMap<u32, String>>>;

/// Owned fds of the two programs, so attaching can happen on any thread
/// (for instance one that entered another network namespace).
pub struct ProgramFds {
    pub ingress: OwnedFd,
    pub egress: OwnedFd,
}

impl ProgramFds {
    pub fn of(dp: &Datapath) -> Result<ProgramFds, AttachError> {
        let dup =
            |p: &libbpf_rs::ProgramMut<'_>| p.as_fd().try_clone_to_owned().map_err(AttachError::Fd);
        Ok(ProgramFds {
            ingress: dup(dp.ingress())?,
            egress: dup(dp.egress())?,
        })
    }
}

/// Opens a pinned link and points it at `prog`; None (and the pin removed) when that fails.
fn take_over_link(pin: &Path, prog: &OwnedFd) -> Option<OwnedFd> {
    if !pin.exists() {
        return None;
    }
    let c = CString::new(pin.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: valid C string path.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    let fd = if fd >= 0 {
        // SAFETY: the kernel just handed us this fd.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    } else {
        None
    };
    // SAFETY: valid link and program fds; null opts are allowed.
    let updated = fd
        .as_ref()
        .is_some_and(|l| unsafe { libbpf_sys::bpf_link_update(l.as_raw_fd(), prog.as_raw_fd(), std::ptr::null()) } == 0);
    if updated {
        return fd;
    }
    warn!(
        "dropping pinned link {} that could not be taken over",
        pin.display()
    );
    let _ = fs::remove_file(pin);
    None
}

fn pin_fd(fd: &OwnedFd, path: &Path) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: valid fd and C string path.
    let r = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
    if r < 0 {
        return Err(std::io::Error::from_raw_os_error(-r));
    }
    Ok(())
}

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub failed: Vec<String>,
}

/// Keeps the programs attached to exactly the selected interfaces.
pub struct Attacher {
    ingress: OwnedFd,
    egress: OwnedFd,
    mode: Mode,
    attached: HashMap<u32, Attachment>,
    names: IfNames,
    /// Where TCX links are pinned, so they stay attached (and keep counting
    /// into the pinned maps) while the agent restarts after a crash.
    link_dir: Option<PathBuf>,
    /// Pins a previous agent left for interfaces we did not take over are
    /// removed once, after the first sync; our own go with their attachment.
    stale_pins_swept: bool,
    /// TCX proved unavailable: stop trying it.
    tcx_unsupported: bool,
    /// Interfaces whose attachment failed at the last sync: retried every sync, warned
    /// about once until they attach.
    failing: HashSet<u32>,
}

/// TC filter priority and handle used for our clsact filters.
const TC_PRIORITY: u32 = 1;
const TC_HANDLE: u32 = 0xf10e;

impl Attacher {
    pub fn new(progs: ProgramFds, mode: Mode, names: IfNames) -> Attacher {
        Attacher {
            ingress: progs.ingress,
            egress: progs.egress,
            mode,
            attached: HashMap::new(),
            names,
            link_dir: None,
            stale_pins_swept: false,
            tcx_unsupported: false,
            failing: HashSet::new(),
        }
    }

    /// Pins TCX links under `dir` and takes over links a previous agent pinned there
    /// (once everything in it is checked to be root's alone).
    pub fn pin_links(&mut self, dir: PathBuf) -> Result<(), AttachError> {
        crate::kernel::preflight::make_pin_dir(&dir)?;
        self.link_dir = Some(dir);
        Ok(())
    }

    /// Removes link pins of interfaces we do not attach to (gone, or deselected).
    fn sweep_link_pins(&self) {
        let Some(dir) = &self.link_dir else { return };
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ifindex = name.split('-').next().and_then(|i| i.parse::<u32>().ok());
            if ifindex.is_none_or(|i| !self.attached.contains_key(&i)) {
                info!("removing stale link pin {}", e.path().display());
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Each interface attached to: (ifindex, name, "tcx" or "tc"), by ifindex.
    pub fn attached(&self) -> Vec<(u32, String, &'static str)> {
        let mut v: Vec<_> = self
            .attached
            .iter()
            .map(|(i, a)| (*i, a.name.clone(), a.hooks.kind()))
            .collect();
        v.sort();
        v
    }

    /// Attaches to newly selected interfaces and drops those gone or deselected.
    pub fn sync(&mut self, sel: &Selector) -> Result<SyncReport, AttachError> {
        let ifaces = list_interfaces()?;
        self.failing.retain(|i| ifaces.contains_key(i));
        let mut report = SyncReport::default();
        let gone: Vec<u32> = self
            .attached
            .iter()
            .filter(|(i, a)| {
                ifaces
                    .get(i)
                    .is_none_or(|f| f.name != a.name || !sel.wants(f))
            })
            .map(|(i, _)| *i)
            .collect();
        for i in gone {
            if let Some(a) = self.attached.remove(&i) {
                info!("detached from {} (ifindex {i})", a.name);
                report.detached.push(a.name.clone());
            }
        }
        for iface in ifaces.values() {
            if self.attached.contains_key(&iface.ifindex) || !sel.wants(iface) {
                continue;
            }
            match self.attach(iface) {
                Ok(a) => {
                    let how = match a.hooks {
                        Hooks::Tcx { .. } => "TCX",
                        Hooks::Tc { .. } => "TC clsact",
                    };
                    info!(
                        "attached to {} (ifindex {}) with {how}",
                        iface.name, iface.ifindex
                    );
                    self.failing.remove(&iface.ifindex);
                    report.attached.push(iface.name.clone());
                    self.names
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(iface.ifindex, iface.name.clone());
                    self.attached.insert(iface.ifindex, a);
                }
                Err(e) => {
                    if self.failing.insert(iface.ifindex) {
                        warn!("{e} (retried every sync; said again when it works)");
                    } else {
                        debug!("{e}");
                    }
                    report.failed.push(iface.name.clone());
                }
            }
        }
        if !self.stale_pins_swept {
            self.sweep_link_pins();
            self.stale_pins_swept = true;
        }
        Ok(report)
    }

    fn attach(&mut self, iface: &Interface) -> Result<Attachment, AttachError> {
        let use_tcx =
            matches!(self.mode, Mode::Tcx) || (self.mode == Mode::Auto && !self.tcx_unsupported);
        if use_tcx {
            match self.attach_tcx(iface) {
                Ok(a) => return Ok(a),
                Err(AttachError::Attach { source, .. })
                    if self.mode == Mode::Auto
                        && matches!(
                            source.raw_os_error(),
                            Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
                        ) =>
                {
                    info!("TCX unavailable ({source}); using TC clsact");
                    self.tcx_unsupported = true;
                }
                Err(e) => return Err(e),
            }
        }
        self.attach_tc(iface)
    }

    fn attach_tcx(&self, iface: &Interface) -> Result<Attachment, AttachError> {
        let err = |source: std::io::Error| AttachError::Attach {
            iface: iface.name.clone(),
            ifindex: iface.ifindex,
            mode: "TCX",
            source,
        };
        let mut pins = Vec::new();
        let mut link = |prog: &OwnedFd, ty: libbpf_sys::bpf_attach_type, dir: &str| {
            let pin = self
                .link_dir
                .as_ref()
                .map(|d| d.join(format!("{}-{dir}", iface.ifindex)));
            if let Some(fd) = pin.as_deref().and_then(|p| take_over_link(p, prog)) {
                info!("{} {dir}: took over the pinned TCX link", iface.name);
                pins.extend(pin);
                return Ok(fd);
            }
            // SAFETY: valid program fd; null opts are allowed.
            let fd = unsafe {
                libbpf_sys::bpf_link_create(
                    prog.as_raw_fd(),
                    iface.ifindex as i32,
                    ty,
                    std::ptr::null(),
                )
            };
            if fd < 0 {
                return Err(err(std::io::Error::from_raw_os_error(-fd)));
            }
            // SAFETY: the kernel just handed us this fd.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Some(p) = pin {
                match pin_fd(&fd, &p) {
                    Ok(()) => pins.push(p),
                    Err(e) => warn!(
                        "pinning the TCX link at {}: {e} (it will not survive a crash)",
                        p.display()
                    ),
                }
            }
            Ok(fd)
        };
        let ingress = if iface.loopback {
            None
        } else {
            Some(link(&self.ingress, libbpf_sys::BPF_TCX_INGRESS, "ingress")?)
        };
        let egress = link(&self.egress, libbpf_sys::BPF_TCX_EGRESS, "egress")?;
        Ok(Attachment {
            name: iface.name.clone(),
            hooks: Hooks::Tcx {
                _ingress: ingress,
                _egress: egress,
                pins,
            },
        })
    }

    fn attach_tc(&self, iface: &Interface) -> Result<Attachment, AttachError> {
        let err = |source: libbpf_rs::Error| AttachError::Attach {
            iface: iface.name.clone(),
            ifindex: iface.ifindex,
            mode: "TC clsact",
            source: std::io::Error::other(source),
        };
        let hook = |prog: &OwnedFd, point| {
            let mut h = TcHookBuilder::new(prog.as_fd())
                .ifindex(iface.ifindex as i32)
                .replace(true)
                .handle(TC_HANDLE)
                .priority(TC_PRIORITY)
                .hook(point);
            // The clsact qdisc may exist already (ours from before, or another tool's).
            if let Err(e) = h.create() {
                if e.kind() != libbpf_rs::ErrorKind::AlreadyExists {
                    return Err(err(e));
                }
            }
            h.attach().map_err(err)?;
            Ok(h)
        };
        let ingress = if iface.loopback {
            None
        } else {
            Some(hook(&self.ingress, TC_INGRESS)?)
        };
        let egress = match hook(&self.egress, TC_EGRESS) {
            Ok(h) => h,
            Err(e) => {
                if let Some(mut i) = ingress {
                    let _ = i.detach();
                }
                return Err(e);
            }
        };
        Ok(Attachment {
            name: iface.name.clone(),
            hooks: Hooks::Tc { ingress, egress },
        })
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) {
        for (i, a) in self.attached.drain() {
            info!("detached from {} (ifindex {i})", a.name);
        }
    }
}

impl Drop for Attacher {
    fn drop(&mut self) {
        self.detach_all();
    }
}
