//! A private bpffs mount for one test, outside /sys (which `ip netns exec`
//! remounts), unmounted and removed on drop.
use std::path::PathBuf;

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
