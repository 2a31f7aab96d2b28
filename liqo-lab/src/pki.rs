//! Keys and certificates of a lab cluster (ECDSA P-256, PEM; private keys are PKCS#8).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::error::{LabError, Result};

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate (`CERTIFICATE` PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 `PRIVATE KEY` PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Everything a cluster's components need.
#[derive(Debug, Clone)]
pub(crate) struct ClusterPki {
    /// The cluster CA: serving CA, client CA and CSR signing CA at once.
    pub(crate) ca: CertifiedKey,
    pub(crate) apiserver: CertifiedKey,
    /// Service-account signing key (private) and its public key.
    pub(crate) sa_key_pem: String,
    pub(crate) sa_pub_pem: String,
}

fn pki_err(owner: &str, what: &str) -> impl FnOnce(rcgen::Error) -> LabError {
    let owner = owner.to_owned();
    let what = what.to_owned();
    move |source| LabError::Pki {
        owner,
        what,
        source,
    }
}

fn new_key(owner: &str, what: &str) -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki_err(owner, what))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// The most groups (O attributes) a client certificate can carry: rcgen keeps one value per
/// attribute type, so the first group is written as `OrganizationName` and the second as the same
/// OID (2.5.4.10) spelled as a custom attribute type.
pub const MAX_CERT_GROUPS: usize = 2;

const ORGANIZATION_OID: [u64; 4] = [2, 5, 4, 10];

fn dn(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (i, o) in organizations.iter().enumerate() {
        let ty = if i == 0 {
            DnType::OrganizationName
        } else {
            DnType::CustomDnType(ORGANIZATION_OID.to_vec())
        };
        dn.push(ty, *o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

impl ClusterPki {
    /// Generates the PKI of cluster `cluster`. `sans` are extra IP SANs of the serving certificate
    /// (besides 127.0.0.1 and the usual `kubernetes.default...` names).
    pub(crate) fn generate(cluster: &str, service_ip: IpAddr, sans: &[IpAddr]) -> Result<Self> {
        let owner = format!("cluster {cluster:?}");
        let ca_key = new_key(&owner, "the CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = dn(&format!("liqo-lab-ca-{cluster}"), &["liqo-lab"]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut ca_params, 3650);
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(pki_err(&owner, "the CA certificate"))?;
        let ca = CertifiedKey {
            cert_pem: ca_cert.pem(),
            key_pem: ca_key.serialize_pem(),
        };

        let mut ip_sans: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), service_ip];
        for ip in sans {
            if !ip_sans.contains(ip) {
                ip_sans.push(*ip);
            }
        }
        let mut names: Vec<SanType> = ip_sans.into_iter().map(SanType::IpAddress).collect();
        for dns in [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            let name = dns
                .to_owned()
                .try_into()
                .map_err(pki_err(&owner, "the apiserver SANs"))?;
            names.push(SanType::DnsName(name));
        }
        let apiserver = issue(&ca, &owner, "the apiserver serving certificate", |p| {
            p.distinguished_name = dn("kube-apiserver", &[]);
            p.subject_alt_names = names;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        })?;

        let sa = new_key(&owner, "the service-account key")?;
        Ok(Self {
            ca,
            apiserver,
            sa_key_pem: sa.serialize_pem(),
            sa_pub_pem: sa.public_key_pem(),
        })
    }
}

/// Issues a client certificate (CN = `user`, O = each of `groups`, at most [`MAX_CERT_GROUPS`])
/// signed by `ca`.
pub(crate) fn issue_client_cert(
    ca: &CertifiedKey,
    owner: &str,
    user: &str,
    groups: &[&str],
) -> Result<CertifiedKey> {
    if groups.len() > MAX_CERT_GROUPS {
        return Err(LabError::InvalidSpec(format!(
            "a client certificate for {user:?} of {owner} can carry at most {MAX_CERT_GROUPS} \
             groups, got {groups:?}"
        )));
    }
    issue(
        ca,
        owner,
        &format!("a client certificate for {user:?}"),
        |p| {
            p.distinguished_name = dn(user, groups);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        },
    )
}

fn issue(
    ca: &CertifiedKey,
    owner: &str,
    what: &str,
    customize: impl FnOnce(&mut CertificateParams),
) -> Result<CertifiedKey> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(pki_err(owner, "the CA key (parsing)"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(pki_err(owner, "the CA certificate (parsing)"))?;
    let key = new_key(owner, what)?;
    let mut params = CertificateParams::default();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, 365);
    customize(&mut params);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(pki_err(owner, what))?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use x509_parser::pem::parse_x509_pem;

    use super::*;

    #[test]
    fn cluster_pki_has_the_expected_names() {
        let pki = ClusterPki::generate(
            "lab-a",
            "10.96.0.1".parse().expect("ip"),
            &["192.0.2.7".parse().expect("ip")],
        )
        .expect("pki");
        assert!(pki.ca.key_pem.contains("BEGIN PRIVATE KEY"));
        assert!(pki.sa_pub_pem.contains("BEGIN PUBLIC KEY"));
        let (_, pem) = parse_x509_pem(pki.apiserver.cert_pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let san = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san present");
        let text = format!("{:?}", san.value.general_names);
        for want in [
            "127.0.0.1",
            "10.96.0.1",
            "192.0.2.7",
            "kubernetes.default.svc",
        ] {
            // IP SANs print as byte arrays; compare DNS names literally and IPs by bytes.
            let found = match want.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => text.contains(&format!("{:?}", ip.octets())),
                _ => text.contains(want),
            };
            assert!(found, "{want} missing in {text}");
        }
        // Signed by the CA.
        let (_, ca_pem) = parse_x509_pem(pki.ca.cert_pem.as_bytes()).expect("pem");
        let ca = ca_pem.parse_x509().expect("x509");
        cert.verify_signature(Some(ca.public_key()))
            .expect("signed by the CA");
    }

    #[test]
    fn client_certs_carry_user_and_groups() {
        let pki = ClusterPki::generate("c", "10.96.0.1".parse().expect("ip"), &[]).expect("pki");
        let c = issue_client_cert(&pki.ca, "cluster c", "alice", &["devs", "system:masters"])
            .expect("cert");
        let (_, pem) = parse_x509_pem(c.cert_pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .collect();
        let orgs: Vec<_> = cert
            .subject()
            .iter_organization()
            .filter_map(|a| a.as_str().ok())
            .collect();
        assert_eq!(cn, ["alice"]);
        assert_eq!(orgs, ["devs", "system:masters"]);
        assert!(!format!("{c:?}").contains("PRIVATE"));
        assert!(issue_client_cert(&pki.ca, "cluster c", "x", &["a", "b", "c"]).is_err());
    }
}
