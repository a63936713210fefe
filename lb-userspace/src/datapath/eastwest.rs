//! East-west: the socket hooks on a cgroup2 directory, and the TC program on the pods'
//! host-side interfaces, which the agent follows through netlink as they come and go.
//!
//! Pins, beside the external interface's links:
//! - `links/sock_<hook>@cgroup<inode>` for the eight sock_addr hooks (connect, sendmsg,
//!   recvmsg and getpeername, of IPv4 and of IPv6) on the cgroup whose directory has that
//!   inode number (an agent upgraded from one with only the IPv4 hooks creates the IPv6
//!   ones);
//! - `links/pod_ingress@<interface>#<ifindex>` for each pod interface (an interface that
//!   comes back under the same name is a new interface with a new index).
//!
//! A restarted agent replaces the programs of the links that are still wanted in place and
//! removes the others (another cgroup, interfaces that are gone).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, links::FdLink,
};
use lb_common::{map_names, program_names, tc_prog_slot};
use thiserror::Error;
use tracing::{info, warn};

use crate::datapath::{Datapath, DatapathError, LinkOutcome, typed_program};

/// Where the agent mounts cgroup2 when nothing has mounted it.
pub const CGROUP2_MOUNT: &str = "/run/lb/cgroup2";

/// The socket hooks and the pin name of each one's link.
const SOCK_HOOKS: [(&str, &str); 8] = [
    (program_names::SOCK_CONNECT4, "sock_connect4"),
    (program_names::SOCK_SENDMSG4, "sock_sendmsg4"),
    (program_names::SOCK_RECVMSG4, "sock_recvmsg4"),
    (program_names::SOCK_GETPEERNAME4, "sock_getpeername4"),
    (program_names::SOCK_CONNECT6, "sock_connect6"),
    (program_names::SOCK_SENDMSG6, "sock_sendmsg6"),
    (program_names::SOCK_RECVMSG6, "sock_recvmsg6"),
    (program_names::SOCK_GETPEERNAME6, "sock_getpeername6"),
];
/// Pin-name prefix of the socket hooks' links.
const SOCK_PIN_PREFIX: &str = "sock_";
/// Pin-name prefix of the pod interfaces' links.
const POD_PIN_PREFIX: &str = "pod_ingress@";

/// Errors of finding or preparing the cgroup2 hierarchy and the pod interfaces.
#[derive(Debug, Error)]
pub enum EastWestError {
    /// /proc/mounts could not be read, or cgroup2 could not be mounted.
    #[error("cgroup2 at {path}: {source}")]
    Cgroup {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `--cgroup` directory is not in a cgroup2 hierarchy.
    #[error(
        "{0} is not a cgroup2 directory, nor is {0}/unified (the hybrid layout's): give \
         --cgroup a directory of the cgroup2 hierarchy (the host's /sys/fs/cgroup, on \
         either layout)"
    )]
    NotCgroup2(PathBuf),
    /// A pattern of `--pod-interfaces` is empty.
    #[error("empty --pod-interfaces pattern")]
    EmptyPattern,
    /// The interfaces could not be listed.
    #[error("listing the network interfaces: {0}")]
    Interfaces(#[source] io::Error),
    /// A pinned link could not be removed.
    #[error("removing pinned link {path}: {source}")]
    Unpin {
        /// The pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Loading or attaching a program.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// Where the socket hooks go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketHooks {
    /// Nowhere (and links an earlier agent pinned are removed).
    Off,
    /// The root of the cgroup2 hierarchy (see [`cgroup2_root`]): every process on the node.
    Root,
    /// This cgroup2 directory: the processes in it and below.
    At(PathBuf),
}

impl SocketHooks {
    /// The cgroup directory, mounting cgroup2 for [`SocketHooks::Root`] if needed.
    pub fn cgroup(&self) -> Result<Option<PathBuf>, EastWestError> {
        match self {
            SocketHooks::Off => Ok(None),
            SocketHooks::Root => cgroup2_root().map(Some),
            SocketHooks::At(path) => cgroup2_dir(path).map(Some),
        }
    }
}

/// Where cgroup2 sits in a directory laid out as /sys/fs/cgroup is on hybrid hosts (cgroup
/// v1 controllers on a tmpfs).
const HYBRID_CGROUP2: &str = "unified";

/// The cgroup2 directory `--cgroup DIR` names: DIR when it is one, else, when DIR is laid out
/// as /sys/fs/cgroup is on hybrid hosts (cgroup v1 controllers, cgroup2 at `unified`),
/// DIR/unified. So the host's /sys/fs/cgroup, mounted into a pod as it is (deploy/), is
/// found on both layouts.
pub fn cgroup2_dir(dir: &Path) -> Result<PathBuf, EastWestError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| EastWestError::Cgroup { path, source }
    };
    let open = std::fs::File::open(dir).map_err(err(dir))?;
    if is_cgroup2(&open).map_err(err(dir))? {
        return Ok(dir.to_owned());
    }
    let unified = dir.join(HYBRID_CGROUP2);
    match std::fs::File::open(&unified) {
        Ok(open) if is_cgroup2(&open).map_err(err(&unified))? => {
            info!(
                cgroup = %unified.display(),
                "{} is not cgroup2 (a hybrid layout): hooking its cgroup2 hierarchy",
                dir.display()
            );
            Ok(unified)
        }
        Ok(_) => Err(EastWestError::NotCgroup2(dir.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(EastWestError::NotCgroup2(dir.to_owned()))
        }
        Err(e) => Err(err(&unified)(e)),
    }
}

