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
    #[error("--pin-dir {path}: no BPF filesystem is mounted at /sys/fs/bpf and mounting one failed ({source}); mount it (`mount -t bpf bpf /sys/fs/bpf`), or pass --pin-dir off")]
    NoBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--pin-dir {path} is not on a BPF filesystem: use a directory under /sys/fs/bpf (mounted when missing), mount one where you want it (`mount -t bpf bpf DIR`), or pass --pin-dir off")]
    NotBpffs { path: PathBuf },
    #[error("another flowlens already uses the pinned maps in {0}; stop it, or give this one another --pin-dir")]
    Busy(PathBuf),
    #[error("pin directory {path}: {problem}: another user could take over or move the agent's pins; {fix}, or pass another --pin-dir")]
    Untrusted {
        path: PathBuf,
        problem: String,
        fix: String,
    },
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

/// Whether this process may mount file systems (CAP_SYS_ADMIN).
pub fn has_sys_admin() -> bool {
    effective_caps() & (1u64 << CAP_SYS_ADMIN) != 0
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
        // Root only, as systemd mounts it: a bare `mount -t bpf` gives 1777.
        let data = c"mode=0700";
        // SAFETY: valid C strings; the data string outlives the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if r == 0 && is_bpffs(Path::new(BPFFS_ROOT)) {
            if private_mount_namespace() {
                log::warn!(
                    "mounted a BPF filesystem at {BPFFS_ROOT} in this process's own mount \
                     namespace (as `ip netns exec` gives it): the pins under {} vanish when \
                     the agent exits, so a restarted agent cannot take its flows over; run it \
                     in the host's mount namespace (e.g. `nsenter --net=/run/netns/NAME`) \
                     or pass --pin-dir off",
                    pin_root.display()
                );
            } else {
                log::info!("mounted a BPF filesystem at {BPFFS_ROOT}");
            }
            return Ok(());
        }
        return Err(PreflightError::NoBpffs {
            path: pin_root.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Err(PreflightError::NotBpffs {
        path: pin_root.to_path_buf(),
    })
}

/// Whether this process runs in a mount namespace of its own rather than init's: a bpffs
/// it mounts there is gone when the namespace is (`ip netns exec` makes one per command).
fn private_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    match (ns("self"), ns("1")) {
        (Some(me), Some(init)) => me != init,
        _ => false,
    }
}

/// Whether `pin_root` can be on a bpffs without loading anything: it is on one already,
/// or it is under /sys/fs/bpf, which `ensure_bpffs` mounts when missing.
pub fn check_bpffs(pin_root: &Path) -> Result<(), PreflightError> {
    let mut probe = pin_root.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) || pin_root.starts_with(BPFFS_ROOT) {
        Ok(())
    } else {
        Err(PreflightError::NotBpffs {
            path: pin_root.to_path_buf(),
        })
    }
}

/// Held for the agent's life: one agent per pin directory.
pub struct PinLock {
    _dir: File,
}

/// Refuses a pin directory another user could control: it, and each of its parents on
/// the BPF filesystem, must be a directory owned by root that nobody else can write to. A
/// parent may be world-writable with the sticky bit (a fresh bpffs is 1777): there nobody
/// can rename or remove root's entries. `pin_root` itself may not be, since the agent
/// creates entries in it; nor may anything under it ([`check_pin_tree`]). Paths that do
/// not exist yet are skipped.
pub fn check_pin_dir(pin_root: &Path) -> Result<(), PreflightError> {
    check_pin_parents(pin_root)?;
    check_pin_tree(pin_root)
}

/// Directories nested deeper than this under the pin root are refused: flowlens makes two
/// levels (`v<layout>/links/`).
const MAX_PIN_DEPTH: usize = 8;

