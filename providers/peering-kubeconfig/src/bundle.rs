//! The peering bundle: what the provider's administrator hands to the consumer's, and its
//! validation (a bundle is hostile input until checked).

use std::{fmt, time::SystemTime};

use liqo_core::{
    ClusterId, ClusterIdentity, KeyFingerprint, NetworkParameters, PeeringError, ResourceOffer,
};
use liqo_peering::{credential, names, quantity::Milli};
use serde::{Deserialize, Serialize};

/// `apiVersion` of a bundle.
pub const BUNDLE_API_VERSION: &str = "peering.liqo.io/v1";
/// `kind` of a bundle.
pub const BUNDLE_KIND: &str = "PeeringBundle";
/// Largest bundle accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024;

/// Everything a consumer needs to use a provider, issued out of band by the provider's
/// administrator ([`issue_bundle`](crate::issue_bundle)). YAML or JSON, camelCase fields:
///
/// ```yaml
/// apiVersion: peering.liqo.io/v1
/// kind: PeeringBundle
/// consumer: milan                      # the cluster the bundle is for
/// provider: {id: rome, name: Rome}     # optionally publicKey, checked against the pin
/// tenantNamespace: liqo-tenant-milan   # on the provider
/// kubeconfig: |                        # client certificate and key of user liqo-consumer-milan
///   ...
/// offer: {cpu: "2", memory: 4Gi, pods: 10}
/// network: {podCidr: 10.1.0.0/16, serviceCidr: 10.2.0.0/16}
/// ```
///
/// The kubeconfig is a credential (secret): keep the bundle like one. [`Debug`] hides it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeeringBundle {
    /// Must be [`BUNDLE_API_VERSION`].
    pub api_version: String,
    /// Must be [`BUNDLE_KIND`].
    pub kind: String,
    /// The consumer cluster the bundle was issued for.
    pub consumer: ClusterId,
    /// The provider (with its public key, when it has one, to check a pin against).
    pub provider: ClusterIdentity,
    /// The consumer's tenant namespace on the provider, `liqo-tenant-<consumer>`.
    pub tenant_namespace: String,
    /// A kubeconfig for the provider's API server: a client certificate for user
    /// `liqo-consumer-<consumer>` with its key, default namespace the tenant's.
    pub kubeconfig: String,
    /// What the provider offers.
    pub offer: ResourceOffer,
    /// The provider's network parameters.
    pub network: NetworkParameters,
}

impl fmt::Debug for PeeringBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeeringBundle")
            .field("consumer", &self.consumer)
            .field("provider", &self.provider)
            .field("tenant_namespace", &self.tenant_namespace)
            .field("kubeconfig", &"<redacted>")
            .field("offer", &self.offer)
            .field("network", &self.network)
            .finish()
    }
}

/// A bundle, checked: the credential's expiry comes from its certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedBundle {
    /// The bundle.
    pub bundle: PeeringBundle,
    /// When its certificate expires.
    pub expires_at: SystemTime,
}

fn invalid(source: &str, field: &str, reason: impl Into<String>) -> PeeringError {
    PeeringError::Invalid {
        what: format!("peering bundle {source}: field {field}"),
        reason: reason.into(),
    }
}

impl PeeringBundle {
    /// The bundle as YAML.
    pub fn to_yaml(&self) -> Result<String, PeeringError> {
        serde_yaml_ng::to_string(self).map_err(|e| PeeringError::Other(Box::new(e)))
    }

    /// Parses `text` (YAML or JSON) read from `source` (named in errors). Checks only the shape:
    /// see [`check`](Self::check).
    pub fn parse(text: &str, source: &str) -> Result<Self, PeeringError> {
        if text.len() > MAX_BUNDLE_BYTES {
            return Err(PeeringError::Invalid {
                what: format!("peering bundle {source}"),
                reason: format!(
                    "{} bytes, more than the {MAX_BUNDLE_BYTES} a bundle may have",
                    text.len()
                ),
            });
        }
        serde_yaml_ng::from_str(text).map_err(|e| PeeringError::Invalid {
            what: format!("peering bundle {source}"),
            reason: format!("not a PeeringBundle: {e}"),
        })
    }

