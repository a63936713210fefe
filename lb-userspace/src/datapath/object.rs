//! The embedded objects held to lb-common's schema ([`map_names::ALL`],
//! [`program_names::ALL`]): each map there with its kind, key and value sizes, entries and
//! flags, each program with its hook, nothing else, and every name short enough for the
//! kernel. The objects are parsed (as the loader parses them), not loaded: no root needed.

use std::collections::BTreeMap;

use aya_obj::{
    EbpfSectionKind, Map, Object, ProgramSection,
    maps::PinningType,
    programs::{CgroupSockAddrAttachType, XdpAttachType},
};
use lb_common::{
    BACKEND_STATS_MASK_GLOBAL, map_names, program_names,
    schema::{MAX_NAME_LEN, MapKind, MapSpec, ProgramKind, ProgramSpec},
};

fn parse(object: &[u8]) -> Object {
    Object::parse(object).expect("the embedded object parses")
}

/// A map as the object declares it, or as the schema says it must be: type, key and value
/// sizes, entries, flags.
type Declared = (u32, u32, u32, u32, u32);

fn declared(map: &Map) -> Declared {
    (
        map.map_type(),
        map.key_size(),
        map.value_size(),
        map.max_entries(),
        map.map_flags(),
    )
}

fn expected(spec: &MapSpec) -> Declared {
    (
        spec.kind.bpf_type(),
        spec.key_size,
        spec.value_size,
        spec.entries.default_entries(),
        spec.flags,
    )
}

/// The object's sections of global variables (aya makes each a map).
fn is_data(map: &Map) -> bool {
    matches!(
        map.section_kind(),
        EbpfSectionKind::Data | EbpfSectionKind::Rodata | EbpfSectionKind::Bss
    )
}

/// The schema's kind of a program of the object, from its section.
fn kind(section: &ProgramSection) -> Option<ProgramKind> {
    use CgroupSockAddrAttachType as Sock;
    Some(match section {
        ProgramSection::Xdp {
            frags: false,
            attach_type: XdpAttachType::Interface,
        } => ProgramKind::Xdp,
        ProgramSection::SchedClassifier => ProgramKind::Classifier,
        ProgramSection::CgroupSockAddr { attach_type } => {
            ProgramKind::CgroupSockAddr(match attach_type {
                Sock::Connect4 => "connect4",
                Sock::Connect6 => "connect6",
                Sock::UDPSendMsg4 => "sendmsg4",
                Sock::UDPSendMsg6 => "sendmsg6",
                Sock::UDPRecvMsg4 => "recvmsg4",
                Sock::UDPRecvMsg6 => "recvmsg6",
                Sock::GetPeerName4 => "getpeername4",
                Sock::GetPeerName6 => "getpeername6",
                _ => return None,
            })
        }
        _ => return None,
    })
}

/// What is wrong with the programs of `object`, against `specs`.
fn program_errors(object: &Object, specs: &[ProgramSpec]) -> Vec<String> {
    let mut errors = Vec::new();
    let programs: BTreeMap<&String, _> = object.programs.iter().collect();
    for (name, program) in programs {
        match specs.iter().find(|p| p.name == name) {
            None => errors.push(format!(
                "program {name}: not in lb_common::program_names (add it, with its hook)"
            )),
            Some(spec) if kind(&program.section) != Some(spec.kind) => errors.push(format!(
                "program {name}: its section is {:?}, program_names says {:?}",
                program.section, spec.kind
            )),
            Some(_) => {}
        }
    }
    for spec in specs {
        if !object.programs.contains_key(spec.name) {
            errors.push(format!(
                "program {}: in lb_common::program_names, not in the object",
                spec.name
            ));
        }
    }
    errors
}

/// Names the kernel would cut short.
fn long_names<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    names
        .filter(|name| name.len() > MAX_NAME_LEN)
        .map(|name| {
            format!(
                "{name}: {} characters, of which the kernel keeps {MAX_NAME_LEN} (bpftool \
                 shows {:?}): rename it",
                name.len(),
                &name[..MAX_NAME_LEN]
            )
        })
        .collect()
}

