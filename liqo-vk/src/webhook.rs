//! The pod admission webhook: pods of offloaded namespaces may land on virtual nodes with no
//! change to their manifests.
//!
//! The agent serves HTTPS with a certificate from a CA it makes at start-up and registers a
//! `MutatingWebhookConfiguration` (URL and CA bundle) for pod creations in namespaces labelled
//! `liqo.io/offloading-enabled=true`. The API server reaches it at the bound address by default;
//! an agent running in a pod sets a [`WebhookService`] instead, and the configuration then names
//! that Service (the serving certificate is valid for its DNS names). The mutation follows the namespace's
//! `NamespaceOffloading`:
//!
//! | strategy | toleration of the virtual-node taint | required node affinity |
//! |---|---|---|
//! | `Local` | no | not a virtual node |
//! | `Remote` | yes | a virtual node matching the cluster selector |
//! | `LocalAndRemote` | yes | not a virtual node, or one matching the cluster selector |
//!
//! A pod's own required node affinity is kept: each of its terms is combined with ours.
//!
//! `LocalAndRemote` also adds a *preferred* affinity (weight 100) for nodes that are not
//! virtual, so the scheduler fills the cluster's own nodes first and bursts onto virtual nodes
//! only when they are full (cloud bursting); the virtual kubelet marks offloaded pods with a low
//! `controller.kubernetes.io/pod-deletion-cost`, so scaling down removes remote pods first.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
            WebhookClientConfig,
        },
        core::v1::{
            Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
            PreferredSchedulingTerm, Toleration,
        },
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api,
    api::{Patch, PatchParams},
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
    runtime::reflector::{ObjectRef, Store},
};
use liqo_core::{
    ClusterId,
    crds::{NamespaceOffloading, PodOffloadingStrategy},
    labels,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};
use tokio_util::sync::CancellationToken;

use crate::{
    VkError,
    names::{self, FIELD_MANAGER},
};

/// The path the API server posts pod admission reviews to.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";

