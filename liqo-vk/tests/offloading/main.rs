//! Offloading against one real lab shared by this test binary: a consumer ("consumer", with kwok
//! workers) and two providers ("provider-a" in region eu-west, "provider-b" in region eu-south),
//! all with pod CIDR 10.244.0.0/16. The consumer sees provider-a's pods as 10.71.0.0/16 and
//! provider-b's as 10.72.0.0/16 (static, non-identity mappings standing for the fabric).
//!
//! The agents (one consumer agent, one provider agent per provider) run for the whole binary on
//! a runtime of their own, like the lab; every test uses clients of its own.

#[path = "../common/mod.rs"]
mod common;
mod pod_security;

use std::{collections::BTreeSet, sync::OnceLock, time::Duration};

use common::*;
use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{
        ConfigMap, Event, Namespace, Node, Pod, Secret, Service, ServiceAccount, ServicePort,
        ServiceSpec,
    },
    discovery::v1::EndpointSlice,
    rbac::v1::{ClusterRole, PolicyRule, RoleBinding, RoleRef},
};
use kube::{
    Api, Client, CustomResource, CustomResourceExt, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::watcher,
};
use liqo_core::{
    AddressTranslator, CidrMapping, ReflectionDirection, ReflectionScope, ResourceOffer,
    crds::{NamespaceMappingStrategy, PodOffloadingStrategy, RemoteNamespace, VirtualNode},
    labels,
};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use liqo_vk::{
    AGGREGATE_TO_OFFLOADING, ConsumerAgent, ConsumerConfig, ProviderAgent, StaticTranslation,
    reflection::{Reflect, ReflectionPolicy, Reflector, TransformError, clean_metadata},
    security::{PodSecurity, PodSecurityLevel},
    shadow::ShadowPod,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

/// A custom resource of a user, reflected by a reflector of a few lines.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "test.liqo.io", version = "v1", kind = "Widget", namespaced)]
struct WidgetSpec {
    size: i32,
}

struct Widgets;

impl Reflect for Widgets {
    type Source = Widget;
    type Target = Widget;
    fn name(&self) -> &str {
        "widget"
    }
    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }
    /// Widgets are opt-in: only those annotated `liqo.io/allow-reflection=true` go.
    fn policy(&self) -> ReflectionPolicy {
        ReflectionPolicy::OnlyAllowed
    }
    fn transform(&self, w: &Widget, _: &ReflectionScope) -> Result<Option<Widget>, TransformError> {
        Ok(Some(Widget {
            metadata: clean_metadata(&w.metadata),
            spec: w.spec.clone(),
        }))
    }
}

const CONSUMER: &str = "consumer";
const PROVIDER_A: &str = "provider-a";
const PROVIDER_B: &str = "provider-b";

fn mapping(remapped: &str) -> CidrMapping {
    CidrMapping::new(
        "10.244.0.0/16".parse().expect("cidr"),
        remapped.parse().expect("cidr"),
    )
    .expect("mapping")
}

fn translator(provider: &str) -> AddressTranslator {
    let remapped = if provider == PROVIDER_A {
        "10.71.0.0/16"
    } else {
        "10.72.0.0/16"
    };
    AddressTranslator::new(id(provider), vec![mapping(remapped)])
}

static AGENTS: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
static READY: OnceCell<Result<(), String>> = OnceCell::const_new();

async fn lab() -> &'static Lab {
    init_tracing();
    liqo_lab::shared(|| {
        LabSpec::new([
            ClusterSpec::new(CONSUMER),
            ClusterSpec::new(PROVIDER_A),
            ClusterSpec::new(PROVIDER_B),
        ])
    })
    .await
    .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

