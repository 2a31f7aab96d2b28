//! The workload of the data-plane tests: a Deployment `web` answering HTTP on 8080 from the
//! lab's data plane, a client pod at home, server-side apply, and reading the answers.
#![allow(dead_code)] // Each test binary uses what it needs.

use std::collections::BTreeMap;

use std::net::Ipv4Addr;

use futures::{StreamExt, pin_mut};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{Container, ContainerPort, Node, Pod, PodSpec, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use liqo_core::{
    ClusterId, ClusterInfo, DiscoverySource,
    crds::{
        DiscoverySpec, ForeignCluster, ForeignClusterSpec, PeeringRole, foreign_cluster_condition,
    },
};
use liqo_lab::NETNS_LABEL;
use serde::de::DeserializeOwned;

use super::{Agent, Error, FIELD_MANAGER, WAIT, failure};

/// `key=value` from the data plane's one-line answer.
pub fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Deployment `web` in `namespace`: pods the lab gives a network namespace and an HTTP server.
pub fn web_deployment(namespace: &str, replicas: i32) -> Deployment {
    let labels = BTreeMap::from([
        ("app".to_owned(), "web".to_owned()),
        (NETNS_LABEL.to_owned(), "true".to_owned()),
    ]);
    Deployment {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "web".into(),
                        image: Some("ghcr.io/liqo-rs/hello:test".into()),
                        ports: Some(vec![ContainerPort {
                            container_port: 8080,
                            ..ContainerPort::default()
                        }]),
                        ..Container::default()
                    }],
                    termination_grace_period_seconds: Some(1),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Pod `default/client` at home, with a network namespace of the lab's data plane.
pub fn client_pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("client".into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                NETNS_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "client".into(),
                image: Some("ghcr.io/liqo-rs/client:test".into()),
                ..Container::default()
            }],
            termination_grace_period_seconds: Some(1),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Server-side apply of `obj` through `api`.
pub async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    Ok(api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Watches `api` (filtered by `config`) until `f` accepts an object.
pub async fn watch_for<K, T>(
    what: &str,
    agents: &[&Agent],
    api: Api<K>,
    config: watcher::Config,
    mut f: impl FnMut(&K) -> Option<T>,
) -> Result<T, Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let found = tokio::time::timeout(WAIT, async {
        let stream = watcher(api, config).default_backoff().applied_objects();
        pin_mut!(stream);
        while let Some(item) = stream.next().await {
            if let Some(v) = item.ok().as_ref().and_then(&mut f) {
                return Some(v);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(v)) => Ok(v),
        _ => Err(failure(what, agents, format!("not within {WAIT:?}"))),
    }
}

pub fn named(name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={name}"))
}

pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn network_ready(fc: &ForeignCluster) -> bool {
    fc.status.as_ref().is_some_and(|s| {
        liqo_core::conditions::is_true(&s.conditions, foreign_cluster_condition::NETWORK_READY)
    })
}

pub fn running_ip(p: &Pod) -> Option<Ipv4Addr> {
    let s = p.status.as_ref()?;
    if s.phase.as_deref() != Some("Running") || p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    s.pod_ip.as_deref()?.parse().ok()
}

/// The consumer's intent to peer with the provider that published `info`: its
/// `ForeignCluster`, role `Provider`, endpoint and key fingerprint pinned.
pub fn provider_intent(id: &ClusterId, info: ClusterInfo) -> Result<ForeignCluster, Error> {
    Ok(ForeignCluster::new(
        id.as_str(),
        ForeignClusterSpec {
            cluster_id: id.clone(),
            cluster_name: info.cluster_name.clone(),
            peering_endpoint: Some(
                info.peering_endpoint
                    .clone()
                    .ok_or("the provider publishes no peering endpoint")?,
            ),
            public_key_fingerprint: Some(info.fingerprint),
            discovery: DiscoverySpec {
                source: DiscoverySource::Manual,
                auto_peer: false,
            },
            role: PeeringRole::Provider,
        },
    ))
}

/// Offloads namespace `ns` of the cluster `client` reaches (made if missing), pods only on the
/// providers, and waits (watching) until its `NamespaceOffloading` is Ready.
pub async fn offload_namespace(
    client: &kube::Client,
    ns: &str,
    agents: &[&Agent],
) -> Result<(), Error> {
    use k8s_openapi::api::core::v1::Namespace;
    use liqo_core::crds::{NamespaceOffloading, NamespaceOffloadingSpec, PodOffloadingStrategy};

    apply(
        &Api::<Namespace>::all(client.clone()),
        ns,
        &Namespace {
            metadata: ObjectMeta {
                name: Some(ns.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        },
    )
    .await?;
    let nsos: Api<NamespaceOffloading> = Api::namespaced(client.clone(), ns);
    apply(
        &nsos,
        liqo_vk::names::OFFLOADING_NAME,
        &NamespaceOffloading::new(
            liqo_vk::names::OFFLOADING_NAME,
            NamespaceOffloadingSpec {
                namespace_mapping_strategy: Default::default(),
                remote_namespace_name: None,
                pod_offloading_strategy: PodOffloadingStrategy::Remote,
                cluster_selector: None,
            },
        ),
    )
    .await?;
    watch_for(
        "the NamespaceOffloading Ready",
        agents,
        nsos,
        named(liqo_vk::names::OFFLOADING_NAME),
        |o| {
            o.status
                .as_ref()
                .and_then(|s| s.phase.as_ref())
                .filter(|p| format!("{p:?}") == "Ready")
                .map(|_| ())
        },
    )
    .await
}
