//! [`Agent`]: the controllers of every concern, each over its trait, run as one.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use kube::Client;
use liqo_core::{
    ClusterId, Discovery, DiscoverySource, NetworkFabric, PeerAdvertisement, PeeringAuthority,
    ResourceReflector,
};
use liqo_discovery::{AutoPeerPolicy, CompositeDiscovery, ControllerConfig, DiscoveryController};
use liqo_vk::{ConsumerAgent, ConsumerConfig, PodReflector, ProviderAgent, StaticTranslation};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::translation::LinkTranslation;

/// Why an [`Agent`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A component stopped (with an error, or at all) before shutdown was asked.
    #[error("{component} failed: {message}")]
    Component {
        /// The component, e.g. `peering controller`.
        component: String,
        /// Its error.
        message: String,
    },
}

type Task = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Starter = Box<dyn FnOnce(CancellationToken) -> Task + Send>;

/// Composes one provider per trait into an [`Agent`]; see the [crate] docs.
pub struct AgentBuilder {
    client: Client,
    me: ClusterId,
    discovery: Option<liqo_discovery::composite::CompositeBuilder>,
    advertisement: Option<PeerAdvertisement>,
    auto_peer: AutoPeerPolicy,
    peering: Option<Arc<dyn PeeringAuthority>>,
    fabric: Option<Arc<dyn NetworkFabric>>,
    reflectors: Vec<Arc<dyn ResourceReflector>>,
    consumer: Option<(ConsumerConfig, PodReflector)>,
    provider: Option<ProviderAgent>,
    components: Vec<(String, Starter)>,
}

