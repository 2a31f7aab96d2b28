//! # liqo-reflectors-k8s
//!
//! Reflectors for the built-in kinds offloaded pods need, each a few lines on liqo-vk's generic
//! engine ([`liqo_vk::reflection`]):
//!
//! | reflector | direction | what changes on the way |
//! |---|---|---|
//! | [`ConfigMaps`] | local → remote | `kube-root-ca.crt` stays home (each cluster has its own) |
//! | [`Secrets`] | local → remote | service-account token Secrets stay home |
//! | [`Services`] | local → remote | cluster IPs, node ports and the selector are cleared: the provider allocates its own IP and the endpoints come from [`EndpointSlices`] |
//! | [`EndpointSlices`] | local → remote | addresses of pods offloaded there translated back to the provider's own, local pods' to how the provider reaches them, other providers' pods left out; node names and target references dropped |
//! | [`ServiceAccountTokens`] | local → remote | a token of each local ServiceAccount an offloaded pod uses (TokenRequest API, 1 h), renewed before it expires, in Secret `liqo-sa-<name>` that offloaded pods mount; withdrawn when no offloaded pod uses it |
//! | [`Events`] | remote → local | events about remote pods (and their ShadowPods) point at the local pods |
//!
//! ```no_run
//! # async fn demo(client: kube::Client) -> Result<(), liqo_vk::VkError> {
//! let agent = liqo_vk::ConsumerAgent::builder(client, "milan".parse().unwrap())
//!     .reflectors(liqo_reflectors_k8s::all())
//!     .build();
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{
            ConfigMap, Event, ObjectReference, Pod, Secret, Service, ServiceAccount, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use liqo_core::{ReflectionDirection, ReflectionScope, ResourceReflector};
use liqo_vk::reflection::{Reflect, Reflector, TransformError, clean_metadata};

/// Every reflector of this crate, ready for `liqo_vk::ConsumerAgent::builder(..).reflectors(..)`.
pub fn all() -> Vec<Arc<dyn ResourceReflector>> {
    vec![
        Arc::new(Reflector::new(ConfigMaps)),
        Arc::new(Reflector::new(Secrets)),
        Arc::new(Reflector::new(Services)),
        Arc::new(Reflector::new(EndpointSlices)),
        Arc::new(Reflector::new(ServiceAccountTokens::default())),
        Arc::new(Reflector::new(Events)),
    ]
}

/// ConfigMaps, local to remote.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigMaps;

impl Reflect for ConfigMaps {
    type Source = ConfigMap;
    type Target = ConfigMap;
    fn name(&self) -> &str {
        "configmap"
    }
    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }
    fn source_selector(&self) -> watcher::Config {
        watcher::Config::default().fields("metadata.name!=kube-root-ca.crt")
    }
    fn transform(
        &self,
        cm: &ConfigMap,
        _: &ReflectionScope,
    ) -> Result<Option<ConfigMap>, TransformError> {
        Ok(Some(ConfigMap {
            metadata: clean_metadata(&cm.metadata),
            data: cm.data.clone(),
            binary_data: cm.binary_data.clone(),
            immutable: cm.immutable,
        }))
    }
}

/// Secrets, local to remote (not service-account tokens: they are only valid at home).
#[derive(Debug, Clone, Copy, Default)]
pub struct Secrets;

impl Reflect for Secrets {
    type Source = Secret;
    type Target = Secret;
    fn name(&self) -> &str {
        "secret"
    }
    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }
    fn source_selector(&self) -> watcher::Config {
        watcher::Config::default().fields("type!=kubernetes.io/service-account-token")
    }
    fn transform(&self, s: &Secret, _: &ReflectionScope) -> Result<Option<Secret>, TransformError> {
        Ok(Some(Secret {
            metadata: clean_metadata(&s.metadata),
            data: s.data.clone(),
            string_data: None,
            type_: s.type_.clone(),
            immutable: s.immutable,
        }))
    }
}

/// Services, local to remote, without cluster IPs, node ports or selector.
#[derive(Debug, Clone, Copy, Default)]
pub struct Services;

