//! Consumer credentials: client certificates issued through the Kubernetes CSR API, wrapped in a
//! kubeconfig, and read back (expiry) on the consumer.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::await_condition,
};
use liqo_core::{ClusterId, PeeringError};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

use crate::names::{self, SIDE_PROVIDER, kube_err};

/// The signer that makes certificates the API server accepts as client credentials.
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// The shortest lifetime the CSR API honours (`spec.expirationSeconds` minimum).
pub const MIN_LIFETIME: Duration = Duration::from_secs(600);

/// Errors about a credential's content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The kubeconfig cannot be parsed or lacks a client certificate.
    #[error("invalid kubeconfig: {0}")]
    InvalidKubeconfig(String),
    /// The client certificate cannot be parsed.
    #[error("invalid client certificate: {0}")]
    InvalidCertificate(String),
    /// The credential is past its expiry; the API server would answer 401 Unauthorized.
    #[error(
        "credential for cluster {provider} expired at {not_after} (unix seconds); renew it by peering again"
    )]
    Expired {
        /// The provider it was for.
        provider: ClusterId,
        /// When it expired, in seconds since the Unix epoch.
        not_after: u64,
    },
    /// Making the key or the certificate request failed.
    #[error("making the certificate request failed: {0}")]
    Pki(#[from] rcgen::Error),
}

impl From<CredentialError> for PeeringError {
    fn from(e: CredentialError) -> Self {
        PeeringError::Other(Box::new(e))
    }
}

/// The provider's API server as consumers reach it: its URL and the CA that signed its serving
/// certificate (PEM). Goes into every kubeconfig the provider issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiEndpoint {
    /// `https://host:port`.
    pub url: String,
    /// The CA bundle (PEM) that verifies the API server.
    pub ca_pem: String,
}

impl ApiEndpoint {
    /// An endpoint from a URL and a PEM CA bundle.
    pub fn new(url: impl Into<String>, ca_pem: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_pem: ca_pem.into(),
        }
    }

    /// The endpoint of a client configuration (e.g. the admin kubeconfig of the provider).
    pub fn from_kube_config(config: &kube::Config) -> Result<Self, CredentialError> {
        let certs = config.root_cert.as_ref().ok_or_else(|| {
            CredentialError::InvalidKubeconfig("the configuration has no CA certificate".into())
        })?;
        let ca_pem = certs.iter().map(|der| der_to_pem(der)).collect();
        Ok(Self {
            url: config
                .cluster_url
                .to_string()
                .trim_end_matches('/')
                .to_owned(),
            ca_pem,
        })
    }
}

fn der_to_pem(der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A client certificate and its key.
pub(crate) struct IssuedCert {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) not_after: SystemTime,
}

/// Issues a client certificate for `user` through the CSR API: creates the request, approves it
/// (the provider's policy already accepted the consumer), waits for the signer, and deletes the
/// request again so nothing lingers.
///
/// The key pair is made here, on the provider; it leaves only inside the grant, over the pinned
/// TLS channel of the peering endpoint (or in-process for the one-command path).
pub(crate) async fn issue(
    client: &Client,
    consumer: &ClusterId,
    user: &str,
    lifetime: Duration,
    timeout: Duration,
) -> Result<IssuedCert, PeeringError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CredentialError::from)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, user);
    params.distinguished_name = dn;
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(CredentialError::from)?;

    let mut suffix = [0u8; 5];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| PeeringError::Other("the system random generator failed".into()))?;
    let name = format!(
        "liqo-{consumer}-{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(names::peer_labels(consumer, SIDE_PROVIDER)),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: CLIENT_SIGNER.to_owned(),
            usages: Some(vec!["client auth".to_owned()]),
            expiration_seconds: Some(
                i32::try_from(lifetime.max(MIN_LIFETIME).as_secs()).unwrap_or(i32::MAX),
            ),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    csrs.create(&PostParams::default(), &csr)
        .await
        .map_err(kube_err(format!(
            "creating CertificateSigningRequest {name}"
        )))?;
    let result = approve_and_wait(&csrs, &name, timeout).await;
    if let Err(e) = csrs.delete(&name, &DeleteParams::default()).await
        && !names::is_not_found(&e)
    {
        tracing::warn!(csr = %name, error = %e, "could not delete the signed CertificateSigningRequest");
    }
    let cert_pem = result?;
    let not_after = certificate_validity(&cert_pem)?.1;
    Ok(IssuedCert {
        cert_pem,
        key_pem: key.serialize_pem(),
        not_after,
    })
}

