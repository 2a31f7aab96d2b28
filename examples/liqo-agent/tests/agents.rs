//! Two `liqo-agent` processes against a two-cluster lab (network disabled): peering through the
//! consumer's `ForeignCluster`, a Ready virtual node, metrics and readiness, an offloaded pod,
//! and a SIGTERM that exits 0 and leaves the remote workload running. The agents run as the
//! ServiceAccount of `deploy/` (its RBAC and admission guard applied, CRDs installed by the
//! admin), and none of their requests may be refused.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use liqo_core::{
    ClusterId, DiscoverySource,
    crds::{
        DiscoverySpec, ForeignCluster, ForeignClusterSpec, NamespaceOffloading,
        NamespaceOffloadingSpec, PeeringRole, PodOffloadingStrategy,
    },
};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use liqo_vk::shadow::ShadowPod;
use tokio::process::{Child, Command};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
const WAIT: Duration = Duration::from_secs(90);

async fn lab() -> &'static Lab {
    liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("agent-a"), ClusterSpec::new("agent-b")]))
        .await
        .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Removed when the test ends, pass or fail.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One agent process; killed if the test ends without stopping it.
struct Agent {
    child: Child,
    metrics: String,
    log: PathBuf,
}

impl Agent {
    /// Starts an agent on `cluster`, authenticated by `kubeconfig`.
    async fn start(
        dir: &Path,
        cluster: &Cluster,
        kubeconfig: &Path,
        id: &str,
        name: &str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let (metrics_port, peering_port) = (free_port(), free_port());
        let config = dir.join(format!("{id}.yaml"));
        std::fs::write(
            &config,
            format!(
                "installCrds: false\n\
                 cluster:\n  name: {name}\n  id: {id}\n  podCidr: {pod}\n  serviceCidr: {svc}\n\
                 peering:\n  listen: 127.0.0.1:{peering_port}\n  credentialLifetimeSeconds: 600\n  \
                 offer: {{cpu: '4', memory: 8Gi, pods: 20}}\n\
                 virtualKubelet:\n  consumer:\n    heartbeatSeconds: 2\n",
                pod = cluster.pod_cidr(),
                svc = cluster.service_cidr(),
            ),
        )?;
        let log = dir.join(format!("{id}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_liqo-agent"))
            .arg("--config")
            .arg(&config)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--log-format")
            .arg("json")
            .env("RUST_LOG", "info,liqo_vk=debug,kube_runtime=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            child,
            metrics: format!("127.0.0.1:{metrics_port}"),
            log,
        })
    }

    /// The refusals the agent logged (all of them), then the last lines of its log.
    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let refused = common::refusals(&self.log);
        format!(
            "refusals: {}\n{}",
            if refused.is_empty() {
                "none".to_owned()
            } else {
                refused.join("\n")
            },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Sends SIGTERM and waits for the exit code.
    async fn terminate(mut self) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
        let pid = self.child.id().ok_or("the agent already exited")?;
        let pid = i32::try_from(pid)?;
        // SIGTERM to the child we spawned, by its pid.
        let rc = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        assert!(rc.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(Duration::from_secs(45), self.child.wait())
            .await
            .map_err(|_| {
                format!(
                    "the agent did not exit within 45s after SIGTERM:\n{}",
                    self.logs()
                )
            })??;
        Ok(status.code().unwrap_or(-1))
    }
}

/// GET over plain HTTP/1.0 on loopback: (status code, body).
async fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

