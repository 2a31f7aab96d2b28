//! The Greeting reflector against a real two-cluster lab, with the scope liqo-vk's ConsumerAgent
//! hands a reflector: the consumer's admin client locally, and on the provider the consumer's
//! least-privilege user (`liqo-consumer-<id>`), which may touch Greetings in the twin namespace
//! only because the provider's admin installed [`offloading_cluster_role`] (aggregation into
//! `liqo-offloading`, bound there as the ProviderAgent binds it).

use std::time::Duration;

use custom_reflector::{
    Greeting, GreetingReflector, GreetingSpec, INVALID_REASON, REFLECTOR_NAME,
    offloading_cluster_role,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::Namespace,
    events::v1::Event,
    rbac::v1::{ClusterRole, RoleBinding, RoleRef, Subject},
};
use kube::{
    Api, CustomResourceExt, Resource, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, wait::await_condition, watcher},
};
use liqo_core::{ClusterId, ReflectionScope, ResourceReflector};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(60);
const CONSUMER: &str = "greet-a";
const PROVIDER: &str = "greet-b";
const MANAGER: &str = "custom-reflector-test";

fn id(s: &str) -> ClusterId {
    s.parse().expect("valid cluster id")
}

async fn lab() -> &'static Lab {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_vk=info,liqo_lab=warn".into()),
        )
        .with_test_writer()
        .try_init();
    liqo_lab::shared(|| LabSpec::new([ClusterSpec::new(CONSUMER), ClusterSpec::new(PROVIDER)]))
        .await
        .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