fn requirement(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.to_owned(),
        operator: op.to_owned(),
        values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

fn and(a: &NodeSelectorTerm, b: &NodeSelectorTerm) -> NodeSelectorTerm {
    let join = |x: &Option<Vec<NodeSelectorRequirement>>,
                y: &Option<Vec<NodeSelectorRequirement>>| {
        let v: Vec<_> = x.iter().chain(y.iter()).flatten().cloned().collect();
        (!v.is_empty()).then_some(v)
    };
    NodeSelectorTerm {
        match_expressions: join(&a.match_expressions, &b.match_expressions),
        match_fields: join(&a.match_fields, &b.match_fields),
    }
}

/// The terms (ORed) that say where a pod of an offloaded namespace may run.
pub fn placement_terms(nso: &NamespaceOffloading) -> Vec<NodeSelectorTerm> {
    let virtual_node = NodeSelectorTerm {
        match_expressions: Some(vec![requirement(
            labels::TYPE,
            "In",
            &[labels::TYPE_VIRTUAL_NODE],
        )]),
        match_fields: None,
    };
    let local = NodeSelectorTerm {
        match_expressions: Some(vec![requirement(
            labels::TYPE,
            "NotIn",
            &[labels::TYPE_VIRTUAL_NODE],
        )]),
        match_fields: None,
    };
    let remote: Vec<NodeSelectorTerm> = match &nso.spec.cluster_selector {
        Some(sel) if !sel.node_selector_terms.is_empty() => sel
            .node_selector_terms
            .iter()
            .map(|t| and(&virtual_node, t))
            .collect(),
        _ => vec![virtual_node],
    };
    match nso.spec.pod_offloading_strategy {
        PodOffloadingStrategy::Local => vec![local],
        PodOffloadingStrategy::Remote => remote,
        PodOffloadingStrategy::LocalAndRemote => std::iter::once(local).chain(remote).collect(),
    }
}

/// The JSON patch for a pod being created in a namespace offloaded as `nso`.
pub fn mutation(pod: &Pod, nso: &NamespaceOffloading) -> json_patch::Patch {
    let spec = pod.spec.clone().unwrap_or_default();
    let ours = placement_terms(nso);
    let mut affinity = spec.affinity.clone().unwrap_or_default();
    let mut node_affinity = affinity.node_affinity.clone().unwrap_or_default();
    let terms = match &node_affinity.required_during_scheduling_ignored_during_execution {
        Some(sel) if !sel.node_selector_terms.is_empty() => sel
            .node_selector_terms
            .iter()
            .flat_map(|user| ours.iter().map(move |o| and(user, o)))
            .collect(),
        _ => ours,
    };
    node_affinity.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: terms,
    });
    if nso.spec.pod_offloading_strategy == PodOffloadingStrategy::LocalAndRemote {
        let prefer_local = PreferredSchedulingTerm {
            weight: 100,
            preference: NodeSelectorTerm {
                match_expressions: Some(vec![requirement(
                    labels::TYPE,
                    "NotIn",
                    &[labels::TYPE_VIRTUAL_NODE],
                )]),
                match_fields: None,
            },
        };
        let preferred = node_affinity
            .preferred_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new);
        if !preferred.contains(&prefer_local) {
            preferred.push(prefer_local);
        }
    }
    affinity.node_affinity = Some(NodeAffinity { ..node_affinity });
    let mut ops = vec![
        serde_json::json!({"op": "add", "path": "/spec/affinity", "value": Affinity { ..affinity }}),
    ];
    if nso.spec.pod_offloading_strategy != PodOffloadingStrategy::Local {
        let mut tolerations = spec.tolerations.clone().unwrap_or_default();
        if !tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some(names::VIRTUAL_NODE_TAINT_KEY))
        {
            tolerations.push(Toleration {
                key: Some(names::VIRTUAL_NODE_TAINT_KEY.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoExecute".to_owned()),
                ..Toleration::default()
            });
        }
        ops.push(
            serde_json::json!({"op": "add", "path": "/spec/tolerations", "value": tolerations}),
        );
    }
    // Built from well-formed operations: deserialisation cannot fail, an empty patch is safe.
    serde_json::from_value(serde_json::Value::Array(ops))
        .unwrap_or_else(|_| json_patch::Patch(vec![]))
}

async fn review(
    body: &[u8],
    offloadings: &Store<NamespaceOffloading>,
    client: &kube::Client,
) -> AdmissionReview<kube::core::DynamicObject> {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return AdmissionResponse::invalid(format!("not an AdmissionReview: {e}"))
                .into_review();
        }
    };
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
    };
    let resp = AdmissionResponse::from(&req);
    let (Some(pod), Some(ns)) = (&req.object, req.namespace.as_deref()) else {
        return resp.into_review();
    };
    // We are only called for namespaces labelled as offloaded; if our store has not seen the
    // offloading yet (it was just created), ask the API server rather than let the pod through
    // unmutated.
    let nso = match offloadings.get(&ObjectRef::new(names::OFFLOADING_NAME).within(ns)) {
        Some(nso) => nso,
        None => match Api::<NamespaceOffloading>::namespaced(client.clone(), ns)
            .get_opt(names::OFFLOADING_NAME)
            .await
        {
            Ok(Some(nso)) => Arc::new(nso),
            Ok(None) => return resp.into_review(),
            Err(e) => {
                return resp
                    .deny(format!("cannot read the NamespaceOffloading of {ns}: {e}"))
                    .into_review();
            }
        },
    };
    if nso.metadata.deletion_timestamp.is_some() {
        return resp.into_review();
    }
    match resp.clone().with_patch(mutation(pod, &nso)) {
        Ok(r) => r.into_review(),
        Err(e) => {
            tracing::warn!(error = %e, "pod mutation could not be serialised");
            resp.into_review()
        }
    }
}

struct Tls {
    ca_pem: String,
    acceptor: TlsAcceptor,
}

