//! Consumer credentials: client certificates for the consumer's user (`liqo-consumer-<id>`, the
//! user the tenant Role and liqo-vk's offloading role are bound to) issued through the provider's
//! Kubernetes CSR API, wrapped in a kubeconfig, and read back (expiry) on the consumer. Every
//! method that hands out such a certificate uses these, whoever made the key.

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
use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use ring::rand::{SecureRandom, SystemRandom};
use x509_parser::{
    certification_request::X509CertificationRequest, extensions::ParsedExtension, oid_registry,
    prelude::FromDer, public_key::PublicKey,
};

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
    /// A consumer's certificate signing request is not one this provider signs.
    #[error("certificate signing request refused: {0}")]
    InvalidCsr(String),
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

/// A client key pair made by the consumer for one provider, with the certificate signing
/// request it sends in its [`PeeringRequest`](liqo_core::PeeringRequest). The private key never
/// leaves the consumer: the provider returns only the certificate, and
/// [`complete_kubeconfig`] puts the key next to it.
pub struct ClientKey {
    key: KeyPair,
    csr_pem: String,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("key", &"<redacted>")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

impl ClientKey {
    /// A fresh ECDSA P-256 key and a CSR for it whose subject is only `CN=<user>` (no
    /// organization: the provider grants no Kubernetes group), as
    /// [`check_csr`] expects for user [`names::consumer_user`].
    pub fn generate(user: &str) -> Result<Self, CredentialError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        params.distinguished_name = dn;
        let csr_pem = params.serialize_request(&key)?.pem()?;
        Ok(Self { key, csr_pem })
    }

    /// The PEM PKCS#10 certificate signing request.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }
}

/// The key types the API server accepts for client certificates that this provider signs.
const ACCEPTED_KEYS: &str = "ECDSA P-256, ECDSA P-384 or RSA of at least 2048 bits";

/// Checks a consumer's certificate signing request before it goes to the CSR API: one PEM block
/// `CERTIFICATE REQUEST`, a valid self-signature (the consumer holds the key), the subject
/// exactly `CN=<user>` (no `O`, which Kubernetes reads as group membership, nor any other
/// attribute), no subject alternative names, and a key of an accepted type
/// (ECDSA P-256/P-384, RSA ≥ 2048 bits). The error says what is wrong.
pub fn check_csr(csr_pem: &str, user: &str) -> Result<(), CredentialError> {
    let bad = |m: String| CredentialError::InvalidCsr(m);
    let (rest, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(bad(format!(
            "the PEM block is a {:?}, not a \"CERTIFICATE REQUEST\"",
            pem.label
        )));
    }
    if !rest.iter().all(u8::is_ascii_whitespace) {
        return Err(bad("more than one PEM block".into()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| bad(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the PKCS#10 request".into()));
    }
    csr.verify_signature().map_err(|e| {
        bad(format!(
            "its signature does not verify with its own key ({e}); the requester must hold the \
             key, with a key of type {ACCEPTED_KEYS}"
        ))
    })?;
    let info = &csr.certification_request_info;
    let mut cns = vec![];
    for attr in info.subject.iter_attributes() {
        let value = attr
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|_| String::from_utf8_lossy(attr.as_slice()).into_owned());
        if attr.attr_type() == &oid_registry::OID_X509_COMMON_NAME {
            cns.push(value);
        } else {
            let name = x509_parser::objects::oid2abbrev(
                attr.attr_type(),
                x509_parser::objects::oid_registry(),
            )
            .map(str::to_owned)
            .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let why = if attr.attr_type() == &oid_registry::OID_X509_ORGANIZATION_NAME {
                format!(" (Kubernetes would make the consumer a member of group {value:?})")
            } else {
                String::new()
            };
            return Err(bad(format!(
                "the subject carries {name}={value:?}{why}; this provider issues credentials \
                 only for the subject CN={user}, with no organization"
            )));
        }
    }
    match cns.as_slice() {
        [cn] if cn == user => {}
        [cn] => {
            return Err(bad(format!(
                "the subject CN is {cn:?}, but this consumer's user is {user:?}"
            )));
        }
        [] => return Err(bad(format!("the subject has no CN; it must be {user:?}"))),
        _ => {
            return Err(bad(format!(
                "the subject has {} CNs; it must have one, {user:?}",
                cns.len()
            )));
        }
    }
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(_) = ext {
                return Err(bad(
                    "it requests subject alternative names; a consumer credential has none".into(),
                ));
            }
        }
    }
    let spki = &info.subject_pki;
    let accepted = match spki.parsed() {
        Ok(PublicKey::EC(_)) => spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| {
                curve == oid_registry::OID_EC_P256 || curve == oid_registry::OID_NIST_EC_P384
            }),
        Ok(PublicKey::RSA(rsa)) => rsa.key_size() >= 2048,
        _ => false,
    };
    if !accepted {
        return Err(bad(format!(
            "its key ({}, {} bits) is not accepted: use {ACCEPTED_KEYS}",
            spki.algorithm.algorithm.to_id_string(),
            spki.parsed().map(|k| k.key_size()).unwrap_or(0)
        )));
    }
    Ok(())
}

