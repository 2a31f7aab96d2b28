//! What a provider offers a consumer: the size of the virtual node the consumer will see.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Resources a provider makes available to one consumer, plus labels describing where they are.
///
/// The consumer turns this into a virtual node's capacity and labels; the provider enforces it
/// with a ResourceQuota in the consumer's tenant namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceOffer {
    /// CPU, e.g. `4` or `4500m`.
    pub cpu: Quantity,
    /// Memory, e.g. `16Gi`.
    pub memory: Quantity,
    /// The number of pods.
    #[schemars(range(min = 0))]
    pub pods: u32,
    /// Ephemeral storage, if offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<Quantity>,
    /// Descriptive labels copied onto the virtual node, e.g. [`ResourceOffer::REGION`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ResourceOffer {
    /// Label key for the provider's region (the well-known Kubernetes topology label).
    pub const REGION: &'static str = "topology.kubernetes.io/region";
    /// Label key for the provider's zone (the well-known Kubernetes topology label).
    pub const ZONE: &'static str = "topology.kubernetes.io/zone";
    /// Label key for a price hint, free-form (e.g. `0.04/cpu-hour`).
    pub const PRICE: &'static str = "liqo.io/price";

    /// An offer of `cpu`, `memory` and `pods`, e.g. `ResourceOffer::new("4", "8Gi", 110)`.
    pub fn new(cpu: &str, memory: &str, pods: u32) -> Self {
        Self {
            cpu: Quantity(cpu.to_owned()),
            memory: Quantity(memory.to_owned()),
            pods,
            ephemeral_storage: None,
            labels: BTreeMap::new(),
        }
    }

    /// Adds a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The offer as a node's capacity map (`cpu`, `memory`, `pods`, `ephemeral-storage`).
    pub fn as_capacity(&self) -> BTreeMap<String, Quantity> {
        let mut m = BTreeMap::from([
            ("cpu".to_owned(), self.cpu.clone()),
            ("memory".to_owned(), self.memory.clone()),
            ("pods".to_owned(), Quantity(self.pods.to_string())),
        ]);
        if let Some(s) = &self.ephemeral_storage {
            m.insert("ephemeral-storage".to_owned(), s.clone());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_has_every_resource() {
        let mut o = ResourceOffer::new("4", "8Gi", 110).with_label(ResourceOffer::REGION, "eu-1");
        o.ephemeral_storage = Some(Quantity("20Gi".into()));
        let cap = o.as_capacity();
        assert_eq!(cap["cpu"].0, "4");
        assert_eq!(cap["memory"].0, "8Gi");
        assert_eq!(cap["pods"].0, "110");
        assert_eq!(cap["ephemeral-storage"].0, "20Gi");
        assert_eq!(o.labels[ResourceOffer::REGION], "eu-1");
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["ephemeralStorage"], "20Gi");
    }
}