fn cluster(lab: &'static Lab, name: &str) -> &'static Cluster {
    lab.cluster(name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

async fn start_agents(lab: &'static Lab) -> TestResult {
    let consumer = cluster(lab, CONSUMER);
    let widget_crd = Widget::crd();
    for c in [CONSUMER, PROVIDER_A, PROVIDER_B] {
        install_crds(
            &cluster(lab, c).client()?,
            std::slice::from_ref(&widget_crd),
        )
        .await?;
    }
    for (p, region) in [(PROVIDER_A, "eu-west"), (PROVIDER_B, "eu-south")] {
        let offer = ResourceOffer::new("16", "64Gi", 200).with_label(ResourceOffer::REGION, region);
        simulate_peering(consumer, &id(CONSUMER), cluster(lab, p), &id(p), offer).await?;
        // The provider's admin lets consumers use widgets in their twin namespaces.
        let role = ClusterRole {
            metadata: kube::api::ObjectMeta {
                name: Some("offloading-widgets".into()),
                labels: Some([(AGGREGATE_TO_OFFLOADING.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec!["test.liqo.io".into()]),
                resources: Some(vec!["widgets".into()]),
                verbs: [
                    "get", "list", "watch", "create", "update", "patch", "delete",
                ]
                .map(String::from)
                .to_vec(),
                ..PolicyRule::default()
            }]),
            aggregation_rule: None,
        };
        apply(&Api::<ClusterRole>::all(cluster(lab, p).client()?), &role).await?;
        // provider-a holds consumers to the default level (baseline); provider-b's admin
        // trusts them with anything.
        let level = if p == PROVIDER_B {
            PodSecurityLevel::Privileged
        } else {
            PodSecurityLevel::default()
        };
        let provider = ProviderAgent::new(cluster(lab, p).client()?, id(p))
            .pod_security(PodSecurity::new(level));
        tokio::spawn(async move {
            if let Err(e) = provider.run(std::future::pending()).await {
                eprintln!("provider agent failed: {e}");
            }
        });
    }
    let translation = StaticTranslation::identity()
        .with(id(PROVIDER_A), vec![mapping("10.71.0.0/16")])
        .with(id(PROVIDER_B), vec![mapping("10.72.0.0/16")]);
    let agent = ConsumerAgent::builder(consumer.client()?, id(CONSUMER))
        .reflectors(liqo_reflectors_k8s::all())
        .reflector(Reflector::new(Widgets))
        .translation(translation)
        .config(ConsumerConfig {
            heartbeat: Duration::from_secs(2),
            ..ConsumerConfig::default()
        })
        .build();
    tokio::spawn(async move {
        if let Err(e) = agent.run(std::future::pending()).await {
            eprintln!("consumer agent failed: {e}");
        }
    });
    // Ready once both virtual nodes are.
    let nodes: Api<Node> = Api::all(consumer.client()?);
    wait_for(
        nodes,
        watcher::Config::default().labels(&format!(
            "{}={}",
            labels::TYPE,
            labels::TYPE_VIRTUAL_NODE
        )),
        "both virtual nodes Ready",
        WAIT,
        |ns| {
            ns.iter()
                .filter(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
                .count()
                == 2
        },
    )
    .await?;
    Ok(())
}

/// The lab, with the agents running (started once for the binary).
async fn env() -> &'static Lab {
    let lab = lab().await;
    let r = READY
        .get_or_init(|| async move {
            let rt = AGENTS.get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("liqo-vk-agents")
                    .enable_all()
                    .build()
                    .expect("agents runtime")
            });
            match rt.spawn(start_agents(lab)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    if let Err(e) = r {
        panic!("agents did not start: {e}");
    }
    lab
}

fn clients(lab: &'static Lab) -> (Client, Client, Client) {
    let c = |n| cluster(lab, n).client().expect("client");
    (c(CONSUMER), c(PROVIDER_A), c(PROVIDER_B))
}

fn twin(ns: &str) -> String {
    format!("{ns}-{CONSUMER}")
}

#[tokio::test]
async fn virtual_nodes_mirror_the_offer_and_heartbeat() -> TestResult {
    let lab = env().await;
    let (c, _, _) = clients(lab);
    let node = Api::<Node>::all(c.clone()).get("liqo-provider-a").await?;
    let l = node.labels();
    assert_eq!(l[labels::TYPE], labels::TYPE_VIRTUAL_NODE);
    assert_eq!(l[labels::REMOTE_CLUSTER_ID], PROVIDER_A);
    assert_eq!(l[ResourceOffer::REGION], "eu-west");
    assert!(l.contains_key(liqo_vk::names::REMOTE_CLUSTER_NAME));
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert!(
        taints
            .iter()
            .any(|t| t.key == liqo_vk::names::VIRTUAL_NODE_TAINT_KEY && t.effect == "NoExecute"),
        "{taints:?}"
    );
    let status = node.status.clone().ok_or("no status")?;
    assert_eq!(
        status.allocatable.as_ref().ok_or("no allocatable")?["pods"].0,
        "200"
    );
    assert_eq!(
        status.capacity.as_ref().ok_or("no capacity")?["cpu"].0,
        "16"
    );
    // The Lease is renewed: its renewTime moves.
    let leases: Api<Lease> = Api::namespaced(c.clone(), "kube-node-lease");
    let first = leases
        .get("liqo-provider-a")
        .await?
        .spec
        .and_then(|s| s.renew_time)
        .ok_or("no renewTime")?;
    wait_one(leases, "liqo-provider-a", "the lease to be renewed", |l| {
        l.and_then(|l| l.spec.as_ref())
            .and_then(|s| s.renew_time.as_ref())
            .is_some_and(|t| t.0 > first.0)
    })
    .await?;
    let vn =
        Api::<VirtualNode>::namespaced(c, &liqo_core::names::tenant_namespace(&id(PROVIDER_A)))
            .get(PROVIDER_A)
            .await?;
    let st = vn.status.ok_or("no VirtualNode status")?;
    assert_eq!(st.node_name.as_deref(), Some("liqo-provider-a"));
    assert!(
        liqo_core::conditions::is_true(&st.conditions, "Ready"),
        "{:?}",
        st.conditions
    );
    Ok(())
}

#[tokio::test]
async fn twenty_replicas_run_remotely_with_translated_ips() -> TestResult {
    let lab = env().await;
    let (c, pa, _) = clients(lab);
    let ns = "twenty";
    let mut s = spec(PodOffloadingStrategy::Remote);
    s.cluster_selector = Some(select(ResourceOffer::REGION, "eu-west"));
    offload(&c, ns, s).await?;
    wait_offloading(&c, ns, "Ready").await?;
    // A plain Deployment: nothing in it mentions virtual nodes.
    create(
        &Api::<Deployment>::namespaced(c.clone(), ns),
        &deployment("web", 20, "nginx:1.27"),
    )
    .await?;
    let pods = wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default().labels("app=web"),
        "20 local pods Running",
        WAIT,
        |ps| ps.iter().filter(|p| running(p)).count() == 20,
    )
    .await?;
    let remote = wait_for(
        Api::<Pod>::namespaced(pa.clone(), &twin(ns)),
        watcher::Config::default(),
        "20 remote pods Running",
        WAIT,
        |ps| ps.iter().filter(|p| running(p)).count() == 20,
    )
    .await?;
    let t = translator(PROVIDER_A);
    let remote_ips: BTreeSet<String> = remote
        .iter()
        .filter_map(|p| pod_ip(p))
        .map(|ip| t.to_local_view(ip).map(|i| i.to_string()))
        .collect::<Result<_, _>>()?;
    for p in pods.iter().filter(|p| running(p)) {
        assert_eq!(
            node_of(p),
            "liqo-provider-a",
            "{} scheduled by kube-scheduler onto the virtual node",
            p.name_any()
        );
        let ip = pod_ip(p).ok_or("no pod ip")?;
        assert!(
            "10.71.0.0/16".parse::<ipnet::IpNet>()?.contains(&ip),
            "{ip} is translated"
        );
        assert!(
            remote_ips.contains(&ip.to_string()),
            "{ip} is the translation of a remote pod IP"
        );
    }
    let rs = Api::<ShadowPod>::namespaced(pa, &twin(ns))
        .list(&ListParams::default())
        .await?;
    assert_eq!(rs.items.len(), 20, "one ShadowPod per pod");
    Ok(())
}

#[tokio::test]
async fn strategies_and_cluster_selector() -> TestResult {
    let lab = env().await;
    let (c, pa, pb) = clients(lab);
    let workers: BTreeSet<String> = cluster(lab, CONSUMER)
        .workers()
        .into_iter()
        .map(|(n, _)| n)
        .collect();

    // Local: pods stay home; the namespace is still mirrored on every provider.
    offload(&c, "st-local", spec(PodOffloadingStrategy::Local)).await?;
    // Remote, only to eu-south (provider-b).
    let mut remote = spec(PodOffloadingStrategy::Remote);
    remote.cluster_selector = Some(select(ResourceOffer::REGION, "eu-south"));
    offload(&c, "st-remote", remote).await?;
    // Local and remote, anywhere.
    offload(&c, "st-both", spec(PodOffloadingStrategy::LocalAndRemote)).await?;
    // Same name, taken on provider-a by someone else: a conflict there, fine on provider-b.
    ensure_namespace(&pa, "st-conflict", &[]).await?;
    let mut same = spec(PodOffloadingStrategy::Remote);
    same.namespace_mapping_strategy = NamespaceMappingStrategy::EnforceSameName;
    offload(&c, "st-conflict", same).await?;

    for ns in ["st-local", "st-remote", "st-both"] {
        wait_offloading(&c, ns, "Ready").await?;
    }
    // Settled: provider-a refused, provider-b ready.
    let conflict = wait_one(
        Api::<liqo_core::crds::NamespaceOffloading>::namespaced(c.clone(), "st-conflict"),
        "offloading",
        "st-conflict to settle",
        |o| {
            o.and_then(|o| o.status.as_ref()).is_some_and(|s| {
                s.remote_namespaces.len() == 2
                    && s.remote_namespaces
                        .iter()
                        .all(|e| e.ready || e.message.contains("NameConflict"))
            })
        },
    )
    .await?
    .ok_or("offloading vanished")?;
    let status = conflict.status.ok_or("no status")?;
    assert_eq!(
        status.phase,
        Some(liqo_core::crds::OffloadingPhase::SomeFailed)
    );
    let entries = status.remote_namespaces;
    let a = entries
        .iter()
        .find(|e| e.cluster_id.as_str() == PROVIDER_A)
        .ok_or("no entry for provider-a")?;
    assert!(!a.ready && a.message.contains("NameConflict"), "{a:?}");
    let b = entries
        .iter()
        .find(|e| e.cluster_id.as_str() == PROVIDER_B)
        .ok_or("no entry for provider-b")?;
    assert!(b.ready && b.namespace == "st-conflict", "{b:?}");

    let ns_exists = |client: &Client, name: String| {
        let api: Api<Namespace> = Api::all(client.clone());
        async move { api.get_opt(&name).await.map(|n| n.is_some()) }
    };
    assert!(ns_exists(&pa, twin("st-local")).await? && ns_exists(&pb, twin("st-local")).await?);
    assert!(ns_exists(&pb, twin("st-remote")).await?);
    assert!(
        !ns_exists(&pa, twin("st-remote")).await?,
        "provider-a is not selected"
    );
    assert!(ns_exists(&pa, twin("st-both")).await? && ns_exists(&pb, twin("st-both")).await?);

    for ns in ["st-local", "st-remote", "st-both"] {
        create(
            &Api::<Deployment>::namespaced(c.clone(), ns),
            &deployment("app", 4, "nginx"),
        )
        .await?;
    }
    let placed = |ns: &'static str| {
        let c = c.clone();
        async move {
            wait_for(
                Api::<Pod>::namespaced(c, ns),
                watcher::Config::default().labels("app=app"),
                &format!("4 pods Running in {ns}"),
                WAIT,
                |ps| ps.iter().filter(|p| running(p)).count() == 4,
            )
            .await
            .map(|ps| ps.iter().map(|p| node_of(p)).collect::<Vec<_>>())
        }
    };
    let local = placed("st-local").await?;
    assert!(
        local.iter().all(|n| workers.contains(n)),
        "Local stays on the consumer's nodes: {local:?}"
    );
    let remote = placed("st-remote").await?;
    assert!(
        remote.iter().all(|n| n == "liqo-provider-b"),
        "Remote goes to the selected provider only: {remote:?}"
    );
    let both = placed("st-both").await?;
    assert!(
        both.iter()
            .all(|n| workers.contains(n) || n.starts_with("liqo-provider-")),
        "LocalAndRemote may use any node: {both:?}"
    );
    // Tolerations and affinity came from the webhook, not the manifest.
    let pod = Api::<Pod>::namespaced(c.clone(), "st-remote")
        .list(&ListParams::default().labels("app=app"))
        .await?
        .items;
    let p = pod.first().ok_or("no pod")?;
    let tolerations = p
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some(liqo_vk::names::VIRTUAL_NODE_TAINT_KEY))
    );
    Ok(())
}

