//! Service instances that claim cluster ids, turned into one stream of events per cluster id.
//!
//! On mDNS and in DNS-SD a cluster is published as a service *instance* (`rome._liqo._tcp...`)
//! whose TXT record names its cluster id. Nothing stops two instances from naming the same id: a
//! cluster restarted under another instance name, a copy of a record left behind, or an impostor.
//! A [`Discovery`](liqo_core::Discovery) stream has one record per cluster id and source, so a
//! provider has to decide which instance speaks for a cluster. [`InstanceTable`] makes that
//! decision the same way for every provider:
//!
//! - the first instance to claim a cluster id *owns* it; its record is the one reported;
//! - another instance with the same id and the same key fingerprint is an alternate: silent while
//!   the owner lives, promoted (an `Updated` event) when the owner goes away;
//! - another instance with the same id and a *different* fingerprint never replaces the owner: it
//!   is reported as an `Err` item carrying a [`ClaimConflict`] (each time it is seen), and is
//!   promoted only once the owner is gone, when the consumer's key pinning judges it;
//! - when the last instance of a cluster id goes, the cluster is reported `Expired`.

use std::collections::{BTreeMap, BTreeSet};

use liqo_core::{
    ClusterId, DiscoveryError, DiscoveryEvent, DiscoverySource, KeyFingerprint, PeerAdvertisement,
};

/// An instance announced a cluster id already owned by another instance, with another key.
///
/// Carried in [`DiscoveryError::Other`]; get it back with
/// `error.source()`/`downcast_ref::<ClaimConflict>()` or [`ClaimConflict::find`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} instance {instance:?} claims cluster {cluster_id} with key {}, but instance \
     {owner:?} owns that id with key {}; the claim is ignored",
    .source_kind.as_str(), fmt_fp(.fingerprint), fmt_fp(.owner_fingerprint)
)]
pub struct ClaimConflict {
    /// The source kind that saw both claims.
    pub source_kind: DiscoverySource,
    /// The cluster id claimed twice.
    pub cluster_id: ClusterId,
    /// The ignored instance.
    pub instance: String,
    /// Its key fingerprint.
    pub fingerprint: Option<KeyFingerprint>,
    /// The instance that owns the id.
    pub owner: String,
    /// The owner's key fingerprint.
    pub owner_fingerprint: Option<KeyFingerprint>,
    /// The ignored record itself.
    pub advertisement: Box<PeerAdvertisement>,
}

fn fmt_fp(fp: &Option<KeyFingerprint>) -> String {
    fp.map_or_else(|| "(none)".to_owned(), |f| f.to_string())
}

impl ClaimConflict {
    /// The conflict inside a discovery error, if it carries one.
    pub fn find(error: &DiscoveryError) -> Option<&ClaimConflict> {
        let mut current: Option<&(dyn std::error::Error + 'static)> = match error {
            DiscoveryError::Other(inner) => Some(inner.as_ref()),
            _ => None,
        };
        while let Some(e) = current {
            if let Some(c) = e.downcast_ref::<ClaimConflict>() {
                return Some(c);
            }
            current = e.source();
        }
        None
    }

    fn into_error(self) -> DiscoveryError {
        DiscoveryError::Other(Box::new(self))
    }
}

/// What a provider knows about service instances, and which one speaks for each cluster id.
#[derive(Debug, Clone)]
pub struct InstanceTable {
    source: DiscoverySource,
    instances: BTreeMap<String, PeerAdvertisement>,
    /// Cluster id -> the owning instance.
    owners: BTreeMap<ClusterId, String>,
}

/// Items a provider yields: events, and conflicts as `Err` items.
pub type TableOutput = Vec<Result<DiscoveryEvent, DiscoveryError>>;

impl InstanceTable {
    /// An empty table for a provider of kind `source`.
    pub fn new(source: DiscoverySource) -> Self {
        Self {
            source,
            instances: BTreeMap::new(),
            owners: BTreeMap::new(),
        }
    }

