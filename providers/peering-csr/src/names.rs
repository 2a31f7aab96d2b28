//! Names, labels and annotations: those every peering method shares (re-exported from
//! [`liqo_peering::names`]) and the handshake's own.

pub use liqo_peering::names::*;

/// Annotation on a provider's `ForeignCluster` with which an administrator approves a pending
/// consumer under [`PeeringPolicy::Manual`](crate::PeeringPolicy::Manual) (value `true`).
pub const APPROVED_ANNOTATION: &str = "liqo.io/peering-approved";

/// Words every "the key is not the pinned one" error carries (the TLS pin check and the identity
/// check), so the controller can tell a fingerprint mismatch from other failures even when the
/// error crossed the wire as text.
pub(crate) const PIN_MISMATCH: &str = "not the pinned";
/// Words the provider's refusal carries while a manual approval is pending.
pub(crate) const AWAITING_APPROVAL: &str = "awaiting manual approval";
