#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use async_trait::async_trait;
use liqo_core::{
    Cidr, CidrMapping, ClusterId, FabricError, LinkState, LinkStatus, NetworkFabric,
    NetworkParameters, PeerLink,
};
use tracing::info;

/// A fabric for pod networks already routed to each other (see the [crate docs](crate)).
#[derive(Debug)]
pub struct RoutedFabric {
    local: NetworkParameters,
    /// The connected peers and the networks they announced.
    peers: Mutex<BTreeMap<ClusterId, NetworkParameters>>,
}

impl RoutedFabric {
    /// A fabric for this cluster's networks. A gateway endpoint or WireGuard key in `local` is
    /// dropped: there is no gateway to reach.
    pub fn new(mut local: NetworkParameters) -> Self {
        local.gateway_endpoint = None;
        local.wireguard_public_key = None;
        Self {
            local,
            peers: Mutex::default(),
        }
    }

    /// The clusters currently connected.
    pub fn peers(&self) -> Vec<ClusterId> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClusterId, NetworkParameters>> {
        // Every update is a plain insert or remove: a panic elsewhere leaves it consistent.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This cluster's networks that a peer's networks must not overlap.
    fn own_networks(&self) -> Vec<(&'static str, Cidr)> {
        let mut out = vec![
            ("pod CIDR", self.local.pod_cidr),
            ("service CIDR", self.local.service_cidr),
        ];
        out.extend(self.local.external_cidr.map(|c| ("external CIDR", c)));
        out
    }
}

/// A peer's routed networks: its pod CIDR and, if any, its external CIDR.
fn routed_networks(p: &NetworkParameters) -> Vec<(&'static str, Cidr)> {
    std::iter::once(("pod CIDR", p.pod_cidr))
        .chain(p.external_cidr.map(|c| ("external CIDR", c)))
        .collect()
}

fn link(remote: &ClusterId, params: &NetworkParameters, local: &NetworkParameters) -> PeerLink {
    PeerLink {
        cluster: remote.clone(),
        remote_mappings: routed_networks(params)
            .into_iter()
            .map(|(_, c)| CidrMapping::identity(c))
            .collect(),
        local_mappings: routed_networks(local)
            .into_iter()
            .map(|(_, c)| CidrMapping::identity(c))
            .collect(),
    }
}

#[async_trait]
impl NetworkFabric for RoutedFabric {
    async fn local_parameters(&self) -> Result<NetworkParameters, FabricError> {
        Ok(self.local.clone())
    }

    async fn connect(
        &self,
        remote: &ClusterId,
        params: &NetworkParameters,
    ) -> Result<PeerLink, FabricError> {
        if let Some(ext) = params.external_cidr
            && ext.overlaps(&params.pod_cidr)
        {
            return Err(FabricError::InvalidConfig(format!(
                "cluster {remote}'s external CIDR {ext} overlaps its own pod CIDR {}",
                params.pod_cidr
            )));
        }
        let theirs = routed_networks(params);
        let mut peers = self.lock();
        for (what, cidr) in &theirs {
            for (ours, own) in self.own_networks() {
                if cidr.overlaps(&own) {
                    return Err(FabricError::InvalidConfig(format!(
                        "cluster {remote}'s {what} {cidr} overlaps this cluster's {ours} {own}: \
                         the routed fabric does no address translation, so the clusters need \
                         disjoint networks (or use a fabric with NAT, e.g. WireGuard)"
                    )));
                }
            }
            for (other, other_params) in peers.iter().filter(|(c, _)| *c != remote) {
                for (their_what, their) in routed_networks(other_params) {
                    if cidr.overlaps(&their) {
                        return Err(FabricError::InvalidConfig(format!(
                            "cluster {remote}'s {what} {cidr} overlaps the {their_what} {their} \
                             of connected cluster {other}: routed flat, the two could not be \
                             told apart"
                        )));
                    }
                }
            }
        }
        if peers.insert(remote.clone(), params.clone()).as_ref() != Some(params) {
            info!(cluster = %remote, pod_cidr = %params.pod_cidr, "peer connected (routed)");
        }
        Ok(link(remote, params, &self.local))
    }

    async fn disconnect(&self, remote: &ClusterId) -> Result<(), FabricError> {
        if self.lock().remove(remote).is_some() {
            info!(cluster = %remote, "peer disconnected (routed)");
        }
        Ok(())
    }

