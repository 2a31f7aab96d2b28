//! What the liqo-vk tests share: simulated peering (the objects the peering provider would
//! make, with a least-privilege consumer credential), waiting on watches, and small builders.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{Arc, OnceLock},
    time::Duration,
};

use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{Container, Namespace, Pod, PodSpec, PodTemplateSpec, Secret},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, reflector, wait::await_condition, watcher},
};
use liqo_core::{
    ClusterId, ResourceOffer,
    crds::{
        NamespaceOffloading, NamespaceOffloadingSpec, SecretKeyRef, VirtualNode, VirtualNodeSpec,
    },
    labels,
};
use liqo_lab::Cluster;
use serde::{Serialize, de::DeserializeOwned};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub const WAIT: Duration = Duration::from_secs(120);

/// Where this test binary's logs go: the agents run on threads no test owns, so the test
/// harness would not show their output; a timeout prints this file's tail instead.
static LOG: OnceLock<std::path::PathBuf> = OnceLock::new();

/// Sends all logs (the agents' included) to a file of this test binary; once per process.
pub fn init_tracing() {
    LOG.get_or_init(|| {
        let exe = std::env::current_exe().ok();
        let bin = exe
            .as_deref()
            .and_then(|e| e.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "test".into());
        // One file per test binary, overwritten by its next run: nothing piles up.
        let bin = bin.split('-').next().unwrap_or("test").to_owned();
        let path = std::env::temp_dir().join(format!("liqo-vk-{bin}.log"));
        if let Ok(file) = std::fs::File::create(&path) {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "liqo_vk=debug,liqo_lab=info".into()),
                )
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init();
        }
        path
    });
}

/// Prints, for the failing test's output, what a wait saw last and the tail of the log (where
/// the agents say what they did), and returns the error the wait fails with.
fn timed_out(
    what: &str,
    timeout: Duration,
    last_seen: &str,
) -> Box<dyn std::error::Error + Send + Sync> {
    eprintln!("=== timed out after {timeout:?} waiting for {what}\n=== last seen: {last_seen}");
    if let Some(path) = LOG.get() {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_LINES)..];
        eprintln!(
            "=== last {} lines of {}:\n{}",
            tail.len(),
            path.display(),
            tail.join("\n")
        );
    }
    format!("timed out after {timeout:?} waiting for {what} (details above)").into()
}

/// How much of the log a timeout prints.
const LOG_LINES: usize = 150;

pub fn id(s: &str) -> ClusterId {
    s.parse().expect("valid cluster id")
}

pub async fn apply<K>(api: &Api<K>, obj: &K) -> BoxResult<K>
where
    K: Resource + Clone + Debug + serde::Serialize + DeserializeOwned,
{
    let name = obj.meta().name.clone().ok_or("object without name")?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply("liqo-vk-test").force(),
            &Patch::Apply(obj),
        )
        .await?)
}

pub fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

pub async fn ensure_namespace(
    client: &Client,
    name: &str,
    ns_labels: &[(&str, &str)],
) -> TestResult {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                ns_labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    apply(&Api::<Namespace>::all(client.clone()), &ns).await?;
    Ok(())
}

pub async fn install_crds(client: &Client, extra: &[CustomResourceDefinition]) -> TestResult {
    Ok(liqo_core::crds::install(client, extra, "liqo-vk-test").await?)
}

/// A kubeconfig for `user` on `cluster`, with `namespace` as its default namespace.
pub fn kubeconfig(cluster: &Cluster, user: &str, namespace: &str) -> BoxResult<String> {
    let cert = cluster.issue_client_cert(user, &[])?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: ctx\n  context:\n    cluster: c\n    user: u\n    namespace: {namespace}\ncurrent-context: ctx\n",
        cluster.api_url(),
        b64(cluster.ca_cert_pem()),
        b64(&cert.cert_pem),
        b64(&cert.key_pem),
    ))
}