    /// Checks everything a consumer can check before using the bundle: version and kind; issued
    /// for `me`; from `provider` (the `ForeignCluster`'s `spec.clusterId`) and, when `pin` is
    /// given, from that key; the tenant namespace is `me`'s; the kubeconfig has exactly the
    /// shape issued (an `https://` server, a client certificate valid at `now` and its key, the
    /// tenant as namespace); the offer's quantities parse. Errors name the field.
    pub fn check(
        self,
        source: &str,
        me: &ClusterId,
        provider: Option<&ClusterId>,
        pin: Option<KeyFingerprint>,
        now: SystemTime,
    ) -> Result<CheckedBundle, PeeringError> {
        let bad = |field: &str, reason: String| invalid(source, field, reason);
        if self.api_version != BUNDLE_API_VERSION {
            return Err(bad(
                "apiVersion",
                format!("is {:?}, expected {BUNDLE_API_VERSION}", self.api_version),
            ));
        }
        if self.kind != BUNDLE_KIND {
            return Err(bad(
                "kind",
                format!("is {:?}, expected {BUNDLE_KIND}", self.kind),
            ));
        }
        if &self.consumer != me {
            return Err(bad(
                "consumer",
                format!(
                    "the bundle was issued for cluster {}, this cluster is {me}: ask the provider's administrator for a bundle for {me}",
                    self.consumer
                ),
            ));
        }
        if let Some(expected) = provider
            && &self.provider.id != expected
        {
            return Err(bad(
                "provider.id",
                format!(
                    "the bundle is from cluster {}, the ForeignCluster names {expected} (spec.clusterId)",
                    self.provider.id
                ),
            ));
        }
        if let Some(pin) = pin {
            match self.provider.fingerprint() {
                Some(actual) if actual == pin => {}
                Some(actual) => {
                    return Err(bad(
                        "provider.publicKey",
                        format!("key {actual} is not the pinned {pin} (spec.publicKeyFingerprint)"),
                    ));
                }
                None => {
                    return Err(bad(
                        "provider.publicKey",
                        format!(
                            "missing, but spec.publicKeyFingerprint pins {pin}: issue the bundle with the provider's identity, or remove the pin"
                        ),
                    ));
                }
            }
        }
        let tenant = names::tenant_namespace(me)?;
        if self.tenant_namespace != tenant {
            return Err(bad(
                "tenantNamespace",
                format!("is {:?}, expected {tenant}", self.tenant_namespace),
            ));
        }
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig)
            .map_err(|e| bad("kubeconfig", format!("not a kubeconfig: {e}")))?;
        let [context] = kc.contexts.as_slice() else {
            return Err(bad(
                "kubeconfig",
                format!("has {} contexts, expected exactly one", kc.contexts.len()),
            ));
        };
        let namespace = context
            .context
            .as_ref()
            .and_then(|c| c.namespace.as_deref());
        if namespace != Some(tenant.as_str()) {
            return Err(bad(
                "kubeconfig",
                format!("its context's namespace is {namespace:?}, expected {tenant}"),
            ));
        }
        for c in &kc.clusters {
            let server = c.cluster.as_ref().and_then(|c| c.server.as_deref());
            if !server.is_some_and(|s| s.starts_with("https://")) {
                return Err(bad(
                    "kubeconfig",
                    format!(
                        "cluster {:?} has server {server:?}: an https:// URL is required",
                        c.name
                    ),
                ));
            }
        }
        match credential::kubeconfig_has_private_key(&self.kubeconfig) {
            Ok(true) => {}
            Ok(false) => {
                return Err(bad(
                    "kubeconfig",
                    "has no client key (client-key-data)".into(),
                ));
            }
            Err(e) => return Err(bad("kubeconfig", e.to_string())),
        }
        let (not_before, not_after) = credential::kubeconfig_certificate(&self.kubeconfig)
            .and_then(|c| credential::certificate_validity(&c))
            .map_err(|e| bad("kubeconfig", format!("client certificate: {e}")))?;
        if not_after <= now {
            return Err(bad(
                "kubeconfig",
                format!(
                    "the client certificate expired at {}: ask the provider's administrator for a new bundle",
                    liqo_peering::rfc3339(not_after)
                ),
            ));
        }
        if not_before > now + std::time::Duration::from_secs(300) {
            return Err(bad(
                "kubeconfig",
                format!(
                    "the client certificate is valid only from {}",
                    liqo_peering::rfc3339(not_before)
                ),
            ));
        }
        for (field, q) in [
            ("offer.cpu", &self.offer.cpu),
            ("offer.memory", &self.offer.memory),
        ] {
            Milli::of(q).map_err(|e| bad(field, e.to_string()))?;
        }
        Ok(CheckedBundle {
            bundle: self,
            expires_at: not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_SHAPE: &str = r#"
apiVersion: peering.liqo.io/v1
kind: PeeringBundle
consumer: milan
provider: {id: rome, name: Rome}
tenantNamespace: liqo-tenant-milan
kubeconfig: "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"
offer: {cpu: "2", memory: 4Gi, pods: 10}
network: {podCidr: 10.1.0.0/16, serviceCidr: 10.2.0.0/16}
"#;

    fn check(text: &str) -> String {
        let me: ClusterId = "milan".parse().unwrap();
        let rome: ClusterId = "rome".parse().unwrap();
        PeeringBundle::parse(text, "liqo-system/b")
            .and_then(|b| b.check("liqo-system/b", &me, Some(&rome), None, SystemTime::now()))
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn hostile_bundles_are_refused_naming_the_field() {
        let e = check("[1, 2");
        assert!(
            e.contains("peering bundle liqo-system/b") && e.contains("not a PeeringBundle"),
            "{e}"
        );
        let e = check(&GOOD_SHAPE.replace("offer:", "extra: 1\noffer:"));
        assert!(e.contains("extra"), "unknown fields are refused: {e}");
        let e = check(&GOOD_SHAPE.replace("kind: PeeringBundle", "kind: Secret"));
        assert!(e.contains("field kind"), "{e}");
        let e = check(&GOOD_SHAPE.replace("consumer: milan", "consumer: paris"));
        assert!(e.contains("field consumer") && e.contains("paris"), "{e}");
        let e = check(&GOOD_SHAPE.replace("id: rome", "id: turin"));
        assert!(
            e.contains("field provider.id") && e.contains("turin"),
            "{e}"
        );
        let e = check(&GOOD_SHAPE.replace(
            "tenantNamespace: liqo-tenant-milan",
            "tenantNamespace: kube-system",
        ));
        assert!(e.contains("field tenantNamespace"), "{e}");
        let e = check(GOOD_SHAPE);
        assert!(
            e.contains("field kubeconfig") && e.contains("0 contexts"),
            "{e}"
        );
        let e = check(&"x".repeat(MAX_BUNDLE_BYTES + 1));
        assert!(e.contains("more than"), "{e}");
    }

    #[test]
    fn debug_hides_the_kubeconfig() {
        let b = PeeringBundle::parse(GOOD_SHAPE, "t").unwrap();
        let s = format!("{b:?}");
        assert!(s.contains("redacted") && !s.contains("clusters"), "{s}");
    }
}
