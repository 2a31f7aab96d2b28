//! Where address translation comes from: the fabric, through [`AddressTranslation`].

use std::collections::HashMap;

use async_trait::async_trait;
use liqo_core::{AddressTranslator, Cidr, CidrMapping, ClusterId};

/// Gives the translator of one provider's addresses (pod IPs, endpoint addresses).
///
/// The fabric's [`PeerLink`](liqo_core::PeerLink) is the real source (liqo-net's network
/// controller keeps each peer's link); without a fabric, [`StaticTranslation`] holds fixed
/// mappings, identity by default.
#[async_trait]
pub trait AddressTranslation: Send + Sync + 'static {
    /// The translator for `provider`.
    async fn translator(&self, provider: &ClusterId) -> AddressTranslator;

    /// Changes whenever [`translator`](Self::translator) may answer differently (a network
    /// link made after reflection started); `None` for translations that never change. The
    /// consumer then re-checks its reflections and restarts those whose translator changed.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// A translator that changes no address, IPv4 or IPv6.
pub fn identity_translator(cluster: &ClusterId) -> AddressTranslator {
    let all = ["0.0.0.0/0", "::/0"]
        .iter()
        .filter_map(|c| c.parse::<Cidr>().ok())
        .map(CidrMapping::identity)
        .collect();
    AddressTranslator::new(cluster.clone(), all)
}

/// Fixed mappings per provider; providers without an entry get the identity.
#[derive(Debug, Clone, Default)]
pub struct StaticTranslation {
    mappings: HashMap<ClusterId, Vec<CidrMapping>>,
}

impl StaticTranslation {
    /// Identity for every provider.
    pub fn identity() -> Self {
        Self::default()
    }

    /// Adds mappings for `provider` (addresses outside them stay untranslated and are reported).
    pub fn with(mut self, provider: ClusterId, mappings: Vec<CidrMapping>) -> Self {
        self.mappings.entry(provider).or_default().extend(mappings);
        self
    }
}

#[async_trait]
impl AddressTranslation for StaticTranslation {
    async fn translator(&self, provider: &ClusterId) -> AddressTranslator {
        match self.mappings.get(provider) {
            Some(m) => AddressTranslator::new(provider.clone(), m.clone()),
            None => identity_translator(provider),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_and_identity() {
        let rome: ClusterId = "rome".parse().unwrap();
        let m = CidrMapping::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.71.0.0/16".parse().unwrap(),
        )
        .unwrap();
        let t = StaticTranslation::identity().with(rome.clone(), vec![m]);
        let tr = t.translator(&rome).await;
        assert_eq!(
            tr.to_local_view("10.244.3.4".parse().unwrap())
                .unwrap()
                .to_string(),
            "10.71.3.4"
        );
        let other = t.translator(&"milan".parse().unwrap()).await;
        assert_eq!(
            other
                .to_local_view("10.244.3.4".parse().unwrap())
                .unwrap()
                .to_string(),
            "10.244.3.4"
        );
        assert_eq!(
            other
                .to_local_view("fd00::1".parse().unwrap())
                .unwrap()
                .to_string(),
            "fd00::1"
        );
    }
}