    /// How many instances are known.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether no instance is known.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// The instance names currently known.
    pub fn instances(&self) -> impl Iterator<Item = &str> {
        self.instances.keys().map(String::as_str)
    }

    /// The instances claiming `cluster` (the owner and any other claimant).
    pub fn instances_of<'a>(
        &'a self,
        cluster: &'a ClusterId,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.instances
            .iter()
            .filter(move |(_, a)| a.cluster_id == *cluster)
            .map(|(i, _)| i.as_str())
    }

    /// Forgets everything without reporting anything (a new listing will report again).
    pub fn reset(&mut self) {
        self.instances.clear();
        self.owners.clear();
    }

    /// The record reported for `cluster`, if any.
    pub fn get(&self, cluster: &ClusterId) -> Option<&PeerAdvertisement> {
        self.owners.get(cluster).and_then(|i| self.instances.get(i))
    }

    /// Records that `instance` announces `ad`. With `refresh`, an unchanged record of an owner is
    /// reported again as `Updated` (the medium re-confirmed it), otherwise it is silent.
    pub fn upsert(&mut self, instance: &str, ad: PeerAdvertisement, refresh: bool) -> TableOutput {
        let mut out = vec![];
        // An instance whose record now names another cluster id leaves its old id first.
        if let Some(old) = self.instances.get(instance)
            && old.cluster_id != ad.cluster_id
        {
            out.extend(self.remove(instance));
        }
        let previous = self.instances.insert(instance.to_owned(), ad.clone());
        match self.owners.get(&ad.cluster_id) {
            None => {
                self.owners
                    .insert(ad.cluster_id.clone(), instance.to_owned());
                out.push(Ok(DiscoveryEvent::Added(ad)));
            }
            Some(owner) if owner == instance => {
                if previous.as_ref() != Some(&ad) || refresh {
                    out.push(Ok(DiscoveryEvent::Updated(ad)));
                }
            }
            Some(owner) => {
                let owner_ad = &self.instances[owner];
                if owner_ad.key_fingerprint != ad.key_fingerprint {
                    out.push(Err(ClaimConflict {
                        source_kind: self.source,
                        cluster_id: ad.cluster_id.clone(),
                        instance: instance.to_owned(),
                        fingerprint: ad.key_fingerprint,
                        owner: owner.clone(),
                        owner_fingerprint: owner_ad.key_fingerprint,
                        advertisement: Box::new(ad),
                    }
                    .into_error()));
                }
            }
        }
        out
    }

    /// Records that `instance` went away (goodbye, TTL expiry, removed from the zone).
    pub fn remove(&mut self, instance: &str) -> TableOutput {
        let Some(ad) = self.instances.remove(instance) else {
            return vec![];
        };
        let id = ad.cluster_id;
        if self.owners.get(&id).map(String::as_str) != Some(instance) {
            return vec![];
        }
        // Promote an alternate with the owner's key first, else any other claimant.
        let successor = self
            .instances
            .iter()
            .filter(|(_, a)| a.cluster_id == id)
            .max_by_key(|(name, a)| {
                (
                    a.key_fingerprint == ad.key_fingerprint,
                    std::cmp::Reverse((*name).clone()),
                )
            })
            .map(|(name, a)| (name.clone(), a.clone()));
        match successor {
            Some((name, next)) => {
                self.owners.insert(id, name);
                vec![Ok(DiscoveryEvent::Updated(next))]
            }
            None => {
                self.owners.remove(&id);
                vec![Ok(DiscoveryEvent::Expired {
                    cluster_id: id,
                    source: self.source,
                })]
            }
        }
    }

    /// Removes every instance for which `keep` is false (a fresh listing replaced the old one).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> TableOutput {
        let gone: BTreeSet<String> = self
            .instances
            .keys()
            .filter(|i| !keep(i))
            .cloned()
            .collect();
        gone.iter().flat_map(|i| self.remove(i)).collect()
    }

    /// Removes everything, reporting each cluster as expired.
    pub fn clear(&mut self) -> TableOutput {
        self.retain(|_| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liqo_core::{PROTOCOL_VERSION, PublicKey};

    fn ad(id: &str, key: Option<u8>, ep: &str) -> PeerAdvertisement {
        PeerAdvertisement {
            cluster_id: id.parse().unwrap(),
            cluster_name: id.into(),
            peering_endpoint: ep.into(),
            key_fingerprint: key.map(|k| PublicKey::from_bytes(vec![k]).fingerprint()),
            protocol_version: PROTOCOL_VERSION,
            source: DiscoverySource::Mdns,
            ttl: None,
        }
    }

    fn events(out: TableOutput) -> Vec<String> {
        out.into_iter()
            .map(|r| match r {
                Ok(DiscoveryEvent::Added(a)) => {
                    format!("added {} {}", a.cluster_id, a.peering_endpoint)
                }
                Ok(DiscoveryEvent::Updated(a)) => {
                    format!("updated {} {}", a.cluster_id, a.peering_endpoint)
                }
                Ok(DiscoveryEvent::Expired { cluster_id, .. }) => format!("expired {cluster_id}"),
                Err(e) => format!("conflict {}", ClaimConflict::find(&e).unwrap().instance),
            })
            .collect()
    }

    #[test]
    fn first_claim_owns_alternates_take_over() {
        let mut t = InstanceTable::new(DiscoverySource::Mdns);
        assert_eq!(
            events(t.upsert("a", ad("rome", Some(1), "https://a:1"), false)),
            ["added rome https://a:1"]
        );
        // Unchanged: silent unless it is a refresh.
        assert!(
            t.upsert("a", ad("rome", Some(1), "https://a:1"), false)
                .is_empty()
        );
        assert_eq!(
            events(t.upsert("a", ad("rome", Some(1), "https://a:1"), true)),
            ["updated rome https://a:1"]
        );
        // Same key, other instance: an alternate, silent.
        assert!(
            t.upsert("b", ad("rome", Some(1), "https://b:1"), false)
                .is_empty()
        );
        // Another key: a conflict, every time it is seen, and it never replaces the owner.
        assert_eq!(
            events(t.upsert("c", ad("rome", Some(2), "https://c:1"), false)),
            ["conflict c"]
        );
        assert_eq!(
            t.get(&"rome".parse().unwrap()).unwrap().peering_endpoint,
            "https://a:1"
        );
        // Owner leaves: the alternate with the same key is preferred over the impostor.
        assert_eq!(events(t.remove("a")), ["updated rome https://b:1"]);
        assert!(t.remove("c").is_empty());
        assert_eq!(events(t.remove("b")), ["expired rome"]);
        assert!(t.is_empty());
        assert!(t.remove("b").is_empty(), "removing twice is harmless");
    }

    #[test]
    fn instance_changing_its_id_leaves_the_old_one() {
        let mut t = InstanceTable::new(DiscoverySource::Dns);
        t.upsert("x", ad("rome", None, "https://x:1"), false);
        assert_eq!(
            events(t.upsert("x", ad("milan", None, "https://x:1"), false)),
            ["expired rome", "added milan https://x:1"]
        );
        t.upsert("y", ad("turin", None, "https://y:1"), false);
        assert_eq!(events(t.retain(|i| i == "y")), ["expired milan"]);
        assert_eq!(events(t.clear()), ["expired turin"]);
    }

    #[test]
    fn conflict_message_names_both_keys() {
        let mut t = InstanceTable::new(DiscoverySource::Mdns);
        t.upsert("a", ad("rome", Some(1), "https://a:1"), false);
        let err = t
            .upsert("c", ad("rome", None, "https://c:1"), false)
            .pop()
            .unwrap()
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"c\"") && msg.contains("(none)") && msg.contains("sha256:"),
            "{msg}"
        );
        assert!(
            ClaimConflict::find(&DiscoveryError::Unavailable {
                source_name: "x".into(),
                message: "y".into()
            })
            .is_none()
        );
    }
}