#[tokio::test]
async fn services_endpoints_configmaps_secrets_events_and_custom_resources_are_reflected()
-> TestResult {
    let lab = env().await;
    let (c, pa, _) = clients(lab);
    let ns = "refl";
    let t = twin(ns);
    let mut s = spec(PodOffloadingStrategy::Remote);
    s.cluster_selector = Some(select(ResourceOffer::REGION, "eu-west"));
    offload(&c, ns, s).await?;
    wait_offloading(&c, ns, "Ready").await?;

    // A Service and its endpoints: the offloaded pods, seen locally as 10.71.x.y.
    create(
        &Api::<Deployment>::namespaced(c.clone(), ns),
        &deployment("web", 2, "nginx"),
    )
    .await?;
    let svc = Service {
        metadata: meta("web"),
        spec: Some(ServiceSpec {
            selector: Some([("app".to_owned(), "web".to_owned())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    create(&Api::<Service>::namespaced(c.clone(), ns), &svc).await?;
    let local_pods = wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default().labels("app=web"),
        "2 pods Running",
        WAIT,
        |ps| ps.iter().filter(|p| running(p)).count() == 2,
    )
    .await?;
    let tr = translator(PROVIDER_A);
    let want: BTreeSet<String> = local_pods
        .iter()
        .filter_map(|p| pod_ip(p))
        .map(|ip| tr.to_remote_view(ip).map(|i| i.to_string()))
        .collect::<Result<_, _>>()?;
    assert!(want.iter().all(|ip| ip.starts_with("10.244.")), "{want:?}");
    let remote_svc = wait_one(
        Api::<Service>::namespaced(pa.clone(), &t),
        "web",
        "the Service on provider-a",
        |s| s.is_some(),
    )
    .await?
    .ok_or("gone")?;
    let rspec = remote_svc.spec.ok_or("no spec")?;
    assert_eq!(
        rspec.selector, None,
        "endpoints are reflected, not selected"
    );
    let local_ip = Api::<Service>::namespaced(c.clone(), ns)
        .get("web")
        .await?
        .spec
        .and_then(|s| s.cluster_ip);
    assert!(
        rspec.cluster_ip.is_some(),
        "the provider allocated a cluster IP"
    );
    eprintln!(
        "service web: local cluster IP {local_ip:?}, remote {:?}",
        rspec.cluster_ip
    );
    let want2 = want.clone();
    wait_for(
        Api::<EndpointSlice>::namespaced(pa.clone(), &t),
        watcher::Config::default().labels("kubernetes.io/service-name=web"),
        "the EndpointSlice with both translated addresses",
        WAIT,
        move |slices| {
            let got: BTreeSet<String> = slices
                .iter()
                .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
                .collect();
            got == want2
        },
    )
    .await?;

    // A ConfigMap, then a change to it.
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), ns);
    let rcms: Api<ConfigMap> = Api::namespaced(pa.clone(), &t);
    let cm = |v: &str| ConfigMap {
        metadata: meta("settings"),
        data: Some([("level".to_owned(), v.to_owned())].into()),
        ..ConfigMap::default()
    };
    apply(&cms, &cm("1")).await?;
    let has = |v: &'static str| {
        move |o: Option<&ConfigMap>| {
            o.and_then(|c| c.data.as_ref())
                .and_then(|d| d.get("level"))
                .is_some_and(|l| l == v)
        }
    };
    wait_one(
        rcms.clone(),
        "settings",
        "settings level=1 on the provider",
        has("1"),
    )
    .await?;
    apply(&cms, &cm("2")).await?;
    wait_one(
        rcms.clone(),
        "settings",
        "settings level=2 on the provider",
        has("2"),
    )
    .await?;
    // The skip annotation: a reflected object is withdrawn once annotated.
    cms.patch(
        "settings",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"annotations": {labels::SKIP_REFLECTION: "true"}}}),
        ),
    )
    .await?;
    wait_one(
        rcms.clone(),
        "settings",
        "skipped settings removed from the provider",
        |o| o.is_none(),
    )
    .await?;
    // kube-root-ca.crt is the provider's own, not ours.
    let root = rcms.get("kube-root-ca.crt").await?;
    assert!(!root.labels().contains_key(liqo_vk::names::REFLECTOR_LABEL));

    // A Secret.
    let secret = Secret {
        metadata: meta("creds"),
        string_data: Some([("password".to_owned(), "hunter2".to_owned())].into()),
        ..Secret::default()
    };
    create(&Api::<Secret>::namespaced(c.clone(), ns), &secret).await?;
    let rs = wait_one(
        Api::<Secret>::namespaced(pa.clone(), &t),
        "creds",
        "the Secret on provider-a",
        |s| s.is_some(),
    )
    .await?
    .ok_or("gone")?;
    assert_eq!(rs.data.ok_or("no data")?["password"].0, b"hunter2");
    // The default ServiceAccount's token, for offloaded pods.
    let token = wait_one(
        Api::<Secret>::namespaced(pa.clone(), &t),
        "liqo-sa-default",
        "the default token on provider-a",
        |s| s.is_some(),
    )
    .await?
    .ok_or("gone")?;
    let data = token.data.ok_or("no data")?;
    assert!(
        data["token"].0.len() > 20 && !data["ca.crt"].0.is_empty(),
        "a real token and the consumer's CA"
    );
    // Only the ServiceAccounts offloaded pods use: `idle` stays home; `builder`'s token leaves
    // with its first offloaded pod and is withdrawn with its last.
    let accounts = Api::<ServiceAccount>::namespaced(c.clone(), ns);
    for sa in ["idle", "builder"] {
        create(
            &accounts,
            &ServiceAccount {
                metadata: meta(sa),
                ..ServiceAccount::default()
            },
        )
        .await?;
    }
    let mut builder = pod_spec("busybox");
    builder.service_account_name = Some("builder".into());
    let pods = Api::<Pod>::namespaced(c.clone(), ns);
    create(
        &pods,
        &Pod {
            metadata: meta("build-1"),
            spec: Some(builder),
            status: None,
        },
    )
    .await?;
    let remote_secrets = Api::<Secret>::namespaced(pa.clone(), &t);
    wait_one(
        remote_secrets.clone(),
        "liqo-sa-builder",
        "the builder token on provider-a",
        |s| s.is_some(),
    )
    .await?;
    assert!(
        remote_secrets.get_opt("liqo-sa-idle").await?.is_none(),
        "a token of a ServiceAccount no offloaded pod uses left the cluster"
    );
    pods.delete("build-1", &DeleteParams::default()).await?;
    wait_one(
        remote_secrets,
        "liqo-sa-builder",
        "the builder token withdrawn with its last pod",
        |s| s.is_none(),
    )
    .await?;

    // Events about the remote pods come back, pointing at the local pods.
    let local_names: BTreeSet<String> = local_pods.iter().map(|p| p.name_any()).collect();
    wait_for(
        Api::<Event>::namespaced(c.clone(), ns),
        watcher::Config::default().labels(&format!("{}={PROVIDER_A}", labels::REMOTE_CLUSTER_ID)),
        "reflected events about the local pods",
        WAIT,
        move |evs| {
            evs.iter().any(|e| {
                e.involved_object
                    .name
                    .as_ref()
                    .is_some_and(|n| local_names.contains(n))
            })
        },
    )
    .await?;

    // A custom resource, with the user's few-line reflector (opt-in with the allow annotation).
    let widgets: Api<Widget> = Api::namespaced(c.clone(), ns);
    let rwidgets: Api<Widget> = Api::namespaced(pa.clone(), &t);
    create(&widgets, &Widget::new("plain", WidgetSpec { size: 1 })).await?;
    let mut w = Widget::new("gizmo", WidgetSpec { size: 3 });
    w.annotations_mut()
        .insert(liqo_vk::names::ALLOW_REFLECTION.into(), "true".into());
    create(&widgets, &w).await?;
    let rw = wait_one(rwidgets.clone(), "gizmo", "the widget on provider-a", |w| {
        w.is_some()
    })
    .await?
    .ok_or("gone")?;
    assert_eq!(rw.spec.size, 3);
    assert!(
        rwidgets.get_opt("plain").await?.is_none(),
        "a widget without the allow annotation stays home"
    );
    let allow = |v: &str| {
        Patch::Merge(
            serde_json::json!({"metadata": {"annotations": {liqo_vk::names::ALLOW_REFLECTION: v}}}),
        )
    };
    widgets
        .patch("plain", &PatchParams::default(), &allow("true"))
        .await?;
    wait_one(
        rwidgets.clone(),
        "plain",
        "the allowed widget on provider-a",
        |w| w.is_some(),
    )
    .await?;
    widgets
        .patch("plain", &PatchParams::default(), &allow("false"))
        .await?;
    wait_one(rwidgets, "plain", "the widget withdrawn", |w| w.is_none()).await?;
    Ok(())
}

