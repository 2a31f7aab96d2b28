//! Rendering kubeconfig files with embedded certificate data.

use std::path::Path;

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::Serialize;

use crate::{
    error::{LabError, Result},
    pki::CertifiedKey,
};

#[derive(Serialize)]
struct File<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: [Named<'a, ClusterEntry>; 1],
    users: [Named<'a, UserEntry>; 1],
    contexts: [Named<'a, ContextEntry<'a>>; 1],
    #[serde(rename = "current-context")]
    current_context: &'a str,
}

#[derive(Serialize)]
struct Named<'a, T> {
    name: &'a str,
    #[serde(flatten)]
    value: T,
}

#[derive(Serialize)]
struct ClusterEntry {
    cluster: ClusterData,
}

#[derive(Serialize)]
struct ClusterData {
    server: String,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: String,
}

#[derive(Serialize)]
struct UserEntry {
    user: UserData,
}

#[derive(Serialize)]
struct UserData {
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: String,
    #[serde(rename = "client-key-data")]
    client_key_data: String,
}

#[derive(Serialize)]
struct ContextEntry<'a> {
    context: ContextData<'a>,
}

#[derive(Serialize)]
struct ContextData<'a> {
    cluster: &'a str,
    user: &'a str,
}

/// What goes into one kubeconfig: a single cluster, user and context.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KubeconfigSpec<'a> {
    /// Name of the context (the current context).
    pub(crate) context: &'a str,
    /// Name of the cluster entry.
    pub(crate) cluster: &'a str,
    /// Name of the user entry.
    pub(crate) user: &'a str,
    /// API server URL.
    pub(crate) server: &'a str,
    /// PEM of the CA that signed the serving certificate.
    pub(crate) ca_pem: &'a str,
    /// Client certificate and key.
    pub(crate) credentials: &'a CertifiedKey,
}

impl KubeconfigSpec<'_> {
    /// Renders the kubeconfig YAML.
    pub(crate) fn render(&self, path_for_errors: &Path) -> Result<String> {
        let file = File {
            api_version: "v1",
            kind: "Config",
            clusters: [Named {
                name: self.cluster,
                value: ClusterEntry {
                    cluster: ClusterData {
                        server: self.server.to_owned(),
                        certificate_authority_data: STANDARD.encode(self.ca_pem),
                    },
                },
            }],
            users: [Named {
                name: self.user,
                value: UserEntry {
                    user: UserData {
                        client_certificate_data: STANDARD.encode(&self.credentials.cert_pem),
                        client_key_data: STANDARD.encode(&self.credentials.key_pem),
                    },
                },
            }],
            contexts: [Named {
                name: self.context,
                value: ContextEntry {
                    context: ContextData {
                        cluster: self.cluster,
                        user: self.user,
                    },
                },
            }],
            current_context: self.context,
        };
        serde_yaml_ng::to_string(&file).map_err(|source| LabError::RenderKubeconfig {
            path: path_for_errors.to_owned(),
            source,
        })
    }
}

/// Builds a client configuration from kubeconfig YAML. Proxy variables are ignored: the lab's API
/// servers are always on the loopback interface.
pub(crate) async fn client_config(yaml: &str, path: &Path) -> Result<kube::Config> {
    let err = |source| LabError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let kc = kube::config::Kubeconfig::from_yaml(yaml).map_err(err)?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(err)?;
    config.proxy_url = None;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_kubeconfig_kube_can_read() {
        let creds = CertifiedKey {
            cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n".into(),
        };
        let spec = KubeconfigSpec {
            context: "admin@lab-a",
            cluster: "lab-a",
            user: "admin",
            server: "https://127.0.0.1:20001",
            ca_pem: "CA PEM",
            credentials: &creds,
        };
        let yaml = spec.render(Path::new("x")).expect("render");
        let kc = kube::config::Kubeconfig::from_yaml(&yaml).expect("parse");
        assert_eq!(kc.current_context.as_deref(), Some("admin@lab-a"));
        let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(kc.clusters[0].name, "lab-a");
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:20001"));
        let ca = STANDARD
            .decode(cluster.certificate_authority_data.as_deref().expect("ca"))
            .expect("b64");
        assert_eq!(ca, b"CA PEM");
        let user = kc.auth_infos[0].auth_info.as_ref().expect("user");
        assert_eq!(kc.auth_infos[0].name, "admin");
        let cert = STANDARD
            .decode(user.client_certificate_data.as_deref().expect("cert"))
            .expect("b64");
        assert_eq!(cert, creds.cert_pem.as_bytes());
        let ctx = kc.contexts[0].context.as_ref().expect("context");
        assert_eq!(
            (ctx.cluster.as_str(), ctx.user.as_deref()),
            ("lab-a", Some("admin"))
        );
        assert!(yaml.starts_with("apiVersion: v1\nkind: Config\n"), "{yaml}");
    }
}
