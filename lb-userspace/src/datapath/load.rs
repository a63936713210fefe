//! Loading the embedded programs with their maps pinned, and attaching them to an interface
//! through pinned links (so they keep running when the agent exits).

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapError, ProgramArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError},
    },
};
use lb_common::{
    BACKEND_STATS_MASK_GLOBAL, map_names, prog_slot, program_names,
    schema::{BPF_F_NO_PREALLOC, Entries, MapKind, MapSpec, Sizing},
};
use tracing::warn;

use super::{BpfMaps, Capacity, DatapathError, Pins, capacity_flag, map_err, sys};

/// How a program came to be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// A pinned link existed: its program was replaced atomically with the one just loaded.
    Replaced,
    /// There was no (live) pinned link: the program was attached and its link pinned.
    Created,
}

/// What attaching a program gave: a link to pin, or why not.
pub(crate) type Attached = Result<Result<FdLink, LinkError>, ProgramError>;

/// The loaded object: programs and the maps, pinned in its [`Pins`].
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
}

/// The error of loading the object: for a map that could not be created, which map, its
/// size, about how much memory it takes and the flag that sizes it (memory is the usual
/// reason: maps are charged to the agent's memory cgroup).
fn load_error(source: aya::EbpfError, pins: &Pins, capacity: &Capacity) -> DatapathError {
    let aya::EbpfError::MapError(MapError::CreateError { name, io_error }) = source else {
        return DatapathError::Load {
            pin_dir: pins.dir().to_owned(),
            source: Box::new(source),
        };
    };
    // The schema is the object's (the object tests hold them equal).
    let spec = map_names::spec(&name);
    let entries = spec.map(|m| match m.entries {
        Entries::Fixed(n) => n,
        Entries::Sized(sizing) => capacity.entries(sizing),
    });
    let bytes = spec
        .zip(entries)
        .and_then(|(m, entries)| map_memory(m, entries));
    DatapathError::MapCreate {
        flag: capacity_flag(&name),
        name,
        entries,
        bytes,
        source: io_error,
    }
}

/// About how much kernel memory `map` takes at creation with `entries` entries, when its
/// type is one that takes it then (preallocated hash maps, LRU maps, arrays); the hash
/// tables' buckets otherwise.
fn map_memory(map: &MapSpec, entries: u32) -> Option<u64> {
    /// The kernel's `struct htab_elem` before the key, and a bucket.
    const HTAB_ELEM: u64 = 48;
    const BUCKET: u64 = 16;
    let round8 = |n: u32| u64::from(n.div_ceil(8) * 8);
    let entries64 = u64::from(entries);
    let buckets = u64::from(entries.checked_next_power_of_two().unwrap_or(1 << 31)) * BUCKET;
    match map.kind {
        MapKind::Hash if map.flags & BPF_F_NO_PREALLOC != 0 => Some(buckets),
        MapKind::Hash | MapKind::LruHash => {
            Some(entries64 * (HTAB_ELEM + round8(map.key_size) + round8(map.value_size)) + buckets)
        }
        MapKind::Array => Some(entries64 * round8(map.value_size)),
        MapKind::PerCpuArray => {
            let cpus = aya::util::nr_cpus().ok()? as u64;
            Some(entries64 * round8(map.value_size) * cpus)
        }
        _ => None,
    }
}

impl Datapath {
    /// Loads the embedded programs. Maps already pinned in `pins` are reused with their
    /// contents (conntrack included); missing ones are created, with the default
    /// [`Capacity`], and pinned.
    pub fn load(pins: &Pins) -> Result<Self, DatapathError> {
        Self::load_with(pins, &Capacity::default())
    }