/// A client certificate issued for a consumer's key.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// When it expires.
    pub not_after: SystemTime,
}

/// Issues a client certificate for the consumer's `csr_pem` (checked with [`check_csr`])
/// through the CSR API: creates the request, approves it (the provider's policy already accepted
/// the consumer), waits for the signer, and deletes the request again so nothing lingers.
///
/// The provider never sees the private key: the consumer made it and keeps it.
pub async fn issue(
    client: &Client,
    consumer: &ClusterId,
    csr_pem: &str,
    lifetime: Duration,
    timeout: Duration,
) -> Result<IssuedCert, PeeringError> {
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
            request: ByteString(csr_pem.as_bytes().to_vec()),
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
#[derive(Debug, Clone, Copy)]
pub struct KubeconfigParts<'a> {
    /// The provider (names the cluster and context).
    pub provider: &'a ClusterId,
    /// Its API server.
    pub endpoint: &'a ApiEndpoint,
    /// The user the certificate is for.
    pub user: &'a str,
    /// The context's default namespace (the tenant's).
    pub namespace: &'a str,
    /// The client certificate (PEM).
    pub cert_pem: &'a str,
    /// The private key (PEM), when the renderer holds it; the provider does not, and the
    /// consumer adds its own with [`complete_kubeconfig`].
    pub key_pem: Option<&'a str>,
}

/// Renders a kubeconfig whose only context points at the tenant namespace.
pub fn render_kubeconfig(p: &KubeconfigParts<'_>) -> Result<String, PeeringError> {
    let context = format!("{}@{}", p.user, p.provider);
    let mut user = serde_json::json!({"client-certificate-data": B64.encode(p.cert_pem)});
    if let Some(key) = p.key_pem {
        user["client-key-data"] = B64.encode(key).into();
    }
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": p.provider.as_str(), "cluster": {
            "server": p.endpoint.url,
            "certificate-authority-data": B64.encode(&p.endpoint.ca_pem),
        }}],
        "users": [{"name": p.user, "user": user}],
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

/// Completes the key-less kubeconfig of a grant with the consumer's own private key, after
/// checking that its client certificate was issued for that key (a provider that made a key of
/// its own, or a mixed-up grant, is refused). Replaces any `client-key-data` already there.
pub fn complete_kubeconfig(kubeconfig: &str, key: &ClientKey) -> Result<String, CredentialError> {
    let cert_pem = kubeconfig_certificate(kubeconfig)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CredentialError::InvalidCertificate(format!("not PEM: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CredentialError::InvalidCertificate(format!("not X.509: {e}")))?;
    if cert
        .tbs_certificate
        .subject_pki
        .subject_public_key
        .data
        .as_ref()
        != key.key.der_bytes()
    {
        return Err(CredentialError::InvalidCertificate(
            "the granted certificate is not for the key this consumer made; refusing it".into(),
        ));
    }
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(kubeconfig)
        .map_err(|e| CredentialError::InvalidKubeconfig(e.to_string()))?;
    let user = current_user(&doc)?;
    let entry = doc
        .get_mut("users")
        .and_then(|u| u.as_sequence_mut())
        .and_then(|users| {
            users
                .iter_mut()
                .find(|u| u.get("name").and_then(|n| n.as_str()) == Some(user.as_str()))
        })
        .and_then(|u| u.get_mut("user"))
        .and_then(|u| u.as_mapping_mut())
        .ok_or_else(|| CredentialError::InvalidKubeconfig(format!("no user {user}")))?;
    entry.insert(
        "client-key-data".into(),
        B64.encode(key.key.serialize_pem()).into(),
    );
    serde_yaml_ng::to_string(&doc)
        .map_err(|e| CredentialError::InvalidKubeconfig(format!("rendering: {e}")))
}

fn current_user(doc: &serde_yaml_ng::Value) -> Result<String, CredentialError> {
    let context = doc
        .get("current-context")
        .and_then(|c| c.as_str())
        .ok_or_else(|| CredentialError::InvalidKubeconfig("no current-context".into()))?;
    doc.get("contexts")
        .and_then(|c| c.as_sequence())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(context))
        })
        .and_then(|c| c.get("context"))
        .and_then(|c| c.get("user"))
        .and_then(|u| u.as_str())
        .map(str::to_owned)
        .ok_or_else(|| CredentialError::InvalidKubeconfig(format!("context {context} has no user")))
}

