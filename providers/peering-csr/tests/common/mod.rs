//! Helpers shared by the tests against the lab.
#![allow(dead_code)]

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
    discovery::{Discovery, verbs},
};
use liqo_core::{ClusterId, NetworkParameters, ResourceOffer, labels};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use liqo_peering_csr::{
    ApiEndpoint, Connector, Consumer, LocalIdentity, NetworkSource, OfferPolicy, Provider,
    ProviderConfig,
};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub const WAIT: Duration = Duration::from_secs(60);

pub async fn lab() -> &'static Lab {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_peering_csr=info,liqo_lab=warn".into()),
        )
        .with_test_writer()
        .try_init();
    liqo_lab::shared(|| {
        LabSpec::new([
            ClusterSpec::new("lab-a"),
            ClusterSpec::new("lab-b"),
            ClusterSpec::new("lab-c"),
        ])
    })
    .await
    .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

pub fn cluster<'a>(lab: &'a Lab, name: &str) -> &'a Cluster {
    lab.cluster(name)
        .unwrap_or_else(|| panic!("cluster {name} missing"))
}

/// Applies the liqo CRDs (idempotent) and waits until they are served.
pub async fn install_crds(client: &Client) -> TestResult {
    Ok(liqo_core::crds::install(client, &[], "liqo-test").await?)
}

pub fn id(s: &str) -> ClusterId {
    s.parse().expect("valid test cluster id")
}

pub fn network(c: &Cluster) -> NetworkParameters {
    NetworkParameters::new(
        c.pod_cidr().to_string().parse().expect("lab pod CIDR"),
        c.service_cidr()
            .to_string()
            .parse()
            .expect("lab service CIDR"),
    )
}

pub fn endpoint(c: &Cluster) -> ApiEndpoint {
    ApiEndpoint::new(c.api_url(), c.ca_cert_pem())
}

pub fn small_offer() -> ResourceOffer {
    ResourceOffer::new("2", "4Gi", 10)
}

pub fn provider_config(c: &Cluster, offer: ResourceOffer) -> ProviderConfig {
    ProviderConfig::new(
        endpoint(c),
        OfferPolicy::Absolute(offer),
        NetworkSource::Static(network(c)),
    )
    .with_credential_lifetime(Duration::from_secs(600))
}

pub async fn provider(c: &Cluster, name: &str, config: ProviderConfig) -> BoxResult<Arc<Provider>> {
    let client = c.client()?;
    install_crds(&client).await?;
    Ok(Arc::new(Provider::new(
        client,
        Arc::new(LocalIdentity::generate(id(name), name)?),
        config,
    )))
}

pub async fn consumer(
    c: &Cluster,
    name: &str,
    connector: Arc<dyn Connector>,
) -> BoxResult<Arc<Consumer>> {
    let client = c.client()?;
    install_crds(&client).await?;
    Ok(Arc::new(Consumer::new(
        client,
        Arc::new(LocalIdentity::generate(id(name), name)?),
        NetworkSource::Static(network(c)),
        connector,
    )))
}

/// Asserts `result` is a 403 Forbidden from the API server.
pub fn assert_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {s:?}"),
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// Whether the API server lets `client` do `verb` on `resource`'s `subresource` (empty: the
/// resource itself) in `namespace` (asks it).
pub async fn can_sub(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    subresource: &str,
    namespace: &str,
) -> BoxResult<bool> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: (!subresource.is_empty()).then(|| subresource.into()),
                verb: Some(verb.into()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Whether the API server lets `client` do `verb` on `resource` in `namespace` (asks it).
pub async fn can(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> BoxResult<bool> {
    can_sub(client, verb, group, resource, "", namespace).await
}

/// Waits until the authorizer has caught up with an RBAC change made by the test (it learns of
/// bindings through an informer; there is nothing to watch from outside).
pub async fn wait_until_can(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> TestResult {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !can(client, verb, group, resource, namespace).await? {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{verb} {resource} in {namespace} never allowed").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Every object of any listable kind in the cluster that belongs to a peering with one of
/// `peers`: named after it, in a namespace named after it, or carrying its id in a label (every
/// object we make has `liqo.io/remote-cluster-id=<peer>`) or annotation. Other tests run
/// concurrently on the same clusters, so "everything labelled `liqo.io/managed-by=liqo-peering`"
/// would see their objects; the peer's id is what singles out one peering. Events (an audit trail
/// the API server expires) are left out.
pub async fn objects_of_peering(client: &Client, peers: &[&str]) -> BoxResult<Vec<String>> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut found = vec![];
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if !caps.supports_operation(verbs::LIST) || ar.kind == "Event" {
                continue;
            }
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let list = match api.list(&ListParams::default()).await {
                Ok(l) => l,
                Err(e) => return Err(format!("listing {}: {e}", ar.plural).into()),
            };
            for obj in list.items {
                let name = obj.name_any();
                let ns = obj.namespace().unwrap_or_default();
                let ours = obj.labels().get(labels::MANAGED_BY).map(String::as_str)
                    == Some("liqo-peering");
                let mentions = peers.iter().any(|p| {
                    name.contains(p)
                        || ns.contains(p)
                        || obj.labels().values().any(|v| v.contains(p))
                        || obj.annotations().values().any(|v| v.contains(p))
                });
                if mentions {
                    let by = if ours { " (labelled liqo-peering)" } else { "" };
                    found.push(format!("{} {ns}/{name}{by}", ar.kind));
                }
            }
        }
    }
    Ok(found)
}

/// The kubeconfig stored on the consumer for `provider`.
pub async fn stored_kubeconfig(consumer: &Client, provider: &str) -> BoxResult<String> {
    let secret = Api::<Secret>::namespaced(consumer.clone(), &format!("liqo-tenant-{provider}"))
        .get(&format!("liqo-kubeconfig-{provider}"))
        .await?;
    let data = secret.data.ok_or("secret without data")?;
    Ok(String::from_utf8(
        data.get("kubeconfig").ok_or("no kubeconfig key")?.0.clone(),
    )?)
}

/// Makes a twin namespace as liqo-vk's provider-side controller would, and lets the consumer's
/// user manage pods in it (a stand-in for the `liqo-offloading` ClusterRole).
pub async fn make_twin(admin: &Client, consumer: &str, name: &str) -> TestResult {
    let ns = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {
            labels::REMOTE_CLUSTER_ID: consumer, labels::MANAGED_BY: "liqo-vk",
        }},
    });
    Api::<Namespace>::all(admin.clone())
        .patch(
            name,
            &PatchParams::apply("liqo-test").force(),
            &Patch::Apply(&ns),
        )
        .await?;
    let role = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "test-offloading", "namespace": name},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "watch", "delete"]}],
    });
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "test-offloading", "namespace": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "test-offloading"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": format!("liqo-consumer-{consumer}")}],
    });
    let ssa = PatchParams::apply("liqo-test").force();
    Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        name,
        &kube::core::ApiResource::erase::<k8s_openapi::api::rbac::v1::Role>(&()),
    )
    .patch("test-offloading", &ssa, &Patch::Apply(&role))
    .await?;
    Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        name,
        &kube::core::ApiResource::erase::<k8s_openapi::api::rbac::v1::RoleBinding>(&()),
    )
    .patch("test-offloading", &ssa, &Patch::Apply(&binding))
    .await?;
    Ok(())
}