#[test]
fn the_object_has_the_declared_maps_and_no_other() {
    let object = parse(crate::EBPF_OBJECT);
    let mut errors = Vec::new();
    let maps: BTreeMap<&String, &Map> = object.maps.iter().collect();
    for (name, map) in maps.into_iter().filter(|(_, m)| !is_data(m)) {
        let Some(spec) = map_names::spec(name) else {
            errors.push(format!(
                "map {name}: not in lb_common::map_names::ALL (add it, with its layout)"
            ));
            continue;
        };
        if declared(map) != expected(spec) {
            errors.push(format!(
                "map {name}: the object declares (type, key, value, entries, flags) {:?}, \
                 map_names::ALL says {:?}",
                declared(map),
                expected(spec)
            ));
        }
        // The maps of maps are BTF maps, which the agent pins by path; the others are
        // pinned by name.
        let (inner, pinning) = match spec.kind {
            MapKind::HashOfMaps(inner) => (Some(expected(inner)), PinningType::None),
            _ => (None, PinningType::ByName),
        };
        if map.inner().as_ref().map(declared) != inner {
            errors.push(format!(
                "map {name}: inner map {:?}, map_names::ALL says {inner:?}",
                map.inner().as_ref().map(declared)
            ));
        }
        if map.pinning() != pinning {
            errors.push(format!(
                "map {name}: pinning {:?}, not {pinning:?}",
                map.pinning()
            ));
        }
    }
    for spec in map_names::ALL {
        if !object.maps.contains_key(spec.name) {
            errors.push(format!(
                "map {}: in lb_common::map_names::ALL, not in the object",
                spec.name
            ));
        }
    }
    // Global variables: only read-only ones (.rodata, with the constants the agent sets at
    // load time, such as the mask of the backends' counters, and the compiler's).
    let data: BTreeMap<&str, EbpfSectionKind> = (object.maps.iter())
        .filter(|(_, m)| is_data(m))
        .map(|(name, m)| (name.as_str(), m.section_kind()))
        .collect();
    if data.values().any(|kind| *kind != EbpfSectionKind::Rodata)
        || data.get(".rodata") != Some(&EbpfSectionKind::Rodata)
    {
        errors.push(format!(
            "global variables in {data:?}: the programs have read-only ones only, in .rodata \
             (such as {BACKEND_STATS_MASK_GLOBAL}): a writable one would be one per object, \
             not pinned, and start again on each load"
        ));
    }
    errors.extend(program_errors(&object, &program_names::ALL));
    let mut names: Vec<&String> = object.maps.keys().chain(object.programs.keys()).collect();
    names.sort();
    errors.extend(long_names(names.into_iter()));
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The benchmarks' generator: its program and its maps (not pinned), as declared.
#[test]
fn the_generator_object_has_the_declared_programs_and_maps() {
    let object = parse(crate::PKTGEN_OBJECT);
    let mut errors = program_errors(&object, &program_names::PKTGEN);
    let maps: BTreeMap<&String, &Map> = object.maps.iter().collect();
    for (name, map) in maps {
        match lb_common::pktgen::map_names::ALL
            .iter()
            .find(|m| m.name == name)
        {
            Some(spec) if declared(map) == expected(spec) && map.pinning() == PinningType::None => {
            }
            Some(spec) => errors.push(format!(
                "map {name}: the object declares {:?} pinned {:?}, pktgen::map_names::ALL \
                 says {:?}, not pinned",
                declared(map),
                map.pinning(),
                expected(spec)
            )),
            None => errors.push(format!(
                "map {name}: not in lb_common::pktgen::map_names::ALL"
            )),
        }
    }
    for spec in lb_common::pktgen::map_names::ALL {
        if !object.maps.contains_key(spec.name) {
            errors.push(format!("map {}: declared, not in the object", spec.name));
        }
    }
    let mut names: Vec<&String> = object.maps.keys().chain(object.programs.keys()).collect();
    names.sort();
    errors.extend(long_names(names.into_iter()));
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_floor_object_has_the_declared_programs_and_no_map() {
    let object = parse(crate::NOOP_OBJECT);
    let mut errors = program_errors(&object, &program_names::NOOP);
    errors.extend(long_names(object.programs.keys()));
    let maps: Vec<&String> = object.maps.keys().collect();
    assert!(maps.is_empty(), "maps in the floor object: {maps:?}");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
