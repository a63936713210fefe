//! The few system calls aya does not expose: mounting bpffs, opening a pinned link by path,
//! replacing the program of a link in place (`BPF_LINK_UPDATE`), and writing or reading a
//! whole array map in one call (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

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

/// Mounts a bpf filesystem at `path` unless one is there already (on a fresh machine
/// /sys/fs/bpf is a plain sysfs directory). Returns whether it mounted one.
pub fn ensure_bpffs(path: &Path) -> io::Result<bool> {
    std::fs::create_dir_all(path)?;
    if is_bpffs(path)? {
        return Ok(false);
    }
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all pointers are valid C strings; data is null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
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

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands, in 64-bit words: in_batch,
/// out_batch, keys, values, (count | map_fd << 32), elem_flags, flags.
fn batch_attr(map: BorrowedFd<'_>, keys: *const u32, values: *const u8, count: usize) -> [u64; 16] {
    let mut attr = [0u64; 16];
    attr[2] = keys as u64;
    attr[3] = values as u64;
    attr[4] = count as u32 as u64 | (map.as_raw_fd() as u32 as u64) << 32;
    attr
}

/// Writes elements `0..values.len()` of the array map `map` in one system call (kernel
/// >= 5.6). `V` must be the map's value type.
pub fn array_write_all<V: aya::Pod>(map: BorrowedFd<'_>, values: &[V]) -> io::Result<()> {
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    let mut attr = batch_attr(map, keys.as_ptr(), values.as_ptr().cast(), values.len());
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    let written = attr[4] as u32 as usize;
    if written != values.len() {
        return Err(io::Error::other(format!(
            "batch update wrote {written} of {} elements",
            values.len()
        )));
    }
    Ok(())
}

/// Reads elements `0..len` of the array map `map` (in as few system calls as the kernel
/// allows; one for an array). `V` must be the map's value type.
pub fn array_read_all<V: aya::Pod + Default>(map: BorrowedFd<'_>, len: u32) -> io::Result<Vec<V>> {
    let len = len as usize;
    let mut keys = vec![0u32; len];
    let mut values = vec![V::default(); len];
    let mut read = 0usize;
    let mut cursor = 0u32;
    while read < len {
        // The kernel writes keys and values there.
        let mut attr = batch_attr(
            map,
            keys[read..].as_mut_ptr(),
            values[read..].as_mut_ptr().cast_const().cast(),
            len - read,
        );
        attr[0] = if read == 0 {
            0
        } else {
            &raw const cursor as u64
        };
        let mut next = 0u32;
        attr[1] = &raw mut next as u64;
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let count = attr[4] as u32 as usize;
        read += count;
        cursor = next;
        match result {
            Ok(_) if count > 0 => {}
            // ENOENT: the end of the map, after the last batch.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Ok(_) => return Err(io::Error::other("batch lookup made no progress")),
            Err(e) => return Err(e),
        }
    }
    // An array is read in index order.
    if read != len || keys.iter().enumerate().any(|(i, &k)| k as usize != i) {
        return Err(io::Error::other(format!(
            "batch lookup read {read} of {len} elements, or out of order"
        )));
    }
    Ok(values)
}