async fn until<F, Fut, T>(
    what: &str,
    agents: &[&Agent],
    mut f: F,
) -> Result<T, Box<dyn std::error::Error + Send + Sync>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        // A refusal fails the test anyway: stop waiting at the first one.
        let refused = agents.iter().any(|a| !common::refusals(&a.log).is_empty());
        if refused || Instant::now() > deadline {
            let why = if refused {
                "an agent was refused by the API server"
            } else {
                "timed out"
            };
            let logs: Vec<String> = agents.iter().map(|a| a.logs()).collect();
            return Err(format!(
                "{why} while waiting for {what}; agent logs:\n{}",
                logs.join("\n-----\n")
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn two_agents_peer_offload_and_stop_gracefully() -> TestResult {
    let lab = lab().await;
    let (ca, cb) = (
        lab.cluster("agent-a").ok_or("cluster a")?,
        lab.cluster("agent-b").ok_or("cluster b")?,
    );
    let (a, b): (Client, Client) = (ca.client()?, cb.client()?);
    let dir = TempDir(std::env::temp_dir().join(format!("liqo-agent-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let dir = &dir.0;

    // What deploy/ installs, as the admin; the agents run as its ServiceAccount.
    let (sa_a, sa_b) = (
        common::install_deploy(ca).await?,
        common::install_deploy(cb).await?,
    );
    let consumer = Agent::start(dir, ca, &sa_a, "agent-cons", "Consumer").await?;
    let provider = Agent::start(dir, cb, &sa_b, "agent-prov", "Provider").await?;
    let logs = [consumer.log.clone(), provider.log.clone()];
    let agents = [&consumer, &provider];

    // Both become ready (controllers started, local API answering).
    for agent in agents {
        until("/readyz 200", &agents, || async {
            matches!(get(&agent.metrics, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await?;
        let (code, body) = get(&agent.metrics, "/healthz").await?;
        assert_eq!((code, body.trim()), (200, "ok"));
    }

    // The provider published its facts; the consumer's administrator asks for it as a provider.
    let info = until("the provider's cluster info", &agents, || async {
        liqo_core::info::read(&b).await.ok().flatten()
    })
    .await?;
    assert_eq!(info.cluster_id.as_str(), "agent-prov");
    let endpoint = info
        .peering_endpoint
        .clone()
        .ok_or("no peering endpoint published")?;
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    let prov_id: ClusterId = "agent-prov".parse()?;
    let fc = ForeignCluster::new(
        "agent-prov",
        ForeignClusterSpec {
            cluster_id: prov_id.clone(),
            cluster_name: info.cluster_name.clone(),
            peering_endpoint: Some(endpoint),
            public_key_fingerprint: Some(info.fingerprint),
            discovery: DiscoverySpec {
                source: DiscoverySource::Manual,
                auto_peer: false,
            },
            role: PeeringRole::Provider,
        },
    );
    Api::<ForeignCluster>::all(a.clone())
        .patch(
            "agent-prov",
            &PatchParams::apply("agent-test").force(),
            &Patch::Apply(&fc),
        )
        .await?;

    // The virtual node comes up Ready on the consumer.
    let node = liqo_vk::names::node_name(&prov_id);
    let nodes: Api<Node> = Api::all(a.clone());
    until("virtual node Ready", &agents, || async {
        nodes.get_opt(&node).await.ok().flatten().filter(node_ready)
    })
    .await?;

    // Metrics show the peer and its virtual node.
    let body = until("the peer in /metrics", &agents, || async {
        match get(&consumer.metrics, "/metrics").await {
            Ok((200, body))
                if body.contains("peer=\"agent-prov\"")
                    && body.contains(&format!(
                        "liqo_virtual_node_ready{{node=\"{node}\",peer=\"agent-prov\"}} 1"
                    )) =>
            {
                Some(body)
            }
            _ => None,
        }
    })
    .await?;
    assert!(body.contains("liqo_peers{"), "{body}");
    assert!(body.contains("# EOF"), "OpenMetrics text ends with # EOF");

    // Offload a namespace and a pod: it runs on the provider as a ShadowPod.
    let ns = "agent-offload";
    Api::<Namespace>::all(a.clone())
        .patch(
            ns,
            &PatchParams::apply("agent-test"),
            &Patch::Apply(&Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            }),
        )
        .await?;
    let nso = NamespaceOffloading::new(
        liqo_vk::names::OFFLOADING_NAME,
        NamespaceOffloadingSpec {
            namespace_mapping_strategy: Default::default(),
            remote_namespace_name: None,
            pod_offloading_strategy: PodOffloadingStrategy::Remote,
            cluster_selector: None,
        },
    );
    let nsos: Api<NamespaceOffloading> = Api::namespaced(a.clone(), ns);
    nsos.patch(
        liqo_vk::names::OFFLOADING_NAME,
        &PatchParams::apply("agent-test").force(),
        &Patch::Apply(&nso),
    )
    .await?;
    until("offloading Ready", &agents, || async {
        nsos.get_opt(liqo_vk::names::OFFLOADING_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|o| o.status)
            .and_then(|s| s.phase)
            .filter(|p| format!("{p:?}") == "Ready")
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(a.clone(), ns);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("web".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("nginx".into()),
                ..Container::default()
            }],
            termination_grace_period_seconds: Some(1),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    until("the pod created (webhook ready)", &agents, || async {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => Some(p),
            Err(kube::Error::Api(s)) if s.code == 409 => pods.get_opt("web").await.ok().flatten(),
            Err(_) => None,
        }
    })
    .await?;
    let shadows: Api<ShadowPod> = Api::all(b.clone());
    let shadow = until("the ShadowPod on the provider", &agents, || async {
        shadows
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|s| s.metadata.name.as_deref() == Some("web"))
    })
    .await?;
    let twin = shadow
        .metadata
        .namespace
        .clone()
        .ok_or("ShadowPod without namespace")?;
    let remote_pods: Api<Pod> = Api::namespaced(b.clone(), &twin);
    until("the remote pod on the provider", &agents, || async {
        remote_pods.get_opt("web").await.ok().flatten()
    })
    .await?;
    let body = until("the offloaded pod in /metrics", &agents, || async {
        match get(&consumer.metrics, "/metrics").await {
            Ok((200, body))
                if body.contains(&format!(
                    "liqo_offloaded_pods{{node=\"{node}\",peer=\"agent-prov\"}} 1"
                )) =>
            {
                Some(body)
            }
            _ => None,
        }
    })
    .await?;
    assert!(
        body.contains("liqo_reflection_reconcile_seconds_count{kind=\"Pod\",result=\"ok\"}"),
        "{body}"
    );

    // Tunnel metrics come from the Tunnel objects (the network controller writes them; with the
    // network disabled here, the test writes one).
    let tenant = liqo_core::names::tenant_namespace(&prov_id);
    let tunnels: Api<liqo_core::crds::Tunnel> = Api::namespaced(a.clone(), &tenant);
    let tunnel: liqo_core::crds::Tunnel = serde_json::from_value(serde_json::json!({
        "apiVersion": "liqo.io/v1alpha1",
        "kind": "Tunnel",
        "metadata": {"name": "agent-prov", "namespace": tenant},
        "spec": {
            "clusterId": "agent-prov",
            "backend": "WireGuardGo",
            "peerPublicKey": "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
        },
    }))?;
    tunnels.create(&PostParams::default(), &tunnel).await?;
    tunnels
        .patch_status(
            "agent-prov",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "rxBytes": 1234,
                "txBytes": 5678,
                "conditions": [{
                    "type": "Connected", "status": "True", "reason": "TunnelConnected",
                    "message": "handshake 1s ago", "lastTransitionTime": "2026-01-01T00:00:00Z",
                }],
            }})),
        )
        .await?;
    until("the tunnel in /metrics", &agents, || async {
        match get(&consumer.metrics, "/metrics").await {
            Ok((200, body))
                if body.contains("liqo_tunnel_up{peer=\"agent-prov\"} 1")
                    && body.contains(
                        "liqo_tunnel_bytes{peer=\"agent-prov\",direction=\"rx\"} 1234",
                    )
                    && body.contains(
                        "liqo_tunnel_bytes{peer=\"agent-prov\",direction=\"tx\"} 5678",
                    ) =>
            {
                Some(())
            }
            _ => None,
        }
    })
    .await?;

    // SIGTERM: both exit 0, the remote workload stays.
    assert_eq!(consumer.terminate().await?, 0, "consumer exit code");
    assert_eq!(provider.terminate().await?, 0, "provider exit code");
    // The agents log a refusal and retry: a flow can end well while one of its steps (a status
    // update, a cleanup) was refused. None may have been.
    let refused: Vec<String> = logs.iter().flat_map(|l| common::refusals(l)).collect();
    assert!(
        refused.is_empty(),
        "the agents (ServiceAccount liqo-system/liqo-agent) were refused by the API server:\n{}",
        refused.join("\n")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let shadow_after = Api::<ShadowPod>::namespaced(b.clone(), &twin)
        .get_opt("web")
        .await?;
    assert!(
        shadow_after.is_some_and(|s| s.metadata.deletion_timestamp.is_none()),
        "the ShadowPod survives the agents' shutdown"
    );
    let pod_after = remote_pods.get_opt("web").await?;
    assert!(
        pod_after.is_some_and(|p| p.metadata.deletion_timestamp.is_none()),
        "the remote pod survives the agents' shutdown"
    );
    assert!(
        Api::<Node>::all(a.clone()).get_opt(&node).await?.is_some(),
        "the virtual node stays (the peering is left in place)"
    );
    Ok(())
}
