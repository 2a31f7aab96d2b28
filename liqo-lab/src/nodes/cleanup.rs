//! Removing everything the real nodes of a lab made, whatever state they are in: one shell script,
//! written when the nodes are set up, run by the lab when it stops and by its watchdog when the
//! process that started it dies (containers outlive their kubelet and containerd).

use std::path::Path;

use crate::{cluster::write_file, error::Result};

/// Name of the script in the lab's root directory.
pub(crate) const SCRIPT: &str = "nodes-cleanup.sh";

/// The script: kill every process of the nodes' cgroups and every process whose command line
/// names the nodes' directory (containerd, its shims, kubelet, kube-proxy), unmount what is
/// mounted under the lab's root (container root filesystems, volumes, pod network namespaces),
/// remove the cgroups and delete the network namespaces.
pub(crate) fn script(root: &Path, cgroup_names: &[String], netns: &[String]) -> String {
    let root = root.display();
    // Every hierarchy, the cgroup-v2 `unified` one of a hybrid layout included: runc makes the
    // containers' cgroups there too.
    let cgroups: Vec<String> = cgroup_names
        .iter()
        .flat_map(|n| {
            [
                format!("/sys/fs/cgroup/*/{n}"),
                format!("/sys/fs/cgroup/{n}"),
            ]
        })
        .collect();
    let cgroups = cgroups.join(" ");
    let namespaces = netns.join(" ");
    format!(
        r#"# Written by liqo-lab: removes the real nodes of the lab in {root}.
nodes="{root}/nodes/"
cgroups=$(for d in {cgroups}; do [ -d "$d" ] && echo "$d"; done)
for round in 1 2 3 4 5 6 7 8 9 10; do
  pids=$(for d in $cgroups; do [ -d "$d" ] && find "$d" -name cgroup.procs -exec cat {{}} + 2>/dev/null; done)
  pids="$pids $(pgrep -f -- "$nodes" | grep -vx "$$")"
  pids=$(echo $pids)
  [ -z "$pids" ] && break
  kill -9 $pids 2>/dev/null
  sleep 0.2
done
awk -v r="{root}/" 'index($5, r) == 1 {{ print $5 }}' /proc/self/mountinfo | sort -r | while read -r m; do
  umount -l "$m" 2>/dev/null
done
for d in $cgroups; do
  [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {{}} + 2>/dev/null
done
for n in {namespaces}; do
  ip netns del "$n" 2>/dev/null
done
exit 0
"#
    )
}

/// Writes the script into `root`.
pub(crate) fn write(root: &Path, cgroup_names: &[String], netns: &[String]) -> Result<()> {
    write_file(
        &root.join(SCRIPT),
        &script(root, cgroup_names, netns),
        0o755,
    )
}

/// Runs the script of the lab in `root`, if it has one (blocking: used on teardown, where no
/// runtime may be left).
pub(crate) fn run(root: &Path) {
    let script = root.join(SCRIPT);
    if !script.exists() {
        return;
    }
    match std::process::Command::new("sh").arg(&script).status() {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::warn!("{} ended with {s}", script.display()),
        Err(e) => tracing::warn!("running {}: {e}", script.display()),
    }
}
