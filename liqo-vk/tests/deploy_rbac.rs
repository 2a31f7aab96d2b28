//! The manifests in `deploy/` against a real two-cluster lab:
//!
//! (a) every manifest the kustomization lists applies with server-side dry-run (`dryRun=All`)
//!     once the CRDs are installed, and the kustomization lists every manifest;
//! (b) the RBAC is *enough*: with clients authenticated as the agent's ServiceAccount only, on
//!     both clusters, one-command peering, the provider and consumer agents, offloading a
//!     namespace, a pod running remotely through the virtual node, and unpeering all work;
//! (c) the RBAC grants *no more*: no wildcard, and the API server refuses (SubjectAccessReview,
//!     and real dry-run requests for what the admission guard narrows) what the agent must not do.
//!
//! The namespace, RBAC and guard are applied for real once per binary; each test uses objects of
//! its own.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        certificates::v1::{
            CertificateSigningRequest, CertificateSigningRequestCondition,
            CertificateSigningRequestSpec, CertificateSigningRequestStatus,
        },
        core::v1::{ConfigMap, Container, Namespace, Node, Pod, PodSpec, Secret},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::wait::await_condition,
};
use liqo_core::{
    NetworkParameters, ResourceOffer,
    crds::{NamespaceOffloading, NamespaceOffloadingSpec, PodOffloadingStrategy, VirtualNode},
    labels,
};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use liqo_peering_csr::{ApiEndpoint, NetworkSource, OfferPolicy, ProviderConfig};
use liqo_vk::{ConsumerAgent, ConsumerConfig, ProviderAgent};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(120);
const CONSUMER: &str = "deploy-a";
const PROVIDER: &str = "deploy-b";
const FIELD_MANAGER: &str = "liqo-deploy-test";
/// The agent's ServiceAccount, as the API server names it.
const SA_USER: &str = "system:serviceaccount:liqo-system:liqo-agent";
const SA_GROUPS: [&str; 3] = [
    "system:serviceaccounts",
    "system:serviceaccounts:liqo-system",
    "system:authenticated",
];

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Everything the agents log, to find the API server's refusals they only log and retry.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Writes log lines to the test's output and to [`LOGS`].
struct Tee;

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        print!("{}", String::from_utf8_lossy(buf));
        LOGS.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines so far that report a refusal by the API server (403).
fn refusals() -> Vec<String> {
    String::from_utf8_lossy(
        &LOGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .lines()
    .filter(|l| l.to_lowercase().contains("forbidden"))
    .map(str::to_owned)
    .collect()
}

async fn lab() -> &'static Lab {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_vk=info,liqo_peering_csr=info,liqo_lab=warn".into()),
        )
        .with_ansi(false)
        .with_writer(|| Tee)
        .try_init();
    liqo_lab::shared(|| LabSpec::new([ClusterSpec::new(CONSUMER), ClusterSpec::new(PROVIDER)]))
        .await
        .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

