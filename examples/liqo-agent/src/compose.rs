//! Builds one provider per trait from the configuration and hands them to
//! [`liqo_runtime::Agent`]: the reference agent is the SDK's builder plus configuration,
//! metrics and logging, nothing more.
//!
//! Everything is Kubernetes-native: each part is a controller over the API server (discovery
//! writes `ForeignCluster`s; peering acts on their `spec.role`; liqo-vk acts on the
//! `VirtualNode`s peering leaves), so the parts meet through objects, not through calls.

use std::{future::Future, path::Path, sync::Arc, time::Duration};

use kube::Client;
use liqo_core::{ClusterId, NetworkParameters, PeerAdvertisement, ResourceOffer};
use liqo_peering_csr::{
    ApiEndpoint, Consumer, CsrAuthority, HttpsConnector, IdentityOptions, LocalIdentity,
    NetworkSource, OfferPolicy, PeeringPolicy, PeeringServer, Provider, ProviderConfig,
    RotationController,
};
use liqo_vk::{PodReflector, ProviderAgent, reflection::EngineConfig};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Offer, PeeringMethod, PolicyKind, Validated},
    metrics::{Metrics, Readiness},
};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The kubeconfig could not be used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file (or `<inferred>`).
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A step of the start failed.
    #[error("{step}: {message}")]
    Start {
        /// The step, e.g. `loading the identity`.
        step: &'static str,
        /// The error.
        message: String,
    },
    /// A component stopped before shutdown was asked (see [`liqo_runtime::AgentError`]).
    #[error(transparent)]
    Runtime(#[from] liqo_runtime::AgentError),
}

fn start_err(step: &'static str) -> impl Fn(&dyn std::fmt::Display) -> AgentError {
    move |e| AgentError::Start {
        step,
        message: e.to_string(),
    }
}

/// A kube client for the kubeconfig at `path`, or the inferred one (in-cluster, `$KUBECONFIG`).
pub async fn client(path: Option<&Path>) -> Result<(Client, kube::Config), AgentError> {
    let shown = path.map_or_else(|| "<inferred>".to_owned(), |p| p.display().to_string());
    let err = |e: &dyn std::fmt::Display| AgentError::Kubeconfig {
        path: shown.clone(),
        message: e.to_string(),
    };
    let config = match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    let client = Client::try_from(config.clone()).map_err(|e| err(&e))?;
    // Every component shares this client, the fabric's store inside a gateway's namespace
    // too: its connections are made here, in the host's namespace, whoever sends.
    let client = liqo_net::host_client(client).map_err(|e| err(&e))?;
    Ok((client, config))
}

/// Applies the liqo CRDs (server-side apply, idempotent).
async fn install_crds(client: &Client) -> Result<(), AgentError> {
    liqo_core::crds::install(client, &[], "liqo-agent")
        .await
        .map_err(|e| AgentError::Start {
            step: "installing the liqo CRDs",
            message: e.to_string(),
        })
}

/// The API server URL and CA issued credentials point at: the configuration's, else the
/// kubeconfig's.
fn api_endpoint(cfg: &Validated, kube: &kube::Config) -> Result<ApiEndpoint, AgentError> {
    let url = cfg.raw.peering.api_server.clone().unwrap_or_else(|| {
        kube.cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned()
    });
    let ca_pem = match &cfg.raw.peering.api_server_ca_file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| AgentError::Start {
            step: "reading peering.apiServerCaFile",
            message: format!("{}: {e}", f.display()),
        })?,
        None => kube
            .root_cert
            .iter()
            .flatten()
            .map(|der| der_to_pem(der))
            .collect::<String>(),
    };
    if ca_pem.is_empty() {
        return Err(AgentError::Start {
            step: "finding the API server's CA",
            message: "the kubeconfig has no CA; set peering.apiServerCaFile".into(),
        });
    }
    Ok(ApiEndpoint::new(url, ca_pem))
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A task the agent started before the runtime (it had to bind a port first), run as one of
/// the runtime's components: `own` stops it when the runtime cancels, and its end is the
/// component's end.
fn linked<E: std::fmt::Display + Send + 'static>(
    own: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), E>>,
) -> impl FnOnce(CancellationToken) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
{
    move |cancel| {
        Box::pin(async move {
            let stop = cancel.cancelled_owned();
            tokio::pin!(task);
            tokio::select! {
                r = &mut task => return flatten(r),
                () = stop => own.cancel(),
            }
            flatten(task.await)
        })
    }
}

