//! Clients from peering credentials: [`client_from_kubeconfig`].

use crate::ClusterId;

/// A credential (a kubeconfig held in memory) that cannot be turned into a client.
#[derive(Debug, thiserror::Error)]
#[error("credential for cluster {cluster} is unusable: {message}")]
pub struct CredentialError {
    /// The cluster the credential is for.
    pub cluster: ClusterId,
    /// Why it is unusable.
    pub message: String,
}

/// Builds a client from a kubeconfig held in memory (a peering credential for `cluster`).
pub async fn client_from_kubeconfig(
    cluster: &ClusterId,
    kubeconfig: &str,
) -> Result<kube::Client, CredentialError> {
    let err = |message: String| CredentialError {
        cluster: cluster.clone(),
        message,
    };
    let kc = kube::config::Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| err(format!("not a kubeconfig: {e}")))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn garbage_is_refused_with_the_cluster_named() {
        let id: ClusterId = "rome".parse().unwrap();
        let Err(err) = client_from_kubeconfig(&id, "{not yaml: [").await else {
            panic!("a client from garbage");
        };
        let text = err.to_string();
        assert!(
            text.contains("rome") && text.contains("not a kubeconfig"),
            "{text}"
        );
    }
}
