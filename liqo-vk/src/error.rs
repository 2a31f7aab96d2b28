//! Typed errors of the virtual kubelet.

use liqo_core::ClusterId;

/// What went wrong in a liqo-vk controller, and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VkError {
    /// A Kubernetes API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done, naming the object.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The credential for a provider is missing or unusable.
    #[error("credential for provider {cluster}: {message}")]
    Credential {
        /// The provider.
        cluster: ClusterId,
        /// What is wrong.
        message: String,
    },
    /// An object is invalid in a way the schema does not catch.
    #[error("{object}: {message}")]
    Invalid {
        /// The object, `<kind> <namespace>/<name>`.
        object: String,
        /// What is wrong.
        message: String,
    },
    /// The admission webhook could not be set up or served.
    #[error("pod webhook: {0}")]
    Webhook(String),
    /// A finalizer step failed.
    #[error("finalizer of {object}: {message}")]
    Finalizer {
        /// The object.
        object: String,
        /// What failed.
        message: String,
    },
}

impl VkError {
    /// A [`VkError::Kube`] for `action`.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            action: action.into(),
            source,
        }
    }
}

/// Maps a kube result to [`VkError::Kube`] with a description of the action.
pub(crate) trait KubeContext<T> {
    fn ctx(self, action: impl FnOnce() -> String) -> Result<T, VkError>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn ctx(self, action: impl FnOnce() -> String) -> Result<T, VkError> {
        self.map_err(|e| VkError::kube(action(), e))
    }
}

/// Whether an API error is a 404.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