    /// [`Datapath::load`], creating missing maps with `capacity`.
    pub fn load_with(pins: &Pins, capacity: &Capacity) -> Result<Self, DatapathError> {
        pins.prepare()?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.dir());
        // The maps of maps are BTF maps, which have no pinning attribute: pinned by path.
        for map in map_names::ALL.iter() {
            if let MapKind::HashOfMaps(_) = map.kind {
                loader.map_pin_path(map.name, pins.map(map.name));
            }
        }
        for (name, size) in super::map_sizes(capacity) {
            loader.map_max_entries(name, size);
        }
        // The datapath masks backend ids with the size of the counters' array: the pinned
        // one's when it exists (the loader reuses it), else the one about to be created.
        let stats_slots = match pins.max_entries(map_names::BACKEND_STATS) {
            Ok(slots) => slots,
            Err(DatapathError::NotPinned(_)) => capacity.entries(Sizing::BackendSlots),
            Err(e) => return Err(e),
        };
        if !stats_slots.is_power_of_two() {
            return Err(DatapathError::BadPinnedMap {
                name: map_names::BACKEND_STATS,
                reason: format!("{stats_slots} entries, not a power of two"),
            });
        }
        let stats_mask = stats_slots - 1;
        loader.override_global(BACKEND_STATS_MASK_GLOBAL, &stats_mask, true);
        let ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(|source| load_error(source, pins, capacity))?;
        Ok(Self {
            ebpf,
            pins: pins.clone(),
        })
    }

    /// The pin directory.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// The loaded object, for tests that run the programs directly.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Verifies and loads the programs of the external interface into the kernel (without
    /// attaching them), and puts the ones that are tail-called into their slots of
    /// [`map_names::PROGRAMS`].
    pub fn load_programs(&mut self) -> Result<(), DatapathError> {
        let prog_err = |name| {
            move |source| DatapathError::Program {
                name,
                source: Box::new(source),
            }
        };
        // Loaded once, for the first interface (the pod interfaces' program may have loaded
        // TC_EGRESS already: it tail-calls it).
        let xdp = self.xdp()?;
        if xdp.fd().is_ok() {
            return Ok(());
        }
        xdp.load().map_err(prog_err(program_names::XDP_INGRESS))?;
        let tc = self.tc()?;
        if tc.fd().is_err() {
            tc.load().map_err(prog_err(program_names::TC_EGRESS))?;
        }
        for name in [
            program_names::XDP_INGRESS6,
            program_names::XDP_NAT6,
            program_names::XDP_ICMP6,
            program_names::XDP_DSR6,
            program_names::XDP_DSR4,
        ] {
            let prog: &mut Xdp = typed_program(&mut self.ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }
        self.fill_program_slots()
    }

    /// Writes each tail-called program into its slot of the pinned program array. On every
    /// start: an earlier agent's slots hold its own programs, and the XDP program the
    /// pinned link now runs (this agent's) must tail-call this agent's programs.
    fn fill_program_slots(&mut self) -> Result<(), DatapathError> {
        for (slot, name) in [
            (prog_slot::XDP_INGRESS6, program_names::XDP_INGRESS6),
            (prog_slot::XDP_NAT6, program_names::XDP_NAT6),
            (prog_slot::XDP_ICMP6, program_names::XDP_ICMP6),
            (prog_slot::XDP_DSR6, program_names::XDP_DSR6),
            (prog_slot::XDP_DSR4, program_names::XDP_DSR4),
        ] {
            self.fill_slot(map_names::PROGRAMS, slot, name)?;
        }
        Ok(())
    }

    /// Writes the loaded program `name` into `slot` of the pinned program array `map`.
    pub(crate) fn fill_slot(
        &mut self,
        map: &'static str,
        slot: u32,
        name: &'static str,
    ) -> Result<(), DatapathError> {
        let prog_err = |source| DatapathError::Program {
            name,
            source: Box::new(source),
        };
        let fd = program(&mut self.ebpf, name)?.fd().map_err(prog_err)?;
        let fd = fd
            .try_clone()
            .map_err(|e| prog_err(ProgramError::from(e)))?;
        let slots = self.ebpf.map_mut(map).ok_or(DatapathError::Map {
            name: map,
            source: Box::new(MapError::InvalidName {
                name: map.to_owned(),
            }),
        })?;
        let mut slots = ProgramArray::try_from(slots).map_err(map_err(map))?;
        slots.set(slot, &fd, 0).map_err(map_err(map))?;
        Ok(())
    }

    fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        typed_program(&mut self.ebpf, program_names::XDP_INGRESS)
    }

    fn tc(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        typed_program(&mut self.ebpf, program_names::TC_EGRESS)
    }

    /// Attaches XDP (ingress) and TC (egress) to `interface`. A live pinned link from an
    /// earlier agent is kept and its program replaced in place, so traffic never runs
    /// without a program; otherwise the program is attached and its link pinned.
    pub fn attach(
        &mut self,
        interface: &str,
    ) -> Result<[(&'static str, LinkOutcome); 2], DatapathError> {
        interface_index(interface)?;
        self.load_programs()?;
        let [xdp_pin, tc_pin] = super::external::PIN_PREFIXES;
        let xdp = self.attach_one(
            program_names::XDP_INGRESS,
            &format!("{xdp_pin}{interface}"),
            interface,
            |dp| {
                let prog = dp.xdp()?;
                let id = prog.attach(interface, XdpMode::default());
                Ok(id.and_then(|id| prog.take_link(id)).map(FdLink::try_from))
            },
        )?;
        let tc = self.attach_one(
            program_names::TC_EGRESS,
            &format!("{tc_pin}{interface}"),
            interface,
            |dp| {
                // TCX (a bpf_link) on kernels >= 6.6; only a link can be pinned.
                let prog = dp.tc()?;
                let id = prog.attach(interface, TcAttachType::Egress);
                Ok(id.and_then(|id| prog.take_link(id)).map(FdLink::try_from))
            },
        )?;
        Ok([
            (program_names::XDP_INGRESS, xdp),
            (program_names::TC_EGRESS, tc),
        ])
    }

    /// Keeps the live link pinned at `links/<pin_name>` (replacing its program), or attaches
    /// with `attach` and pins the new link there.
    pub(crate) fn attach_one(
        &mut self,
        program: &'static str,
        pin_name: &str,
        interface: &str,
        attach: impl FnOnce(&mut Self) -> Result<Attached, DatapathError>,
    ) -> Result<LinkOutcome, DatapathError> {
        let path = self.pins.link(pin_name);
        if let Some(outcome) = self.replace_pinned(&path, program)? {
            return Ok(outcome);
        }
        let link = attach(self)?.map_err(|source| DatapathError::Attach {
            program,
            interface: interface.to_owned(),
            source: Box::new(source),
        })?;
        pin_link(link, &path)?;
        Ok(LinkOutcome::Created)
    }

    /// Replaces the program of the link pinned at `path`; `None` when there is no live link
    /// there (a stale pin, whose interface is gone, is removed).
    fn replace_pinned(
        &mut self,
        path: &Path,
        name: &'static str,
    ) -> Result<Option<LinkOutcome>, DatapathError> {
        if !path.exists() {
            return Ok(None);
        }
        let prog = program(&mut self.ebpf, name)?;
        let prog_fd = prog.fd().map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })?;
        let result =
            sys::obj_get(path).and_then(|link| sys::link_update(link.as_fd(), prog_fd.as_fd()));
        match result {
            Ok(()) => Ok(Some(LinkOutcome::Replaced)),
            Err(error) => {
                warn!(
                    "pinned link {} is stale ({error}); attaching anew",
                    path.display()
                );
                std::fs::remove_file(path).map_err(|source| DatapathError::PinDir {
                    path: path.to_owned(),
                    source,
                })?;
                Ok(None)
            }
        }
    }

    /// Takes the maps the agent writes.
    pub fn take_maps(&mut self) -> Result<BpfMaps, DatapathError> {
        let mut take = |name: &'static str| {
            self.ebpf.take_map(name).ok_or(DatapathError::Map {
                name,
                source: Box::new(MapError::InvalidName {
                    name: name.to_owned(),
                }),
            })
        };
        let maps = [
            take(map_names::SERVICES)?,
            take(map_names::BACKENDS)?,
            take(map_names::REV_NAT)?,
            take(map_names::MAGLEV)?,
            take(map_names::SOURCE_RANGES)?,
            take(map_names::BACKEND_STATS)?,
            take(map_names::BACKEND_GEN)?,
            take(map_names::PREFILTER)?,
            take(map_names::SERVICES6)?,
            take(map_names::BACKENDS6)?,
            take(map_names::REV_NAT6)?,
            take(map_names::SOURCE_RANGES6)?,
            take(map_names::SHORT_CIRCUIT)?,
        ];
        BpfMaps::from_maps(maps, &self.pins)
    }
}