async fn approve_and_wait(
    csrs: &Api<CertificateSigningRequest>,
    name: &str,
    timeout: Duration,
) -> Result<String, PeeringError> {
    let approval = serde_json::json!({
        "status": {"conditions": [{
            "type": "Approved",
            "status": "True",
            "reason": "LiqoPeeringPolicy",
            "message": "the consumer proved its identity and the provider's peering policy accepted it",
        }]}
    });
    csrs.patch_subresource(
        "approval",
        name,
        &PatchParams::default(),
        &Patch::Merge(&approval),
    )
    .await
    .map_err(kube_err(format!(
        "approving CertificateSigningRequest {name}"
    )))?;
    let done = |csr: Option<&CertificateSigningRequest>| {
        csr.and_then(|c| c.status.as_ref()).is_some_and(|s| {
            s.certificate.as_ref().is_some_and(|c| !c.0.is_empty())
                || s.conditions
                    .iter()
                    .flatten()
                    .any(|c| (c.type_ == "Failed" || c.type_ == "Denied") && c.status == "True")
        })
    };
    let signed = tokio::time::timeout(timeout, await_condition(csrs.clone(), name, done))
        .await
        .map_err(|_| {
            PeeringError::Other(
                format!(
                    "CertificateSigningRequest {name} was not signed within {timeout:?}; is the \
                     controller-manager's {CLIENT_SIGNER} signer enabled?"
                )
                .into(),
            )
        })?
        .map_err(|e| {
            PeeringError::Other(format!("watching CertificateSigningRequest {name}: {e}").into())
        })?
        .ok_or_else(|| {
            PeeringError::Other(
                format!("CertificateSigningRequest {name} vanished before signing").into(),
            )
        })?;
    let status = signed.status.unwrap_or_default();
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Failed" || c.type_ == "Denied") && c.status == "True")
    {
        return Err(PeeringError::Other(
            format!(
                "CertificateSigningRequest {name} {}: {}",
                c.type_.to_lowercase(),
                c.message.as_deref().unwrap_or("no message")
            )
            .into(),
        ));
    }
    let cert = status.certificate.map(|c| c.0).unwrap_or_default();
    String::from_utf8(cert).map_err(|_| {
        CredentialError::InvalidCertificate(format!("CSR {name}: certificate is not PEM text"))
            .into()
    })
}

/// What a kubeconfig needs.
pub(crate) struct KubeconfigParts<'a> {
    pub(crate) provider: &'a ClusterId,
    pub(crate) endpoint: &'a ApiEndpoint,
    pub(crate) user: &'a str,
    pub(crate) namespace: &'a str,
    pub(crate) cert_pem: &'a str,
    pub(crate) key_pem: &'a str,
}

/// Renders a kubeconfig whose only context points at the tenant namespace.
pub(crate) fn render_kubeconfig(p: &KubeconfigParts<'_>) -> Result<String, PeeringError> {
    let context = format!("{}@{}", p.user, p.provider);
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": p.provider.as_str(), "cluster": {
            "server": p.endpoint.url,
            "certificate-authority-data": B64.encode(&p.endpoint.ca_pem),
        }}],
        "users": [{"name": p.user, "user": {
            "client-certificate-data": B64.encode(p.cert_pem),
            "client-key-data": B64.encode(p.key_pem),
        }}],
        "contexts": [{"name": context, "context": {
            "cluster": p.provider.as_str(),
            "user": p.user,
            "namespace": p.namespace,
        }}],
        "current-context": context,
    });
    serde_yaml_ng::to_string(&doc)
        .map_err(|e| CredentialError::InvalidKubeconfig(format!("rendering: {e}")).into())
}

