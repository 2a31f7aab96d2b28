//! Issue #14, as seen on the demo: `kill -9` of an agent whose userspace gateway runs in the
//! cluster's gateway network namespace, then the same command again. The second agent must
//! start (no refusal over its predecessor's wireguard-go, no `client error (Connect)` from the
//! IPAM store loading on the namespace's thread), log what it replaced in one line, and on
//! SIGTERM leave no daemon or control socket.
//!
//! Needs root, `ip`, `nft`, `setpriv` and `wireguard-go` (as CI has), and the lab's binaries.

mod common;

use common::{Agent, Error, free_port, http_get, until};

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use liqo_lab::{Cluster, ClusterSpec, DataPlane, Lab, LabSpec, WorkerSpec};
use liqo_wireguard_userspace::{leftovers::marked_for, socket_path};

type TestResult = Result<(), Error>;

const WAIT: Duration = Duration::from_secs(90);
const CLUSTER: &str = "cr-a";
const LINE: &str = "an earlier run left state behind";

async fn lab() -> &'static Lab {
    liqo_lab::shared(|| {
        LabSpec::new([ClusterSpec::new(CLUSTER)
            .pod_cidr("10.244.0.0/16".parse().expect("a CIDR"))
            .workers(1, WorkerSpec::new("4", "8Gi", 20))])
    })
    .await
    .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

/// Removes, pass or fail, the test's directory and any daemon marked for our interface.
struct Leftovers {
    dir: PathBuf,
    iface: String,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for d in marked_for(&self.iface) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &d.pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_file(socket_path(&self.iface));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(
    dir: &Path,
    cluster: &Cluster,
    kubeconfig: &Path,
    dp: &DataPlane,
    iface: &str,
) -> Result<(PathBuf, String), Error> {
    let gw = dp.gateway(CLUSTER).ok_or("the data plane has no gateway")?;
    let metrics = format!("127.0.0.1:{}", free_port());
    let path = dir.join("agent.yaml");
    std::fs::write(
        &path,
        format!(
            "kubeconfig: {kubeconfig}\n\
             installCrds: false\n\
             metricsAddr: {metrics}\n\
             cluster:\n  name: {CLUSTER}\n  id: {CLUSTER}\n  podCidr: {pod}\n  serviceCidr: {svc}\n\
             discovery:\n  mdns: {{enabled: false}}\n  foreignClusters: true\n\
             peering:\n  listen: 127.0.0.1:{peering}\n\
             network:\n  enabled: true\n  backend: userspace\n  \
             implementation: wireguard-go\n  interface: {iface}\n  listenPort: 51820\n  \
             endpoint: {wan}:51820\n  netns: {netns}\n\
             virtualKubelet:\n  consumer:\n    enabled: false\n  provider:\n    enabled: false\n",
            kubeconfig = kubeconfig.display(),
            pod = cluster.pod_cidr(),
            svc = cluster.service_cidr(),
            wan = gw.wan_address,
            // Not the default 0.0.0.0:8443, which another test or agent may hold.
            peering = free_port(),
            netns = gw.netns_path.display(),
        ),
    )?;
    Ok((path, metrics))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

async fn ready(agent: &Agent) -> TestResult {
    until("/readyz 200", &[agent], WAIT, || async {
        matches!(http_get(&agent.metrics, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_starts_again_over_its_leftovers() -> TestResult {
    let lab = lab().await;
    let cluster = lab.cluster(CLUSTER).ok_or("no cluster")?;
    // Drop order (reverse of declaration): agents, then leftovers, then the data plane.
    let dp = DataPlane::start(lab).await?;
    let leftovers = Leftovers {
        dir: std::env::temp_dir().join(format!("liqo-agent-restart-{}", std::process::id())),
        iface: format!("lqcr{}", std::process::id() % 100_000),
    };
    std::fs::create_dir_all(&leftovers.dir)?;
    let sa = common::install_deploy(cluster).await?;
    let (cfg, metrics) = config(&leftovers.dir, cluster, &sa, &dp, &leftovers.iface)?;
    let rust_log = "info,kube_runtime=warn";
    let log = |n: u32| leftovers.dir.join(format!("agent-{n}.log"));

    // The first agent plays one without `setpriv` (or from before it was used): its
    // wireguard-go is not stopped by the kernel when it dies, as in the issue.
    let bin = leftovers.dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    for tool in ["wireguard-go", "nft"] {
        let path = which(tool).ok_or_else(|| format!("{tool} is not installed"))?;
        std::os::unix::fs::symlink(path, bin.join(tool))?;
    }
    let first = Agent::spawn_with_env(
        &cfg,
        &[],
        metrics.clone(),
        log(1),
        rust_log,
        &[("PATH", bin.as_os_str())],
    )?;
    ready(&first).await?;
    let daemons = marked_for(&leftovers.iface);
    assert_eq!(daemons.len(), 1, "one wireguard-go for {}", leftovers.iface);
    let orphan = daemons[0].pid;
    first.kill().await?;
    assert!(
        marked_for(&leftovers.iface).iter().any(|d| d.pid == orphan),
        "the first agent's daemon should outlive it"
    );

    // The same command again: it replaces the orphan and says so in one line.
    let second = Agent::spawn(&cfg, &[], metrics.clone(), log(2), rust_log)?;
    ready(&second).await?;
    let text = std::fs::read_to_string(log(2))?;
    assert!(
        !text.contains("client error (Connect)"),
        "{}",
        second.logs()
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(LINE)).collect();
    assert_eq!(lines.len(), 1, "one leftovers line: {}", second.logs());
    eprintln!("{}", lines[0]);
    assert!(
        lines[0].contains(&format!("replaced daemon pid {orphan} ")),
        "{}",
        lines[0]
    );
    let now: Vec<i32> = marked_for(&leftovers.iface).iter().map(|d| d.pid).collect();
    assert!(now.len() == 1 && now[0] != orphan, "{now:?}");

    // Killed with setpriv in place, its daemon is stopped by the kernel (or, still exiting,
    // replaced): the third start works too, and SIGTERM then leaves nothing.
    second.kill().await?;
    let third = Agent::spawn(&cfg, &[], metrics.clone(), log(3), rust_log)?;
    ready(&third).await?;
    let text = std::fs::read_to_string(log(3))?;
    assert!(!text.contains("client error (Connect)"), "{}", third.logs());
    assert!(text.lines().filter(|l| l.contains(LINE)).count() <= 1);
    assert_eq!(marked_for(&leftovers.iface).len(), 1, "{}", third.logs());
    assert_eq!(third.terminate().await?, 0);
    assert!(
        marked_for(&leftovers.iface).is_empty(),
        "a daemon outlived SIGTERM"
    );
    assert!(!socket_path(&leftovers.iface).exists());
    Ok(())
}