/// The sysctl `net.ipv4.conf.<interface>.accept_local` (its file under /proc/sys). XDP hands
/// a source-NATed packet (whose source is this node's address) to the kernel to forward
/// while the next hop's neighbour entry is unresolved, so that the kernel resolves it;
/// without this sysctl the kernel drops such a packet as a martian. (Once resolved, XDP
/// sends the packets itself.)
pub fn accept_local_sysctl(interface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/accept_local"))
}

/// What [`ensure_sysctl`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlOutcome {
    /// The value was there already: nothing was written.
    AlreadySet,
    /// The value was written.
    Written,
}

/// Sets the sysctl whose file is `path` to `value`, reading it first and writing only when
/// it differs: container runtimes mount /proc/sys read-only, and a value the host set
/// already needs no write.
pub fn ensure_sysctl(path: &Path, value: &str) -> Result<SysctlOutcome, DatapathError> {
    let err = |source| DatapathError::Sysctl {
        path: path.to_owned(),
        source,
    };
    if std::fs::read_to_string(path).map_err(err)?.trim() == value {
        return Ok(SysctlOutcome::AlreadySet);
    }
    std::fs::write(path, value).map_err(err)?;
    Ok(SysctlOutcome::Written)
}

/// The index of a network interface in this network namespace.
pub fn interface_index(name: &str) -> Result<u32, DatapathError> {
    let unknown = || DatapathError::UnknownInterface {
        name: name.to_owned(),
    };
    let c_name = std::ffi::CString::new(name).map_err(|_| unknown())?;
    // SAFETY: c_name is a valid C string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(unknown()),
        index => Ok(index),
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: Box::new(ProgramError::UnexpectedProgramType),
    })
}

/// The program `name`, as the program type `P` it must be.
pub(crate) fn typed_program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    program(ebpf, name)?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })
}

fn pin_link(link: Result<FdLink, LinkError>, path: &Path) -> Result<(), DatapathError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::PinLink {
        path: path.to_owned(),
        source,
    };
    let link = link.map_err(|e| err(Box::new(e)))?;
    link.pin(path).map_err(|e| err(Box::new(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sysctl_is_read_first_and_written_only_when_it_differs() {
        let dir = std::env::temp_dir().join(format!("lb-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("accept_local");
        std::fs::write(&file, "0\n").unwrap();
        assert_eq!(ensure_sysctl(&file, "1").unwrap(), SysctlOutcome::Written);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "1");
        // Set already (as /proc/sys shows it, with a newline): not written.
        std::fs::write(&file, "1\n").unwrap();
        assert_eq!(
            ensure_sysctl(&file, "1").unwrap(),
            SysctlOutcome::AlreadySet
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "1\n");
        // Missing: an error naming the file.
        let missing = dir.join("missing");
        let e = ensure_sysctl(&missing, "1").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