/// Whether a kubeconfig carries a private key (`client-key-data` or `client-key`) for any user.
pub fn kubeconfig_has_private_key(kubeconfig: &str) -> Result<bool, CredentialError> {
    let kc = Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| CredentialError::InvalidKubeconfig(e.to_string()))?;
    Ok(kc.auth_infos.iter().any(|a| {
        a.auth_info
            .as_ref()
            .is_some_and(|i| i.client_key_data.is_some() || i.client_key.is_some())
    }))
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
pub fn secret_labels(provider: &ClusterId) -> BTreeMap<String, String> {
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
            key_pem: Some(&key),
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
            key_pem: Some(&key),
        })
        .unwrap();
        let Err(err) = client_from_kubeconfig(&provider, &kc).await else {
            panic!("an expired credential must be refused");
        };
        assert!(err.to_string().contains("expired"), "{err}");
    }

    fn csr_with(dn: &[(DnType, &str)], alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        for (t, v) in dn {
            name.push(t.clone(), *v);
        }
        params.distinguished_name = name;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn refused(csr: &str, user: &str) -> String {
        match check_csr(csr, user) {
            Err(e @ CredentialError::InvalidCsr(_)) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn csr_checks() {
        let user = "liqo-consumer-milan";
        let good = ClientKey::generate(user).unwrap();
        check_csr(good.csr_pem(), user).unwrap();
        check_csr(
            &csr_with(
                &[(DnType::CommonName, user)],
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ),
            user,
        )
        .unwrap();
        assert!(
            !format!("{good:?}").contains("PRIVATE"),
            "Debug hides the key"
        );

        let e = refused(good.csr_pem(), "liqo-consumer-rome");
        assert!(
            e.contains("CN is \"liqo-consumer-milan\"") && e.contains("liqo-consumer-rome"),
            "{e}"
        );
        let e = refused(
            &csr_with(
                &[
                    (DnType::CommonName, user),
                    (DnType::OrganizationName, "system:masters"),
                ],
                &PKCS_ECDSA_P256_SHA256,
            ),
            user,
        );
        assert!(
            e.contains("O=\"system:masters\"") && e.contains("group"),
            "{e}"
        );
        let e = refused(
            &csr_with(&[(DnType::OrganizationName, "x")], &PKCS_ECDSA_P256_SHA256),
            user,
        );
        assert!(e.contains("O=\"x\""), "{e}");
        let e = refused(&csr_with(&[], &PKCS_ECDSA_P256_SHA256), user);
        assert!(e.contains("no CN"), "{e}");
        let e = refused(
            &csr_with(&[(DnType::CommonName, user)], &rcgen::PKCS_ED25519),
            user,
        );
        assert!(
            e.contains("not accepted") || e.contains("ECDSA P-256"),
            "{e}"
        );

        // Alternative names.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        params.distinguished_name = dn;
        let sans = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(refused(&sans, user).contains("alternative names"));

        // Not a CSR, or tampered with after signing.
        assert!(refused("hello", user).contains("not PEM"));
        let (cert, _) = self_signed(1);
        assert!(refused(&cert, user).contains("not a \"CERTIFICATE REQUEST\""));
        let twice = format!("{}{}", good.csr_pem(), good.csr_pem());
        assert!(refused(&twice, user).contains("more than one"));
        let (_, pem) = x509_parser::pem::parse_x509_pem(good.csr_pem().as_bytes()).unwrap();
        let mut der = pem.contents.clone();
        let at = der
            .windows(user.len())
            .position(|w| w == user.as_bytes())
            .unwrap();
        der[at + user.len() - 1] = b'x'; // CN "liqo-consumer-milax", signature now stale
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            B64.encode(&der)
        );
        assert!(
            refused(&tampered, "liqo-consumer-milax").contains("signature does not verify"),
            "{}",
            refused(&tampered, "liqo-consumer-milax")
        );
    }

    #[test]
    fn kubeconfig_is_completed_with_our_key_only() {
        let provider: ClusterId = "rome".parse().unwrap();
        let user = "liqo-consumer-milan";
        let ours = ClientKey::generate(user).unwrap();
        // A certificate for our key (self-signed here, by the CA in production).
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        params.distinguished_name = dn;
        let cert = params.self_signed(&ours.key).unwrap().pem();
        let endpoint = ApiEndpoint::new("https://127.0.0.1:6443", cert.clone());
        let keyless = render_kubeconfig(&KubeconfigParts {
            provider: &provider,
            endpoint: &endpoint,
            user,
            namespace: "liqo-tenant-milan",
            cert_pem: &cert,
            key_pem: None,
        })
        .unwrap();
        assert!(!kubeconfig_has_private_key(&keyless).unwrap());
        let full = complete_kubeconfig(&keyless, &ours).unwrap();
        assert!(kubeconfig_has_private_key(&full).unwrap());
        assert_eq!(kubeconfig_certificate(&full).unwrap(), cert);
        let kc = Kubeconfig::from_yaml(&full).unwrap();
        assert_eq!(
            kc.current_context.as_deref(),
            Some("liqo-consumer-milan@rome")
        );

        // A certificate for another key is refused.
        let other = ClientKey::generate(user).unwrap();
        let Err(e) = complete_kubeconfig(&keyless, &other) else {
            panic!("a certificate for another key must be refused");
        };
        assert!(e.to_string().contains("not for the key"), "{e}");
    }

    #[test]
    fn der_to_pem_wraps_at_64() {
        let pem = der_to_pem(&[7u8; 100]);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
    }
}
