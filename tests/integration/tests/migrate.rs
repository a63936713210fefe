//! The migration of pinned maps (`lb_userspace::datapath::migrate`) on real pinned maps, with a
//! conversion of the test's own: what the new map lacks is converted, what it has is kept,
//! the old pins go at the end, newer ones stay. Needs root (bpffs). The real conversion,
//! conntrack V1 -> V2 under traffic, is in the upgrade test (`restart.rs`).

use lb_userspace::datapath::Pins;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use lb_testbed::PinDir;
use lb_userspace::datapath::migrate::{Conversion, Copied, Migrated, Migration};

fn create(dir: &Path, name: &str, entries: &[(u32, u32)]) {
    let mut map = HashMap::<MapData, u32, u32>::create(16, 0).unwrap();
    for (k, v) in entries {
        map.insert(k, v, 0).unwrap();
    }
    map.pin(dir.join(name)).unwrap();
}

fn open<V: aya::Pod>(dir: &Path, name: &str) -> HashMap<MapData, u32, V> {
    let data = MapData::from_pin(dir.join(name)).unwrap();
    HashMap::try_from(Map::HashMap(data)).unwrap()
}

#[test]
fn older_pinned_maps_are_converted_where_the_new_map_lacks_the_key_then_unpinned() {
    let pins = PinDir::new().unwrap();
    let dir = pins.path();
    // V1 maps u32 -> u32; V2 maps u32 -> u64 (value + 1) and drops key 4. LB_OTHER has no
    // conversion, nor has LB_OLDNAME_V1, its former name; a V3 of LB_TESTMAP is newer than
    // this "agent".
    create(
        dir,
        "LB_TESTMAP_V1",
        &[(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)],
    );
    create(dir, "LB_OTHER_V1", &[(1, 1)]);
    create(dir, "LB_OLDNAME_V1", &[(2, 2)]);
    create(dir, "LB_TESTMAP_V3", &[(7, 7)]);
    let conversion = Conversion::hash("LB_TESTMAP_V1", "LB_TESTMAP_V2", |k: u32, v: u32| {
        (k != 4).then_some((k, u64::from(v) + 1))
    });
    let current = ["LB_TESTMAP_V2", "LB_OTHER_V2"];
    let renamed = [("LB_OLDNAME_V1", "LB_OTHER_V2")];
    let mut migration =
        Migration::plan_with(&Pins::new(dir), &current, &renamed, vec![conversion]).unwrap();
    assert_eq!(
        migration.conversions().collect::<Vec<_>>(),
        [("LB_TESTMAP_V1", "LB_TESTMAP_V2")]
    );

    // The load creates the current maps; say the new programs already wrote key 5.
    let mut new = HashMap::<MapData, u32, u64>::create(16, 0).unwrap();
    new.insert(5, 999, 0).unwrap();
    new.pin(dir.join("LB_TESTMAP_V2")).unwrap();
    create(dir, "LB_OTHER_V2", &[]);
    let first = migration.copy().unwrap();
    assert_eq!(
        first,
        Copied {
            written: 3,
            present: 1,
            dropped: 1,
            failed: 0
        }
    );
    // The old programs write once more before the new ones replace them.
    open::<u32>(dir, "LB_TESTMAP_V1").insert(6, 60, 0).unwrap();
    let done = migration.finish().unwrap();

    let mut converted: Vec<(u32, u64)> = open::<u64>(dir, "LB_TESTMAP_V2")
        .iter()
        .map(Result::unwrap)
        .collect();
    converted.sort();
    assert_eq!(converted, [(1, 11), (2, 21), (3, 31), (5, 999), (6, 61)]);
    assert_eq!(
        done,
        [
            Migrated {
                from: "LB_TESTMAP_V1".into(),
                to: Some("LB_TESTMAP_V2"),
                // The second pass finds 1, 2, 3 and 5 there, drops 4 again, writes 6.
                copied: Copied {
                    written: 4,
                    present: 5,
                    dropped: 2,
                    failed: 0
                },
            },
            Migrated {
                from: "LB_OLDNAME_V1".into(),
                to: None,
                copied: Copied::default(),
            },
            Migrated {
                from: "LB_OTHER_V1".into(),
                to: None,
                copied: Copied::default(),
            },
        ]
    );
    for (name, pinned) in [
        ("LB_TESTMAP_V1", false),
        ("LB_OTHER_V1", false),
        ("LB_OLDNAME_V1", false),
        ("LB_TESTMAP_V3", true),
        ("LB_TESTMAP_V2", true),
        ("LB_OTHER_V2", true),
    ] {
        assert_eq!(dir.join(name).exists(), pinned, "{name}");
    }
}