/// The client certificate of a kubeconfig's current context, PEM.
pub fn kubeconfig_certificate(kubeconfig: &str) -> Result<String, CredentialError> {
    let kc = Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| CredentialError::InvalidKubeconfig(e.to_string()))?;
    let context_name = kc
        .current_context
        .clone()
        .ok_or_else(|| CredentialError::InvalidKubeconfig("no current-context".into()))?;
    let user = kc
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone())
        .ok_or_else(|| {
            CredentialError::InvalidKubeconfig(format!("context {context_name} has no user"))
        })?;
    let data = kc
        .auth_infos
        .iter()
        .find(|a| a.name == user)
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.client_certificate_data.clone())
        .ok_or_else(|| {
            CredentialError::InvalidKubeconfig(format!(
                "user {user} has no client-certificate-data"
            ))
        })?;
    let pem = B64
        .decode(data.trim())
        .map_err(|e| CredentialError::InvalidKubeconfig(format!("client-certificate-data: {e}")))?;
    String::from_utf8(pem)
        .map_err(|_| CredentialError::InvalidKubeconfig("client certificate is not PEM".into()))
}

/// A certificate's validity window (not before, not after).
pub fn certificate_validity(cert_pem: &str) -> Result<(SystemTime, SystemTime), CredentialError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CredentialError::InvalidCertificate(format!("not PEM: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CredentialError::InvalidCertificate(format!("not X.509: {e}")))?;
    let at = |ts: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).unwrap_or(0));
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// Makes a client from a kubeconfig, refusing an expired credential with a clear reason instead of
/// letting the API server answer `401 Unauthorized`.
pub async fn client_from_kubeconfig(
    provider: &ClusterId,
    kubeconfig: &str,
) -> Result<Client, PeeringError> {
    let (_, not_after) = certificate_validity(&kubeconfig_certificate(kubeconfig)?)?;
    if not_after <= SystemTime::now() {
        return Err(CredentialError::Expired {
            provider: provider.clone(),
            not_after: not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
        .into());
    }
    let kc = Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| CredentialError::InvalidKubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| CredentialError::InvalidKubeconfig(e.to_string()))?;
    Client::try_from(config)
        .map_err(|e| CredentialError::InvalidKubeconfig(format!("building a client: {e}")).into())
}

/// Labels for a kubeconfig Secret.
pub(crate) fn secret_labels(provider: &ClusterId) -> BTreeMap<String, String> {
    names::peer_labels(provider, names::SIDE_CONSUMER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(days: i64) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["x".into()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(2);
        params.not_after = now + time::Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn kubeconfig_round_trip_and_validity() {
        let (cert, key) = self_signed(3);
        let provider: ClusterId = "rome".parse().unwrap();
        let endpoint = ApiEndpoint::new("https://127.0.0.1:6443", cert.clone());
        let kc = render_kubeconfig(&KubeconfigParts {
            provider: &provider,
            endpoint: &endpoint,
            user: "liqo-consumer-milan",
            namespace: "liqo-tenant-milan",
            cert_pem: &cert,
            key_pem: &key,
        })
        .unwrap();
        assert!(kc.contains("namespace: liqo-tenant-milan"));
        assert_eq!(kubeconfig_certificate(&kc).unwrap(), cert);
        let (nb, na) = certificate_validity(&cert).unwrap();
        assert!(nb < SystemTime::now() && na > SystemTime::now());
        assert!(kubeconfig_certificate("not: [yaml").is_err());
    }

    #[tokio::test]
    async fn expired_credential_is_refused_with_reason() {
        let (cert, key) = self_signed(-1);
        let provider: ClusterId = "rome".parse().unwrap();
        let endpoint = ApiEndpoint::new("https://127.0.0.1:6443", cert.clone());
        let kc = render_kubeconfig(&KubeconfigParts {
            provider: &provider,
            endpoint: &endpoint,
            user: "u",
            namespace: "n",
            cert_pem: &cert,
            key_pem: &key,
        })
        .unwrap();
        let Err(err) = client_from_kubeconfig(&provider, &kc).await else {
            panic!("an expired credential must be refused");
        };
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn der_to_pem_wraps_at_64() {
        let pem = der_to_pem(&[7u8; 100]);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
    }
}
