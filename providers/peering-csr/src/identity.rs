//! This cluster's identity: a stable cluster id and an Ed25519 key pair, made at first start and
//! kept in a Secret (`liqo-system/liqo-identity` by default).

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use liqo_core::{ClusterId, ClusterIdentity, KeyFingerprint, PublicKey, labels};
use ring::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};

use crate::names::MANAGED_BY_VALUE;

/// Default namespace of the identity Secret.
pub const IDENTITY_NAMESPACE: &str = "liqo-system";
/// Default name of the identity Secret.
pub const IDENTITY_SECRET: &str = "liqo-identity";

const KEY_CLUSTER_ID: &str = "cluster-id";
const KEY_CLUSTER_NAME: &str = "cluster-name";
const KEY_PRIVATE_KEY: &str = "private-key";
const KEY_PUBLIC_KEY: &str = "public-key";

/// Errors while making, loading or using this cluster's identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The key material is unusable.
    #[error("identity key is invalid: {0}")]
    InvalidKey(String),
    /// The identity Secret exists but is malformed.
    #[error("identity Secret {namespace}/{name} is malformed: {reason}")]
    MalformedSecret {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The stored cluster id differs from the one configured: the id is stable, never changed
    /// silently.
    #[error(
        "identity Secret {namespace}/{name} holds cluster id {stored}, but {configured} was configured; \
         delete the Secret to start over with a new identity"
    )]
    IdMismatch {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The id in the Secret.
        stored: ClusterId,
        /// The id the caller asked for.
        configured: ClusterId,
    },
    /// A Kubernetes API call failed.
    #[error("kubernetes API error while {action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// This cluster's id, name and signing key.
///
/// The private key never leaves the object except as PKCS#8 into the identity Secret; `Debug`
/// prints only the fingerprint.
pub struct LocalIdentity {
    id: ClusterId,
    name: String,
    key: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl LocalIdentity {
    /// A new identity with a fresh key (kept in memory only; see [`LocalIdentity::load_or_create`]).
    pub fn generate(id: ClusterId, name: impl Into<String>) -> Result<Self, IdentityError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| IdentityError::InvalidKey("the system random generator failed".into()))?;
        Self::from_pkcs8(id, name, doc.as_ref())
    }

    /// An identity from a PKCS#8-encoded Ed25519 private key.
    pub fn from_pkcs8(
        id: ClusterId,
        name: impl Into<String>,
        pkcs8: &[u8],
    ) -> Result<Self, IdentityError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| IdentityError::InvalidKey(format!("not a PKCS#8 Ed25519 key: {e}")))?;
        Ok(Self {
            id,
            name: name.into(),
            key,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// Loads the identity from its Secret, creating the Secret (and its namespace) on first start.
    ///
    /// The id is `options.cluster_id` if given, else the UID of the `kube-system` namespace, which
    /// is stable for the life of the cluster. When two agents race at first start, both end up
    /// with the identity whose Secret was created first.
    pub async fn load_or_create(
        client: &Client,
        options: &IdentityOptions,
    ) -> Result<Self, IdentityError> {
        let (ns, name) = (&options.namespace, &options.secret_name);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let kube_err = |action: String| move |source| IdentityError::Kube { action, source };
        if let Some(secret) = secrets
            .get_opt(name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{name}")))?
        {
            return Self::from_secret(&secret, options);
        }
        let id = match &options.cluster_id {
            Some(id) => id.clone(),
            None => default_cluster_id(client).await?,
        };
        let display_name = options
            .cluster_name
            .clone()
            .unwrap_or_else(|| id.to_string());
        let fresh = Self::generate(id, display_name)?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match namespaces.create(&PostParams::default(), &namespace).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => {
                return Err(IdentityError::Kube {
                    action: format!("creating namespace {ns}"),
                    source,
                });
            }
        }
        match secrets
            .create(&PostParams::default(), &fresh.to_secret(options))
            .await
        {
            Ok(_) => Ok(fresh),
            // Another agent won the race: use its identity.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let secret = secrets
                    .get(name)
                    .await
                    .map_err(kube_err(format!("reading Secret {ns}/{name}")))?;
                Self::from_secret(&secret, options)
            }
            Err(source) => Err(IdentityError::Kube {
                action: format!("creating Secret {ns}/{name}"),
                source,
            }),
        }
    }

    fn to_secret(&self, options: &IdentityOptions) -> Secret {
        let data = BTreeMap::from([
            (
                KEY_CLUSTER_ID.to_owned(),
                ByteString(self.id.as_str().into()),
            ),
            (
                KEY_CLUSTER_NAME.to_owned(),
                ByteString(self.name.clone().into()),
            ),
            (KEY_PRIVATE_KEY.to_owned(), ByteString(self.pkcs8.clone())),
            (
                KEY_PUBLIC_KEY.to_owned(),
                ByteString(self.public_key().to_string().into()),
            ),
        ]);
        Secret {
            metadata: ObjectMeta {
                name: Some(options.secret_name.clone()),
                namespace: Some(options.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    labels::MANAGED_BY.to_owned(),
                    MANAGED_BY_VALUE.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(data),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        }
    }

    fn from_secret(secret: &Secret, options: &IdentityOptions) -> Result<Self, IdentityError> {
        let malformed = |reason: String| IdentityError::MalformedSecret {
            namespace: options.namespace.clone(),
            name: options.secret_name.clone(),
            reason,
        };
        let data = secret
            .data
            .as_ref()
            .ok_or_else(|| malformed("no data".into()))?;
        let field = |key: &str| {
            data.get(key)
                .map(|b| b.0.clone())
                .ok_or_else(|| malformed(format!("key {key:?} is missing")))
        };
        let id_text = String::from_utf8(field(KEY_CLUSTER_ID)?)
            .map_err(|_| malformed("cluster-id is not UTF-8".into()))?;
        let id: ClusterId = id_text
            .trim()
            .parse()
            .map_err(|e| malformed(format!("{e}")))?;
        if let Some(configured) = &options.cluster_id
            && configured != &id
        {
            return Err(IdentityError::IdMismatch {
                namespace: options.namespace.clone(),
                name: options.secret_name.clone(),
                stored: id,
                configured: configured.clone(),
            });
        }
        let name = data
            .get(KEY_CLUSTER_NAME)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .unwrap_or_else(|| id.to_string());
        Self::from_pkcs8(id, name, &field(KEY_PRIVATE_KEY)?).map_err(|e| malformed(format!("{e}")))
    }

    /// The cluster id.
    pub fn id(&self) -> &ClusterId {
        &self.id
    }

    /// The human-readable name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(self.key.public_key().as_ref().to_vec())
    }

    /// The public key's fingerprint, the value discovery advertises.
    pub fn fingerprint(&self) -> KeyFingerprint {
        self.public_key().fingerprint()
    }

    /// The identity to hand to peers (with the public key).
    pub fn identity(&self) -> ClusterIdentity {
        ClusterIdentity::new(self.id.clone(), self.name.clone()).with_public_key(self.public_key())
    }

    /// Signs `message` with the private key.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }

    /// The PKCS#8 private key, for the TLS certificate of the peering endpoint.
    pub(crate) fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }
}