impl Reflect for Services {
    type Source = Service;
    type Target = Service;
    fn name(&self) -> &str {
        "service"
    }
    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }
    fn transform(
        &self,
        s: &Service,
        _: &ReflectionScope,
    ) -> Result<Option<Service>, TransformError> {
        let Some(spec) = &s.spec else {
            return Ok(None);
        };
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let ports = spec.ports.clone().map(|ps| {
            ps.into_iter()
                .map(|mut p| {
                    p.node_port = None;
                    p
                })
                .collect()
        });
        Ok(Some(Service {
            metadata: clean_metadata(&s.metadata),
            spec: Some(ServiceSpec {
                type_: spec.type_.clone(),
                ports,
                // Headless stays headless; otherwise the provider allocates its own address.
                cluster_ip: headless.then(|| "None".to_owned()),
                cluster_ips: headless.then(|| vec!["None".to_owned()]),
                // Endpoints are reflected, not selected: the provider runs only some of the pods.
                selector: None,
                external_name: spec.external_name.clone(),
                session_affinity: spec.session_affinity.clone(),
                session_affinity_config: spec.session_affinity_config.clone(),
                publish_not_ready_addresses: spec.publish_not_ready_addresses,
                ip_family_policy: spec.ip_family_policy.clone(),
                internal_traffic_policy: spec.internal_traffic_policy.clone(),
                traffic_distribution: spec.traffic_distribution.clone(),
                ..ServiceSpec::default()
            }),
            status: None,
        }))
    }
}

/// The managed-by value of reflected EndpointSlices, so the provider's EndpointSlice controller
/// leaves them alone.
pub const ENDPOINTSLICE_MANAGED_BY: &str = "endpointslice.reflection.liqo.io";

/// EndpointSlices, local to remote, with addresses as the provider knows them.
#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointSlices;

impl Reflect for EndpointSlices {
    type Source = EndpointSlice;
    type Target = EndpointSlice;
    fn name(&self) -> &str {
        "endpointslice"
    }
    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }
    fn source_selector(&self) -> watcher::Config {
        watcher::Config::default()
            .labels("endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io")
    }
    fn transform(
        &self,
        es: &EndpointSlice,
        scope: &ReflectionScope,
    ) -> Result<Option<EndpointSlice>, TransformError> {
        let mut metadata = clean_metadata(&es.metadata);
        metadata.labels.get_or_insert_with(BTreeMap::new).insert(
            "endpointslice.kubernetes.io/managed-by".to_owned(),
            ENDPOINTSLICE_MANAGED_BY.to_owned(),
        );
        let endpoints = es
            .endpoints
            .iter()
            .filter_map(|e| {
                let addresses: Vec<String> = e
                    .addresses
                    .iter()
                    .filter_map(|a| provider_view(a, scope))
                    .collect();
                // An endpoint the provider cannot reach at all is not one for it.
                (!addresses.is_empty()).then(|| Endpoint {
                    addresses,
                    conditions: e.conditions.clone(),
                    hostname: e.hostname.clone(),
                    zone: e.zone.clone(),
                    deprecated_topology: None,
                    hints: None,
                    node_name: None,
                    target_ref: None,
                })
            })
            .collect();
        Ok(Some(EndpointSlice {
            metadata,
            address_type: es.address_type.clone(),
            endpoints,
            ports: es.ports.clone(),
        }))
    }
}

/// An endpoint address as the provider reaches it: a pod offloaded to this provider (seen here
/// through the fabric's remapping) gets the provider's own address back; a pod of this cluster
/// gets the address the provider knows it by; anything else (a pod offloaded to another
/// provider, which this provider has no tunnel to) is left out. Non-IP text stays as it is.
fn provider_view(address: &str, scope: &ReflectionScope) -> Option<String> {
    let Ok(ip) = address.parse() else {
        return Some(address.to_owned());
    };
    let t = &scope.translator;
    t.to_remote_view(ip)
        .ok()
        .or_else(|| t.local_for_remote(ip))
        .map(|ip| ip.to_string())
}

/// The name of the Secret holding a service account's token on the provider.
pub fn token_secret_name(service_account: &str) -> String {
    liqo_vk::pods::service_account_secret(service_account)
}

/// Annotation on token Secrets: when the token expires (Unix seconds).
pub const TOKEN_EXPIRY: &str = "liqo.io/token-expiry";

/// ServiceAccount tokens for offloaded pods: a token of each local ServiceAccount that a pod
/// offloaded to this provider uses (and of no other), requested with the TokenRequest API,
/// short-lived and renewed when a fifth of its lifetime is left; withdrawn from the provider
/// once no offloaded pod uses it.
#[derive(Debug, Clone, Copy)]
pub struct ServiceAccountTokens {
    /// Requested token lifetime.
    pub lifetime: Duration,
}

impl Default for ServiceAccountTokens {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(3600),
        }
    }
}