/// Whether the open directory is on a cgroup2 file system.
fn is_cgroup2(dir: &std::fs::File) -> io::Result<bool> {
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs(2) on an open descriptor, writing into a statfs-sized buffer.
    if unsafe { libc::fstatfs(dir.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so it filled the buffer (zeroed before in any case).
    let fs = unsafe { fs.assume_init() };
    Ok(fs.f_type == libc::CGROUP2_SUPER_MAGIC)
}

/// The root of the cgroup2 hierarchy: the first cgroup2 mount in /proc/mounts, or, when
/// there is none, a new one at [`CGROUP2_MOUNT`].
pub fn cgroup2_root() -> Result<PathBuf, EastWestError> {
    let mounts = Path::new("/proc/mounts");
    let text = std::fs::read_to_string(mounts).map_err(|source| EastWestError::Cgroup {
        path: mounts.to_owned(),
        source,
    })?;
    if let Some(found) = find_cgroup2(&text) {
        return Ok(found);
    }
    let path = PathBuf::from(CGROUP2_MOUNT);
    let err = |source| EastWestError::Cgroup {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&path).map_err(err)?;
    crate::datapath::sys::mount(c"cgroup2", &path).map_err(err)?;
    info!(path = %path.display(), "mounted cgroup2");
    Ok(path)
}

/// The mount point of the first cgroup2 filesystem in a /proc/mounts text (octal escapes
/// such as `\040` decoded).
fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(unescape_mount_path(point)))
    })
}

fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters and `?` for
/// one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Classic two-pointer matching with backtracking to the last star.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The pinned links in `links` whose names start with `prefix`.
pub(crate) fn pinned_with_prefix(
    links: &Path,
    prefix: &str,
) -> Result<BTreeSet<String>, EastWestError> {
    let entries = match std::fs::read_dir(links) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => {
            return Err(EastWestError::Unpin {
                path: links.to_owned(),
                source,
            });
        }
    };
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// Removes a pinned link (which detaches it once nothing else holds it).
pub(crate) fn unpin(links: &Path, name: &str) -> Result<(), EastWestError> {
    let path = links.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EastWestError::Unpin { path, source }),
    }
}

impl Datapath {
    /// Attaches the socket hooks to the cgroup2 directory `cgroup` (they then apply to every
    /// process in it and below), or, with `None`, removes any that an earlier agent pinned.
    /// Links on another cgroup are removed.
    pub fn attach_cgroup(
        &mut self,
        cgroup: Option<&Path>,
    ) -> Result<Vec<(&'static str, LinkOutcome)>, EastWestError> {
        let links = self.pins().links();
        let mut wanted = BTreeSet::new();
        let mut outcomes = Vec::new();
        if let Some(cgroup) = cgroup {
            let err = |source| EastWestError::Cgroup {
                path: cgroup.to_owned(),
                source,
            };
            let dir = std::fs::File::open(cgroup).map_err(err)?;
            if !is_cgroup2(&dir).map_err(err)? {
                return Err(EastWestError::NotCgroup2(cgroup.to_owned()));
            }
            let inode = dir.metadata().map_err(err)?.ino();
            let shown = cgroup.display().to_string();
            for (program, pin) in SOCK_HOOKS {
                let prog: &mut CgroupSockAddr = typed_program(self.ebpf_mut(), program)?;
                if prog.fd().is_err() {
                    prog.load().map_err(|source| DatapathError::Program {
                        name: program,
                        source: Box::new(source),
                    })?;
                }
                let pin_name = format!("{pin}@cgroup{inode}");
                let outcome = self.attach_one(program, &pin_name, &shown, |dp| {
                    let prog: &mut CgroupSockAddr = typed_program(dp.ebpf_mut(), program)?;
                    // A bpf_link (kernel >= 5.7), which takes no flags: links always let
                    // other programs run on the same cgroup and its parents' too.
                    let id = prog.attach(&dir, CgroupAttachMode::Single);
                    Ok(id.and_then(|id| prog.take_link(id)).map(FdLink::try_from))
                })?;
                wanted.insert(pin_name);
                outcomes.push((program, outcome));
            }
        }
        for stale in pinned_with_prefix(&links, SOCK_PIN_PREFIX)?.difference(&wanted) {
            info!(link = %stale, "removing the socket hook of another cgroup");
            unpin(&links, stale)?;
        }
        Ok(outcomes)
    }