fn flatten<E: std::fmt::Display>(
    r: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), String> {
    match r {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// What the agent runs, started; see [`Agent::start`].
pub struct Agent {
    /// This cluster's id.
    pub cluster_id: ClusterId,
    /// Where `/metrics` is served.
    pub metrics_addr: std::net::SocketAddr,
    /// Where the HTTPS peering endpoint listens, if it does.
    pub peering_addr: Option<std::net::SocketAddr>,
    runtime: liqo_runtime::Agent,
    /// Stops what runs outside the runtime's components (the metrics watches).
    cancel: CancellationToken,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("cluster_id", &self.cluster_id)
            .field("metrics_addr", &self.metrics_addr)
            .field("peering_addr", &self.peering_addr)
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Builds every configured part; [`run`](Self::run) starts them.
    pub async fn start(cfg: Validated) -> Result<Self, AgentError> {
        let cancel = CancellationToken::new();
        let (client, kube_config) = client(cfg.raw.kubeconfig.as_deref()).await?;

        // Health and metrics first: /healthz answers while the rest starts.
        let metrics = Metrics::new();
        let readiness = Readiness::new(client.clone());
        let metrics_cancel = cancel.child_token();
        let (metrics_addr, server) = crate::metrics::serve(
            cfg.raw
                .metrics_addr
                .unwrap_or(crate::config::DEFAULT_METRICS_ADDR),
            metrics.clone(),
            readiness.clone(),
            metrics_cancel.clone(),
        )
        .await
        .map_err(|e| start_err("binding metricsAddr")(&e))?;
        let server = tokio::spawn(async move { server.await.map_err(|e| e.to_string()) });
        tracing::info!(%metrics_addr, "serving /metrics, /healthz, /readyz");

        if cfg.raw.install_crds.unwrap_or(true) {
            install_crds(&client).await?;
        }
        let identity = Arc::new(
            LocalIdentity::load_or_create(
                &client,
                &IdentityOptions {
                    cluster_id: cfg.id.clone(),
                    cluster_name: Some(cfg.name.clone()),
                    ..IdentityOptions::default()
                },
            )
            .await
            .map_err(|e| {
                start_err("loading the identity (Secret liqo-system/liqo-identity)")(&e)
            })?,
        );
        let me = identity.id().clone();
        tracing::info!(cluster = %me, name = identity.name(), fingerprint = %identity.fingerprint(), "identity loaded");
        metrics.watch(client.clone(), cancel.clone());
        let mut agent = liqo_runtime::Agent::builder(client.clone(), me.clone())
            .component("metrics server", linked(metrics_cancel, server));

        // The network fabric: its parameters (gateway endpoint and key) go to peers at each
        // grant, its links translate offloaded pods' addresses.
        let mut network = NetworkParameters::new(cfg.pod_cidr, cfg.service_cidr);
        network.external_cidr = cfg.external_cidr;
        let network_source = if cfg.raw.network.enabled {
            network.gateway_endpoint = cfg.raw.network.endpoint.clone();
            let fabric = crate::network::fabric(&client, &cfg, network)
                .await
                .map_err(|e| start_err("starting the network fabric (network)")(&e))?;
            agent = agent.fabric(fabric.clone());
            NetworkSource::Fabric(fabric)
        } else {
            NetworkSource::Static(network)
        };
        // Published in the cluster info, for administrators issuing out-of-band peerings.
        let published_network = network_source
            .parameters()
            .await
            .map_err(|e| start_err("reading the network fabric's parameters")(&e))?;

        // Peering: the consumer role driven by ForeignCluster.spec.role through liqo-peering's
        // controller, over the configured method; with the CSR method, the provider role
        // behind the HTTPS endpoint.
        let method = cfg.raw.peering.method;
        let mut peering_addr = None;
        if method == PeeringMethod::Csr
            && let Some(listen) = cfg.raw.peering.listen
        {
            let offer = match &cfg.offer {
                Offer::Absolute { cpu, memory, pods } => {
                    OfferPolicy::Absolute(ResourceOffer::new(cpu, memory, *pods))
                }
                Offer::ShareOfFree(percent) => OfferPolicy::ShareOfFree {
                    percent: *percent,
                    labels: Default::default(),
                },
            };
            let policy = match cfg.raw.peering.policy {
                PolicyKind::AcceptAll => {
                    tracing::warn!(
                        "peering.policy is AcceptAll: every cluster that can reach {listen} may peer and run pods here; prefer AllowList or Manual"
                    );
                    PeeringPolicy::AcceptAll
                }
                PolicyKind::AllowList => PeeringPolicy::AllowList(cfg.allow_list.clone()),
                PolicyKind::Manual => PeeringPolicy::Manual,
            };
            let provider_config = ProviderConfig::new(
                api_endpoint(&cfg, &kube_config)?,
                offer,
                network_source.clone(),
            )
            .with_policy(policy)
            .with_credential_lifetime(Duration::from_secs(
                cfg.raw.peering.credential_lifetime_seconds,
            ));
            let provider = Arc::new(Provider::new(
                client.clone(),
                identity.clone(),
                provider_config,
            ));
            let server_cancel = cancel.child_token();
            let (addr, server) = PeeringServer::new(provider)
                .spawn(listen, server_cancel.clone().cancelled_owned())
                .await
                .map_err(|e| start_err("binding peering.listen")(&e))?;
            agent = agent.component("peering server", linked(server_cancel, server));
            peering_addr = Some(addr);
            tracing::info!(%addr, "serving the HTTPS peering endpoint");
        }
        let endpoint = cfg.endpoint.clone().or_else(|| {
            peering_addr
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| format!("https://{a}"))
        });
        if peering_addr.is_some() && endpoint.is_none() {
            tracing::warn!(
                "peering.listen is a wildcard address and peering.endpoint is not set: no peering \
                 endpoint is published, peers must be told it by hand"
            );
        }
        match method {
            PeeringMethod::Csr => {
                let consumer = Arc::new(Consumer::new(
                    client.clone(),
                    identity.clone(),
                    network_source,
                    Arc::new(HttpsConnector::default()),
                ));
                let rotation = RotationController::new(client.clone(), consumer.clone());
                agent = agent
                    .peering(Arc::new(CsrAuthority::new(consumer)))
                    .component(
                        "credential rotation",
                        move |cancel: CancellationToken| async move {
                            rotation.run(cancel.cancelled_owned()).await;
                            Ok::<(), std::convert::Infallible>(())
                        },
                    );
            }
            PeeringMethod::Kubeconfig => {
                tracing::info!(
                    "peering.method is Kubeconfig: no peering endpoint; providers are reached \
                     through the bundles their administrators issue (Secrets \
                     liqo-system/liqo-peering-bundle-<provider>)"
                );
                agent = agent.peering(Arc::new(liqo_peering_kubeconfig::KubeconfigAuthority::new(
                    client.clone(),
                    me.clone(),
                )));
            }
        }

        // What peers and liqoctl read about us.
        let info = liqo_core::info::ClusterInfo {
            cluster_id: me.clone(),
            cluster_name: Some(identity.name().to_owned()),
            peering_endpoint: endpoint.clone(),
            fingerprint: identity.fingerprint(),
            network: Some(published_network),
        };
        liqo_core::info::publish(&client, &info)
            .await
            .map_err(|e| start_err("publishing liqo-system/liqo-cluster-info")(&e))?;

        // Discovery: every configured source, merged by the runtime.
        let d = &cfg.raw.discovery;
        if d.mdns.enabled {
            let mdns = liqo_discovery_mdns::MdnsDiscovery::new(
                liqo_discovery_mdns::MdnsConfig::default().interfaces(
                    d.mdns
                        .interfaces
                        .iter()
                        .map(|i| liqo_discovery_mdns::Interface::from(i.as_str())),
                ),
            )
            .map_err(|e| start_err("starting mDNS discovery (discovery.mdns)")(&e))?;
            agent = agent.discovery(mdns);
        }
        if let Some(dns) = &d.dns {
            let mut c = liqo_discovery_dns::DnsConfig::new(dns.domain.clone());
            if let Some(s) = dns.server {
                c = c.nameservers([s]);
            }
            let dns = liqo_discovery_dns::DnsDiscovery::new(c)
                .map_err(|e| start_err("starting DNS discovery (discovery.dns)")(&e))?;
            agent = agent.discovery(dns);
        }
        if let Some(file) = &d.r#static.file {
            agent = agent.discovery(liqo_discovery_static::FileDiscovery::new(file.clone()));
        }
        if !cfg.static_peers.is_empty() {
            agent = agent.discovery(liqo_discovery_static::StaticDiscovery::new(
                cfg.static_peers.clone(),
            ));
        }
        if d.foreign_clusters {
            agent = agent.discovery(liqo_discovery_static::ForeignClusterDiscovery::new(
                client.clone(),
            ));
        }
        if let Some(endpoint) = &endpoint {
            agent = agent.advertise(PeerAdvertisement {
                cluster_id: me.clone(),
                cluster_name: identity.name().to_owned(),
                peering_endpoint: endpoint.clone(),
                key_fingerprint: Some(identity.fingerprint()),
                protocol_version: liqo_core::PROTOCOL_VERSION,
                source: liqo_core::DiscoverySource::Manual,
                ttl: None,
            });
        }
        for s in &cfg.auto_peer {
            agent = agent.auto_peer(*s);
        }

        // The virtual kubelet.
        let vk = &cfg.raw.virtual_kubelet;
        if vk.provider.enabled {
            agent = agent.provider(
                ProviderAgent::new(client.clone(), me.clone())
                    .pod_security(cfg.pod_security.clone()),
            );
        }
        if vk.consumer.enabled {
            let reflectors = liqo_reflectors_k8s::all().into_iter().filter(|r| {
                vk.consumer
                    .reflectors
                    .as_ref()
                    .is_none_or(|want| want.iter().any(|k| k == r.kind()))
            });
            let config = liqo_vk::ConsumerConfig {
                heartbeat: Duration::from_secs(vk.consumer.heartbeat_seconds),
                webhook: vk.consumer.webhook,
                webhook_service: vk.consumer.webhook_service.as_ref().map(|s| {
                    liqo_vk::webhook::WebhookService {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        port: s.port,
                    }
                }),
                ..liqo_vk::ConsumerConfig::default()
            };
            let pods = PodReflector::new(me.clone()).with_config(EngineConfig {
                workers: vk.consumer.pod_workers,
                ..EngineConfig::default()
            });
            agent = agent.reflectors(reflectors).consumer(config, pods);
        }
        readiness.set_started();
        Ok(Self {
            cluster_id: me,
            metrics_addr,
            peering_addr,
            runtime: agent.build(),
            cancel,
        })
    }

    /// Runs until `shutdown` resolves or a component fails, then stops every component and the
    /// fabric: peerings and remote workloads are left in place. `Err` names the component that
    /// failed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let result = self.runtime.run(shutdown).await;
        self.cancel.cancel();
        Ok(result?)
    }
}