/// Refuses anything under `dir` (and `dir` itself) that another user could have put there
/// or could change: every directory and pinned object must be root's and not writable by
/// group or others, and none may be a symlink. Whatever lives there is checked, not a
/// list of names, so pins that later versions add are covered too. A missing `dir` is fine.
pub fn check_pin_tree(dir: &Path) -> Result<(), PreflightError> {
    check_tree(dir, 0)
}

fn check_tree(path: &Path, depth: usize) -> Result<(), PreflightError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PreflightError::PinDir {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let untrusted = |problem: String, fix: String| PreflightError::Untrusted {
        path: path.to_path_buf(),
        problem,
        fix,
    };
    let remove = || format!("remove it (`rm -r {}`)", path.display());
    if meta.file_type().is_symlink() {
        return Err(untrusted("is a symlink".into(), remove()));
    }
    if meta.uid() != 0 {
        return Err(untrusted(
            format!("is owned by uid {}, not root", meta.uid()),
            remove(),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(untrusted(
            format!("is writable by group or others (mode {mode:04o})"),
            format!("`chmod go-w {}`", path.display()),
        ));
    }
    if !meta.is_dir() {
        return Ok(());
    }
    if depth >= MAX_PIN_DEPTH {
        return Err(untrusted(
            format!("is nested more than {MAX_PIN_DEPTH} directories deep"),
            remove(),
        ));
    }
    let entries = std::fs::read_dir(path).map_err(|source| PreflightError::PinDir {
        path: path.to_path_buf(),
        source,
    })?;
    for e in entries {
        let e = e.map_err(|source| PreflightError::PinDir {
            path: path.to_path_buf(),
            source,
        })?;
        check_tree(&e.path(), depth + 1)?;
    }
    Ok(())
}

/// Creates `dir` under a checked pin root (root's alone: 0700, whatever the umask) when
/// missing, and checks everything in it before the agent reuses what it holds.
pub fn make_pin_dir(dir: &Path) -> Result<(), PreflightError> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |source| PreflightError::PinDir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        // The umask may have taken bits away, never added any; but make it exact.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io)?;
    }
    check_pin_tree(dir)
}

/// The pin root and its parents on the BPF filesystem (see [`check_pin_dir`]).
fn check_pin_parents(pin_root: &Path) -> Result<(), PreflightError> {
    use std::os::unix::fs::MetadataExt;
    let mut path = pin_root.to_path_buf();
    let mut own = true;
    loop {
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !is_bpffs(&path) {
                break;
            }
            let untrusted = |problem: String, fix: String| PreflightError::Untrusted {
                path: path.clone(),
                problem,
                fix,
            };
            if !meta.is_dir() {
                return Err(untrusted(
                    "is not a directory (a symlink or a pinned object)".into(),
                    format!("remove it (`rm {}`)", path.display()),
                ));
            }
            if meta.uid() != 0 {
                return Err(untrusted(
                    format!("is owned by uid {}, not root", meta.uid()),
                    format!("remove it (`rm -r {}`)", path.display()),
                ));
            }
            let mode = meta.mode() & 0o7777;
            let sticky = mode & 0o1000 != 0;
            if mode & 0o022 != 0 && (own || !sticky) {
                return Err(untrusted(
                    format!("is writable by group or others (mode {mode:04o})"),
                    format!("`chmod go-w {}`", path.display()),
                ));
            }
        }
        own = false;
        if !path.pop() || path.as_os_str().is_empty() {
            break;
        }
    }
    Ok(())
}

/// Creates `pin_root` (root only, 0700) and takes an exclusive lock on it, after checking
/// nobody else controls it.
pub fn lock_pin_root(pin_root: &Path) -> Result<PinLock, PreflightError> {
    use std::os::unix::fs::DirBuilderExt;
    check_pin_dir(pin_root)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_root)
        .map_err(|source| PreflightError::PinDir {
            path: pin_root.to_path_buf(),
            source,
        })?;
    // Again now that it exists: someone may have created it first.
    check_pin_dir(pin_root)?;
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
