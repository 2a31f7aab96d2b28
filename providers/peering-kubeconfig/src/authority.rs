//! [`KubeconfigAuthority`]: the consumer side, turning a bundle Secret into a grant.

use std::time::SystemTime;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use liqo_core::{
    ClusterId, Credential, Diagnosis, PeeringAuthority, PeeringError, PeeringGrant, PeeringTarget,
    crds::{ForeignCluster, foreign_cluster_condition as cond},
};
use liqo_peering::names::kube_err;

use crate::bundle::PeeringBundle;

/// Namespace of bundle Secrets on the consumer, unless [`KubeconfigAuthority::with_namespace`].
pub const BUNDLE_NAMESPACE: &str = "liqo-system";
/// Key of the bundle in its Secret.
pub const BUNDLE_KEY: &str = "bundle";
/// Scheme of the [`PeeringTarget::endpoint`]s of this method: `secret://<namespace>/<name>`.
pub const SECRET_SCHEME: &str = "secret://";

/// The bundle Secret's name for `provider`: `liqo-peering-bundle-<provider>`.
pub fn bundle_secret_name(provider: &ClusterId) -> String {
    format!("liqo-peering-bundle-{provider}")
}

/// The kubeconfig peering method, consumer side.
///
/// Where the bundle is: the consumer's administrator stores the bundle the provider's gave them
/// as key `bundle` of Secret `liqo-system/liqo-peering-bundle-<provider id>` (a convention, so
/// the `ForeignCluster` needs no new field; `spec.peeringEndpoint` is not used):
///
/// ```text
/// kubectl -n liqo-system create secret generic liqo-peering-bundle-rome --from-file=bundle=rome.yaml
/// ```
///
/// then sets `spec.role: Provider` on ForeignCluster `rome` (`spec.publicKeyFingerprint`, when
/// set, must match the bundle's `provider.publicKey`). [`request`](PeeringAuthority::request)
/// reads and checks the bundle ([`PeeringBundle::check`]) and returns it as a grant, which the
/// peering controller stores like any other. [`release`](PeeringAuthority::release) does nothing
/// on the provider (the consumer's credential may not remove its own tenant: the provider's
/// administrator revokes with [`revoke`](crate::revoke)); the controller removes everything
/// stored here. The bundle Secret is the administrator's and stays.
#[derive(Clone)]
pub struct KubeconfigAuthority {
    client: Client,
    me: ClusterId,
    namespace: String,
}

impl std::fmt::Debug for KubeconfigAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeconfigAuthority")
            .field("me", &self.me)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl KubeconfigAuthority {
    /// Consumer `me`, reading bundles from the cluster of `client` (its own).
    pub fn new(client: Client, me: ClusterId) -> Self {
        Self {
            client,
            me,
            namespace: BUNDLE_NAMESPACE.to_owned(),
        }
    }

    /// Reads bundle Secrets from `namespace` instead of `liqo-system`.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    async fn read(&self, target: &PeeringTarget) -> Result<(String, String), PeeringError> {
        let bad = |reason: String| PeeringError::Invalid {
            what: format!("peering target {}", target.endpoint),
            reason,
        };
        let path = target
            .endpoint
            .strip_prefix(SECRET_SCHEME)
            .ok_or_else(|| bad(format!("expected {SECRET_SCHEME}<namespace>/<name>")))?;
        let (ns, name) = path
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| bad(format!("expected {SECRET_SCHEME}<namespace>/<name>")))?;
        let source = format!("{ns}/{name}");
        let secret = Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(kube_err(format!("reading the peering bundle Secret {source}")))?
            .ok_or_else(|| PeeringError::Invalid {
                what: format!("peering bundle {source}"),
                reason: format!(
                    "{MISSING}: create it from the provider's bundle file with `kubectl -n {ns} create secret generic {name} --from-file={BUNDLE_KEY}=<file>`"
                ),
            })?;
        let bytes = secret
            .data
            .and_then(|mut d| d.remove(BUNDLE_KEY))
            .ok_or_else(|| PeeringError::Invalid {
                what: format!("peering bundle {source}"),
                reason: format!("the Secret has no key {BUNDLE_KEY}"),
            })?;
        let text = String::from_utf8(bytes.0).map_err(|_| PeeringError::Invalid {
            what: format!("peering bundle {source}: key {BUNDLE_KEY}"),
            reason: "not UTF-8 text".into(),
        })?;
        Ok((source, text))
    }
}

/// Words of the "bundle Secret missing" error, for [`PeeringAuthority::explain`].
const MISSING: &str = "the Secret does not exist";

#[async_trait]
impl PeeringAuthority for KubeconfigAuthority {
    /// The bundle Secret for `spec.clusterId`, pinned to `spec.publicKeyFingerprint`.
    fn target(&self, fc: &ForeignCluster) -> Result<PeeringTarget, Diagnosis> {
        Ok(PeeringTarget {
            cluster_id: Some(fc.spec.cluster_id.clone()),
            endpoint: format!(
                "{SECRET_SCHEME}{}/{}",
                self.namespace,
                bundle_secret_name(&fc.spec.cluster_id)
            ),
            expected_fingerprint: fc.spec.public_key_fingerprint,
        })
    }

    async fn request(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
        let (source, text) = self.read(target).await?;
        let checked = PeeringBundle::parse(&text, &source)?.check(
            &source,
            &self.me,
            target.cluster_id.as_ref(),
            target.expected_fingerprint,
            SystemTime::now(),
        )?;
        let b = checked.bundle;
        Ok(PeeringGrant {
            provider: b.provider,
            credential: Credential {
                kubeconfig: b.kubeconfig,
                tenant_namespace: b.tenant_namespace,
                expires_at: Some(checked.expires_at),
            },
            offer: b.offer,
            network: b.network,
        })
    }

    async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        tracing::info!(%provider, "released here; the provider's administrator revokes the tenant there");
        Ok(())
    }

    fn explain(&self, e: &PeeringError, _target: &PeeringTarget) -> Option<Diagnosis> {
        let PeeringError::Invalid { reason, .. } = e else {
            return None;
        };
        let missing = reason.starts_with(MISSING);
        Some(Diagnosis {
            condition: cond::AUTHENTICATED,
            reason: if missing {
                "MissingBundle"
            } else {
                "InvalidBundle"
            },
            message: if missing {
                format!("{e}; retrying with backoff")
            } else {
                format!(
                    "{e}; nothing was stored: replace the bundle Secret with a correct one (retrying with backoff)"
                )
            },
        })
    }
}
