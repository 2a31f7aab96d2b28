//! What a cluster tells whoever may read its `liqo-system` namespace about itself: its id, name,
//! peering endpoint and key fingerprint.
//!
//! The agent publishes a [`ClusterInfo`] in the ConfigMap `liqo-system/liqo-cluster-info`
//! ([`NAMESPACE`], [`CONFIG_MAP`]) as one JSON document under the data key `info.json`
//! ([`DATA_KEY`]). An administrator holding a provider's kubeconfig (`liqoctl peer`) reads it with
//! [`read`] to fill the consumer's `ForeignCluster` (`spec.clusterId`, `spec.peeringEndpoint`,
//! `spec.publicKeyFingerprint`), so the consumer pins the key it saw through a trusted channel.
//!
//! ```
//! use liqo_core::info::ClusterInfo;
//! let json = r#"{"clusterId": "rome", "fingerprint":
//!   "sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#;
//! let info = ClusterInfo::decode(json).unwrap();
//! assert_eq!(info.cluster_id.as_str(), "rome");
//! assert_eq!(info.peering_endpoint, None);
//! assert!(ClusterInfo::decode(r#"{"clusterId": "Rome"}"#).is_err());
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};

use crate::{ClusterId, KeyFingerprint, NetworkParameters, labels};

/// Namespace of the cluster-info ConfigMap.
pub const NAMESPACE: &str = "liqo-system";
/// Name of the cluster-info ConfigMap.
pub const CONFIG_MAP: &str = "liqo-cluster-info";
/// Data key holding the JSON-encoded [`ClusterInfo`].
pub const DATA_KEY: &str = "info.json";
/// Field manager (server-side apply) of [`publish`].
pub const MANAGER: &str = "liqo-cluster-info";

/// A cluster's public facts, as published in its own cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    /// The cluster's id.
    pub cluster_id: ClusterId,
    /// Its human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Its HTTPS peering endpoint (`https://host:port`), if it serves one (provider role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peering_endpoint: Option<String>,
    /// The fingerprint of its identity key.
    pub fingerprint: KeyFingerprint,
    /// Its network as its fabric gives it to peers (pod, service and external CIDRs; with a
    /// tunnel, the gateway's endpoint and public key): what an administrator issuing an
    /// out-of-band peering (the kubeconfig method) needs of both clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkParameters>,
}

/// Errors reading the published [`ClusterInfo`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// The API server refused or failed the read.
    #[error("reading ConfigMap {NAMESPACE}/{CONFIG_MAP}: {0}")]
    Kube(#[from] kube::Error),
    /// The ConfigMap exists but does not hold a valid [`ClusterInfo`].
    #[error("ConfigMap {NAMESPACE}/{CONFIG_MAP} is malformed: {reason}")]
    Malformed {
        /// What is wrong, naming the key or field.
        reason: String,
    },
}

