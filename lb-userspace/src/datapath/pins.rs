//! The pin directory and every name pinned in it ([`Pins`]): loading, migration, the
//! counters, east-west and teardown open what is pinned through it.
//!
//! Layout under the directory (default [`DEFAULT_PIN_DIR`]):
//! - one file per map, named as in [`lb_common::map_names`] (versioned: a layout change
//!   gets a new name, see [`super::migrate`]);
//! - `links/`: the pinned links of the programs (`xdp_ingress@<interface>`,
//!   `tc_egress@<interface>`, and the east-west ones of [`super::eastwest`]).

use std::{
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData};
use tracing::{debug, info};

use super::{BPFFS_ROOT, DEFAULT_PIN_DIR, DatapathError, map_err, sys};

/// The pin directory and the names in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    dir: PathBuf,
}

impl Default for Pins {
    fn default() -> Self {
        Self::new(DEFAULT_PIN_DIR)
    }
}

impl From<&Path> for Pins {
    fn from(dir: &Path) -> Self {
        Self::new(dir)
    }
}

impl Pins {
    /// The pins under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether map `name` is pinned.
    pub fn has_map(&self, name: &str) -> bool {
        self.map(name).exists()
    }

    /// The directory of the pinned links.
    pub fn links(&self) -> PathBuf {
        self.dir.join("links")
    }

    /// Where link `name` is pinned.
    pub fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }

    /// Makes sure the directory is inside a bpf filesystem, mounting bpffs at /sys/fs/bpf
    /// when the directory is under it and nothing is mounted there yet, but only where the
    /// mount outlives the agent (the host's mount namespace): pins in a bpffs that dies with
    /// the agent would take the datapath with them, and the restart guarantee.
    pub fn prepare(&self) -> Result<(), DatapathError> {
        let err = |source| DatapathError::PinDir {
            path: self.dir.clone(),
            source,
        };
        let default_root = Path::new(BPFFS_ROOT);
        if self.dir.starts_with(default_root) {
            std::fs::create_dir_all(default_root).map_err(err)?;
            if !sys::is_bpffs(default_root).map_err(err)? {
                if let Some(why) = sys::private_mount_namespace() {
                    return Err(DatapathError::PrivateBpffs { why });
                }
                sys::mount(c"bpf", default_root).map_err(err)?;
                info!("mounted bpffs at {}", default_root.display());
            }
        }
        std::fs::create_dir_all(self.links()).map_err(err)?;
        if !sys::is_bpffs(&self.dir).map_err(err)? {
            return Err(err(io::Error::other("not on a bpf filesystem")));
        }
        Ok(())
    }

    /// The pinned map `name`.
    pub fn map_data(&self, name: &'static str) -> Result<MapData, DatapathError> {
        let path = self.map(name);
        if !path.exists() {
            return Err(DatapathError::NotPinned(self.dir.clone()));
        }
        MapData::from_pin(&path).map_err(map_err(name))
    }

    /// The pinned map `name`, as the map type `kind` it must be.
    pub fn open_map(
        &self,
        name: &'static str,
        kind: fn(MapData) -> Map,
    ) -> Result<Map, DatapathError> {
        Ok(kind(self.map_data(name)?))
    }

    /// The size of the pinned map `name`.
    pub fn max_entries(&self, name: &'static str) -> Result<u32, DatapathError> {
        let info = self.map_data(name)?.info().map_err(map_err(name))?;
        Ok(info.max_entries())
    }

    /// Removes everything pinned: links first (which detaches the programs once no agent
    /// holds them), then maps, then the directories. Returns the paths removed.
    pub fn teardown(&self) -> io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        if !self.dir.exists() {
            return Ok(removed);
        }
        let links = self.links();
        for dir in [&links, &self.dir] {
            if !dir.exists() {
                continue;
            }
            let mut entries: Vec<_> = std::fs::read_dir(dir)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            entries.sort();
            for path in entries {
                if path.is_dir() {
                    continue;
                }
                if *dir == links {
                    detach(&path);
                }
                std::fs::remove_file(&path)?;
                removed.push(path);
            }
        }
        if links.exists() {
            std::fs::remove_dir(&links)?;
        }
        std::fs::remove_dir(&self.dir)?;
        removed.push(self.dir.clone());
        Ok(removed)
    }
}

/// Detaches the link pinned at `path` before it is unpinned, so that its program is gone from
/// its hook when `lb teardown` returns (unpinning alone leaves it attached until the kernel
/// releases the link). Best effort: a link whose hook is gone (ENOLINK) or that cannot be
/// detached this way is released by the unpinning.
fn detach(path: &Path) {
    let detached = sys::obj_get(path).and_then(|link| sys::link_detach(link.as_fd()));
    if let Err(e) = detached {
        debug!(path = %path.display(), "link not detached before unpinning: {e}");
    }
}