#[async_trait]
impl Reflect for ServiceAccountTokens {
    type Source = ServiceAccount;
    type Target = Secret;
    fn name(&self) -> &str {
        "serviceaccount-token"
    }
    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }
    fn target_name(&self, source_name: &str, _: &ReflectionScope) -> String {
        token_secret_name(source_name)
    }
    fn transform(
        &self,
        _: &ServiceAccount,
        _: &ReflectionScope,
    ) -> Result<Option<Secret>, TransformError> {
        // Tokens need an API call: see `desired`.
        Ok(None)
    }
    fn refresh_after(&self, _: &ServiceAccount) -> Option<Duration> {
        Some(self.lifetime / 5)
    }
    /// A pod offloaded to this provider appears or goes: its ServiceAccount is looked at again.
    fn triggers(&self, scope: &ReflectionScope) -> Option<BoxStream<'static, String>> {
        let node = liqo_vk::names::node_name(&scope.remote_cluster);
        let pods: Api<Pod> = Api::namespaced(scope.local.clone(), &scope.local_namespace);
        // Pods already counted, so status updates of a thousand pods do not each wake the
        // ServiceAccount up.
        let mut seen = HashSet::new();
        let account = |p: &Pod| {
            p.spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned())
        };
        Some(
            watcher(
                pods,
                watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            )
            .backoff(liqo_core::watch_backoff())
            .filter_map(move |ev| {
                let key = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        seen.insert(p.uid()).then(|| account(&p))
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        seen.remove(&p.uid());
                        Some(account(&p))
                    }
                    _ => None,
                };
                futures::future::ready(key)
            })
            .boxed(),
        )
    }
    async fn desired(
        &self,
        sa: &ServiceAccount,
        existing: Option<&Secret>,
        scope: &ReflectionScope,
    ) -> Result<Option<Secret>, TransformError> {
        // Only what offloaded pods use leaves the cluster.
        let (name, ns) = (sa.name_any(), &scope.local_namespace);
        let users = Api::<Pod>::namespaced(scope.local.clone(), ns)
            .list_metadata(
                &ListParams::default()
                    .fields(&format!(
                        "spec.nodeName={},spec.serviceAccountName={name}",
                        liqo_vk::names::node_name(&scope.remote_cluster)
                    ))
                    .limit(1),
            )
            .await
            .map_err(|e| {
                TransformError::new(format!(
                    "listing the offloaded pods of ServiceAccount {ns}/{name}: {e}"
                ))
            })?;
        if users.items.is_empty() {
            return Ok(None);
        }
        let now = Timestamp::now().as_second();
        let margin = (self.lifetime.as_secs() / 5) as i64;
        let secret = |data: BTreeMap<String, ByteString>, expiry: i64| Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(
                    TOKEN_EXPIRY.to_owned(),
                    expiry.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(data),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        };
        if let Some(e) = existing
            && let Some(expiry) = e
                .annotations()
                .get(TOKEN_EXPIRY)
                .and_then(|v| v.parse::<i64>().ok())
            && expiry - margin > now
            && let Some(data) = &e.data
        {
            return Ok(Some(secret(data.clone(), expiry)));
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(self.lifetime.as_secs() as i64),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let token = Api::<ServiceAccount>::namespaced(scope.local.clone(), ns)
            .create_token_request(&name, &PostParams::default(), &request)
            .await
            .map_err(|e| {
                TransformError::new(format!(
                    "requesting a token for ServiceAccount {ns}/{name}: {e}"
                ))
            })?;
        let status = token.status.ok_or_else(|| {
            TransformError::new(format!(
                "the token request for {ns}/{name} returned no token"
            ))
        })?;
        let expiry = status.expiration_timestamp.0.as_second();
        let ca = Api::<ConfigMap>::namespaced(scope.local.clone(), ns)
            .get_opt("kube-root-ca.crt")
            .await
            .map_err(|e| TransformError::new(format!("reading {ns}/kube-root-ca.crt: {e}")))?
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("ca.crt").cloned())
            .unwrap_or_default();
        let data = BTreeMap::from([
            ("token".to_owned(), ByteString(status.token.into_bytes())),
            ("ca.crt".to_owned(), ByteString(ca.into_bytes())),
            ("namespace".to_owned(), ByteString(ns.clone().into_bytes())),
        ]);
        Ok(Some(secret(data, expiry)))
    }
}

/// Events, remote to local: what happens to offloaded pods shows up on the local ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct Events;

/// The local object a remote one stands for: remote pods and their ShadowPods carry the local
/// pod's name; other objects keep theirs.
fn local_object(involved: &ObjectReference, namespace: &str) -> ObjectReference {
    let pod = matches!(involved.kind.as_deref(), Some("Pod" | "ShadowPod"));
    ObjectReference {
        api_version: if pod {
            Some("v1".to_owned())
        } else {
            involved.api_version.clone()
        },
        kind: if pod {
            Some("Pod".to_owned())
        } else {
            involved.kind.clone()
        },
        name: involved.name.clone(),
        namespace: Some(namespace.to_owned()),
        field_path: involved.field_path.clone(),
        ..ObjectReference::default()
    }
}