    /// Loads the pod interfaces' program, and the programs it tail-calls into their slots
    /// of [`map_names::TC_PROGRAMS`] (on this agent's first load of the pod program: an
    /// earlier agent's slots hold its own programs).
    fn pod_program(&mut self) -> Result<&mut SchedClassifier, EastWestError> {
        let name = program_names::TC_POD_INGRESS;
        let loaded = typed_program::<SchedClassifier>(self.ebpf_mut(), name)?
            .fd()
            .is_ok();
        if !loaded {
            for (name, slot) in [
                (program_names::TC_POD_INGRESS6, tc_prog_slot::POD_INGRESS6),
                (program_names::TC_EGRESS, tc_prog_slot::EGRESS),
            ] {
                load_classifier(self, name)?;
                self.fill_slot(map_names::TC_PROGRAMS, slot, name)?;
            }
            load_classifier(self, name)?;
        }
        Ok(typed_program(self.ebpf_mut(), name)?)
    }

    /// Loads the pod interfaces' programs (and fills their program array) without
    /// attaching them, for tests that run them directly.
    pub fn load_pod_programs(&mut self) -> Result<(), EastWestError> {
        self.pod_program().map(|_| ())
    }

    /// Attaches the pod program to `interface` (index `index`), replacing the program of a
    /// link pinned for it earlier.
    fn attach_pod(&mut self, interface: &str, index: u32) -> Result<LinkOutcome, EastWestError> {
        self.pod_program()?;
        let pin_name = pod_pin_name(interface, index);
        let outcome =
            self.attach_one(program_names::TC_POD_INGRESS, &pin_name, interface, |dp| {
                let prog: &mut SchedClassifier =
                    typed_program(dp.ebpf_mut(), program_names::TC_POD_INGRESS)?;
                let id = prog.attach(interface, TcAttachType::Ingress);
                Ok(id.and_then(|id| prog.take_link(id)).map(FdLink::try_from))
            })?;
        Ok(outcome)
    }
}

/// Loads the classifier `name` unless it is loaded already.
fn load_classifier(dp: &mut Datapath, name: &'static str) -> Result<(), EastWestError> {
    let prog: &mut SchedClassifier = typed_program(dp.ebpf_mut(), name)?;
    if prog.fd().is_err() {
        prog.load().map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })?;
    }
    Ok(())
}

fn pod_pin_name(interface: &str, index: u32) -> String {
    format!("{POD_PIN_PREFIX}{interface}#{index}")
}

/// The network interfaces of this namespace: name -> index.
pub fn interfaces() -> io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut found = BTreeMap::new();
    let mut cursor = list;
    loop {
        // SAFETY: cursor stays within the array, up to and including its terminator.
        let entry = unsafe { &*cursor };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: if_name is a C string.
        let name = unsafe { CStr::from_ptr(entry.if_name) };
        found.insert(name.to_string_lossy().into_owned(), entry.if_index);
        cursor = unsafe { cursor.add(1) };
    }
    // SAFETY: list came from if_nameindex and is freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(found)
}

/// The pod interfaces: the interfaces whose names match the patterns, followed through
/// netlink notifications ([`super::netlink::Notifications`]).
pub struct PodInterfaces {
    patterns: Vec<String>,
}

impl PodInterfaces {
    /// Follows the interfaces matching `patterns` (none: no pod interfaces). Call
    /// [`PodInterfaces::reconcile`] once after this, then after each batch of netlink
    /// notifications.
    pub fn new(patterns: Vec<String>) -> Result<Self, EastWestError> {
        if patterns.iter().any(String::is_empty) {
            return Err(EastWestError::EmptyPattern);
        }
        Ok(Self { patterns })
    }

    fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| glob_match(p, name))
    }

    /// Attaches the pod program to every matching interface that does not have it, and
    /// removes the links of interfaces that are gone. Errors are per interface: the others
    /// are still done.
    pub fn reconcile(&self, datapath: &mut Datapath) -> Vec<EastWestError> {
        let mut errors = Vec::new();
        if self.patterns.is_empty() {
            // Links an earlier agent pinned with other flags.
            let links = datapath.pins().links();
            match pinned_with_prefix(&links, POD_PIN_PREFIX) {
                Ok(pins) => errors.extend(pins.iter().filter_map(|p| unpin(&links, p).err())),
                Err(e) => errors.push(e),
            }
            return errors;
        }
        let present = match interfaces() {
            Ok(all) => all,
            Err(e) => return vec![EastWestError::Interfaces(e)],
        };
        let mut wanted = BTreeSet::new();
        for (name, &index) in present.iter().filter(|(name, _)| self.matches(name)) {
            let pin_name = pod_pin_name(name, index);
            let links = datapath.pins().links();
            let pinned = links.join(&pin_name).exists();
            // A pinned link is kept as it is: the program was replaced at start (see
            // `attach_pods_at_start`), or attached by this agent.
            let result = if pinned {
                Ok(None)
            } else {
                datapath.attach_pod(name, index).map(Some)
            };
            match result {
                Ok(Some(outcome)) => {
                    info!(interface = %name, index, ?outcome, "pod interface attached")
                }
                Ok(None) => {}
                // The interface may have gone between the listing and the attach.
                Err(e) => {
                    warn!(interface = %name, "pod interface: {e}");
                    errors.push(e);
                }
            }
            wanted.insert(pin_name);
        }
        let links = datapath.pins().links();
        match pinned_with_prefix(&links, POD_PIN_PREFIX) {
            Ok(pins) => {
                for stale in pins.difference(&wanted) {
                    info!(link = %stale, "pod interface gone; removing its link");
                    if let Err(e) = unpin(&links, stale) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        errors
    }

    /// At start: replaces the program of every pod link an earlier agent pinned for an
    /// interface that is still there and still matches (so those pods never run without a
    /// program), then [`PodInterfaces::reconcile`]s.
    pub fn attach_pods_at_start(&self, datapath: &mut Datapath) -> Vec<EastWestError> {
        let mut errors = Vec::new();
        if let Ok(present) = interfaces() {
            for (name, &index) in present.iter().filter(|(name, _)| self.matches(name)) {
                let path = datapath.pins().link(&pod_pin_name(name, index));
                if path.exists()
                    && let Err(e) = datapath.attach_pod(name, index)
                {
                    errors.push(e);
                }
            }
        }
        errors.extend(self.reconcile(datapath));
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroup2_directories_are_cgroup2() {
        let tmp = std::fs::File::open(std::env::temp_dir()).unwrap();
        assert!(!is_cgroup2(&tmp).unwrap());
        let proc = std::fs::File::open("/proc").unwrap();
        assert!(!is_cgroup2(&proc).unwrap());
        // The hierarchy the agent hooks by default (the machines we test on have cgroup2).
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let root = find_cgroup2(&mounts).expect("a cgroup2 mount");
        assert!(is_cgroup2(&std::fs::File::open(root).unwrap()).unwrap());
    }

    #[test]
    fn the_cgroup2_directory_is_found_on_both_layouts() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let root = find_cgroup2(&mounts).expect("a cgroup2 mount");
        // The unified layout, or the cgroup2 hierarchy of the hybrid one named directly.
        assert_eq!(cgroup2_dir(&root).unwrap(), root);
        // The hybrid layout's /sys/fs/cgroup (these machines have it).
        if root.ends_with(HYBRID_CGROUP2) {
            assert_eq!(cgroup2_dir(root.parent().unwrap()).unwrap(), root);
        }
        let tmp = std::env::temp_dir();
        let e = cgroup2_dir(&tmp).unwrap_err();
        assert!(
            matches!(&e, EastWestError::NotCgroup2(p) if p == &tmp),
            "{e}"
        );
        assert!(e.to_string().contains("/unified"), "{e}");
    }

    #[test]
    fn globs_match_like_shell_patterns() {
        assert!(glob_match("veth*", "veth-pod1"));
        assert!(glob_match("veth*", "veth"));
        assert!(glob_match("lxc*", "lxc12345"));
        assert!(!glob_match("lxc*", "eth0"));
        assert!(glob_match("*pod?", "veth-pod1"));
        assert!(!glob_match("*pod?", "veth-pod12"));
        assert!(glob_match("v*h-*1", "veth-pod1"));
        assert!(!glob_match("v*h-*2", "veth-pod1"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("?", ""));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
    }

    #[test]
    fn the_cgroup2_mount_comes_from_proc_mounts() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("none /my\\040cgroups cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/my cgroups"))
        );
        assert_eq!(
            find_cgroup2("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }
}