/// Does on both sides what the peering provider would: a tenant namespace on the provider where
/// the consumer's user may only manage RemoteNamespaces, and on the consumer the Secret with
/// that credential and the VirtualNode.
pub async fn simulate_peering(
    consumer: &Cluster,
    consumer_id: &ClusterId,
    provider: &Cluster,
    provider_id: &ClusterId,
    offer: ResourceOffer,
) -> TestResult {
    let (c, p) = (consumer.client()?, provider.client()?);
    let tenant_on_provider = liqo_core::names::tenant_namespace(consumer_id);
    ensure_namespace(
        &p,
        &tenant_on_provider,
        &[(labels::TENANT_NAMESPACE, consumer_id.as_str())],
    )
    .await?;
    let user = liqo_core::names::consumer_user(consumer_id);
    let role = Role {
        metadata: meta("liqo-remote-namespaces"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["liqo.io".into()]),
            resources: Some(vec!["remotenamespaces".into()]),
            verbs: [
                "get", "list", "watch", "create", "update", "patch", "delete",
            ]
            .map(String::from)
            .to_vec(),
            ..PolicyRule::default()
        }]),
    };
    apply(
        &Api::<Role>::namespaced(p.clone(), &tenant_on_provider),
        &role,
    )
    .await?;
    let binding = RoleBinding {
        metadata: meta("liqo-remote-namespaces"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "liqo-remote-namespaces".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: user.clone(),
            namespace: None,
        }]),
    };
    apply(
        &Api::<RoleBinding>::namespaced(p.clone(), &tenant_on_provider),
        &binding,
    )
    .await?;

    let tenant_here = liqo_core::names::tenant_namespace(provider_id);
    ensure_namespace(
        &c,
        &tenant_here,
        &[(labels::TENANT_NAMESPACE, provider_id.as_str())],
    )
    .await?;
    let secret_name = format!("liqo-kubeconfig-{provider_id}");
    let secret = Secret {
        metadata: meta(&secret_name),
        data: Some(BTreeMap::from([(
            "kubeconfig".to_owned(),
            ByteString(kubeconfig(provider, &user, &tenant_on_provider)?.into_bytes()),
        )])),
        ..Secret::default()
    };
    apply(&Api::<Secret>::namespaced(c.clone(), &tenant_here), &secret).await?;
    let vn = VirtualNode::new(
        provider_id.as_str(),
        VirtualNodeSpec {
            cluster_id: provider_id.clone(),
            resources: offer,
            kubeconfig_secret_ref: SecretKeyRef {
                name: secret_name,
                key: "kubeconfig".into(),
            },
            labels: BTreeMap::new(),
            taints: vec![],
        },
    );
    apply(&Api::<VirtualNode>::namespaced(c, &tenant_here), &vn).await?;
    Ok(())
}

/// Waits (watch, not poll) until the objects selected by `wc` in `api` satisfy `done`.
pub async fn wait_for<K, F>(
    api: Api<K>,
    wc: watcher::Config,
    what: &str,
    timeout: Duration,
    done: F,
) -> BoxResult<Vec<Arc<K>>>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    F: Fn(&[Arc<K>]) -> bool,
{
    let (store, writer) = reflector::store();
    let mut stream = reflector::reflector(writer, watcher(api, wc).default_backoff()).boxed();
    let r = tokio::time::timeout(timeout, async {
        let mut ready = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => ready = true,
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(_) => {}
                Err(_) => continue,
            }
            if ready {
                let state = store.state();
                if done(&state) {
                    return Some(state);
                }
            }
        }
        None
    })
    .await;
    match r {
        Ok(Some(state)) => Ok(state),
        _ => {
            let state = store.state();
            let names: Vec<String> = state.iter().map(|o| o.name_any()).collect();
            Err(timed_out(
                what,
                timeout,
                &format!("{} objects: {names:?}", state.len()),
            ))
        }
    }
}