impl ClusterInfo {
    /// The JSON document stored under [`DATA_KEY`].
    pub fn encode(&self) -> String {
        // Every field serialises to a JSON string; encoding cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Decodes and checks a document stored under [`DATA_KEY`]: the cluster id must be valid, the
    /// fingerprint `sha256:` and 64 hex digits, the endpoint (if any) an `https://` URL.
    pub fn decode(json: &str) -> Result<Self, InfoError> {
        let info: Self = serde_json::from_str(json).map_err(|e| InfoError::Malformed {
            reason: format!("key {DATA_KEY}: {e}"),
        })?;
        if let Some(ep) = &info.peering_endpoint
            && !ep.starts_with("https://")
        {
            return Err(InfoError::Malformed {
                reason: format!("key {DATA_KEY}: peeringEndpoint {ep:?} is not an https:// URL"),
            });
        }
        Ok(info)
    }

    /// Reads the info out of the ConfigMap's data.
    pub fn from_config_map(cm: &ConfigMap) -> Result<Self, InfoError> {
        let json = cm
            .data
            .as_ref()
            .and_then(|d| d.get(DATA_KEY))
            .ok_or_else(|| InfoError::Malformed {
                reason: format!("no data key {DATA_KEY}"),
            })?;
        Self::decode(json)
    }
}

/// Publishes `info` in ConfigMap `liqo-system/liqo-cluster-info` (server-side apply as
/// [`MANAGER`]), creating namespace `liqo-system` if it is missing. Needs `patch` on that
/// ConfigMap (and `create` on namespaces the first time).
pub async fn publish(client: &Client, info: &ClusterInfo) -> Result<(), kube::Error> {
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIG_MAP,
            "namespace": NAMESPACE,
            "labels": {
                labels::MANAGED_BY: MANAGER,
                labels::ORIGIN_CLUSTER_ID: info.cluster_id.as_str(),
            },
        },
        "data": BTreeMap::from([(DATA_KEY, info.encode())]),
    });
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let params = PatchParams::apply(MANAGER).force();
    match api.patch(CONFIG_MAP, &params, &Patch::Apply(&body)).await {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            // The namespace is missing: make it, then apply again.
            let ns: Namespace = serde_json::from_value(serde_json::json!({
                "metadata": {"name": NAMESPACE},
            }))
            .map_err(kube::Error::SerdeError)?;
            match Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &ns)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e),
            }
            api.patch(CONFIG_MAP, &params, &Patch::Apply(&body))
                .await
                .map(drop)
        }
        other => other.map(drop),
    }
}

/// Reads the [`ClusterInfo`] published in the cluster of `client`; `None` when it has none
/// (namespace or ConfigMap missing).
pub async fn read(client: &Client) -> Result<Option<ClusterInfo>, InfoError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    match api.get_opt(CONFIG_MAP).await? {
        Some(cm) => ClusterInfo::from_config_map(&cm).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> KeyFingerprint {
        crate::PublicKey::from_bytes(vec![7; 32]).fingerprint()
    }

    #[test]
    fn round_trip_in_camel_case() {
        let info = ClusterInfo {
            cluster_id: "rome".parse().unwrap(),
            cluster_name: Some("Rome".into()),
            peering_endpoint: Some("https://10.0.0.1:6443".into()),
            fingerprint: fp(),
            network: Some(NetworkParameters::new(
                "10.244.0.0/16".parse().unwrap(),
                "10.96.0.0/12".parse().unwrap(),
            )),
        };
        let json = info.encode();
        assert!(json.contains("\"clusterId\": \"rome\""), "{json}");
        assert!(json.contains("\"peeringEndpoint\""), "{json}");
        assert!(json.contains("\"clusterName\""), "{json}");
        assert!(json.contains("\"podCidr\": \"10.244.0.0/16\""), "{json}");
        assert_eq!(ClusterInfo::decode(&json).unwrap(), info);
        let minimal = ClusterInfo {
            cluster_name: None,
            peering_endpoint: None,
            network: None,
            ..info
        };
        let json = minimal.encode();
        assert!(!json.contains("peeringEndpoint"), "{json}");
        assert!(!json.contains("network"), "{json}");
        assert_eq!(ClusterInfo::decode(&json).unwrap(), minimal);
    }

    #[test]
    fn malformed_documents_say_what_is_wrong() {
        let f = fp().to_string();
        let cases = [
            ("not json".to_owned(), "info.json"),
            (
                format!(r#"{{"clusterId": "Rome", "fingerprint": "{f}"}}"#),
                "cluster id",
            ),
            (
                r#"{"clusterId": "rome", "fingerprint": "md5:00"}"#.to_owned(),
                "sha256:",
            ),
            (r#"{"clusterId": "rome"}"#.to_owned(), "fingerprint"),
            (
                format!(
                    r#"{{"clusterId": "rome", "fingerprint": "{f}", "peeringEndpoint": "http://x"}}"#
                ),
                "https://",
            ),
        ];
        for (json, expected) in cases {
            let err = ClusterInfo::decode(&json).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
            assert!(err.contains("liqo-system/liqo-cluster-info"), "{err}");
        }
        let empty = ConfigMap::default();
        let err = ClusterInfo::from_config_map(&empty)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no data key info.json"), "{err}");
    }
}