fn tls(host: std::net::IpAddr, dns_names: &[String]) -> Result<Tls, VkError> {
    let err = |what: &str, e: String| VkError::Webhook(format!("{what}: {e}"));
    let ca_key = KeyPair::generate().map_err(|e| err("CA key", e.to_string()))?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "liqo-vk webhook CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| err("CA certificate", e.to_string()))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().map_err(|e| err("serving key", e.to_string()))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "liqo-vk webhook");
    params.subject_alt_names = vec![SanType::IpAddress(host)];
    for name in dns_names {
        let dns = name
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| err(&format!("DNS name {name:?}"), e.to_string()))?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| err("serving certificate", e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("TLS versions", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| err("TLS configuration", e.to_string()))?;
    Ok(Tls {
        ca_pem: ca_cert.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    })
}

/// The name of the agent's MutatingWebhookConfiguration.
pub fn configuration_name(me: &ClusterId) -> String {
    format!("liqo-vk-{me}")
}

/// The Service through which the API server reaches the webhook of an agent running in a pod
/// (`ConsumerConfig::webhook_service`). It must select the agent's pods and forward `port` to
/// the address the webhook listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookService {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service port the API server connects to.
    pub port: u16,
}

impl WebhookService {
    /// The names the serving certificate is valid for: `<name>.<namespace>.svc` (what the API
    /// server dials) and its short and fully qualified forms.
    pub fn dns_names(&self) -> Vec<String> {
        let (name, ns) = (&self.name, &self.namespace);
        vec![
            name.clone(),
            format!("{name}.{ns}"),
            format!("{name}.{ns}.svc"),
            format!("{name}.{ns}.svc.cluster.local"),
        ]
    }
}

/// The agent's `MutatingWebhookConfiguration`: the API server calls `https://<bound>` or, with a
/// `service`, that Service, trusting `ca_pem`.
pub fn configuration(
    me: &ClusterId,
    bound: SocketAddr,
    service: Option<&WebhookService>,
    ca_pem: &str,
) -> MutatingWebhookConfiguration {
    let client_config = match service {
        None => WebhookClientConfig {
            url: Some(format!("https://{bound}{MUTATE_PODS_PATH}")),
            ca_bundle: Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec())),
            service: None,
        },
        Some(svc) => WebhookClientConfig {
            url: None,
            ca_bundle: Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec())),
            service: Some(ServiceReference {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                path: Some(MUTATE_PODS_PATH.to_owned()),
                port: Some(i32::from(svc.port)),
            }),
        },
    };
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(configuration_name(me)),
            labels: Some(
                [(
                    labels::MANAGED_BY.to_owned(),
                    names::MANAGED_BY_VALUE.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "pods.offloading.liqo.io".to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            client_config,
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".to_owned()]),
                operations: Some(vec!["CREATE".to_owned()]),
                resources: Some(vec!["pods".to_owned()]),
                scope: Some("Namespaced".to_owned()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_labels: Some(
                    [(names::OFFLOADING_ENABLED.to_owned(), "true".to_owned())].into(),
                ),
                match_expressions: None,
            }),
            // Without the mutation a pod of a Remote namespace would run locally: refuse instead,
            // and let its controller retry once the agent is back.
            failure_policy: Some("Fail".to_owned()),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(5),
            reinvocation_policy: Some("IfNeeded".to_owned()),
            ..MutatingWebhook::default()
        }]),
    }
}