#[tokio::test]
async fn deleting_and_unoffloading_leave_nothing_behind() -> TestResult {
    let lab = env().await;
    let (c, pa, _) = clients(lab);
    let ns = "gone";
    let t = twin(ns);
    let mut s = spec(PodOffloadingStrategy::Remote);
    s.cluster_selector = Some(select(ResourceOffer::REGION, "eu-west"));
    offload(&c, ns, s).await?;
    wait_offloading(&c, ns, "Ready").await?;
    let deps: Api<Deployment> = Api::namespaced(c.clone(), ns);
    create(&deps, &deployment("web", 3, "nginx")).await?;
    apply(
        &Api::<ConfigMap>::namespaced(c.clone(), ns),
        &ConfigMap {
            metadata: meta("cfg"),
            ..ConfigMap::default()
        },
    )
    .await?;
    wait_for(
        Api::<Pod>::namespaced(pa.clone(), &t),
        watcher::Config::default(),
        "3 remote pods Running",
        WAIT,
        |ps| ps.iter().filter(|p| running(p)).count() == 3,
    )
    .await?;
    let reflected_events = format!("{}={PROVIDER_A}", labels::REMOTE_CLUSTER_ID);
    wait_for(
        Api::<Event>::namespaced(c.clone(), ns),
        watcher::Config::default().labels(&reflected_events),
        "reflected events",
        WAIT,
        |e| !e.is_empty(),
    )
    .await?;
    deps.delete("web", &DeleteParams::foreground()).await?;
    wait_for(
        Api::<ShadowPod>::namespaced(pa.clone(), &t),
        watcher::Config::default(),
        "no ShadowPod",
        WAIT,
        |r| r.is_empty(),
    )
    .await?;
    wait_for(
        Api::<Pod>::namespaced(pa.clone(), &t),
        watcher::Config::default(),
        "no remote pod",
        WAIT,
        |p| p.is_empty(),
    )
    .await?;
    wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default(),
        "no local pod",
        WAIT,
        |p| p.is_empty(),
    )
    .await?;

    Api::<liqo_core::crds::NamespaceOffloading>::namespaced(c.clone(), ns)
        .delete("offloading", &DeleteParams::default())
        .await?;
    wait_one(
        Api::<Namespace>::all(pa.clone()),
        &t,
        "the twin namespace to be deleted",
        |n| n.is_none(),
    )
    .await?;
    let rns =
        Api::<RemoteNamespace>::namespaced(pa, &liqo_core::names::tenant_namespace(&id(CONSUMER)))
            .list(&ListParams::default())
            .await?;
    assert!(
        rns.items.iter().all(|r| r.spec.source_namespace != ns),
        "RemoteNamespace removed"
    );
    wait_for(
        Api::<Event>::namespaced(c.clone(), ns),
        watcher::Config::default().labels(&reflected_events),
        "reflected events removed",
        WAIT,
        |e| e.is_empty(),
    )
    .await?;
    let local_ns = Api::<Namespace>::all(c).get(ns).await?;
    assert!(
        !local_ns
            .labels()
            .contains_key(liqo_vk::names::OFFLOADING_ENABLED),
        "the webhook no longer applies"
    );
    Ok(())
}

