//! Startup checks that turn a kernel or privilege problem into one clear sentence before anything is loaded.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "this kernel exposes no BTF ({0} is missing): flowlens needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.15 or newer)"
    )]
    NoBtf(&'static str),
    #[error(
        "missing capabilities: {missing} (have CapEff={have:#x}); run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (see deploy/flowlens.service)"
    )]
    Capabilities { missing: String, have: u64 },
    #[error("{path} is not on a BPF filesystem and mounting one failed ({source}); mount it with `mount -t bpf bpf /sys/fs/bpf`, or pass --pin-dir off")]
    NoBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another flowlens already uses the pinned maps in {0}; stop it, or give this one another --pin-dir")]
    Busy(PathBuf),
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_ROOT: &str = "/sys/fs/bpf";

pub fn check_btf() -> Result<(), PreflightError> {
    if Path::new(BTF_PATH).exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf(BTF_PATH))
    }
}

/// Effective capability set of this process.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// CAP_BPF and CAP_PERFMON may be stood in for by CAP_SYS_ADMIN (as older kernels require).
pub fn check_capabilities() -> Result<(), PreflightError> {
    let have = effective_caps();
    let has = |c: u32| have & (1u64 << c) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities {
            missing: missing.join(", "),
            have,
        })
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; c is a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `pin_root` can hold pins: it must sit on a bpffs, mounting
/// the standard one at /sys/fs/bpf when it is missing.
pub fn ensure_bpffs(pin_root: &Path) -> Result<(), PreflightError> {
    let mut probe = pin_root.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    if pin_root.starts_with(BPFFS_ROOT) {
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: valid C strings; no mount data.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r == 0 && is_bpffs(Path::new(BPFFS_ROOT)) {
            log::info!("mounted a BPF filesystem at {BPFFS_ROOT}");
            return Ok(());
        }
        return Err(PreflightError::NoBpffs {
            path: pin_root.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Err(PreflightError::NoBpffs {
        path: pin_root.to_path_buf(),
        source: std::io::Error::other("not a BPF filesystem"),
    })
}

/// Held for the agent's life: one agent per pin directory.
pub struct PinLock {
    _dir: File,
}

/// Creates `pin_root` and takes an exclusive lock on it.
pub fn lock_pin_root(pin_root: &Path) -> Result<PinLock, PreflightError> {
    std::fs::create_dir_all(pin_root).map_err(|source| PreflightError::PinDir {
        path: pin_root.to_path_buf(),
        source,
    })?;
    let dir = File::open(pin_root).map_err(|source| PreflightError::PinDir {
        path: pin_root.to_path_buf(),
        source,
    })?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(PreflightError::Busy(pin_root.to_path_buf()));
        }
        // a filesystem without flock: carry on unlocked
        log::debug!("flock on {}: {e}", pin_root.display());
    }
    Ok(PinLock { _dir: dir })
}
