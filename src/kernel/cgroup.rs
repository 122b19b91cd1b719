//! The host's cgroup v2 hierarchy: where it is mounted (unified, hybrid or none), and the names of its cgroups by id (path and systemd unit), cached and following cgroups as they come and go.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;

/// Which cgroup hierarchies the host runs, as its mounts say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2 alone, mounted at this path (usually `/sys/fs/cgroup`).
    Unified(PathBuf),
    /// cgroup v1 controllers with a cgroup v2 hierarchy beside them, mounted at this
    /// path (systemd's hybrid mode: `/sys/fs/cgroup/unified`).
    Hybrid(PathBuf),
    /// No cgroup v2 hierarchy is mounted: a cgroup v1 host.
    V1Only,
}

impl Hierarchy {
    /// Reads `/proc/self/mountinfo`.
    pub fn detect() -> Hierarchy {
        match std::fs::read_to_string("/proc/self/mountinfo") {
            Ok(text) => Self::from_mountinfo(&text),
            Err(_) => Hierarchy::V1Only,
        }
    }

    /// The hierarchy a mountinfo text describes: the first cgroup2 mount of the whole
    /// hierarchy (its root `/`), unified when it is `/sys/fs/cgroup` or no cgroup v1
    /// hierarchy is mounted.
    pub fn from_mountinfo(text: &str) -> Hierarchy {
        let mut v2 = None;
        let mut v1 = false;
        for line in text.lines() {
            // id parent major:minor root mountpoint options [optional...] - fstype source super
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = left.split(' ').collect();
            let fstype = right.split(' ').next().unwrap_or("");
            let (Some(root), Some(point)) = (fields.get(3), fields.get(4)) else {
                continue;
            };
            match fstype {
                "cgroup2" if *root == "/" && v2.is_none() => {
                    v2 = Some(PathBuf::from(unescape(point)));
                }
                "cgroup" => v1 = true,
                _ => {}
            }
        }
        match v2 {
            Some(p) if p == Path::new("/sys/fs/cgroup") || !v1 => Hierarchy::Unified(p),
            Some(p) => Hierarchy::Hybrid(p),
            None => Hierarchy::V1Only,
        }
    }