#[tokio::test]
async fn pod_updates_restarts_and_graceful_deletion_flow() -> TestResult {
    let lab = env().await;
    let (c, _, pb) = clients(lab);
    let ns = "life";
    let t = twin(ns);
    let mut s = spec(PodOffloadingStrategy::Remote);
    s.cluster_selector = Some(select(ResourceOffer::REGION, "eu-south"));
    offload(&c, ns, s).await?;
    wait_offloading(&c, ns, "Ready").await?;
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    let rpods: Api<Pod> = Api::namespaced(pb.clone(), &t);
    let pod = Pod {
        metadata: meta("solo"),
        spec: Some(pod_spec("nginx:1.26")),
        status: None,
    };
    create(&pods, &pod).await?;
    let local = wait_one(pods.clone(), "solo", "solo Running", |p| {
        p.is_some_and(running)
    })
    .await?
    .ok_or("gone")?;
    let uid = local.uid().ok_or("no uid")?;
    let selector = format!("{}={uid}", liqo_vk::names::ORIGIN_POD_UID);
    let first = wait_for(
        rpods.clone(),
        watcher::Config::default().labels(&selector),
        "the remote pod",
        WAIT,
        |ps| ps.iter().any(|p| running(p)),
    )
    .await?;
    let first = first.iter().find(|p| running(p)).ok_or("none")?.clone();

    // Labels, annotations and the image flow to the running remote pod.
    pods.patch(
        "solo",
        &PatchParams::default(),
        &Patch::Strategic(serde_json::json!({
            "metadata": {"labels": {"tier": "gold"}, "annotations": {"note": "hello"}},
            "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}
        })),
    )
    .await?;
    let name = first.name_any();
    wait_one(rpods.clone(), &name, "the update on the remote pod", |p| {
        p.is_some_and(|p| {
            p.labels().get("tier").is_some_and(|v| v == "gold")
                && p.annotations().get("note").is_some_and(|v| v == "hello")
                && p.spec
                    .as_ref()
                    .is_some_and(|s| s.containers[0].image.as_deref() == Some("nginx:1.27"))
        })
    })
    .await?;

    // The provider recreates a deleted remote pod; the local pod shows a restart.
    rpods
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await?;
    let after = wait_one(pods.clone(), "solo", "a restart on the local pod", |p| {
        p.is_some_and(|p| {
            running(p)
                && p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.restart_count >= 1))
        })
    })
    .await?
    .ok_or("gone")?;
    assert_ne!(
        after.annotations().get(liqo_vk::names::REMOTE_POD_UID),
        first.uid().as_ref()
    );
    let remote_now = rpods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    assert_eq!(
        remote_now
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count(),
        1,
        "one live remote pod"
    );

    // Graceful deletion: the remote side goes, then the local pod.
    pods.delete("solo", &DeleteParams::default().grace_period(5))
        .await?;
    wait_for(
        rpods.clone(),
        watcher::Config::default().labels(&selector),
        "the remote pod gone",
        WAIT,
        |p| p.is_empty(),
    )
    .await?;
    wait_one(pods, "solo", "the local pod gone", |p| p.is_none()).await?;
    let rs = Api::<ShadowPod>::namespaced(pb, &t).get_opt("solo").await?;
    assert!(rs.is_none(), "the ShadowPod is gone");
    Ok(())
}

