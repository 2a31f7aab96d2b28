//! [`ForeignClusterDiscovery`]: `ForeignCluster` objects made by hand, as a discovery source.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use liqo_core::{
    ClusterId, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream,
    PROTOCOL_VERSION, PeerAdvertisement, crds::ForeignCluster, labels,
};
use liqo_discovery::record::validate_endpoint;

/// `ForeignCluster` objects declared by an administrator (`spec.discovery.source: Manual`, with
/// a `peeringEndpoint`), watched through the API server and reported as `Manual` peers.
///
/// Objects carrying a `liqo.io/managed-by` label were made by a component, not by hand, and are
/// skipped: the discovery controller made them from what other sources report (reporting them
/// again would echo those sources forever), and the peering side makes some for its consumers.
///
/// The watch restarts by itself (with backoff) when the API server goes away; errors are
/// reported as `Err` items in the meantime.
#[derive(Clone)]
pub struct ForeignClusterDiscovery {
    api: Api<ForeignCluster>,
}

impl std::fmt::Debug for ForeignClusterDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignClusterDiscovery")
            .finish_non_exhaustive()
    }
}

impl ForeignClusterDiscovery {
    /// Watches the ForeignClusters of the cluster `client` talks to.
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }
}

/// The advertisement a hand-made FC stands for, or why it stands for none.
fn advertisement(fc: &ForeignCluster) -> Result<Option<PeerAdvertisement>, String> {
    if fc.spec.discovery.source != DiscoverySource::Manual
        || fc.labels().contains_key(labels::MANAGED_BY)
    {
        return Ok(None);
    }
    let Some(endpoint) = &fc.spec.peering_endpoint else {
        return Err("has no spec.peeringEndpoint".into());
    };
    validate_endpoint(endpoint)?;
    Ok(Some(PeerAdvertisement {
        cluster_id: fc.spec.cluster_id.clone(),
        cluster_name: fc
            .spec
            .cluster_name
            .clone()
            .unwrap_or_else(|| fc.spec.cluster_id.to_string()),
        peering_endpoint: endpoint.clone(),
        key_fingerprint: fc.spec.public_key_fingerprint,
        protocol_version: PROTOCOL_VERSION,
        source: DiscoverySource::Manual,
        ttl: None,
    }))
}

#[derive(Default)]
struct Tracker {
    /// Object name -> the record it stands for.
    by_name: BTreeMap<String, PeerAdvertisement>,
    /// Names seen during a relist.
    relist: Option<BTreeSet<String>>,
}

type Items = Vec<Result<DiscoveryEvent, DiscoveryError>>;

impl Tracker {
    fn apply(&mut self, fc: &ForeignCluster) -> Items {
        let name = fc.name_any();
        if let Some(seen) = &mut self.relist {
            seen.insert(name.clone());
        }
        match advertisement(fc) {
            Ok(Some(ad)) => {
                let new_id = !self.by_name.values().any(|a| a.cluster_id == ad.cluster_id);
                match self.by_name.insert(name, ad.clone()) {
                    Some(old) if old == ad => vec![],
                    Some(old) if old.cluster_id != ad.cluster_id => {
                        // Cannot happen (clusterId is immutable), but stay consistent.
                        vec![Ok(expired(old.cluster_id)), Ok(DiscoveryEvent::Added(ad))]
                    }
                    Some(_) => vec![Ok(DiscoveryEvent::Updated(ad))],
                    None if new_id => vec![Ok(DiscoveryEvent::Added(ad))],
                    None => vec![Ok(DiscoveryEvent::Updated(ad))],
                }
            }
            Ok(None) => self.delete(&name),
            Err(reason) => {
                let mut out = self.delete(&name);
                out.push(Err(DiscoveryError::MalformedRecord {
                    origin: format!("ForeignCluster {name}"),
                    reason,
                }));
                out
            }
        }
    }

    fn delete(&mut self, name: &str) -> Items {
        match self.by_name.remove(name) {
            Some(old)
                if !self
                    .by_name
                    .values()
                    .any(|a| a.cluster_id == old.cluster_id) =>
            {
                vec![Ok(expired(old.cluster_id))]
            }
            _ => vec![],
        }
    }