/// Starts serving on `addr` and registers the webhook; returns the server task.
pub(crate) async fn serve(
    client: kube::Client,
    me: &ClusterId,
    addr: SocketAddr,
    service: Option<WebhookService>,
    offloadings: Store<NamespaceOffloading>,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>, VkError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| VkError::Webhook(format!("binding {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| VkError::Webhook(format!("reading the bound address: {e}")))?;
    let dns_names = service
        .as_ref()
        .map(WebhookService::dns_names)
        .unwrap_or_default();
    let tls = tls(local.ip(), &dns_names)?;
    let acceptor = tls.acceptor.clone();
    let reader = client.clone();
    let task = tokio::spawn(async move {
        // Answering before the offloadings are listed would let pods of offloaded namespaces
        // through unmutated; until then connections are not accepted and the API server's
        // failure policy makes the creator retry.
        tokio::select! {
            () = cancel.cancelled() => return,
            r = offloadings.wait_until_ready() => if r.is_err() { return },
        }
        tracing::info!("pod webhook accepting requests");
        loop {
            let (stream, _) = tokio::select! {
                () = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => { tracing::warn!(error = %e, "webhook accept failed"); continue; }
                },
            };
            let acceptor = acceptor.clone();
            let offloadings = offloadings.clone();
            let client = reader.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(move |req: Request<Incoming>| {
                    let offloadings = offloadings.clone();
                    let client = client.clone();
                    async move {
                        let ok = req.uri().path() == MUTATE_PODS_PATH;
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let (code, bytes) = if ok {
                            let out = review(&body, &offloadings, &client).await;
                            (200, serde_json::to_vec(&out).unwrap_or_default())
                        } else {
                            (404, b"not found".to_vec())
                        };
                        let resp = Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(Full::new(hyper::body::Bytes::from(bytes)));
                        Ok::<_, Infallible>(resp.unwrap_or_else(|_| Response::new(Full::default())))
                    }
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
                tokio::select! {
                    () = cancel.cancelled() => {}
                    _ = conn => {}
                }
            });
        }
    });
    let config = configuration(me, local, service.as_ref(), &tls.ca_pem);
    Api::<MutatingWebhookConfiguration>::all(client)
        .patch(
            &configuration_name(me),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config),
        )
        .await
        .map_err(|e| VkError::kube("registering the pod webhook", e))?;
    tracing::info!(address = %local, "pod webhook serving");
    Ok(task)
}

#[cfg(test)]
mod tests {
    use liqo_core::crds::NamespaceOffloadingSpec;

    use super::*;

    fn nso(strategy: PodOffloadingStrategy, selector: Option<NodeSelector>) -> NamespaceOffloading {
        NamespaceOffloading::new(
            "offloading",
            NamespaceOffloadingSpec {
                namespace_mapping_strategy: Default::default(),
                remote_namespace_name: None,
                pod_offloading_strategy: strategy,
                cluster_selector: selector,
            },
        )
    }

    fn patched(pod: &Pod, n: &NamespaceOffloading) -> Pod {
        let mut v = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut v, &mutation(pod, n)).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn strategies_place_pods() {
        let pod = Pod {
            spec: Some(Default::default()),
            ..Pod::default()
        };
        let local = patched(&pod, &nso(PodOffloadingStrategy::Local, None));
        let spec = local.spec.unwrap();
        assert!(
            spec.tolerations.is_none(),
            "Local pods do not tolerate virtual nodes"
        );
        let terms = spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 1);
        assert_eq!(
            terms[0].match_expressions.as_ref().unwrap()[0].operator,
            "NotIn"
        );