/// A consumer's credential reaches nothing beyond its tenant and twin namespaces.
#[tokio::test]
async fn the_consumer_credential_is_least_privilege() -> TestResult {
    let lab = env().await;
    let (_, pa, _) = clients(lab);
    let tenant = liqo_core::names::tenant_namespace(&id(CONSUMER));
    let kc = kubeconfig(
        cluster(lab, PROVIDER_A),
        &liqo_core::names::consumer_user(&id(CONSUMER)),
        &tenant,
    )?;
    let remote = liqo_core::client_from_kubeconfig(&id(PROVIDER_A), &kc).await?;
    let forbidden =
        |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(forbidden(
        Api::<Namespace>::all(remote.clone())
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Pod>::namespaced(remote.clone(), "default")
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Pod>::namespaced(remote.clone(), &tenant)
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));
    Api::<RemoteNamespace>::namespaced(remote, &tenant)
        .list(&ListParams::default())
        .await?;
    // The twin namespace binding names exactly that user.
    offload(
        &cluster(lab, CONSUMER).client()?,
        "rbac-check",
        spec(PodOffloadingStrategy::Local),
    )
    .await?;
    let b = wait_one(
        Api::<RoleBinding>::namespaced(pa, &twin("rbac-check")),
        liqo_vk::names::OFFLOADING_CLUSTER_ROLE,
        "the offloading binding",
        |b| b.is_some(),
    )
    .await?
    .ok_or("gone")?;
    let subjects = b.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].name, "liqo-consumer-consumer");
    assert_eq!(
        b.role_ref,
        RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "liqo-offloading".into()
        }
    );
    Ok(())
}