    fn on(&mut self, event: watcher::Event<ForeignCluster>) -> Items {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeSet::new());
                vec![]
            }
            watcher::Event::InitApply(fc) | watcher::Event::Apply(fc) => self.apply(&fc),
            watcher::Event::Delete(fc) => self.delete(&fc.name_any()),
            watcher::Event::InitDone => {
                let seen = self.relist.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .by_name
                    .keys()
                    .filter(|n| !seen.contains(*n))
                    .cloned()
                    .collect();
                gone.iter().flat_map(|n| self.delete(n)).collect()
            }
        }
    }
}

fn expired(cluster_id: ClusterId) -> DiscoveryEvent {
    DiscoveryEvent::Expired {
        cluster_id,
        source: DiscoverySource::Manual,
    }
}

#[async_trait]
impl Discovery for ForeignClusterDiscovery {
    fn source(&self) -> DiscoverySource {
        DiscoverySource::Manual
    }

    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let config = watcher::Config::default().labels(&format!("!{}", labels::MANAGED_BY));
        let stream = watcher(self.api.clone(), config)
            .backoff(liqo_core::watch_backoff())
            .scan(Tracker::default(), |tracker, event| {
                let items: Items = match event {
                    Ok(e) => tracker.on(e),
                    Err(e) => vec![Err(DiscoveryError::Unavailable {
                        source_name: "ForeignCluster watch".into(),
                        message: e.to_string(),
                    })],
                };
                futures::future::ready(Some(futures::stream::iter(items)))
            })
            .flatten()
            .boxed();
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liqo_core::crds::{DiscoverySpec, ForeignClusterSpec, PeeringRole};

    fn fc(name: &str, id: &str, source: DiscoverySource, ep: Option<&str>) -> ForeignCluster {
        ForeignCluster::new(
            name,
            ForeignClusterSpec {
                cluster_id: id.parse().unwrap(),
                cluster_name: None,
                peering_endpoint: ep.map(Into::into),
                public_key_fingerprint: None,
                discovery: DiscoverySpec {
                    source,
                    auto_peer: false,
                },
                role: PeeringRole::None,
            },
        )
    }

    fn show(items: Items) -> Vec<String> {
        items
            .into_iter()
            .map(|i| match i {
                Ok(DiscoveryEvent::Added(a)) => format!("added {}", a.cluster_id),
                Ok(DiscoveryEvent::Updated(a)) => format!("updated {}", a.cluster_id),
                Ok(DiscoveryEvent::Expired { cluster_id, .. }) => format!("expired {cluster_id}"),
                Err(e) => format!("error {e}"),
            })
            .collect()
    }

    #[test]
    fn tracks_manual_objects_through_relists() {
        use DiscoverySource::*;
        let mut t = Tracker::default();
        assert!(t.on(watcher::Event::Init).is_empty());
        assert_eq!(
            show(t.on(watcher::Event::InitApply(fc(
                "a",
                "a",
                Manual,
                Some("https://a:1")
            )))),
            ["added a"]
        );
        assert!(
            t.on(watcher::Event::InitApply(fc(
                "b",
                "b",
                Mdns,
                Some("https://b:1")
            )))
            .is_empty()
        );
        let bad = show(t.on(watcher::Event::InitApply(fc("c", "c", Manual, None))));
        assert!(bad[0].contains("peeringEndpoint"), "{bad:?}");
        assert!(t.on(watcher::Event::InitDone).is_empty());
        assert_eq!(
            show(t.on(watcher::Event::Apply(fc(
                "a",
                "a",
                Manual,
                Some("https://a:2")
            )))),
            ["updated a"]
        );
        // Switched away from Manual: no longer declared.
        assert_eq!(
            show(t.on(watcher::Event::Apply(fc(
                "a",
                "a",
                Dns,
                Some("https://a:2")
            )))),
            ["expired a"]
        );
        assert_eq!(
            show(t.on(watcher::Event::Apply(fc(
                "d",
                "d",
                Manual,
                Some("https://d:1")
            )))),
            ["added d"]
        );
        // A relist that no longer has "d" expires it.
        t.on(watcher::Event::Init);
        assert_eq!(show(t.on(watcher::Event::InitDone)), ["expired d"]);
        let mut labelled = fc("e", "e", Manual, Some("https://e:1"));
        labelled
            .labels_mut()
            .insert(labels::MANAGED_BY.into(), "liqo-discovery".into());
        assert!(t.on(watcher::Event::Apply(labelled)).is_empty());
    }
}
