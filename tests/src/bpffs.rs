//! A private bpffs mount for one test, outside /sys (which `ip netns exec`
//! remounts), unmounted and removed on drop.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{sh, unique_id};

pub struct BpffsMount {
    pub id: String,
    /// The test's directory under /run/kpr-test; the mount is `dir/bpf`.
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl BpffsMount {
    pub fn new() -> Result<Self> {
        let id = unique_id();
        let dir = PathBuf::from("/run/kpr-test").join(&id);
        let path = dir.join("bpf");
        std::fs::create_dir_all(&path)?;
        let mount = BpffsMount { id, dir, path };
        sh("mount", &["-t", "bpf", "bpf", mount.path.to_str().expect("utf-8 path")])?;
        Ok(mount)
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = sh("umount", &[self.path.to_str().expect("utf-8 path")]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A map as an earlier build laid it out, pinned at `path` in place of
/// whatever is pinned there: what a node upgraded from that build holds.
/// `flags` is the map's creation flags (0 for none).
pub struct OlderMap<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub key_size: u32,
    pub value_size: u32,
    pub entries: u32,
    pub flags: u32,
}

impl OlderMap<'_> {
    pub fn pin(&self, path: &Path) -> Result<()> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let (key, value, entries, flags) = (
            self.key_size.to_string(),
            self.value_size.to_string(),
            self.entries.to_string(),
            self.flags.to_string(),
        );
        let path = path.to_str().expect("utf-8 path");
        let mut args = vec!["map", "create", path, "type", self.kind, "key", &key, "value", &value];
        args.extend(["entries", &entries, "name", self.name]);
        if self.flags != 0 {
            args.extend(["flags", &flags]);
        }
        sh("bpftool", &args)?;
        Ok(())
    }
}