#[tokio::test]
async fn changing_the_cluster_selector_moves_the_namespace() -> TestResult {
    let lab = env().await;
    let (c, pa, pb) = clients(lab);
    let ns = "moving";
    let t = twin(ns);
    let mut s = spec(PodOffloadingStrategy::Remote);
    s.cluster_selector = Some(select(ResourceOffer::REGION, "eu-south"));
    offload(&c, ns, s.clone()).await?;
    wait_offloading(&c, ns, "Ready").await?;
    create(
        &Api::<Deployment>::namespaced(c.clone(), ns),
        &deployment("app", 2, "nginx"),
    )
    .await?;
    let on = |node: &'static str| {
        move |ps: &[std::sync::Arc<Pod>]| {
            ps.len() == 2 && ps.iter().all(|p| running(p) && node_of(p) == node)
        }
    };
    wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default(),
        "2 pods on provider-b",
        WAIT,
        on("liqo-provider-b"),
    )
    .await?;

    // Now only eu-west: the twin namespace moves to provider-a, and so do the pods.
    s.cluster_selector = Some(select(ResourceOffer::REGION, "eu-west"));
    offload(&c, ns, s).await?;
    wait_one(
        Api::<Namespace>::all(pb.clone()),
        &t,
        "the twin namespace gone from provider-b",
        |n| n.is_none(),
    )
    .await?;
    wait_one(
        Api::<Namespace>::all(pa.clone()),
        &t,
        "the twin namespace on provider-a",
        |n| n.is_some(),
    )
    .await?;
    wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default(),
        "2 pods on provider-a",
        WAIT,
        on("liqo-provider-a"),
    )
    .await?;
    let nso = wait_offloading(&c, ns, "Ready").await?;
    let entries = nso.status.ok_or("no status")?.remote_namespaces;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].cluster_id.as_str(), PROVIDER_A);
    Ok(())
}

