//! `info`: per peer, authentication, network, virtual node, resources offered and used.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, api::ListParams};
use liqo_core::{
    ClusterId,
    crds::{ForeignCluster, PeeringRole, ResourceOffer, Tunnel, foreign_cluster_condition as cond},
};
use liqo_peering_csr::quantity::Milli;
use liqo_vk::pods::OFFLOADING_ADMITTED;
use serde::Serialize;

use super::{CondView, ago, discover, fc_conditions, node_name};
use crate::{
    CliError,
    cli::Cli,
    kube_util::{Target, is_not_found},
    output,
};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerInfo {
    cluster_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_name: Option<String>,
    role: String,
    established_role: String,
    authentication: Option<CondView>,
    offer_accepted: Option<CondView>,
    network: Network,
    virtual_node: Option<NodeInfo>,
    offered: Option<BTreeMap<String, String>>,
    used: Usage,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Network {
    ready: Option<CondView>,
    tunnel: Option<TunnelInfo>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TunnelInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latest_handshake: Option<String>,
    rx_bytes: u64,
    tx_bytes: u64,
    #[serde(skip)]
    handshake_ago: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeInfo {
    name: String,
    ready: String,
    capacity: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Usage {
    pods: usize,
    cpu: String,
    memory: String,
    /// Pods the provider refuses to run (or would refuse now), with its reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refused: Vec<RefusedPod>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RefusedPod {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) reason: String,
    pub(crate) message: String,
}

/// The provider's refusal shown on a local pod, if any.
pub(crate) fn refusal(pod: &Pod) -> Option<RefusedPod> {
    let c = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == OFFLOADING_ADMITTED && c.status == "False")?;
    Some(RefusedPod {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        reason: c.reason.clone().unwrap_or_default(),
        message: c.message.clone().unwrap_or_default(),
    })
}

fn is_peer(fc: &ForeignCluster) -> bool {
    fc.spec.role != PeeringRole::None
        || fc
            .status
            .as_ref()
            .is_some_and(|s| s.role != PeeringRole::None)
}

fn role(r: PeeringRole) -> String {
    format!("{r:?}")
}

/// Bytes as `1.5Gi`, `12Mi`, `800Ki` or plain bytes.
fn bytes(milli: Milli) -> String {
    let b = milli.whole_units();
    let units = [("Gi", 1i128 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
    for (suffix, size) in units {
        if b >= size {
            let v = b as f64 / size as f64;
            return if (v - v.round()).abs() < 0.05 {
                format!("{}{suffix}", v.round())
            } else {
                format!("{v:.1}{suffix}")
            };
        }
    }
    b.to_string()
}

async fn usage(local: &Target, node: &str) -> Result<Usage, CliError> {
    let pods = Api::<Pod>::all(local.client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(local.err(format!("listing pods on node {node}")))?;
    let mut u = Usage::default();
    let (mut cpu, mut memory) = (Milli::ZERO, Milli::ZERO);
    for pod in pods.items.iter().filter(|p| {
        !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
    }) {
        u.pods += 1;
        u.refused.extend(refusal(pod));
        let containers = pod.spec.iter().flat_map(|s| &s.containers);
        for c in containers {
            let req = c.resources.as_ref().and_then(|r| r.requests.as_ref());
            if let Some(q) = req.and_then(|r| r.get("cpu")) {
                cpu = cpu + Milli::of(q).unwrap_or_default();
            }
            if let Some(q) = req.and_then(|r| r.get("memory")) {
                memory = memory + Milli::of(q).unwrap_or_default();
            }
        }
    }
    u.cpu = cpu.to_quantity().0;
    u.memory = bytes(memory);
    Ok(u)
}

async fn peer_info(local: &Target, fc: &ForeignCluster) -> Result<PeerInfo, CliError> {
    let id: &ClusterId = &fc.spec.cluster_id;
    let conds = fc_conditions(fc);
    let tenant = liqo_core::names::tenant_namespace(id);
    let tunnel = ignore_missing(
        Api::<Tunnel>::namespaced(local.client.clone(), &tenant)
            .get_opt(id.as_str())
            .await,
    )
    .map_err(local.err(format!("reading Tunnel {tenant}/{id}")))?;
    let offer = ignore_missing(
        Api::<ResourceOffer>::namespaced(local.client.clone(), &tenant)
            .get_opt(id.as_str())
            .await,
    )
    .map_err(local.err(format!("reading ResourceOffer {tenant}/{id}")))?;
    let node_name = node_name(id);
    let node = Api::<Node>::all(local.client.clone())
        .get_opt(&node_name)
        .await
        .map_err(local.err(format!("reading node {node_name}")))?;
    let used = if node.is_some() {
        usage(local, &node_name).await?
    } else {
        Usage {
            cpu: "0".into(),
            memory: "0".into(),
            ..Usage::default()
        }
    };
    let status = fc.status.clone().unwrap_or_default();
    Ok(PeerInfo {
        cluster_id: id.to_string(),
        cluster_name: fc.spec.cluster_name.clone(),
        role: role(fc.spec.role),
        established_role: role(status.role),
        authentication: CondView::of(conds, cond::AUTHENTICATED),
        offer_accepted: CondView::of(conds, cond::OFFER_ACCEPTED),
        network: Network {
            ready: CondView::of(conds, cond::NETWORK_READY),
            tunnel: tunnel.map(|t| {
                let st = t.status.clone().unwrap_or_default();
                TunnelInfo {
                    endpoint: t.spec.endpoint.clone(),
                    latest_handshake: st.latest_handshake.as_ref().map(|h| h.0.to_string()),
                    handshake_ago: st.latest_handshake.as_ref().map(ago),
                    rx_bytes: st.rx_bytes,
                    tx_bytes: st.tx_bytes,
                }
            }),
        },
        virtual_node: node.map(|n| {
            let st = n.status.unwrap_or_default();
            NodeInfo {
                name: node_name.clone(),
                ready: st
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| c.status.clone())
                    .unwrap_or_else(|| "Unknown".into()),
                capacity: st
                    .capacity
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect(),
            }
        }),
        offered: offer.map(|o| {
            o.spec
                .resources
                .as_capacity()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }),
        used,
    })
}

/// A missing object, or a missing resource type (no fabric installed), is `None`.
fn ignore_missing<T>(r: Result<Option<T>, kube::Error>) -> Result<Option<T>, kube::Error> {
    match r {
        Err(e) if is_not_found(&e) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        other => other,
    }
}

fn cond_cell(c: &Option<CondView>) -> String {
    c.as_ref()
        .map(CondView::short)
        .unwrap_or_else(|| "-".into())
}

fn resources(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Refused pods listed per peer in the table; `-o yaml|json` has them all.
const MAX_REFUSED_SHOWN: usize = 5;

fn render(peers: &[PeerInfo]) -> String {
    let mut out = String::new();
    for (i, p) in peers.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let name = p
            .cluster_name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        out.push_str(&format!(
            "PEER {}{name}   role {} (established {})\n",
            p.cluster_id, p.role, p.established_role
        ));
        let network = match &p.network.tunnel {
            Some(t) => format!(
                "{}; tunnel rx {} tx {}, handshake {}",
                cond_cell(&p.network.ready),
                bytes(Milli(i128::from(t.rx_bytes) * 1000)),
                bytes(Milli(i128::from(t.tx_bytes) * 1000)),
                t.handshake_ago.clone().unwrap_or_else(|| "never".into())
            ),
            None => format!("{}; no tunnel", cond_cell(&p.network.ready)),
        };
        let node = match &p.virtual_node {
            Some(n) => format!(
                "{} Ready={}  capacity {}",
                n.name,
                n.ready,
                resources(&n.capacity)
            ),
            None => "-".into(),
        };
        let rows = vec![
            vec!["  authentication".into(), cond_cell(&p.authentication)],
            vec!["  offer".into(), cond_cell(&p.offer_accepted)],
            vec!["  network".into(), network],
            vec!["  virtual node".into(), node],
            vec![
                "  offered".into(),
                p.offered
                    .as_ref()
                    .map(resources)
                    .unwrap_or_else(|| "-".into()),
            ],
            vec![
                "  used".into(),
                format!(
                    "cpu={} memory={} pods={}",
                    p.used.cpu, p.used.memory, p.used.pods
                ),
            ],
        ];
        let mut rows = rows;
        for r in p.used.refused.iter().take(MAX_REFUSED_SHOWN) {
            rows.push(vec![
                "  refused".into(),
                format!("{}/{} ({}): {}", r.namespace, r.name, r.reason, r.message),
            ]);
        }
        if p.used.refused.len() > MAX_REFUSED_SHOWN {
            rows.push(vec![
                "  refused".into(),
                format!(
                    "... and {} more (-o yaml lists them all)",
                    p.used.refused.len() - MAX_REFUSED_SHOWN
                ),
            ]);
        }
        let t = output::table(&["", ""], &rows);
        // Drop the empty header line.
        out.push_str(t.split_once('\n').map(|(_, rest)| rest).unwrap_or(&t));
    }
    out
}

/// `info`.
pub async fn info(cli: &Cli, local: &Target, only: Option<&ClusterId>) -> Result<(), CliError> {
    let fcs = discover::list(local).await?;
    let selected: Vec<&ForeignCluster> = match only {
        Some(id) => {
            let fc = fcs
                .iter()
                .find(|f| &f.spec.cluster_id == id)
                .ok_or_else(|| {
                    CliError::failed(
                        format!("no ForeignCluster {id} on the local cluster"),
                        "list the known clusters with `liqoctl discover`",
                    )
                })?;
            vec![fc]
        }
        None => fcs.iter().filter(|f| is_peer(f)).collect(),
    };
    let mut peers = Vec::with_capacity(selected.len());
    for fc in selected {
        peers.push(peer_info(local, fc).await?);
    }
    output::emit(cli.output, &peers, || {
        if peers.is_empty() {
            "no peers (no ForeignCluster with a role); peer with `liqoctl peer`\n".into()
        } else {
            render(&peers)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_pods_are_listed_with_the_reason() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "demo"},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": OFFLOADING_ADMITTED, "status": "False", "reason": "OffloadingRefused",
                 "message": "provider milan refused the pod: spec.template.spec.hostNetwork: host networking is not allowed"},
            ]},
        }))
        .unwrap();
        let refused: Vec<_> = std::iter::repeat_with(|| refusal(&pod).unwrap())
            .take(MAX_REFUSED_SHOWN + 2)
            .collect();
        let peer = PeerInfo {
            cluster_id: "milan".into(),
            cluster_name: None,
            role: "Provider".into(),
            established_role: "Provider".into(),
            authentication: None,
            offer_accepted: None,
            network: Network {
                ready: None,
                tunnel: None,
            },
            virtual_node: None,
            offered: None,
            used: Usage {
                pods: refused.len(),
                cpu: "0".into(),
                memory: "0".into(),
                refused,
            },
        };
        let out = render(&[peer]);
        assert!(
            out.contains("  refused          demo/web-1 (OffloadingRefused): provider milan refused the pod: spec.template.spec.hostNetwork"),
            "{out}"
        );
        assert_eq!(
            out.matches("demo/web-1").count(),
            MAX_REFUSED_SHOWN,
            "{out}"
        );
        assert!(out.contains("... and 2 more"), "{out}");
        let ok: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a"}})).unwrap();
        assert!(refusal(&ok).is_none());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(Milli::parse("1Gi").unwrap()), "1Gi");
        assert_eq!(bytes(Milli::parse("1536Mi").unwrap()), "1.5Gi");
        assert_eq!(bytes(Milli::parse("100").unwrap()), "100");
        assert_eq!(bytes(Milli::parse("2048").unwrap()), "2Ki");
    }
}
