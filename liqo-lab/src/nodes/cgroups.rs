//! The cgroup of a real node: its kubelet's `cgroupRoot`, in every hierarchy, so the kubelets of
//! one machine never share `kubepods` and a node's containers can all be found (and killed).

use std::{fs, io, path::PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The directories of cgroup `name` in every hierarchy of this machine: one per cgroup-v1
/// hierarchy (`/sys/fs/cgroup/<controller>/<name>`; the v2 `unified` mount of a hybrid layout is
/// left out, the kubelet does not use it), or `/sys/fs/cgroup/<name>` on a cgroup-v2 machine.
pub(crate) fn dirs(name: &str) -> io::Result<Vec<PathBuf>> {
    let root = PathBuf::from(ROOT);
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![root.join(name)]);
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&root)? {
        let path = entry?.path();
        let hierarchy = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if hierarchy == "unified" || !path.join("cgroup.procs").exists() {
            continue;
        }
        // Symlinks such as `cpu,cpuacct -> cpu` would name one hierarchy twice.
        if fs::symlink_metadata(&path)?.file_type().is_symlink() {
            continue;
        }
        out.push(path.join(name));
    }
    out.sort();
    Ok(out)
}

/// Creates cgroup `name` everywhere [`dirs`] says; a v1 `cpuset` cgroup gets its parent's CPUs
/// and memory nodes (it cannot hold tasks otherwise).
pub(crate) fn create(name: &str) -> io::Result<()> {
    for dir in dirs(name)? {
        fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = dir.join(file);
            if let (true, Some(parent)) = (own.exists(), dir.parent()) {
                let value = fs::read_to_string(parent.join(file))?;
                if fs::read_to_string(&own)?.trim().is_empty() {
                    fs::write(&own, value.trim())?;
                }
            }
        }
    }
    Ok(())
}
