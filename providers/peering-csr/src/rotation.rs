//! Renewing consumer credentials before they expire.
//!
//! [`RotationController`] watches the consumer's kubeconfig Secrets and, once a fraction of a
//! certificate's lifetime has elapsed (two thirds by default), peers again with the provider (a
//! fresh signed challenge; the provider keeps the tenant, offer and RBAC and issues a new
//! certificate) and updates the Secret **in place**. Each renewal makes a **new key pair** on the
//! consumer (see [`Consumer::request`]): the old key is never reused and, like every key, never
//! leaves the consumer. The old certificate stays valid until its own
//! expiry, so clients and watches opened with it keep working while readers pick up the new one.

use std::{future::Future, sync::Arc, time::SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    runtime::{
        Controller,
        controller::{Action, Config as ControllerConfig},
        watcher,
    },
};
use liqo_core::{ClusterId, PeeringError, labels};

use liqo_peering::{
    Backoff, ControllerError,
    credential::{certificate_validity, kubeconfig_certificate},
    target_of,
};

use crate::{
    consumer::Consumer,
    names::{KUBECONFIG_KEY, MANAGED_BY_VALUE, PEERING_SIDE, SIDE_CONSUMER},
};

/// When a certificate valid from `not_before` to `not_after` is due for renewal: after `fraction`
/// of its lifetime.
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime.mul_f64(fraction.clamp(0.0, 1.0))
}

struct Ctx {
    consumer: Arc<Consumer>,
    fraction: f64,
    backoff: Backoff,
}

/// Renews every stored credential of a [`Consumer`] before it expires.
#[derive(Clone)]
pub struct RotationController {
    consumer: Arc<Consumer>,
    client: kube::Client,
    fraction: f64,
}

impl std::fmt::Debug for RotationController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotationController")
            .field("consumer", &self.consumer)
            .field("fraction", &self.fraction)
            .finish_non_exhaustive()
    }
}

impl RotationController {
    /// A controller renewing at two thirds of each credential's lifetime.
    pub fn new(client: kube::Client, consumer: Arc<Consumer>) -> Self {
        Self {
            consumer,
            client,
            fraction: 2.0 / 3.0,
        }
    }

    /// Renews after `fraction` (0 to 1) of the lifetime instead.
    pub fn renew_at(mut self, fraction: f64) -> Self {
        self.fraction = fraction.clamp(0.0, 1.0);
        self
    }

    /// Runs until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
        let secrets: Api<Secret> = Api::all(self.client.clone());
        let selector = format!(
            "{}={MANAGED_BY_VALUE},{PEERING_SIDE}={SIDE_CONSUMER}",
            labels::MANAGED_BY
        );
        let ctx = Arc::new(Ctx {
            consumer: self.consumer,
            fraction: self.fraction,
            backoff: Backoff::default(),
        });
        Controller::new(secrets, watcher::Config::default().labels(&selector))
            .trigger_backoff(liqo_core::watch_backoff())
            .with_config(ControllerConfig::default().concurrency(2))
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, ctx)
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "rotation reconcile");
                }
            })
            .await;
    }
}

async fn reconcile(secret: Arc<Secret>, ctx: Arc<Ctx>) -> Result<Action, ControllerError> {
    let bad = |m: String| ControllerError::Peering(PeeringError::Other(m.into()));
    let name = format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    let provider: ClusterId = secret
        .labels()
        .get(labels::REMOTE_CLUSTER_ID)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            bad(format!(
                "Secret {name} has no valid {} label",
                labels::REMOTE_CLUSTER_ID
            ))
        })?;
    let kubeconfig = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KUBECONFIG_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or_else(|| bad(format!("Secret {name} has no {KUBECONFIG_KEY}")))?;
    let (not_before, not_after) =
        certificate_validity(&kubeconfig_certificate(&kubeconfig).map_err(PeeringError::from)?)
            .map_err(PeeringError::from)?;
    let due = renewal_due(not_before, not_after, ctx.fraction);
    let now = SystemTime::now();
    if now < due {
        ctx.backoff.succeeded(&name);
        return Ok(Action::requeue(due.duration_since(now).unwrap_or_default()));
    }
    let target = target_of(&provider, &secret)
        .ok_or_else(|| bad(format!("Secret {name} does not say where to renew it")))?;
    ctx.consumer.request(&target).await?;
    ctx.backoff.succeeded(&name);
    tracing::info!(%provider, secret = %name, "credential renewed");
    // The Secret's update triggers the next reconcile, which schedules the following renewal.
    Ok(Action::await_change())
}

fn error_policy(secret: Arc<Secret>, error: &ControllerError, ctx: Arc<Ctx>) -> Action {
    let name = format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    let delay = ctx.backoff.failed(name.clone());
    tracing::warn!(secret = %name, %error, retry_in = ?delay, "renewing the credential failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn due_at_the_fraction() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(900);
        assert_eq!(
            renewal_due(nb, na, 2.0 / 3.0),
            nb + Duration::from_secs(600)
        );
        assert_eq!(renewal_due(nb, na, 7.0), na);
        assert_eq!(renewal_due(na, nb, 0.5), na, "inverted window: due at once");
    }
}