    /// Where the cgroup v2 hierarchy is mounted, if it is.
    pub fn mount(&self) -> Option<&Path> {
        match self {
            Hierarchy::Unified(p) | Hierarchy::Hybrid(p) => Some(p),
            Hierarchy::V1Only => None,
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The root directory of the cgroup v2 hierarchy, open, to attach programs to and to name
/// cgroups from: that of `mount`, or, where none is mounted (or it went: another's mount
/// undone meanwhile), of a mount made for the moment in a private directory and undone
/// at once. The open directory keeps working after its mount is undone, and there is one
/// cgroup v2 hierarchy whatever the mount. Needs CAP_SYS_ADMIN for a mount of its own.
pub fn open_root(mount: Option<&Path>) -> std::io::Result<OwnedFd> {
    if let Some(fd) = mount.and_then(|m| open_dir(m).ok()) {
        return Ok(fd);
    }
    // The service unit grants no CAP_SYS_ADMIN (and its file system is read-only): say why
    // rather than fail at the mount.
    if !super::preflight::has_sys_admin() {
        return Err(std::io::Error::other(
            "no cgroup v2 hierarchy is mounted, and mounting one needs CAP_SYS_ADMIN",
        ));
    }
    let dir = std::env::temp_dir().join(format!("flowlens-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let res = mount_and_open(&dir);
    let _ = std::fs::remove_dir(&dir);
    res
}

fn mount_and_open(dir: &Path) -> std::io::Result<OwnedFd> {
    let c = |s: &str| CString::new(s).map_err(std::io::Error::other);
    let target = c(&dir.to_string_lossy())?;
    let (src, fstype) = (c("cgroup2")?, c("cgroup2")?);
    // SAFETY: every argument is a NUL-terminated string that outlives the call; no data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = open_dir(dir);
    // SAFETY: target is a NUL-terminated path; a lazy unmount of the mount made above.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    fd
}

fn open_dir(p: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path; the fd returned is owned by the OwnedFd alone.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Unit types whose cgroups hold processes: a cgroup path names the innermost of these.
const UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];

/// The systemd unit a cgroup path names: its innermost service, scope, socket, mount
/// or swap component (`/system.slice/foo.service` and `/system.slice/foo.service/worker`
/// name `foo.service`; `/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope`
/// names `x.scope`); else its innermost slice; None outside systemd's tree.
pub fn unit_of(path: &str) -> Option<&str> {
    let parts = || path.split('/').filter(|p| !p.is_empty());
    parts()
        .rfind(|p| UNIT_SUFFIXES.iter().any(|s| is_unit(p, s)))
        .or_else(|| parts().rfind(|p| is_unit(p, ".slice")))
}

fn is_unit(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() && name.ends_with(suffix)
}

/// A cgroup's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupName {
    /// Below the hierarchy's root: `/system.slice/nginx.service`; `/` is the root.
    pub path: Arc<str>,
    pub unit: Option<Arc<str>>,
}

/// Cgroup ids whose cgroup went this long ago are forgotten (ids are never reused, so a
/// kept name is never wrong; the bound is only memory).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// An unknown id walks the hierarchy again at most this often, unless it is newer than
/// every id the last walk saw (a cgroup made since).
const REWALK_EVERY: Duration = Duration::from_secs(1);
/// Cgroups a walk reads at most.
const MAX_CGROUPS: usize = 200_000;

#[derive(Debug)]
struct Entry {
    name: Arc<CgroupName>,
    /// When a walk last failed to find it.
    gone_since: Option<Instant>,
}

/// Cgroup ids to names, by walking the cgroup v2 hierarchy from its open root directory
/// (a cgroup2 directory's inode number is the cgroup's id); an unknown id walks it again,
/// so cgroups that appear are found, and those that go are kept a while for the records
/// of their flows.
#[derive(Debug)]
pub struct CgroupNames {
    /// The hierarchy's root directory, open, and the path that reaches it through the
    /// descriptor (`/proc/self/fd/N`), whatever becomes of the mount it was opened by.
    root: Option<(OwnedFd, PathBuf)>,
    by_id: HashMap<u64, Entry>,
    last_walk: Option<Instant>,
    /// The largest id the last walk saw.
    max_id: u64,
    walks: u64,
}

impl CgroupNames {
    /// Names the cgroups of the hierarchy whose root directory `root` is open; none
    /// without one.
    pub fn new(root: Option<OwnedFd>) -> CgroupNames {
        CgroupNames {
            root: root.map(|fd| {
                let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                (fd, path)
            }),
            by_id: HashMap::new(),
            last_walk: None,
            max_id: 0,
            walks: 0,
        }
    }

    /// Names the cgroups of the hierarchy mounted at `mount`.
    pub fn at(mount: &Path) -> std::io::Result<CgroupNames> {
        Ok(Self::new(Some(open_dir(mount)?)))
    }

    /// Whether there is a hierarchy to name cgroups from.
    pub fn has_hierarchy(&self) -> bool {
        self.root.is_some()
    }

    /// Walks of the hierarchy so far.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// The names of cgroup `id`, walking the hierarchy again when the id is not known.
    pub fn name(&mut self, id: u64) -> Option<Arc<CgroupName>> {
        if let Some(e) = self.by_id.get(&id) {
            return Some(e.name.clone());
        }
        self.root.as_ref()?;
        let stale = self.last_walk.is_none_or(|t| t.elapsed() >= REWALK_EVERY);
        if id > self.max_id || stale {
            self.walk();
        }
        self.by_id.get(&id).map(|e| e.name.clone())
    }

    /// Reads every cgroup of the hierarchy.
    pub fn walk(&mut self) {
        let Some(root) = self.root.as_ref().map(|(_, p)| p.clone()) else {
            return;
        };
        let now = Instant::now();
        self.last_walk = Some(now);
        self.walks += 1;
        let mut seen = HashMap::new();
        let mut todo = vec![(root, String::from("/"))];
        while let Some((dir, path)) = todo.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            seen.insert(meta.ino(), path.clone());
            if seen.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child = if path == "/" {
                        format!("/{name}")
                    } else {
                        format!("{path}/{name}")
                    };
                    todo.push((e.path(), child));
                }
            }
        }
        self.max_id = seen.keys().copied().max().unwrap_or(0).max(self.max_id);
        for e in self.by_id.values_mut() {
            e.gone_since.get_or_insert(now);
        }
        for (id, path) in seen {
            match self.by_id.get_mut(&id) {
                Some(e) => e.gone_since = None,
                None => {
                    let unit = unit_of(&path).map(Arc::from);
                    let name = Arc::new(CgroupName {
                        path: path.into(),
                        unit,
                    });
                    self.by_id.insert(
                        id,
                        Entry {
                            name,
                            gone_since: None,
                        },
                    );
                }
            }
        }
        self.by_id.retain(|_, e| {
            e.gone_since
                .is_none_or(|t| now.duration_since(t) < FORGET_AFTER)
        });
        debug!("cgroup names: {} cgroups known", self.by_id.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_the_innermost_service_or_scope() {
        for (path, unit) in [
            ("/system.slice/foo.service", Some("foo.service")),
            ("/system.slice/foo.service/worker", Some("foo.service")),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope",
                Some("x.scope"),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service",
                Some("user@1000.service"),
            ),
            (
                "/system.slice/docker-0123abcd.scope",
                Some("docker-0123abcd.scope"),
            ),
            ("/system.slice/sshd.socket", Some("sshd.socket")),
            ("/init.scope", Some("init.scope")),
            ("/machine.slice", Some("machine.slice")),
            ("/", None),
            ("/mygroup/child", None),
            ("/a/.service", None),
        ] {
            assert_eq!(unit_of(path), unit, "{path}");
        }
    }

    #[test]
    fn mountinfo_tells_unified_hybrid_and_v1_hosts_apart() {
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Hierarchy::from_mountinfo(v2),
            Hierarchy::Unified("/sys/fs/cgroup".into())
        );
        let hybrid = "25 23 0:22 / /sys/fs/cgroup ro shared:4 - tmpfs tmpfs ro\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw shared:5 - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/systemd rw shared:6 - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            Hierarchy::from_mountinfo(hybrid),
            Hierarchy::Hybrid("/sys/fs/cgroup/unified".into())
        );
        let v1 = "27 25 0:24 / /sys/fs/cgroup/cpu rw shared:6 - cgroup cgroup rw,cpu\n";
        assert_eq!(Hierarchy::from_mountinfo(v1), Hierarchy::V1Only);
        // A mount of a subtree (a container's) is not the hierarchy's root.
        let sub = "40 23 0:26 /system.slice/x /mnt rw - cgroup2 cgroup2 rw\n";
        assert_eq!(Hierarchy::from_mountinfo(sub), Hierarchy::V1Only);
        let spaced = "40 23 0:26 / /tmp/a\\040b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Hierarchy::from_mountinfo(spaced),
            Hierarchy::Unified("/tmp/a b".into())
        );
    }
}
