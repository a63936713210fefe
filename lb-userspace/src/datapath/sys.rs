//! The few system calls aya does not expose: mounting bpffs (and cgroup2), opening a pinned link by path,
//! replacing the program of a link in place (`BPF_LINK_UPDATE`), batch updates and deletes
//! (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`), reading or writing an mmapable
//! array map through a mapping, and waiting for running programs ([`GracePeriods`]).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid C string and stat a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// The inode number of the host's (initial) mount namespace, on kernels that give the
/// initial namespaces fixed numbers (6.18 and later; `MNT_NS_INIT_INO` in linux/nsfs.h).
const MNT_NS_INIT_INO: u64 = 0xEFFF_FFF8;

/// Why a file system this process mounts would die with it, if it would: its mount
/// namespace is not the host's (`ip netns exec` gives a command a mount namespace of its own,
/// with a fresh /sys; a container has its own, which ends with it). `None`: the mount is the
/// host's, and outlives the process.
///
/// The host's mount namespace is known by its fixed inode number where the kernel has one,
/// else as PID 1's (which reading needs ptrace access to PID 1: without it, the agent cannot
/// tell, and says so).
pub fn private_mount_namespace() -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = match std::fs::metadata("/proc/self/ns/mnt") {
        Ok(ns) => ns.ino(),
        Err(e) => return Some(format!("reading /proc/self/ns/mnt: {e}")),
    };
    if ours == MNT_NS_INIT_INO {
        return None;
    }
    if std::process::id() == 1 {
        return Some(
            "the agent is PID 1, its container's first process, whose mount namespace ends \
             with it"
                .into(),
        );
    }
    match std::fs::metadata("/proc/1/ns/mnt") {
        Ok(host) if host.ino() == ours => None,
        Ok(host) => Some(format!(
            "its mount namespace (mnt:[{ours}]) is not the host's (PID 1's, mnt:[{}])",
            host.ino()
        )),
        Err(e) => Some(format!(
            "its mount namespace (mnt:[{ours}]) is not known to be the host's (PID 1's: {e})"
        )),
    }
}

/// Mounts a filesystem of type `kind` (e.g. `bpf`, `cgroup2`) at `path`.
pub fn mount(kind: &std::ffi::CStr, path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all pointers are valid C strings; data is null.
    let rc = unsafe {
        libc::mount(
            kind.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised buffer larger than every bpf_attr variant we use;
    // the kernel reads at most size_of_val(attr) bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Creates a hash map (`BPF_MAP_CREATE`, `BPF_MAP_TYPE_HASH`) named `name` (at most 15
/// bytes), for a map only userspace uses.
pub fn create_hash_map(
    name: &str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    map_create(
        BPF_MAP_TYPE_HASH,
        [key_size, value_size, max_entries],
        None,
        name,
    )
}

/// Pins the BPF object `fd` at `path` (`BPF_OBJ_PIN`).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64; // pathname
    attr[1] = fd.as_raw_fd() as u32 as u64; // bpf_fd; file_flags = 0
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the BPF object (here: a link) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64; // pathname; bpf_fd = 0, file_flags = 0
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program of `link` with `prog`: no packet sees no program.
/// Fails with ENOLINK when the link's device is gone.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // struct { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    attr[0] = link.as_raw_fd() as u32 as u64 | (prog.as_raw_fd() as u32 as u64) << 32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches `link` from its hook now (`BPF_LINK_DETACH`, kernel >= 5.9): the program stops
/// seeing packets and sockets before this returns, where dropping the last reference to the
/// link detaches it only once the kernel has released it (after an RCU grace period).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u32 as u64; // link_fd
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands, in 64-bit words: in_batch,
/// out_batch, keys, values, (count | map_fd << 32), elem_flags, flags.
fn batch(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: Option<&[u32]>,
) -> Result<(), (usize, io::Error)> {
    let mut attr = [0u64; 16];
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values.map_or(0, |v| v.as_ptr() as u64);
    attr[4] = keys.len() as u32 as u64 | (map.as_raw_fd() as u32 as u64) << 32;
    // The kernel applies the elements in order and stops at the first failure; `count`
    // comes back as the number applied.
    bpf(cmd, &mut attr)
        .map(drop)
        .map_err(|e| (attr[4] as u32 as usize, e))
}

/// Writes `keys[i] -> values[i]` into a map whose keys and values are `u32` (a map of maps:
/// the values are inner map fds) with one `BPF_MAP_UPDATE_BATCH`. On failure, returns how
/// many were written (the first ones) and why the next failed.
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: &[u32],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    batch(BPF_MAP_UPDATE_BATCH, map, keys, Some(values))
}

/// Deletes `keys` from a map with `u32` keys with one `BPF_MAP_DELETE_BATCH`; as
/// [`map_update_batch`] on failure (ENOENT for a missing key).
pub fn map_delete_batch(map: BorrowedFd<'_>, keys: &[u32]) -> Result<(), (usize, io::Error)> {
    batch(BPF_MAP_DELETE_BATCH, map, keys, None)
}

/// A shared mapping of the values of a `BPF_F_MMAPABLE` array map, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(map: BorrowedFd<'_>, bytes: usize, writable: bool) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = bytes.div_ceil(page).max(1) * page;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping of the map's fd; the kernel checks the length
        // against the map's size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr and len are those of a mapping made by Mapping::new.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Writes elements `0..values.len()` of a `BPF_F_MMAPABLE` array map whose value type is
/// `V`, through a shared mapping: a memory copy instead of one update per element.
pub fn mmap_write<V: aya::Pod>(map: BorrowedFd<'_>, values: &[V]) -> io::Result<()> {
    let bytes = std::mem::size_of_val(values);
    let mapping = Mapping::new(map, bytes, true)?;
    // SAFETY: the mapping is at least `bytes` long and does not overlap `values`.
    unsafe {
        std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), mapping.ptr.cast(), bytes)
    };
    Ok(())
}