fn cluster(lab: &'static Lab, name: &str) -> &'static Cluster {
    lab.cluster(name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

async fn apply<K>(api: &Api<K>, obj: &K) -> BoxResult<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let name = obj.meta().name.clone().ok_or("object without a name")?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Once per binary: the Greeting CRD on both clusters, and on the provider liqo-vk's offloading
/// roles plus the example's aggregated one (what the provider's admin does).
async fn installed() -> &'static Lab {
    static DONE: OnceCell<Result<(), String>> = OnceCell::const_new();
    let lab = lab().await;
    let r = DONE
        .get_or_init(|| async {
            let go = async {
                for name in [CONSUMER, PROVIDER] {
                    let client = cluster(lab, name).client()?;
                    liqo_core::crds::install(&client, &[Greeting::crd()], MANAGER).await?;
                }
                let roles: Api<ClusterRole> = Api::all(cluster(lab, PROVIDER).client()?);
                for role in [
                    liqo_vk::offloading_cluster_role(),
                    liqo_vk::offloading_core_cluster_role(),
                    offloading_cluster_role(),
                ] {
                    apply(&roles, &role).await?;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            go.await.map_err(|e| e.to_string())
        })
        .await;
    if let Err(e) = r {
        panic!("setting up the lab failed: {e}");
    }
    lab
}

fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// A local namespace and its twin on the provider, and the scope for them, as the ConsumerAgent
/// makes it once the twin is Ready.
async fn scope(lab: &'static Lab, ns: &str) -> BoxResult<ReflectionScope> {
    let (a, b) = (cluster(lab, CONSUMER), cluster(lab, PROVIDER));
    let (local, admin_b) = (a.client()?, b.client()?);
    let twin = format!("{ns}-{CONSUMER}");
    apply(&Api::<Namespace>::all(local.clone()), &namespace(ns)).await?;
    apply(&Api::<Namespace>::all(admin_b.clone()), &namespace(&twin)).await?;
    let user = liqo_core::names::consumer_user(&id(CONSUMER));
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("liqo-offloading".into()),
            namespace: Some(twin.clone()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "liqo-offloading".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: user.clone(),
            namespace: None,
        }]),
    };
    apply(&Api::<RoleBinding>::namespaced(admin_b, &twin), &binding).await?;
    let remote = b.user_client(&user, &[]).await?;
    // The aggregation controller and the authorizer catch up asynchronously.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("create".into()),
                    group: Some("example.com".into()),
                    resource: Some("greetings".into()),
                    namespace: Some(twin.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = Api::<SelfSubjectAccessReview>::all(remote.clone())
            .create(&PostParams::default(), &review)
            .await?;
        if answer.status.is_some_and(|s| s.allowed) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{user} never allowed to create greetings in {twin}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ReflectionScope {
        remote_cluster: id(PROVIDER),
        local,
        remote,
        local_namespace: ns.into(),
        remote_namespace: twin,
        translator: liqo_vk::identity_translator(&id(PROVIDER)),
    })
}

fn greeting(name: &str, message: &str) -> Greeting {
    Greeting::new(
        name,
        GreetingSpec {
            message: message.into(),
            to: Some("world".into()),
        },
    )
}

/// Waits (watch) until the named Greeting on `api` satisfies `cond` (`None`: absent).
async fn wait_greeting(
    api: &Api<Greeting>,
    name: &str,
    what: &str,
    cond: impl Fn(Option<&Greeting>) -> bool,
) -> BoxResult<Option<Greeting>> {
    tokio::time::timeout(WAIT, await_condition(api.clone(), name, cond))
        .await
        .map_err(|_| format!("timed out waiting for {what}"))?
        .map_err(Into::into)
}

fn says(message: &str) -> impl Fn(Option<&Greeting>) -> bool {
    let message = message.to_owned();
    move |g| g.is_some_and(|g| g.spec.message == message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greetings_are_created_updated_and_deleted_on_the_provider() -> TestResult {
    let lab = installed().await;
    let scope = scope(lab, "greet-crud").await?;
    let local: Api<Greeting> = Api::namespaced(scope.local.clone(), &scope.local_namespace);
    let admin_b = cluster(lab, PROVIDER).client()?;
    let twins: Api<Greeting> = Api::namespaced(admin_b, &scope.remote_namespace);
    let stop = CancellationToken::new();
    let reflector = GreetingReflector::new();
    let run = {
        let (scope, stop) = (scope.clone(), stop.clone());
        tokio::spawn(async move { reflector.reflect(scope, stop).await })
    };

    let check = async {
        // Create.
        local
            .create(&PostParams::default(), &greeting("hello", "hello"))
            .await?;
        let twin = wait_greeting(&twins, "hello", "the twin", says("hello"))
            .await?
            .ok_or("no twin")?;
        assert_eq!(twin.spec.to.as_deref(), Some("world"));
        assert_eq!(
            twin.labels()
                .get(liqo_vk::names::REFLECTOR_LABEL)
                .map(String::as_str),
            Some(REFLECTOR_NAME)
        );
        // Update.
        let mut g = local.get("hello").await?;
        g.spec.message = "hello again".into();
        local.replace("hello", &PostParams::default(), &g).await?;
        wait_greeting(&twins, "hello", "the updated twin", says("hello again")).await?;
        // Delete.
        local.delete("hello", &DeleteParams::default()).await?;
        wait_greeting(&twins, "hello", "the twin deleted", |g| g.is_none()).await?;

        // A bad Greeting: reported on the consumer's object, never reflected.
        local
            .create(&PostParams::default(), &greeting("mute", ""))
            .await?;
        let events: Api<Event> = Api::namespaced(scope.local.clone(), &scope.local_namespace);
        let event = tokio::time::timeout(
            WAIT,
            watcher(
                events,
                watcher::Config::default().fields("regarding.name=mute"),
            )
            .applied_objects()
            .try_filter(|e| futures::future::ready(e.reason.as_deref() == Some(INVALID_REASON)))
            .boxed()
            .try_next(),
        )
        .await
        .map_err(|_| "no InvalidGreeting event for the bad Greeting")??
        .ok_or("event stream ended")?;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let note = event.note.unwrap_or_default();
        assert!(note.contains("spec.message is empty"), "{note}");
        assert!(
            twins.get_opt("mute").await?.is_none(),
            "a bad Greeting was reflected"
        );
        // Fixed, it goes through (the engine retries it).
        let mut g = local.get("mute").await?;
        g.spec.message = "now I speak".into();
        local.replace("mute", &PostParams::default(), &g).await?;
        wait_greeting(&twins, "mute", "the fixed twin", says("now I speak")).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    let result = check.await;
    stop.cancel();
    let ended = run.await?;
    result?;
    ended?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_the_twins_and_only_them() -> TestResult {
    let lab = installed().await;
    let scope = scope(lab, "greet-cleanup").await?;
    let local: Api<Greeting> = Api::namespaced(scope.local.clone(), &scope.local_namespace);
    let admin_b = cluster(lab, PROVIDER).client()?;
    let twins: Api<Greeting> = Api::namespaced(admin_b, &scope.remote_namespace);
    // A Greeting the provider's users made themselves: not ours to remove.
    twins
        .create(
            &PostParams::default(),
            &greeting("native", "from the provider"),
        )
        .await?;
    let stop = CancellationToken::new();
    let reflector = GreetingReflector::new();
    for name in ["one", "two"] {
        local
            .create(&PostParams::default(), &greeting(name, name))
            .await?;
    }
    let run = {
        let (scope, stop) = (scope.clone(), stop.clone());
        tokio::spawn(async move {
            let r = reflector.reflect(scope.clone(), stop).await;
            (reflector, r)
        })
    };
    let waited = async {
        wait_greeting(&twins, "one", "twin one", says("one")).await?;
        wait_greeting(&twins, "two", "twin two", says("two")).await
    }
    .await;
    stop.cancel();
    let (reflector, ended) = run.await?;
    waited?;
    ended?;

    // The namespace stops being offloaded: the agent calls cleanup.
    reflector.cleanup(&scope).await?;
    let left: Vec<String> = twins
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_none())
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(
        left,
        vec!["native".to_owned()],
        "only the provider's own Greeting stays"
    );
    // Idempotent.
    reflector.cleanup(&scope).await?;
    // The local Greetings are untouched.
    assert_eq!(local.list(&ListParams::default()).await?.items.len(), 2);
    Ok(())
}