fn cluster(lab: &'static Lab, name: &str) -> &'static Cluster {
    lab.cluster(name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

/// The documents of one manifest file, as JSON (comment-only documents skipped).
fn documents(file: &str) -> BoxResult<Vec<serde_json::Value>> {
    Ok(liqo_lab::read_manifest(&deploy_dir().join(file))?)
}

/// The files `deploy/kustomization.yaml` lists, in order.
fn kustomization_resources() -> BoxResult<Vec<String>> {
    let k = documents("kustomization.yaml")?;
    let resources = k
        .first()
        .and_then(|k| k.get("resources"))
        .and_then(|r| r.as_array())
        .ok_or("deploy/kustomization.yaml has no resources list")?;
    Ok(resources
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect())
}

/// Server-side applies one document (dry run or for real) and returns what the server made of it.
async fn apply_doc(client: &Client, doc: &serde_json::Value, dry_run: bool) -> BoxResult<String> {
    Ok(liqo_lab::apply_document(client, doc, FIELD_MANAGER, dry_run).await?)
}

/// Once per binary, on both clusters: the CRDs (from `deploy/crds`), the namespace, the RBAC and
/// the admission guard, applied for real as the admin; then waits until the authorizer knows the
/// ServiceAccount's rights.
async fn installed() -> &'static Lab {
    static DONE: OnceCell<Result<(), String>> = OnceCell::const_new();
    let lab = lab().await;
    let r = DONE
        .get_or_init(|| async {
            let go = async {
                for name in [CONSUMER, PROVIDER] {
                    let c = cluster(lab, name);
                    let admin = c.client()?;
                    for file in kustomization_resources()? {
                        if !file.starts_with("crds/") {
                            continue;
                        }
                        for doc in documents(&file)? {
                            apply_doc(&admin, &doc, false).await?;
                            let crd: CustomResourceDefinition = serde_json::from_value(doc)?;
                            liqo_core::crds::wait_established(&admin, &crd.name_any(), WAIT)
                                .await?;
                        }
                    }
                    for file in ["namespace.yaml", "rbac.yaml", "guard.yaml"] {
                        for doc in documents(file)? {
                            apply_doc(&admin, &doc, false).await?;
                        }
                    }
                    let sa = sa_client(c).await?;
                    wait_until_allowed(&sa, "create", "", "nodes", None).await?;
                    wait_until_allowed(
                        &sa,
                        "update",
                        "coordination.k8s.io",
                        "leases",
                        Some("kube-node-lease"),
                    )
                    .await?;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            go.await.map_err(|e| e.to_string())
        })
        .await;
    if let Err(e) = r {
        panic!("installing deploy/ failed: {e}");
    }
    lab
}

/// A client authenticated as the ServiceAccount (a client certificate with its user name and
/// groups; the API server adds `system:authenticated` itself).
async fn sa_client(c: &Cluster) -> BoxResult<Client> {
    Ok(c.user_client(SA_USER, &SA_GROUPS[..2]).await?)
}

fn attributes(
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> ResourceAttributes {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
        None => (resource.to_owned(), None),
    };
    ResourceAttributes {
        verb: Some(verb.into()),
        group: Some(group.into()),
        resource: Some(resource),
        subresource,
        namespace: namespace.map(str::to_owned),
        ..ResourceAttributes::default()
    }
}

/// Waits until the authorizer lets `client` do it.
async fn wait_until_allowed(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> TestResult {
    let attrs = attributes(verb, group, resource, namespace);
    Ok(liqo_lab::wait_until_allowed(client, &attrs, WAIT).await?)
}

/// Asks the API server (as the admin) whether the agent's ServiceAccount may do it.
async fn sa_may(admin: &Client, attrs: ResourceAttributes) -> BoxResult<bool> {
    let review = SubjectAccessReview {
        metadata: ObjectMeta::default(),
        spec: SubjectAccessReviewSpec {
            user: Some(SA_USER.into()),
            groups: Some(SA_GROUPS.map(String::from).to_vec()),
            resource_attributes: Some(attrs),
            ..SubjectAccessReviewSpec::default()
        },
        status: None,
    };
    let answer = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

fn network(c: &Cluster) -> NetworkParameters {
    NetworkParameters::new(
        c.pod_cidr().to_string().parse().expect("lab pod CIDR"),
        c.service_cidr()
            .to_string()
            .parse()
            .expect("lab service CIDR"),
    )
}

fn provider_config(c: &Cluster) -> ProviderConfig {
    ProviderConfig::new(
        ApiEndpoint::new(c.api_url(), c.ca_cert_pem()),
        OfferPolicy::Absolute(ResourceOffer::new("4", "8Gi", 20)),
        NetworkSource::Static(network(c)),
    )
    .with_credential_lifetime(Duration::from_secs(600))
}

/// Waits (watch) until the named object satisfies `cond` (`None`: absent).
async fn wait_one<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    cond: impl Fn(Option<&K>) -> bool,
) -> BoxResult<Option<K>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::time::timeout(
        WAIT,
        await_condition(api, name, move |o: Option<&K>| cond(o)),
    )
    .await
    .map_err(|_| format!("timed out after {WAIT:?} waiting for {what}"))?
    .map_err(|e| e.into())
}

fn ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// (a) Every manifest applies with `dryRun=All`, and the kustomization lists every manifest.
#[tokio::test]
async fn every_manifest_applies_with_server_side_dry_run() -> TestResult {
    let lab = installed().await;
    let admin = cluster(lab, CONSUMER).client()?;
    let listed = kustomization_resources()?;
    let mut on_disk = vec![];
    for dir in ["", "crds/"] {
        for e in std::fs::read_dir(deploy_dir().join(dir))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                on_disk.push(format!("{dir}{name}"));
            }
        }
    }
    let mut sorted = listed.clone();
    sorted.sort();
    on_disk.sort();
    assert_eq!(
        sorted, on_disk,
        "deploy/kustomization.yaml must list every manifest"
    );
    let mut applied = vec![];
    for file in &listed {
        for doc in documents(file)? {
            applied.push(apply_doc(&admin, &doc, true).await?);
        }
    }
    for expected in [
        "Deployment liqo-agent",
        "Service liqo-agent-webhook",
        "Service liqo-agent-peering",
        "ConfigMap liqo-agent-config",
        "ServiceAccount liqo-agent",
        "ValidatingAdmissionPolicy liqo-agent-guard",
        "CustomResourceDefinition shadowpods.liqo.io",
    ] {
        assert!(
            applied.iter().any(|a| a == expected),
            "{expected} missing from {applied:?}"
        );
    }
    // Dry run: nothing was made.
    assert!(
        Api::<ConfigMap>::namespaced(admin, "liqo-system")
            .get_opt("liqo-agent-config")
            .await?
            .is_none(),
        "a dry run must not create the ConfigMap"
    );
    Ok(())
}

/// (b) The ServiceAccount's rights are enough for every flow, on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rbac_is_enough_to_peer_offload_and_unpeer() -> TestResult {
    let lab = installed().await;
    let (a, b) = (cluster(lab, CONSUMER), cluster(lab, PROVIDER));
    let (sa_a, sa_b) = (sa_client(a).await?, sa_client(b).await?);
    let admin_a = a.client()?;

    // One-command peering, run with the agents' credentials only.
    let grant = liqo_peering_csr::peer(&sa_a, &sa_b, provider_config(b), network(a)).await?;
    let provider_id = grant.provider.id.clone();
    let node_name = format!("liqo-{provider_id}");

    let stop = CancellationToken::new();
    let provider_agent = ProviderAgent::new(sa_b.clone(), provider_id.clone());
    let s = stop.clone();
    let provider_task =
        tokio::spawn(async move { provider_agent.run(async move { s.cancelled().await }).await });
    let consumer_id = {
        let vn = Api::<VirtualNode>::namespaced(
            admin_a.clone(),
            &liqo_core::names::tenant_namespace(&provider_id),
        )
        .get(provider_id.as_str())
        .await?;
        assert_eq!(vn.spec.cluster_id, provider_id);
        liqo_peering_csr::LocalIdentity::load_or_create(&admin_a, &Default::default())
            .await?
            .id()
            .clone()
    };
    let consumer_agent = ConsumerAgent::builder(sa_a.clone(), consumer_id.clone())
        .reflectors(liqo_reflectors_k8s::all())
        .config(ConsumerConfig {
            heartbeat: Duration::from_secs(2),
            ..ConsumerConfig::default()
        })
        .build();
    let s = stop.clone();
    let consumer_task =
        tokio::spawn(async move { consumer_agent.run(async move { s.cancelled().await }).await });

    let flows = async {
        wait_one(
            Api::<Node>::all(admin_a.clone()),
            &node_name,
            "the virtual node Ready",
            |n| n.is_some_and(ready),
        )
        .await?;

        // Offload a namespace (the admin's doing), with a ConfigMap to reflect.
        let ns = "deploy-shop";
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(admin_a.clone())
            .patch(
                ns,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&namespace),
            )
            .await?;
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("settings".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("colour".into(), "blue".into())])),
            ..ConfigMap::default()
        };
        Api::<ConfigMap>::namespaced(admin_a.clone(), ns)
            .patch(
                "settings",
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&cm),
            )
            .await?;
        let nso = NamespaceOffloading::new(
            "offloading",
            NamespaceOffloadingSpec {
                namespace_mapping_strategy: Default::default(),
                remote_namespace_name: None,
                pod_offloading_strategy: PodOffloadingStrategy::Remote,
                cluster_selector: None,
            },
        );
        let nsos: Api<NamespaceOffloading> = Api::namespaced(admin_a.clone(), ns);
        nsos.patch(
            "offloading",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&nso),
        )
        .await?;
        wait_one(nsos.clone(), "offloading", "the offloading Ready", |o| {
            o.and_then(|o| o.status.as_ref())
                .and_then(|s| s.phase)
                .is_some_and(|p| format!("{p:?}") == "Ready")
        })
        .await?;
        let twin = format!("{ns}-{consumer_id}");
        let admin_b = b.client()?;
        wait_one(
            Api::<ConfigMap>::namespaced(admin_b.clone(), &twin),
            "settings",
            "the ConfigMap reflected to the provider",
            |c| {
                c.and_then(|c| c.data.as_ref())
                    .is_some_and(|d| d.get("colour").map(String::as_str) == Some("blue"))
            },
        )
        .await?;

        // A plain pod: the webhook sends it to the virtual node, the provider runs it.
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("nginx".into()),
                    ..Container::default()
                }],
                termination_grace_period_seconds: Some(1),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let pods: Api<Pod> = Api::namespaced(admin_a.clone(), ns);
        pods.create(&PostParams::default(), &pod).await?;
        let local = wait_one(pods.clone(), "web", "the local pod Running", |p| {
            p.is_some_and(running)
        })
        .await?
        .ok_or("the local pod vanished")?;
        assert_eq!(
            local.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(node_name.as_str()),
            "the pod runs on the virtual node"
        );
        let remote = Api::<Pod>::namespaced(admin_b.clone(), &twin)
            .get("web")
            .await?;
        assert!(running(&remote), "the remote pod runs: {:?}", remote.status);
        let remote_node = remote
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        assert!(
            remote_node.starts_with(PROVIDER),
            "the remote pod runs on a worker of the provider, not {remote_node:?}"
        );

        // Stop offloading, then unpeer: the virtual node goes away.
        nsos.delete("offloading", &DeleteParams::default()).await?;
        wait_one(nsos.clone(), "offloading", "the offloading removed", |o| {
            o.is_none()
        })
        .await?;
        wait_one(
            Api::<Namespace>::all(admin_b.clone()),
            &twin,
            "the twin namespace removed",
            |n| n.is_none_or(|n| n.metadata.deletion_timestamp.is_some()),
        )
        .await?;
        liqo_peering_csr::unpeer(&sa_a, &sa_b, provider_config(b), network(a)).await?;
        wait_one(
            Api::<Node>::all(admin_a.clone()),
            &node_name,
            "the virtual node removed",
            |n| n.is_none(),
        )
        .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    let result = flows.await;
    stop.cancel();
    let (p, c) = tokio::join!(provider_task, consumer_task);
    result?;
    p??;
    c??;
    // Controllers log a refusal and retry: a flow can end well while one of its steps was
    // refused (a cleanup, a status update). None may have been.
    let refused = refusals();
    assert!(
        refused.is_empty(),
        "the agents were refused by the API server:\n{}",
        refused.join("\n")
    );
    Ok(())
}