/// Cloud bursting: with `LocalAndRemote` the consumer's own nodes fill first, the overflow lands
/// on virtual nodes, and scaling back down removes the remote pods first.
#[tokio::test]
async fn local_and_remote_bursts_onto_virtual_nodes_and_shrinks_home_first() -> TestResult {
    let lab = env().await;
    let (c, _, _) = clients(lab);
    let ns = "burst";
    offload(&c, ns, spec(PodOffloadingStrategy::LocalAndRemote)).await?;
    wait_offloading(&c, ns, "Ready").await?;
    // 3 CPUs a pod: the consumer's two 8-CPU workers hold two each.
    let mut d = deployment("burst", 4, "nginx:1.27");
    if let Some(spec) = d.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        spec.containers[0].resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(
                [(
                    "cpu".to_owned(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("3".into()),
                )]
                .into(),
            ),
            ..Default::default()
        });
    }
    let deployments = Api::<Deployment>::namespaced(c.clone(), ns);
    create(&deployments, &d).await?;
    let pods = Api::<Pod>::namespaced(c.clone(), ns);
    let is_virtual = |p: &Pod| node_of(p).starts_with("liqo-");
    let live = |ps: &[std::sync::Arc<Pod>]| -> Vec<std::sync::Arc<Pod>> {
        ps.iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect()
    };
    let four = wait_for(
        pods.clone(),
        watcher::Config::default().labels("app=burst"),
        "4 pods scheduled",
        WAIT,
        |ps| ps.iter().filter(|p| !node_of(p).is_empty()).count() == 4,
    )
    .await?;
    assert!(
        four.iter().all(|p| !is_virtual(p)),
        "while they fit, pods stay on local nodes: {:?}",
        four.iter().map(|p| node_of(p)).collect::<Vec<_>>()
    );

    deployments
        .patch(
            "burst",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 7}})),
        )
        .await?;
    let seven = wait_for(
        pods.clone(),
        watcher::Config::default().labels("app=burst"),
        "7 pods scheduled, the 3 remote ones ranked for scale-down",
        WAIT,
        |ps| {
            let ps = live(ps);
            ps.len() == 7
                && ps.iter().all(|p| !node_of(p).is_empty())
                && ps.iter().filter(|p| is_virtual(p)).all(|p| {
                    p.annotations().get(liqo_vk::names::POD_DELETION_COST)
                        == Some(&liqo_vk::names::OFFLOADED_POD_DELETION_COST.to_owned())
                })
        },
    )
    .await?;
    let seven = live(&seven);
    assert_eq!(
        seven.iter().filter(|p| is_virtual(p)).count(),
        3,
        "the overflow bursts onto virtual nodes: {:?}",
        seven.iter().map(|p| node_of(p)).collect::<Vec<_>>()
    );
    assert!(
        seven.iter().filter(|p| !is_virtual(p)).all(|p| !p
            .annotations()
            .contains_key(liqo_vk::names::POD_DELETION_COST)),
        "local pods keep the default deletion cost"
    );

    deployments
        .patch(
            "burst",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 4}})),
        )
        .await?;
    let back = wait_for(
        pods,
        watcher::Config::default().labels("app=burst"),
        "back to 4 pods",
        WAIT,
        |ps| live(ps).len() == 4,
    )
    .await?;
    let back = live(&back);
    assert!(
        back.iter().all(|p| !is_virtual(p)),
        "scaling down removed the remote pods first: {:?}",
        back.iter().map(|p| node_of(p)).collect::<Vec<_>>()
    );
    deployments
        .delete("burst", &DeleteParams::default())
        .await?;
    Ok(())
}