impl std::fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("me", &self.me)
            .field("discovery", &self.discovery.is_some())
            .field("peering", &self.peering.is_some())
            .field("fabric", &self.fabric.is_some())
            .field(
                "reflectors",
                &self.reflectors.iter().map(|r| r.kind()).collect::<Vec<_>>(),
            )
            .field("consumer", &self.consumer.is_some())
            .field("provider", &self.provider.is_some())
            .field(
                "components",
                &self.components.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl AgentBuilder {
    fn new(client: Client, me: ClusterId) -> Self {
        Self {
            client,
            me,
            discovery: None,
            advertisement: None,
            auto_peer: AutoPeerPolicy::none(),
            peering: None,
            fabric: None,
            reflectors: Vec::new(),
            consumer: None,
            provider: None,
            components: Vec::new(),
        }
    }

    /// Adds a discovery source; several are merged (precedence Manual > DNS > mDNS) by
    /// [`CompositeDiscovery`]. Peers found are written as `ForeignCluster`s.
    pub fn discovery(mut self, source: impl Discovery) -> Self {
        let builder = self
            .discovery
            .take()
            .unwrap_or_else(CompositeDiscovery::builder);
        self.discovery = Some(builder.source(source));
        self
    }

    /// Advertises this cluster through every discovery source (where the source can).
    pub fn advertise(mut self, ad: PeerAdvertisement) -> Self {
        self.advertisement = Some(ad);
        self
    }

    /// Peers automatically with clusters found by `source` (none by default: an administrator
    /// declares each peering on its `ForeignCluster`).
    pub fn auto_peer(mut self, source: DiscoverySource) -> Self {
        self.auto_peer = self.auto_peer.allow(source);
        self
    }

    /// The peering method: the consumer side of every `ForeignCluster` whose `spec.role` asks
    /// for a provider goes through it (liqo-peering's `PeeringController`).
    pub fn peering(mut self, authority: Arc<dyn PeeringAuthority>) -> Self {
        self.peering = Some(authority);
        self
    }

    /// The network fabric, driven by liqo-net's `NetworkController`; offloaded pods' addresses
    /// are translated through its links. Without one, addresses are not translated (clusters
    /// whose pod networks are already routed to each other, or no data plane at all).
    pub fn fabric(mut self, fabric: Arc<dyn NetworkFabric>) -> Self {
        self.fabric = Some(fabric);
        self
    }

    /// Reflectors for the consumer side (ConfigMaps, Secrets, Services, ... or your own kinds);
    /// each offloaded namespace gets one reflection of each.
    pub fn reflectors(mut self, rs: impl IntoIterator<Item = Arc<dyn ResourceReflector>>) -> Self {
        self.reflectors.extend(rs);
        self
    }

    /// Runs the consumer side of the virtual kubelet (virtual nodes, namespace and pod
    /// offloading, the reflectors) with these settings.
    pub fn consumer(mut self, config: ConsumerConfig, pods: PodReflector) -> Self {
        self.consumer = Some((config, pods));
        self
    }

    /// Acts as a provider: runs the provider side of the virtual kubelet (ShadowPods into pods
    /// in twin namespaces) and liqo-peering's `QuotaController` (each tenant's quota follows its
    /// offer). How consumers get their grants is the peering method's: its server, if it has
    /// one, is a [`component`](Self::component).
    pub fn provider(mut self, agent: ProviderAgent) -> Self {
        self.provider = Some(agent);
        self
    }

    /// Runs one more component beside the controllers (a peering method's server, metrics, ...):
    /// `start` is given the agent's cancellation token and returns the component's future,
    /// which should end soon after the token is cancelled. A component that ends before then
    /// stops the agent.
    pub fn component<F, Fut, E>(mut self, name: impl Into<String>, start: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.components.push((
            name.into(),
            Box::new(move |cancel| {
                let fut = start(cancel);
                Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
            }),
        ));
        self
    }

    /// The agent, ready to [`run`](Agent::run).
    pub fn build(self) -> Agent {
        Agent { builder: self }
    }
}

/// Every configured controller and component, run until shutdown; built by [`Agent::builder`].
#[derive(Debug)]
pub struct Agent {
    builder: AgentBuilder,
}

type Tasks = JoinSet<(String, Result<(), String>)>;

impl Agent {
    /// Starts composing an agent for cluster `me` whose API server `client` reaches.
    pub fn builder(client: Client, me: ClusterId) -> AgentBuilder {
        AgentBuilder::new(client, me)
    }

    /// Starts every part and runs until `shutdown` resolves or a part stops, then stops them all
    /// (waiting up to 30 s) and shuts the fabric down. Peerings, links and remote workloads are
    /// left in place: the next start resumes from the objects in the API server. `Err` names
    /// the part that stopped.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let b = self.builder;
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new();
        let spawn = |tasks: &mut Tasks, name: &str, task: Task| {
            let name = name.to_owned();
            tasks.spawn(async move { (name, task.await) });
        };
        let stop = || cancel.clone().cancelled_owned();

        for (name, start) in b.components {
            spawn(&mut tasks, &name, start(cancel.clone()));
        }

        // The fabric first: its links give offloaded pods' address translation.
        let links = match &b.fabric {
            Some(fabric) => {
                let controller = liqo_net::NetworkController::new(
                    b.client.clone(),
                    b.me.clone(),
                    fabric.clone(),
                );
                let links = controller.links();
                spawn(
                    &mut tasks,
                    "network controller",
                    boxed(controller.run(stop())),
                );
                Some(links)
            }
            None => None,
        };

        if let Some(authority) = b.peering {
            let controller =
                liqo_peering::PeeringController::new(b.client.clone(), b.me.clone(), authority);
            spawn(
                &mut tasks,
                "peering controller",
                boxed(controller.run(stop())),
            );
        }

        if let Some(sources) = b.discovery {
            let composite = sources.ignore(b.me.clone()).build();
            if let Some(ad) = &b.advertisement
                && let Err(e) = composite.advertise(ad).await
            {
                tracing::warn!(error = %e, "advertising this cluster failed");
            }
            let controller = DiscoveryController::new(b.client.clone(), composite).with_config(
                ControllerConfig::default()
                    .auto_peer(b.auto_peer)
                    .local_cluster(b.me.clone()),
            );
            spawn(
                &mut tasks,
                "discovery controller",
                boxed(controller.run(stop())),
            );
        }

        if let Some(provider) = b.provider {
            // Whatever the peering method, tenants' quotas follow their offers.
            let quota = liqo_peering::QuotaController::new(b.client.clone(), b.me.clone());
            spawn(&mut tasks, "quota controller", boxed(quota.run(stop())));
            spawn(
                &mut tasks,
                "virtual kubelet (provider)",
                boxed(provider.run(stop())),
            );
        }
        if let Some((config, pods)) = b.consumer {
            let agent = ConsumerAgent::builder(b.client.clone(), b.me.clone())
                .reflectors(b.reflectors)
                .config(config)
                .pod_reflector(pods);
            let agent = match links {
                Some(links) => agent.translation(LinkTranslation::new(links)),
                None => agent.translation(StaticTranslation::identity()),
            }
            .build();
            spawn(
                &mut tasks,
                "virtual kubelet (consumer)",
                boxed(agent.run(stop())),
            );
        }

        let mut failure = None;
        tokio::select! {
            () = shutdown => tracing::info!("shutting down"),
            Some(joined) = tasks.join_next() => {
                let (component, result) =
                    joined.unwrap_or_else(|e| ("a component".into(), Err(format!("panicked: {e}"))));
                tracing::error!(%component, ?result, "component stopped; shutting down");
                failure = Some(AgentError::Component {
                    component,
                    message: result.err().unwrap_or_else(|| "stopped unexpectedly".into()),
                });
            }
        }
        cancel.cancel();
        let drain = async {
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((component, Err(e))) => {
                        tracing::warn!(%component, error = %e, "stopped with an error")
                    }
                    Ok((component, Ok(()))) => tracing::debug!(%component, "stopped"),
                    Err(e) => tracing::warn!(error = %e, "a component panicked"),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), drain)
            .await
            .is_err()
        {
            tracing::warn!("components still stopping after 30s; leaving them");
        }
        // The fabric goes with the agent (a gateway leaves no interface, route, NAT table or
        // daemon behind); its configuration stays in the API server for the next start.
        if let Some(fabric) = b.fabric {
            match fabric.shutdown().await {
                Ok(()) => tracing::info!("fabric shut down"),
                Err(e) => tracing::warn!(error = %e, "shutting the fabric down failed"),
            }
        }
        tracing::info!("agent stopped");
        failure.map_or(Ok(()), Err)
    }
}