/// (c) The roles have no wildcard, and the agent may not do what it has no business doing.
#[tokio::test]
async fn agent_rbac_grants_no_more() -> TestResult {
    let lab = installed().await;
    for doc in documents("rbac.yaml")? {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind != "ClusterRole" && kind != "Role" {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let rules = doc["rules"].as_array().ok_or(format!("{name}: no rules"))?;
        for rule in rules {
            for field in ["verbs", "resources", "apiGroups", "resourceNames"] {
                let values = rule[field].as_array().cloned().unwrap_or_default();
                assert!(
                    !values
                        .iter()
                        .any(|v| v.as_str().is_some_and(|s| s.contains('*'))),
                    "{kind} {name} has a wildcard in {field}: {rule}"
                );
            }
        }
    }

    let c = cluster(lab, CONSUMER);
    let admin = c.client()?;
    // The review path itself: what the agent needs is allowed.
    for (verb, group, resource, ns) in [
        ("create", "", "nodes", None),
        ("patch", "", "pods/status", Some("default")),
        (
            "create",
            "coordination.k8s.io",
            "leases",
            Some("kube-node-lease"),
        ),
        (
            "create",
            "certificates.k8s.io",
            "certificatesigningrequests",
            None,
        ),
    ] {
        assert!(
            sa_may(&admin, attributes(verb, group, resource, ns)).await?,
            "the agent needs to {verb} {resource}"
        );
    }
    let named = |verb: &str, group: &str, resource: &str, name: &str| ResourceAttributes {
        name: Some(name.into()),
        ..attributes(verb, group, resource, None)
    };
    let denied = [
        (
            "exec into pods",
            attributes("create", "", "pods/exec", Some("default")),
        ),
        (
            "attach to pods",
            attributes("create", "", "pods/attach", Some("default")),
        ),
        ("proxy to nodes", attributes("get", "", "nodes/proxy", None)),
        (
            "evict pods",
            attributes("create", "", "pods/eviction", Some("default")),
        ),
        (
            "create leases outside kube-node-lease",
            attributes(
                "create",
                "coordination.k8s.io",
                "leases",
                Some("kube-system"),
            ),
        ),
        (
            "create deployments",
            attributes("create", "apps", "deployments", Some("default")),
        ),
        (
            "create ServiceAccounts",
            attributes("create", "", "serviceaccounts", Some("kube-system")),
        ),
        (
            "create ClusterRoleBindings",
            attributes(
                "create",
                "rbac.authorization.k8s.io",
                "clusterrolebindings",
                None,
            ),
        ),
        (
            "escalate cluster-admin",
            named(
                "escalate",
                "rbac.authorization.k8s.io",
                "clusterroles",
                "cluster-admin",
            ),
        ),
        (
            "bind cluster-admin",
            named(
                "bind",
                "rbac.authorization.k8s.io",
                "clusterroles",
                "cluster-admin",
            ),
        ),
        (
            "edit ClusterRole admin",
            named(
                "patch",
                "rbac.authorization.k8s.io",
                "clusterroles",
                "admin",
            ),
        ),
        (
            "create other ClusterRoles",
            attributes("create", "rbac.authorization.k8s.io", "clusterroles", None),
        ),
        (
            "escalate Roles",
            attributes(
                "escalate",
                "rbac.authorization.k8s.io",
                "roles",
                Some("kube-system"),
            ),
        ),
        (
            "bind Roles",
            attributes(
                "bind",
                "rbac.authorization.k8s.io",
                "roles",
                Some("kube-system"),
            ),
        ),
        ("impersonate", attributes("impersonate", "", "users", None)),
        (
            "edit other CRDs",
            named(
                "patch",
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "foreignclusters.liqo.io",
            ),
        ),
        (
            "delete CRDs",
            named(
                "delete",
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "shadowpods.liqo.io",
            ),
        ),
        (
            "approve kubelet serving certificates",
            named(
                "approve",
                "certificates.k8s.io",
                "signers",
                "kubernetes.io/kubelet-serving",
            ),
        ),
        (
            "approve kubelet client certificates",
            named(
                "approve",
                "certificates.k8s.io",
                "signers",
                "kubernetes.io/kube-apiserver-client-kubelet",
            ),
        ),
        (
            "sign certificates",
            named(
                "sign",
                "certificates.k8s.io",
                "signers",
                "kubernetes.io/kube-apiserver-client",
            ),
        ),
        (
            "write ConfigMaps",
            attributes("create", "", "configmaps", Some("kube-system")),
        ),
        (
            "delete nodes collectively",
            attributes("deletecollection", "", "nodes", None),
        ),
        (
            "edit ValidatingWebhookConfigurations",
            attributes(
                "patch",
                "admissionregistration.k8s.io",
                "validatingwebhookconfigurations",
                None,
            ),
        ),
        (
            "delete MutatingWebhookConfigurations",
            attributes(
                "delete",
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations",
                None,
            ),
        ),
    ];
    for (what, attrs) in denied {
        assert!(!sa_may(&admin, attrs).await?, "the agent must not {what}");
    }

    // What RBAC cannot narrow, the guard does: real requests (dry run) as the agent.
    let sa = sa_client(c).await?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("liqo-guard-probe".into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    // The guard takes effect once the API server has loaded it: wait for the first denial.
    let denial = liqo_lab::wait_until_refused(&sa, "kube-system", &secret, WAIT).await?;
    assert!(
        denial.message.contains("liqo-agent-guard"),
        "denied by the guard: {denial:?}"
    );
    // ... while its own namespace is fine.
    Api::<Secret>::namespaced(sa.clone(), "liqo-system")
        .create(&dry, &secret)
        .await?;
    // A real node is not the agent's to delete or relabel; a virtual one is.
    let worker = c
        .workers()
        .first()
        .map(|(n, _)| n.clone())
        .ok_or("the lab cluster has no worker")?;
    let nodes: Api<Node> = Api::all(sa.clone());
    match nodes
        .delete(
            &worker,
            &DeleteParams {
                dry_run: true,
                ..DeleteParams::default()
            },
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains("liqo-agent-guard"),
            "deleting worker {worker}: {s:?}"
        ),
        other => panic!("the agent could delete worker {worker}: {other:?}"),
    }
    let virtual_node = Node {
        metadata: ObjectMeta {
            name: Some("liqo-guard-probe".into()),
            labels: Some(BTreeMap::from([(
                labels::TYPE.to_owned(),
                labels::TYPE_VIRTUAL_NODE.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    nodes.create(&dry, &virtual_node).await?;
    let mut real_looking = virtual_node.clone();
    real_looking.metadata.labels = None;
    match nodes.create(&dry, &real_looking).await {
        Err(kube::Error::Api(s)) => assert!(s.message.contains("liqo-agent-guard"), "{s:?}"),
        other => panic!("the agent could create a non-virtual node: {other:?}"),
    }

    // Certificate requests: only the shape the agent's own flow uses (which the peering test
    // above runs as this ServiceAccount), and approval only of its own requests.
    let csrs: Api<CertificateSigningRequest> = Api::all(sa.clone());
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "liqo-consumer-probe");
    let pem = params.serialize_request(&key)?.pem()?;
    let request =
        |name: &str, signer: &str, usages: &[&str], seconds: i32| CertificateSigningRequest {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.clone().into_bytes()),
                signer_name: signer.into(),
                usages: Some(usages.iter().map(|u| (*u).to_owned()).collect()),
                expiration_seconds: Some(seconds),
                ..CertificateSigningRequestSpec::default()
            },
            status: None,
        };
    const CLIENT: &str = "kubernetes.io/kube-apiserver-client";
    let fine = request("liqo-guard-probe", CLIENT, &["client auth"], 86400);
    let first = liqo_lab::wait_until_refused_by(
        &csrs,
        &request("liqo-guard-probe", CLIENT, &["client auth"], 40 * 86400),
        WAIT,
    )
    .await?;
    assert!(first.message.contains("at most 30 days"), "{first:?}");
    csrs.create(&dry, &fine).await?;
    for (what, bad, part) in [
        (
            "another signer",
            request(
                "liqo-guard-probe",
                "example.com/signer",
                &["client auth"],
                86400,
            ),
            "kube-apiserver-client signer",
        ),
        (
            "another name",
            request("someone-else", CLIENT, &["client auth"], 86400),
            "named liqo-*",
        ),
        (
            "server auth",
            request(
                "liqo-guard-probe",
                CLIENT,
                &["client auth", "server auth"],
                86400,
            ),
            "client auth",
        ),
    ] {
        match csrs.create(&dry, &bad).await {
            Err(kube::Error::Api(s)) => assert!(s.message.contains(part), "{what}: {s:?}"),
            other => panic!("the agent could request a certificate with {what}: {other:?}"),
        }
    }
    // A request the admin made is not the agent's to approve.
    let admins: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let theirs = admins
        .create(
            &PostParams::default(),
            &request("liqo-admin-probe", CLIENT, &["client auth"], 86400),
        )
        .await?;
    let mut approval = theirs.clone();
    approval.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("Probe".into()),
            message: Some("probe".into()),
            ..CertificateSigningRequestCondition::default()
        }]),
        certificate: None,
    });
    let approved = csrs
        .patch_approval(
            "liqo-admin-probe",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"status": approval.status})),
        )
        .await;
    admins
        .delete("liqo-admin-probe", &DeleteParams::default())
        .await?;
    match approved {
        Err(kube::Error::Api(s)) => {
            assert!(
                s.message
                    .contains("only approve the certificate requests it created"),
                "{s:?}"
            )
        }
        other => panic!("the agent could approve the admin's request: {other:?}"),
    }
    Ok(())
}