/// Waits until the named object satisfies `cond` (or is gone, with `cond(None)`).
pub async fn wait_one<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    cond: impl Fn(Option<&K>) -> bool,
) -> BoxResult<Option<K>>
where
    K: Resource + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
{
    match tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, move |o: Option<&K>| cond(o)),
    )
    .await
    {
        Ok(r) => Ok(r?),
        Err(_) => {
            // What the object looked like when the wait gave up, and what the agents did.
            let last = match api.get_opt(name).await {
                Ok(Some(mut o)) => {
                    o.meta_mut().managed_fields = None;
                    serde_json::to_string_pretty(&o).unwrap_or_default()
                }
                Ok(None) => "absent".into(),
                Err(e) => format!("unreadable: {e}"),
            };
            Err(timed_out(what, WAIT, &format!("{name}: {last}")))
        }
    }
}

pub fn deployment(name: &str, replicas: i32, image: &str) -> Deployment {
    let l = BTreeMap::from([("app".to_owned(), name.to_owned())]);
    Deployment {
        metadata: meta(name),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(l.clone()),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(l),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(image)),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

pub fn pod_spec(image: &str) -> PodSpec {
    PodSpec {
        containers: vec![Container {
            name: "app".into(),
            image: Some(image.into()),
            ..Container::default()
        }],
        termination_grace_period_seconds: Some(1),
        ..PodSpec::default()
    }
}

pub async fn create<K>(api: &Api<K>, obj: &K) -> BoxResult<K>
where
    K: Resource + Clone + Debug + serde::Serialize + DeserializeOwned,
{
    Ok(api.create(&PostParams::default(), obj).await?)
}

pub async fn offload(client: &Client, ns: &str, spec: NamespaceOffloadingSpec) -> TestResult {
    ensure_namespace(client, ns, &[]).await?;
    let nso = NamespaceOffloading::new("offloading", spec);
    apply(
        &Api::<NamespaceOffloading>::namespaced(client.clone(), ns),
        &nso,
    )
    .await?;
    Ok(())
}

pub fn spec(strategy: liqo_core::crds::PodOffloadingStrategy) -> NamespaceOffloadingSpec {
    NamespaceOffloadingSpec {
        namespace_mapping_strategy: Default::default(),
        remote_namespace_name: None,
        pod_offloading_strategy: strategy,
        cluster_selector: None,
    }
}

/// A cluster selector on one label.
pub fn select(key: &str, value: &str) -> k8s_openapi::api::core::v1::NodeSelector {
    use k8s_openapi::api::core::v1::{NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};
    NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: key.into(),
                operator: "In".into(),
                values: Some(vec![value.into()]),
            }]),
            match_fields: None,
        }],
    }
}

/// Waits until the namespace's offloading reports `phase`.
pub async fn wait_offloading(
    client: &Client,
    ns: &str,
    phase: &str,
) -> BoxResult<NamespaceOffloading> {
    let api: Api<NamespaceOffloading> = Api::namespaced(client.clone(), ns);
    let want = phase.to_owned();
    wait_one(
        api,
        "offloading",
        &format!("offloading of {ns} to be {phase}"),
        move |o| {
            o.and_then(|o| o.status.as_ref())
                .and_then(|s| s.phase)
                .is_some_and(|p| format!("{p:?}") == want)
        },
    )
    .await?
    .ok_or_else(|| "offloading vanished".into())
}

pub fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .is_some()
}

pub fn pod_ip(p: &Pod) -> Option<std::net::IpAddr> {
    p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

pub fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Runs the `liqo-vk-agent` binary as `role` (`consumer` or `provider`) for `cluster`, with
/// `args` after its kubeconfig and cluster id. It dies with the test process whatever happens
/// to it (SIGKILL on parent death) and when the handle is dropped.
pub fn spawn_vk_agent(
    role: &str,
    cluster: &Cluster,
    args: &[String],
    rust_log: &str,
) -> BoxResult<tokio::process::Child> {
    Ok(tokio::process::Command::new("setpriv")
        .args([
            "--pdeathsig",
            "KILL",
            "--",
            env!("CARGO_BIN_EXE_liqo-vk-agent"),
            role,
        ])
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(["--cluster-id", cluster.name()])
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}