impl Reflect for Events {
    type Source = Event;
    type Target = Event;
    fn name(&self) -> &str {
        "event"
    }
    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::RemoteToLocal
    }
    fn target_name(&self, source_name: &str, scope: &ReflectionScope) -> String {
        // Several providers reflect into one namespace: keep their event names apart.
        format!("{source_name}.{}", scope.remote_cluster)
    }
    fn transform(
        &self,
        ev: &Event,
        scope: &ReflectionScope,
    ) -> Result<Option<Event>, TransformError> {
        Ok(Some(Event {
            metadata: ObjectMeta::default(),
            involved_object: local_object(&ev.involved_object, &scope.local_namespace),
            action: ev.action.clone(),
            count: ev.count,
            event_time: ev.event_time.clone(),
            first_timestamp: ev.first_timestamp.clone(),
            last_timestamp: ev.last_timestamp.clone(),
            message: ev.message.clone(),
            reason: ev.reason.clone(),
            related: None,
            reporting_component: ev.reporting_component.clone(),
            reporting_instance: ev.reporting_instance.clone(),
            series: ev.series.clone(),
            source: ev.source.clone(),
            type_: ev.type_.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ServicePort;
    use liqo_core::{AddressTranslator, CidrMapping};

    use super::*;

    fn scope() -> ReflectionScope {
        // Building a client needs a runtime; these tests only look at the translator.
        let m = CidrMapping::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.71.0.0/16".parse().unwrap(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let cfg = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(cfg).unwrap();
        ReflectionScope {
            remote_cluster: "rome".parse().unwrap(),
            local: client.clone(),
            remote: client,
            local_namespace: "shop".into(),
            remote_namespace: "shop-milan".into(),
            translator: AddressTranslator::new("rome".parse().unwrap(), vec![m]),
        }
    }

    #[test]
    fn services_lose_addresses_and_selector() {
        let s = Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                uid: Some("u".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                cluster_ips: Some(vec!["10.96.0.10".into()]),
                selector: Some(BTreeMap::from([("app".into(), "web".into())])),
                type_: Some("NodePort".into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    node_port: Some(30080),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        };
        let r = Services.transform(&s, &scope()).unwrap().unwrap();
        let spec = r.spec.unwrap();
        assert_eq!(spec.cluster_ip, None);
        assert_eq!(spec.selector, None);
        assert_eq!(spec.ports.unwrap()[0].node_port, None);
        assert_eq!(r.metadata.uid, None);
    }

    #[test]
    fn endpoint_addresses_are_translated() {
        let es = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["10.71.0.5".into(), "10.80.0.9".into()],
                node_name: Some("liqo-rome".into()),
                ..Endpoint::default()
            }],
            ports: None,
        };
        let r = EndpointSlices.transform(&es, &scope()).unwrap().unwrap();
        assert_eq!(
            r.endpoints[0].addresses,
            vec!["10.244.0.5".to_owned(), "10.80.0.9".to_owned()]
        );
        assert_eq!(r.endpoints[0].node_name, None);
        assert_eq!(
            r.metadata.labels.unwrap()["endpointslice.kubernetes.io/managed-by"],
            ENDPOINTSLICE_MANAGED_BY
        );
    }

    #[test]
    fn endpoints_take_the_providers_view_once_it_is_known() {
        // This cluster (rome's consumer) is on 10.244.0.0/16 too; the provider knows it as
        // 10.72.0.0/16. A pod offloaded to another provider is seen here at 10.73.0.4.
        let mut scope = scope();
        let us = CidrMapping::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.72.0.0/16".parse().unwrap(),
        )
        .unwrap();
        scope.translator = scope.translator.clone().with_local(vec![us]);
        let endpoint = |addresses: &[&str]| Endpoint {
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            ..Endpoint::default()
        };
        let es = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![
                endpoint(&["10.71.0.5"]),
                endpoint(&["10.244.3.8"]),
                endpoint(&["10.73.0.4"]),
            ],
            ports: None,
        };
        let r = EndpointSlices.transform(&es, &scope).unwrap().unwrap();
        let addresses: Vec<_> = r.endpoints.iter().map(|e| e.addresses.clone()).collect();
        assert_eq!(
            addresses,
            vec![vec!["10.244.0.5".to_owned()], vec!["10.72.3.8".to_owned()]],
            "the provider's own pod, ours as it reaches us; the other provider's pod left out"
        );
    }

    #[test]
    fn events_point_at_local_pods() {
        let o = ObjectReference {
            kind: Some("ShadowPod".into()),
            api_version: Some("liqo.io/v1alpha1".into()),
            name: Some("web-7d9f-abcde".into()),
            namespace: Some("shop-milan".into()),
            uid: Some("remote-uid".into()),
            ..ObjectReference::default()
        };
        let l = local_object(&o, "shop");
        assert_eq!(l.name.as_deref(), Some("web-7d9f-abcde"));
        assert_eq!(l.kind.as_deref(), Some("Pod"));
        assert_eq!(l.namespace.as_deref(), Some("shop"));
        assert_eq!(l.uid, None, "the remote uid means nothing here");
    }
}
