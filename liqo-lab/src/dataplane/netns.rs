//! Network namespaces: names, `ip` commands, and running code inside a namespace.

use std::{
    fs, io,
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
};

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

use crate::error::{LabError, Result};

/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Longest pod network-namespace name before it is shortened with a hash.
const MAX_NETNS_NAME: usize = 200;

/// FNV-1a, 32 bits: stable across builds and platforms (unlike `DefaultHasher`).
pub(crate) fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// The data-plane id of the lab rooted at `root`: 8 hex digits derived from the root path, so the
/// CLI finds the namespaces of a detached lab again.
pub fn dataplane_id(root: &Path) -> String {
    format!("{:08x}", fnv1a(root.as_os_str().as_encoded_bytes()))
}

/// Every network namespace of the data plane `id` starts with this.
pub(crate) fn prefix(id: &str) -> String {
    format!("liqo-{id}-")
}

/// The namespace holding the "wan" bridge every gateway is plugged into.
pub(crate) fn wan_netns(id: &str) -> String {
    format!("liqo-{id}-wan")
}

/// The gateway namespace of a cluster: `liqo-<id>-<cluster>-gw`.
pub fn gateway_netns_name(id: &str, cluster: &str) -> String {
    format!("liqo-{id}-{cluster}-gw")
}

/// The network namespace of a pod: `liqo-<id>-<cluster>.<namespace>.<pod>` (cluster and namespace
/// names hold no dots, so this never collides with a gateway's). Names longer than 200 bytes are
/// cut and end with a hash of the full name.
pub fn pod_netns_name(id: &str, cluster: &str, namespace: &str, pod: &str) -> String {
    let full = format!("liqo-{id}-{cluster}.{namespace}.{pod}");
    if full.len() <= MAX_NETNS_NAME {
        return full;
    }
    let mut cut = MAX_NETNS_NAME - 9;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{:08x}", &full[..cut], fnv1a(full.as_bytes()))
}

/// The file of a named network namespace (`/run/netns/<name>`), as `ip netns` makes it.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Names of the existing network namespaces starting with `prefix`.
pub(crate) fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

fn render(netns: Option<&str>, args: &[&str]) -> String {
    let mut s = String::from("ip");
    if let Some(ns) = netns {
        s.push_str(" -n ");
        s.push_str(ns);
    }
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

fn check(command: String, out: io::Result<std::process::Output>) -> Result<()> {
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(LabError::NetCommand {
            command,
            message: format!(
                "{} ({})",
                String::from_utf8_lossy(&o.stderr).trim(),
                o.status
            ),
        }),
        Err(e) => Err(LabError::NetCommand {
            command,
            message: format!("cannot run `ip` (iproute2): {e}"),
        }),
    }
}

/// Runs `ip [-n netns] args...`.
pub(crate) async fn ip(netns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = tokio::process::Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    check(render(netns, args), cmd.output().await)
}

/// Runs `ip [-n netns] -batch -` with one command per line, stopping at the first failure.
pub(crate) async fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    let mut cmd = tokio::process::Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let shown = render(netns, &["-batch", "-", "<<", &lines.join("; ")]);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return check(shown, Err(e)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let text = lines.join("\n") + "\n";
        if let Err(e) = stdin.write_all(text.as_bytes()).await {
            return check(shown, Err(e));
        }
    }
    check(shown, child.wait_with_output().await)
}

/// Deletes every network namespace whose name starts with `prefix` (blocking; for teardown, where
/// no runtime may be left). Deleting a namespace destroys the links inside it, including veth
/// pairs reaching into other namespaces.
pub(crate) fn remove_with_prefix(prefix: &str) -> Result<()> {
    let names = list_with_prefix(prefix);
    if names.is_empty() {
        return Ok(());
    }
    let text: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    let run = || -> io::Result<std::process::Output> {
        let mut child = std::process::Command::new("ip")
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(text.as_bytes())?;
        }
        child.wait_with_output()
    };
    let result = check(format!("ip -force -batch - << netns del {prefix}*"), run());
    let left = list_with_prefix(prefix);
    if left.is_empty() {
        return Ok(());
    }
    result?;
    Err(LabError::DataPlane(format!(
        "network namespaces left after deleting them: {}",
        left.join(", ")
    )))
}

/// Runs `f` on a fresh thread that first enters the network namespace at `path`; the thread ends
/// with `f`, so no other code ever runs in that namespace by accident. Sockets `f` creates stay in
/// the namespace and can be used from any thread afterwards.
pub(crate) fn spawn_in_netns<T, F>(path: &Path, f: F) -> oneshot::Receiver<io::Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let path = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name("liqo-lab-netns".to_owned())
        .spawn(move || {
            let result = (|| {
                let file = fs::File::open(&path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("opening network namespace {}: {e}", path.display()),
                    )
                })?;
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::other(format!(
                        "entering network namespace {}: {e}",
                        path.display()
                    ))
                })?;
                f()
            })();
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        // The sender went down with the closure; the receiver reports the thread as gone.
        tracing::warn!("spawning a thread for network namespace work: {e}");
    }
    rx
}

/// [`spawn_in_netns`], awaited.
pub(crate) async fn in_netns<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    spawn_in_netns(path, f).await.unwrap_or_else(|_| {
        Err(io::Error::other(
            "the network-namespace thread did not start",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_bounded() {
        assert_eq!(dataplane_id(Path::new("/x")), dataplane_id(Path::new("/x")));
        assert_ne!(dataplane_id(Path::new("/x")), dataplane_id(Path::new("/y")));
        assert_eq!(dataplane_id(Path::new("/x")).len(), 8);
        assert_eq!(gateway_netns_name("ab", "c1"), "liqo-ab-c1-gw");
        assert_eq!(pod_netns_name("ab", "c1", "ns", "p"), "liqo-ab-c1.ns.p");
        let long = "p".repeat(253);
        let a = pod_netns_name("ab", "c1", "ns", &long);
        let b = pod_netns_name("ab", "c1", "ns", &format!("{}q", &long[1..]));
        assert!(a.len() <= MAX_NETNS_NAME && b.len() <= MAX_NETNS_NAME);
        assert_ne!(a, b);
        assert!(a.starts_with(&prefix("ab")));
    }
}