        let sel = NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![requirement(
                    "topology.kubernetes.io/region",
                    "In",
                    &["eu"],
                )]),
                match_fields: None,
            }],
        };
        let remote = patched(&pod, &nso(PodOffloadingStrategy::Remote, Some(sel)));
        let spec = remote.spec.unwrap();
        assert_eq!(
            spec.tolerations.unwrap()[0].key.as_deref(),
            Some(names::VIRTUAL_NODE_TAINT_KEY)
        );
        let terms = spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 1);
        assert_eq!(
            terms[0].match_expressions.as_ref().unwrap().len(),
            2,
            "virtual node AND region"
        );

        let both = patched(&pod, &nso(PodOffloadingStrategy::LocalAndRemote, None));
        let na = both.spec.unwrap().affinity.unwrap().node_affinity.unwrap();
        let terms = na
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2, "local OR virtual");
        let preferred = na
            .preferred_during_scheduling_ignored_during_execution
            .expect("LocalAndRemote prefers local nodes");
        assert_eq!(preferred.len(), 1);
        assert_eq!(preferred[0].weight, 100);
        let e = &preferred[0].preference.match_expressions.as_ref().unwrap()[0];
        assert_eq!(
            (e.key.as_str(), e.operator.as_str()),
            (labels::TYPE, "NotIn")
        );
        assert!(
            remote_has_no_preference(&pod),
            "only LocalAndRemote prefers local nodes"
        );
    }

    fn remote_has_no_preference(pod: &Pod) -> bool {
        let p = patched(pod, &nso(PodOffloadingStrategy::Remote, None));
        p.spec
            .and_then(|s| s.affinity)
            .and_then(|a| a.node_affinity)
            .and_then(|n| n.preferred_during_scheduling_ignored_during_execution)
            .is_none()
    }

    #[test]
    fn configuration_names_the_url_or_the_service() {
        let me: ClusterId = "milan".parse().unwrap();
        let bound = SocketAddr::from(([127, 0, 0, 1], 9443));
        let by_url = configuration(&me, bound, None, "CA");
        let hook = &by_url.webhooks.as_ref().unwrap()[0];
        assert_eq!(
            hook.client_config.url.as_deref(),
            Some("https://127.0.0.1:9443/mutate-pods")
        );
        assert!(hook.client_config.service.is_none());
        assert_eq!(by_url.metadata.name.as_deref(), Some("liqo-vk-milan"));

        let svc = WebhookService {
            namespace: "liqo-system".into(),
            name: "liqo-agent-webhook".into(),
            port: 443,
        };
        let by_service = configuration(&me, bound, Some(&svc), "CA");
        let hook = &by_service.webhooks.as_ref().unwrap()[0];
        assert!(
            hook.client_config.url.is_none(),
            "url and service are exclusive"
        );
        let reference = hook.client_config.service.as_ref().unwrap();
        assert_eq!(reference.namespace, "liqo-system");
        assert_eq!(reference.name, "liqo-agent-webhook");
        assert_eq!(reference.port, Some(443));
        assert_eq!(reference.path.as_deref(), Some(MUTATE_PODS_PATH));
        assert_eq!(
            hook.client_config
                .ca_bundle
                .as_ref()
                .map(|b| b.0.as_slice()),
            Some(b"CA".as_slice())
        );
        // Everything else is the same as with a URL.
        let (a, b) = (
            &by_url.webhooks.unwrap()[0],
            &by_service.webhooks.unwrap()[0],
        );
        assert_eq!(a.rules, b.rules);
        assert_eq!(a.namespace_selector, b.namespace_selector);
        assert_eq!(a.failure_policy.as_deref(), Some("Fail"));
    }

    #[test]
    fn serving_certificate_names_the_service() {
        let svc = WebhookService {
            namespace: "liqo-system".into(),
            name: "liqo-agent-webhook".into(),
            port: 443,
        };
        assert!(
            svc.dns_names()
                .contains(&"liqo-agent-webhook.liqo-system.svc".to_owned())
        );
        assert!(tls([0, 0, 0, 0].into(), &svc.dns_names()).is_ok());
        let bad = ["webhook-ü.liqo-system.svc".to_owned()];
        assert!(matches!(
            tls([0, 0, 0, 0].into(), &bad),
            Err(VkError::Webhook(m)) if m.contains("webhook-ü")
        ));
    }

    #[test]
    fn user_affinity_is_combined() {
        let user = NodeSelectorTerm {
            match_expressions: Some(vec![requirement("disk", "In", &["ssd"])]),
            match_fields: None,
        };
        let pod = Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                affinity: Some(Affinity {
                    node_affinity: Some(NodeAffinity {
                        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                            node_selector_terms: vec![user],
                        }),
                        ..NodeAffinity::default()
                    }),
                    ..Affinity::default()
                }),
                ..Default::default()
            }),
            ..Pod::default()
        };
        let p = patched(&pod, &nso(PodOffloadingStrategy::LocalAndRemote, None));
        let terms = p
            .spec
            .unwrap()
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2);
        assert!(terms.iter().all(|t| {
            t.match_expressions
                .as_ref()
                .unwrap()
                .iter()
                .any(|r| r.key == "disk")
        }));
    }
}
