//! The end-to-end scenario every combination of providers goes through (a test matrix, not
//! copies): two `liqo-agent` processes as the ServiceAccount of `deploy/` (its RBAC and admission
//! guard applied, CRDs installed by the admin), peering by the combination's method, a Ready
//! virtual node, metrics and readiness, the combination's fabric up, an offloaded pod, and a
//! SIGTERM that exits 0 and leaves the remote workload running; none of the agents' requests may
//! be refused.
#![allow(dead_code)] // Each test binary uses what it needs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Container, Namespace, Node, Pod, PodSpec, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use liqo_core::{
    ClusterId, ClusterIdentity, DiscoverySource, ResourceOffer,
    crds::{
        DiscoverySpec, ForeignCluster, ForeignClusterSpec, PeeringRole,
        foreign_cluster_condition as cond,
    },
};
use liqo_lab::{Cluster, Lab};
use liqo_vk::shadow::ShadowPod;

use super::{Agent, Error, free_port, http_get, until};

const WAIT: Duration = Duration::from_secs(90);

/// How the consumer gets its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// liqo-peering-csr: the provider's HTTPS endpoint, its administrator's approval.
    Csr,
    /// liqo-peering-kubeconfig: a bundle the provider's administrator issues, stored as a Secret.
    Kubeconfig,
}

/// How the pod networks are linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    /// `network.enabled: false`.
    None,
    /// liqo-fabric-routed (the lab clusters' pod CIDRs do not overlap).
    Routed,
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct Combo {
    /// The peering method both agents run.
    pub method: Method,
    /// The fabric both agents run.
    pub fabric: Fabric,
}

