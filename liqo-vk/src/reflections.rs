//! Runs every reflector for each offloaded (provider, namespace) pair, restarting failed ones
//! with capped exponential backoff: the one restart loop of reflectors in liqo-rs.

use std::{collections::HashMap, sync::Arc, time::Duration};

use liqo_core::{ClusterId, ReflectionScope, ResourceReflector};
use tokio::{sync::Mutex, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::links::AddressTranslation;

struct Running {
    remote_namespace: String,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    scope: ReflectionScope,
}

/// The set of running reflections of one agent.
pub(crate) struct Reflections {
    reflectors: Vec<Arc<dyn ResourceReflector>>,
    local: kube::Client,
    translation: Arc<dyn AddressTranslation>,
    backoff: (Duration, Duration),
    shutdown: CancellationToken,
    running: Mutex<HashMap<(ClusterId, String), Running>>,
}

impl Reflections {
    pub(crate) fn new(
        reflectors: Vec<Arc<dyn ResourceReflector>>,
        local: kube::Client,
        translation: Arc<dyn AddressTranslation>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            reflectors,
            local,
            translation,
            backoff: (Duration::from_millis(200), Duration::from_secs(30)),
            shutdown,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Starts reflecting `local_ns` to `remote_ns` on `cluster`; a no-op when already running
    /// for the same pair with the same translator, a restart when either changed.
    pub(crate) async fn start(
        &self,
        cluster: &ClusterId,
        remote: kube::Client,
        local_ns: &str,
        remote_ns: &str,
    ) {
        let key = (cluster.clone(), local_ns.to_owned());
        let translator = self.translation.translator(cluster).await;
        let (stale, restart) = {
            let mut running = self.running.lock().await;
            match running.get(&key) {
                Some(r) if r.remote_namespace == remote_ns && r.scope.translator == translator => {
                    return;
                }
                Some(r) if r.remote_namespace == remote_ns => (false, running.remove(&key)),
                Some(_) => (true, None),
                None => (false, None),
            }
        };
        // Same twin, new addresses (the network link came up after reflection started, which
        // then translated nothing): start over with the new translator. No cleanup: the remote
        // objects stay and are rewritten.
        if let Some(r) = restart {
            r.cancel.cancel();
            for t in r.tasks {
                let _ = t.await;
            }
            tracing::info!(cluster = %cluster, namespace = local_ns, "address translation changed: restarting reflection");
        }
        if stale {
            self.stop(cluster, local_ns).await;
        }
        let scope = ReflectionScope {
            remote_cluster: cluster.clone(),
            local: self.local.clone(),
            remote,
            local_namespace: local_ns.to_owned(),
            remote_namespace: remote_ns.to_owned(),
            translator,
        };
        let cancel = self.shutdown.child_token();
        let tasks = self
            .reflectors
            .iter()
            .map(|r| spawn(r.clone(), scope.clone(), cancel.clone(), self.backoff))
            .collect();
        tracing::info!(cluster = %cluster, namespace = local_ns, twin = remote_ns, "reflection started");
        self.running.lock().await.insert(
            key,
            Running {
                remote_namespace: remote_ns.to_owned(),
                cancel,
                tasks,
                scope,
            },
        );
    }

    /// Stops reflecting `local_ns` to `cluster` and runs each reflector's cleanup.
    pub(crate) async fn stop(&self, cluster: &ClusterId, local_ns: &str) {
        let Some(r) = self
            .running
            .lock()
            .await
            .remove(&(cluster.clone(), local_ns.to_owned()))
        else {
            return;
        };
        r.cancel.cancel();
        for t in r.tasks {
            let _ = t.await;
        }
        for reflector in &self.reflectors {
            if let Err(e) = reflector.cleanup(&r.scope).await {
                tracing::warn!(kind = reflector.kind(), cluster = %cluster, namespace = local_ns, error = %e, "reflector cleanup failed");
            }
        }
        tracing::info!(cluster = %cluster, namespace = local_ns, "reflection stopped");
    }

    /// Stops every reflection with `cluster`.
    pub(crate) async fn stop_cluster(&self, cluster: &ClusterId) {
        let namespaces: Vec<String> = self
            .running
            .lock()
            .await
            .keys()
            .filter(|(c, _)| c == cluster)
            .map(|(_, ns)| ns.clone())
            .collect();
        for ns in namespaces {
            self.stop(cluster, &ns).await;
        }
    }

    /// Stops everything without cleanup (agent shutdown: remote objects stay).
    pub(crate) async fn halt(&self) {
        let all: Vec<Running> = self.running.lock().await.drain().map(|(_, r)| r).collect();
        for r in all {
            r.cancel.cancel();
            for t in r.tasks {
                let _ = t.await;
            }
        }
    }
}

fn spawn(
    reflector: Arc<dyn ResourceReflector>,
    scope: ReflectionScope,
    cancel: CancellationToken,
    (min, max): (Duration, Duration),
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut delay = min;
        loop {
            let result = reflector.reflect(scope.clone(), cancel.clone()).await;
            if cancel.is_cancelled() {
                return;
            }
            match result {
                Ok(()) => delay = min,
                Err(e) => tracing::warn!(kind = reflector.kind(), cluster = %scope.remote_cluster,
                    namespace = %scope.local_namespace, error = %e, "reflector failed; restarting"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(max);
        }
    })
}