/// Whether `signature` is `key`'s Ed25519 signature of `message`.
pub fn verify_signature(key: &PublicKey, message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(message, signature)
        .is_ok()
}

/// Where the identity Secret lives and what to call a new identity.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// The Secret's namespace (default [`IDENTITY_NAMESPACE`]).
    pub namespace: String,
    /// The Secret's name (default [`IDENTITY_SECRET`]).
    pub secret_name: String,
    /// The id to use at first start (default: the `kube-system` namespace's UID). If the Secret
    /// exists with another id, loading fails.
    pub cluster_id: Option<ClusterId>,
    /// The human-readable name at first start (default: the id).
    pub cluster_name: Option<String>,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        Self {
            namespace: IDENTITY_NAMESPACE.to_owned(),
            secret_name: IDENTITY_SECRET.to_owned(),
            cluster_id: None,
            cluster_name: None,
        }
    }
}

async fn default_cluster_id(client: &Client) -> Result<ClusterId, IdentityError> {
    let ns = Api::<Namespace>::all(client.clone())
        .get("kube-system")
        .await
        .map_err(|source| IdentityError::Kube {
            action: "reading namespace kube-system for a default cluster id".into(),
            source,
        })?;
    let uid = ns.metadata.uid.unwrap_or_default();
    uid.parse().map_err(|e| IdentityError::MalformedSecret {
        namespace: "kube-system".into(),
        name: "(namespace uid)".into(),
        reason: format!("{e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let me = LocalIdentity::generate("a".parse().unwrap(), "A").unwrap();
        let sig = me.sign(b"hello");
        assert!(verify_signature(&me.public_key(), b"hello", &sig));
        assert!(!verify_signature(&me.public_key(), b"hellO", &sig));
        let other = LocalIdentity::generate("b".parse().unwrap(), "B").unwrap();
        assert!(!verify_signature(&other.public_key(), b"hello", &sig));
        assert!(!verify_signature(&me.public_key(), b"hello", b"short"));
        assert_eq!(me.identity().fingerprint(), Some(me.fingerprint()));
        assert!(!format!("{me:?}").contains("pkcs8"));
    }

    #[test]
    fn secret_round_trip_and_id_is_stable() {
        let opts = IdentityOptions::default();
        let me = LocalIdentity::generate("a".parse().unwrap(), "A").unwrap();
        let secret = me.to_secret(&opts);
        let back = LocalIdentity::from_secret(&secret, &opts).unwrap();
        assert_eq!(back.id(), me.id());
        assert_eq!(back.fingerprint(), me.fingerprint());
        let other = IdentityOptions {
            cluster_id: Some("b".parse().unwrap()),
            ..IdentityOptions::default()
        };
        let err = LocalIdentity::from_secret(&secret, &other).unwrap_err();
        assert!(err.to_string().contains("holds cluster id a"), "{err}");
        let mut broken = secret.clone();
        broken
            .data
            .as_mut()
            .unwrap()
            .insert(KEY_PRIVATE_KEY.into(), ByteString(b"junk".to_vec()));
        let err = LocalIdentity::from_secret(&broken, &opts).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }
}