    async fn status(&self, remote: &ClusterId) -> Result<LinkStatus, FabricError> {
        if !self.lock().contains_key(remote) {
            return Err(FabricError::NotConnected(remote.clone()));
        }
        Ok(LinkStatus {
            state: LinkState::Connected,
            latest_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            message: "routed by the underlay: no tunnel to check".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn id(s: &str) -> ClusterId {
        s.parse().unwrap()
    }

    fn params(pod: &str, service: &str, external: Option<&str>) -> NetworkParameters {
        let mut p = NetworkParameters::new(c(pod), c(service));
        p.external_cidr = external.map(c);
        p
    }

    fn fabric() -> RoutedFabric {
        RoutedFabric::new(params(
            "10.244.0.0/16",
            "10.96.0.0/12",
            Some("10.250.0.0/16"),
        ))
    }

    #[tokio::test]
    async fn disjoint_peers_get_identity_links() {
        let f = fabric();
        let milan = params("10.245.0.0/16", "10.96.0.0/12", Some("10.251.0.0/16"));
        let link = f.connect(&id("milan"), &milan).await.unwrap();
        assert_eq!(
            link.remote_mappings,
            vec![
                CidrMapping::identity(c("10.245.0.0/16")),
                CidrMapping::identity(c("10.251.0.0/16"))
            ]
        );
        assert!(link.local_mappings.iter().all(CidrMapping::is_identity));
        let tr = link.translator();
        let ip = "10.245.1.2".parse().unwrap();
        assert_eq!(tr.to_local_view(ip).unwrap(), ip);
        // Idempotent.
        assert_eq!(f.connect(&id("milan"), &milan).await.unwrap(), link);
        assert_eq!(f.peers(), vec![id("milan")]);
        let s = f.status(&id("milan")).await.unwrap();
        assert_eq!(s.state, LinkState::Connected);
        let all = f.link_statuses(&[id("milan")]).await.unwrap();
        assert_eq!(all.len(), 1);
        // No tunnel, nothing to shut down.
        assert!(f.tunnel_info().is_none());
        f.shutdown().await.unwrap();
        f.disconnect(&id("milan")).await.unwrap();
        f.disconnect(&id("milan")).await.unwrap();
        assert!(f.peers().is_empty());
        assert!(matches!(
            f.status(&id("milan")).await,
            Err(FabricError::NotConnected(_))
        ));
    }

    #[tokio::test]
    async fn overlapping_peers_are_refused_naming_both_cidrs() {
        let f = fabric();
        // The service CIDR may be the same on both sides: it is never routed between clusters.
        let cases = [
            (
                params("10.244.0.0/16", "10.96.0.0/12", None),
                "pod CIDR 10.244.0.0/16 overlaps this cluster's pod CIDR 10.244.0.0/16",
            ),
            (
                params("10.244.128.0/17", "10.96.0.0/12", None),
                "pod CIDR 10.244.128.0/17 overlaps this cluster's pod CIDR 10.244.0.0/16",
            ),
            (
                params("10.245.0.0/16", "10.96.0.0/12", Some("10.250.0.0/24")),
                "external CIDR 10.250.0.0/24 overlaps this cluster's external CIDR 10.250.0.0/16",
            ),
            (
                params("10.100.0.0/16", "10.96.0.0/12", None),
                "pod CIDR 10.100.0.0/16 overlaps this cluster's service CIDR 10.96.0.0/12",
            ),
        ];
        for (p, want) in cases {
            let e = f.connect(&id("milan"), &p).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains("cluster milan"), "{e}");
        }
        assert!(f.peers().is_empty(), "nothing refused is kept");
        // Two peers with the same network could not be told apart either.
        f.connect(&id("milan"), &params("10.245.0.0/16", "10.96.0.0/12", None))
            .await
            .unwrap();
        let e = f
            .connect(&id("turin"), &params("10.245.0.0/16", "10.96.0.0/12", None))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "10.245.0.0/16 overlaps the pod CIDR 10.245.0.0/16 of connected cluster milan"
            ),
            "{e}"
        );
        // A peer changing its own networks is checked against the others, not itself.
        f.connect(&id("milan"), &params("10.245.0.0/17", "10.96.0.0/12", None))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_peer_must_not_remap_us() {
        let f = fabric();
        let milan = id("milan");
        f.connect(&milan, &params("10.245.0.0/16", "10.96.0.0/12", None))
            .await
            .unwrap();
        let ok = f
            .set_local_mappings(&milan, vec![CidrMapping::identity(c("10.244.0.0/16"))])
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        let remapped = CidrMapping::new(c("10.244.0.0/16"), c("10.71.0.0/16")).unwrap();
        let e = f
            .set_local_mappings(&milan, vec![remapped])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10.244.0.0/16 as 10.71.0.0/16") && e.contains("no address translation"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn no_gateway_is_announced() {
        let mut local = params("10.244.0.0/16", "10.96.0.0/12", None);
        local.gateway_endpoint = Some("192.0.2.1:51820".into());
        let p = RoutedFabric::new(local).local_parameters().await.unwrap();
        assert_eq!(p.gateway_endpoint, None);
        assert_eq!(p.wireguard_public_key, None);
        assert_eq!(p.pod_cidr, c("10.244.0.0/16"));
    }
}