/// Reads elements `0..len` of a `BPF_F_MMAPABLE` array map whose value type is `V`.
pub fn mmap_read<V: aya::Pod + Default>(map: BorrowedFd<'_>, len: usize) -> io::Result<Vec<V>> {
    let mut values = vec![V::default(); len];
    let bytes = std::mem::size_of_val(values.as_slice());
    let mapping = Mapping::new(map, bytes, false)?;
    // SAFETY: the mapping is at least `bytes` long; every bit pattern is a valid `V` (Pod).
    unsafe {
        std::ptr::copy_nonoverlapping(mapping.ptr.cast::<u8>(), values.as_mut_ptr().cast(), bytes)
    };
    Ok(values)
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// Creates a map of `map_type` with `[key_size, value_size, max_entries]`, named `name` (at
/// most 15 bytes, empty for none); `inner` is the template of a map of maps.
fn map_create(
    map_type: u32,
    [key_size, value_size, max_entries]: [u32; 3],
    inner: Option<BorrowedFd<'_>>,
    name: &str,
) -> io::Result<OwnedFd> {
    if name.len() > 15 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a map name has at most 15 bytes",
        ));
    }
    // struct { u32 map_type; u32 key_size; u32 value_size; u32 max_entries; u32 map_flags;
    // u32 inner_map_fd; u32 numa_node; char map_name[16]; ... }
    let inner = inner.map_or(0, |fd| fd.as_raw_fd() as u32);
    let mut bytes = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries, 0, inner]
        .into_iter()
        .enumerate()
    {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    bytes[28..28 + name.len()].copy_from_slice(name.as_bytes());
    let mut attr = [0u64; 16];
    for (word, chunk) in attr.iter_mut().zip(bytes.chunks_exact(8)) {
        *word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A map of maps of this process alone (no program uses it): writing it makes the kernel
/// wait until every BPF program that is running has finished (`synchronize_rcu`), as it
/// does after every write of a map of maps.
pub struct GracePeriods {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GracePeriods {
    /// Creates the two maps (one entry each).
    pub fn new() -> io::Result<Self> {
        let inner = map_create(BPF_MAP_TYPE_ARRAY, [4, 4, 1], None, "")?;
        let outer = map_create(
            BPF_MAP_TYPE_ARRAY_OF_MAPS,
            [4, 4, 1],
            Some(inner.as_fd()),
            "",
        )?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program that was running when it was called has finished.
    pub fn wait(&self) -> io::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        let mut attr = [0u64; 16];
        // struct { u32 map_fd; u64 key; u64 value; u64 flags; } (8-byte aligned)
        attr[0] = self.outer.as_raw_fd() as u32 as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = &value as *const u32 as u64;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }
}
