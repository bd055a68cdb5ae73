//! The pin directory must sit on a bpffs; mount one when it is missing, as
//! Cilium does, so the daemon works on hosts that do not mount it at boot.
use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot create pin directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot mount a bpffs at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> Result<(), BpffsError> {
    let target = CString::new(path.as_os_str().as_bytes()).expect("no NUL in a path");
    // SAFETY: valid C strings; a null data pointer is allowed.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(BpffsError::Mount {
            path: path.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Makes `pin_dir` an existing directory on a bpffs: it is one already, or
/// its parent is one (create it), or the parent is a plain directory such as
/// an unmounted `/sys/fs/bpf` (mount there, then create it).
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), BpffsError> {
    let create = |p: &Path| std::fs::create_dir_all(p).map_err(|source| BpffsError::Create { path: p.into(), source });
    if is_bpffs(pin_dir) {
        return Ok(());
    }
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && parent != Path::new("/") {
        create(parent)?;
        mount_bpffs(parent)?;
        tracing::info!(path = %parent.display(), "mounted bpffs");
    }
    create(pin_dir)
}