/// Removed when the test ends, pass or fail.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts an agent on `cluster`, authenticated by `kubeconfig`, with the providers of `combo`.
fn start_agent(
    dir: &Path,
    cluster: &Cluster,
    kubeconfig: &Path,
    id: &str,
    name: &str,
    combo: Combo,
) -> Result<Agent, Error> {
    let (metrics_port, peering_port) = (free_port(), free_port());
    let config = dir.join(format!("{id}.yaml"));
    std::fs::write(
        &config,
        format!(
            "installCrds: false\n\
             cluster:\n  name: {name}\n  id: {id}\n  podCidr: {pod}\n  serviceCidr: {svc}\n\
             peering:\n{peering}  offer: {{cpu: '4', memory: 8Gi, pods: 20}}\n\
             {network}\
             virtualKubelet:\n  consumer:\n    heartbeatSeconds: 2\n",
            pod = cluster.pod_cidr(),
            svc = cluster.service_cidr(),
            peering = match combo.method {
                Method::Csr => format!(
                    "  listen: 127.0.0.1:{peering_port}\n  credentialLifetimeSeconds: 600\n"
                ),
                Method::Kubeconfig => "  method: Kubeconfig\n".to_owned(),
            },
            network = match combo.fabric {
                Fabric::None => "",
                Fabric::Routed => "network:\n  enabled: true\n  fabric: Routed\n",
            },
        ),
    )?;
    let metrics = format!("127.0.0.1:{metrics_port}");
    Agent::spawn(
        &config,
        &[
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--metrics-addr".into(),
            metrics.clone(),
        ],
        metrics,
        dir.join(format!("{id}.log")),
        "info,liqo_vk=debug,kube_runtime=warn",
    )
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Runs the scenario on clusters `consumer` and `provider` of `lab` with `combo`.
pub async fn run(lab: &Lab, consumer: &str, provider: &str, combo: Combo) -> Result<(), Error> {
    let (ca, cb) = (
        lab.cluster(consumer).ok_or("the consumer's cluster")?,
        lab.cluster(provider).ok_or("the provider's cluster")?,
    );
    let (a, b): (Client, Client) = (ca.client()?, cb.client()?);
    let dir = TempDir(std::env::temp_dir().join(format!("liqo-agent-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let dir = &dir.0;

    // What deploy/ installs, as the admin; the agents run as its ServiceAccount.
    let (sa_a, sa_b) = (
        super::install_deploy(ca).await?,
        super::install_deploy(cb).await?,
    );
    let consumer = start_agent(dir, ca, &sa_a, "agent-cons", "Consumer", combo)?;
    let provider = start_agent(dir, cb, &sa_b, "agent-prov", "Provider", combo)?;
    let agents = [&consumer, &provider];

    // Both become ready (controllers started, local API answering).
    for agent in agents {
        until("/readyz 200", &agents, WAIT, || async {
            matches!(http_get(&agent.metrics, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await?;
        let (code, body) = http_get(&agent.metrics, "/healthz").await?;
        assert_eq!((code, body.trim()), (200, "ok"));
    }
    let prov_id: ClusterId = "agent-prov".parse()?;
    match combo.method {
        Method::Csr => peer_through_the_endpoint(&a, &b, &agents).await?,
        Method::Kubeconfig => {
            peer_through_a_bundle(ca, cb, &"agent-cons".parse()?, &prov_id, &agents).await?
        }
    }

    // The virtual node comes up Ready on the consumer.
    let node = liqo_vk::names::node_name(&prov_id);
    let nodes: Api<Node> = Api::all(a.clone());
    until("virtual node Ready", &agents, WAIT, || async {
        nodes.get_opt(&node).await.ok().flatten().filter(node_ready)
    })
    .await?;

    // Metrics show the peer and its virtual node.
    let body = until("the peer in /metrics", &agents, WAIT, || async {
        match http_get(&consumer.metrics, "/metrics").await {
            // Each gauge comes from its own watch's store: wait for all the test reads.
            Ok((200, body))
                if body.contains("liqo_peers{")
                    && body.contains("peer=\"agent-prov\"")
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
    super::workload::offload_namespace(&a, ns, &agents).await?;
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
    until("the pod created (webhook ready)", &agents, WAIT, || async {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => Some(p),
            Err(kube::Error::Api(s)) if s.code == 409 => pods.get_opt("web").await.ok().flatten(),
            Err(_) => None,
        }
    })
    .await?;
    let shadows: Api<ShadowPod> = Api::all(b.clone());
    let shadow = until("the ShadowPod on the provider", &agents, WAIT, || async {
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
    until("the remote pod on the provider", &agents, WAIT, || async {
        remote_pods.get_opt("web").await.ok().flatten()
    })
    .await?;
    let body = until("the offloaded pod in /metrics", &agents, WAIT, || async {
        match http_get(&consumer.metrics, "/metrics").await {
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

    match combo.fabric {
        Fabric::None => tunnel_metrics(&a, &consumer, &agents, &prov_id).await?,
        Fabric::Routed => {
            // Both sides' network controllers link the peer over the routed fabric.
            for (client, peer) in [(&a, "agent-prov"), (&b, "agent-cons")] {
                let fcs: Api<ForeignCluster> = Api::all(client.clone());
                until(
                    "NetworkReady on the ForeignCluster",
                    &agents,
                    WAIT,
                    || async {
                        fcs.get_opt(peer).await.ok().flatten().filter(|fc| {
                            fc.status.as_ref().is_some_and(|s| {
                                s.conditions
                                    .iter()
                                    .any(|c| c.type_ == cond::NETWORK_READY && c.status == "True")
                            })
                        })
                    },
                )
                .await?;
            }
        }
    }

    // SIGTERM: both exit 0, the remote workload stays.
    super::stop_cleanly(consumer, provider).await?;
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

/// The CSR method: the consumer's administrator declares the provider (its published endpoint and
/// key), the provider's default policy holds the request until its administrator approves.
async fn peer_through_the_endpoint(a: &Client, b: &Client, agents: &[&Agent]) -> Result<(), Error> {
    // The provider published its facts; the consumer's administrator asks for it as a provider.
    let info = until("the provider's cluster info", agents, WAIT, || async {
        liqo_core::info::read(b).await.ok().flatten()
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

    // The default policy lets in no one the provider's admin did not approve: the request
    // waits, and nothing is made for the consumer until the admin approves its key.
    let fcs_b: Api<ForeignCluster> = Api::all(b.clone());
    let pending = until(
        "the consumer's request pending approval",
        agents,
        WAIT,
        || async {
            fcs_b
                .get_opt("agent-cons")
                .await
                .ok()
                .flatten()
                .filter(|fc| {
                    fc.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.reason == "AwaitingApproval" && c.status == "False")
                    })
                })
        },
    )
    .await?;
    let fcs_a: Api<ForeignCluster> = Api::all(a.clone());
    until(
        "the consumer told it awaits approval",
        agents,
        WAIT,
        || async {
            fcs_a
                .get_opt("agent-prov")
                .await
                .ok()
                .flatten()
                .filter(|fc| {
                    fc.status.as_ref().is_some_and(|s| {
                        s.conditions.iter().any(|c| c.reason == "AwaitingApproval")
                    })
                })
        },
    )
    .await?;
    let tenant = liqo_core::names::tenant_namespace(&"agent-cons".parse()?);
    assert!(
        Api::<Namespace>::all(b.clone())
            .get_opt(&tenant)
            .await?
            .is_none(),
        "a tenant namespace exists before approval"
    );
    assert!(
        pending
            .annotations()
            .contains_key("liqo.io/key-fingerprint"),
        "the pending request shows the key to approve: {pending:?}"
    );
    fcs_b
        .patch(
            "agent-cons",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                "liqo.io/peering-approved": "true"
            }}})),
        )
        .await?;

    Ok(())
}

/// The kubeconfig method: the provider's administrator issues a bundle for the consumer (with
/// both clusters' networks as their agents publish them), the consumer's stores it as a Secret
/// and declares the provider; no endpoint anywhere.
pub async fn peer_through_a_bundle(
    ca: &Cluster,
    cb: &Cluster,
    cons_id: &ClusterId,
    prov_id: &ClusterId,
    agents: &[&Agent],
) -> Result<(), Error> {
    let (a, b) = (ca.client()?, cb.client()?);
    let published = |client: Client| async move {
        until(
            "the cluster info with its network",
            agents,
            WAIT,
            || async {
                liqo_core::info::read(&client)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|i| i.network)
            },
        )
        .await
    };
    let (cons_net, prov_net) = (published(a.clone()).await?, published(b.clone()).await?);
    let options = liqo_peering_kubeconfig::IssueOptions::new(
        liqo_peering::ApiEndpoint::new(cb.api_url(), cb.ca_cert_pem()),
        liqo_peering::OfferPolicy::Absolute(ResourceOffer::new("4", "8Gi", 20)),
        liqo_peering::NetworkSource::Static(prov_net),
        cons_net,
    );
    let bundle = liqo_peering_kubeconfig::issue_bundle(
        &b,
        &ClusterIdentity::new(prov_id.clone(), "Provider"),
        cons_id,
        Some(cons_id.as_str()),
        &options,
    )
    .await?;
    let name = liqo_peering_kubeconfig::bundle_secret_name(prov_id);
    Api::<Secret>::namespaced(a.clone(), "liqo-system")
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some(name),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    liqo_peering_kubeconfig::BUNDLE_KEY.to_owned(),
                    ByteString(bundle.to_yaml()?.into_bytes()),
                )])),
                ..Secret::default()
            },
        )
        .await?;
    let fc = ForeignCluster::new(
        prov_id.as_str(),
        ForeignClusterSpec {
            cluster_id: prov_id.clone(),
            cluster_name: Some("Provider".into()),
            peering_endpoint: None,
            public_key_fingerprint: None,
            discovery: DiscoverySpec {
                source: DiscoverySource::Manual,
                auto_peer: false,
            },
            role: PeeringRole::Provider,
        },
    );
    Api::<ForeignCluster>::all(a)
        .patch(
            prov_id.as_str(),
            &PatchParams::apply("agent-test").force(),
            &Patch::Apply(&fc),
        )
        .await?;
    Ok(())
}

/// Tunnel metrics come from the Tunnel objects (the network controller writes them; with the
/// network disabled, the test writes one).
async fn tunnel_metrics(
    a: &Client,
    consumer: &Agent,
    agents: &[&Agent],
    prov_id: &ClusterId,
) -> Result<(), Error> {
    let tenant = liqo_core::names::tenant_namespace(prov_id);
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
    until("the tunnel in /metrics", agents, WAIT, || async {
        match http_get(&consumer.metrics, "/metrics").await {
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

    Ok(())
}
