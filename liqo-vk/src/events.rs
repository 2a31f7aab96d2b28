//! Warning events about objects, best effort: an event that cannot be written is logged at
//! debug level and never fails the reconcile that wanted it.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Publishes a warning about `about` (`reason`: CamelCase, `action`: what was being done).
pub(crate) async fn warn(
    recorder: &Recorder,
    about: &ObjectReference,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_: EventType::Warning,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, about).await {
        tracing::debug!(error = %e, reason, "publishing an event failed");
    }
}
