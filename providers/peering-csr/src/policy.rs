//! Which consumers a provider accepts once they proved their identity in the handshake.

use std::collections::BTreeSet;

use liqo_core::ClusterId;

/// Which consumers a provider accepts once they proved their identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeeringPolicy {
    /// Every consumer that proves possession of its key.
    AcceptAll,
    /// Only these cluster ids.
    AllowList(BTreeSet<ClusterId>),
    /// An administrator approves each consumer: the first request makes a pending
    /// `ForeignCluster` (condition `TenantReady=False`, reason `AwaitingApproval`, the proved key's
    /// fingerprint in annotation `liqo.io/key-fingerprint`); annotating it with
    /// `liqo.io/peering-approved=true` lets the consumer's next request through, for that key
    /// only.
    Manual,
}
