//! Offloaded pods' address translation from the network controller's links.

use async_trait::async_trait;
use liqo_core::{AddressTranslator, ClusterId};
use liqo_net::Links;

/// The virtual kubelet's [`AddressTranslation`](liqo_vk::AddressTranslation) from the network
/// controller's links: identity until a peer's link is known, then that link's mappings; its
/// changes restart the reflections whose translator changed.
#[derive(Debug, Clone)]
pub struct LinkTranslation(Links);

impl LinkTranslation {
    /// The translation `links` give (see `liqo_net::NetworkController::links`).
    pub fn new(links: Links) -> Self {
        Self(links)
    }
}

#[async_trait]
impl liqo_vk::AddressTranslation for LinkTranslation {
    async fn translator(&self, provider: &ClusterId) -> AddressTranslator {
        self.0
            .translator(provider)
            .unwrap_or_else(|| liqo_vk::identity_translator(provider))
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.0.changes())
    }
}