fn boxed<E: std::fmt::Display>(fut: impl Future<Output = Result<(), E>> + Send + 'static) -> Task {
    Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    /// A client that is never used: these tests run components only.
    fn client() -> Client {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("a URL"));
        Client::try_from(config).expect("a client")
    }

    #[tokio::test]
    async fn a_failing_component_stops_the_agent_and_is_named() {
        let stopped = Arc::new(AtomicBool::new(false));
        let seen = stopped.clone();
        let agent = Agent::builder(client(), "rome".parse().expect("an id"))
            .component("waits", move |cancel: CancellationToken| async move {
                cancel.cancelled().await;
                seen.store(true, Ordering::SeqCst);
                Ok::<(), String>(())
            })
            .component("boom", |_| async { Err::<(), _>("out of luck") })
            .build();
        let err = tokio::time::timeout(Duration::from_secs(30), agent.run(std::future::pending()))
            .await
            .expect("the agent stops")
            .expect_err("a component failed");
        let AgentError::Component { component, message } = err;
        assert_eq!(
            (component.as_str(), message.as_str()),
            ("boom", "out of luck")
        );
        assert!(
            stopped.load(Ordering::SeqCst),
            "the other component was cancelled and drained"
        );
    }

    #[tokio::test]
    async fn shutdown_stops_every_component_cleanly() {
        let agent = Agent::builder(client(), "rome".parse().expect("an id"))
            .component("waits", |cancel: CancellationToken| async move {
                cancel.cancelled().await;
                Ok::<(), String>(())
            })
            .build();
        let result = tokio::time::timeout(Duration::from_secs(30), agent.run(async {}))
            .await
            .expect("the agent stops");
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_component_ending_early_is_a_failure() {
        let agent = Agent::builder(client(), "rome".parse().expect("an id"))
            .component("short-lived", |_| async { Ok::<(), String>(()) })
            .build();
        let err = tokio::time::timeout(Duration::from_secs(30), agent.run(std::future::pending()))
            .await
            .expect("the agent stops")
            .expect_err("an early end is a failure");
        assert!(
            err.to_string()
                .contains("short-lived failed: stopped unexpectedly"),
            "{err}"
        );
    }
}
