//! Peering through a bundle between two lab clusters, driven by the shared peering controller.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::wait::await_condition,
};
use liqo_core::{
    ClusterId, ClusterIdentity, NetworkParameters, ResourceOffer,
    conditions::{find, is_true},
    crds::{ForeignCluster, RemoteNamespace, VirtualNode, foreign_cluster_condition as cond},
};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use liqo_peering::{ApiEndpoint, NetworkSource, OfferPolicy, PeeringController, names};
use liqo_peering_kubeconfig::{
    BUNDLE_KEY, IssueOptions, KubeconfigAuthority, bundle_secret_name, issue_bundle, revoke,
};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
const WAIT: Duration = Duration::from_secs(90);
const LABEL: &str = "liqo-test/kubeconfig";

async fn lab() -> &'static Lab {
    liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("kc-a"), ClusterSpec::new("kc-b")]))
        .await
        .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

fn cluster<'a>(lab: &'a Lab, name: &str) -> &'a Cluster {
    lab.cluster(name)
        .unwrap_or_else(|| panic!("cluster {name} missing"))
}

fn id(s: &str) -> ClusterId {
    s.parse().expect("valid id")
}

fn network(c: &Cluster) -> NetworkParameters {
    NetworkParameters::new(
        c.pod_cidr().to_string().parse().expect("pod CIDR"),
        c.service_cidr().to_string().parse().expect("service CIDR"),
    )
}

async fn put_bundle(client: &Client, provider: &str, text: &str) -> TestResult {
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "liqo-system"}});
    Api::<Namespace>::all(client.clone())
        .patch(
            "liqo-system",
            &PatchParams::apply("liqo-test-admin"),
            &Patch::Apply(&ns),
        )
        .await?;
    let name = bundle_secret_name(&id(provider));
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some("liqo-system".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            BUNDLE_KEY.to_owned(),
            ByteString(text.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    let mut v = serde_json::to_value(&secret)?;
    v["apiVersion"] = "v1".into();
    v["kind"] = "Secret".into();
    Api::<Secret>::namespaced(client.clone(), "liqo-system")
        .patch(
            &name,
            &PatchParams::apply("liqo-test-admin").force(),
            &Patch::Apply(&v),
        )
        .await?;
    Ok(())
}

async fn apply_fc(client: &Client, provider: &str, role: &str) -> TestResult {
    let fc = serde_json::json!({
        "apiVersion": "liqo.io/v1alpha1", "kind": "ForeignCluster",
        "metadata": {"name": provider, "labels": {LABEL: "yes"}},
        "spec": {"clusterId": provider, "discovery": {"source": "Manual"}, "role": role},
    });
    Api::<ForeignCluster>::all(client.clone())
        .patch(
            provider,
            &PatchParams::apply("liqo-test-admin").force(),
            &Patch::Apply(&fc),
        )
        .await?;
    Ok(())
}

async fn wait_fc(
    client: &Client,
    name: &str,
    what: &str,
    ok: impl Fn(Option<&ForeignCluster>) -> bool,
) -> TestResult {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    match tokio::time::timeout(WAIT, await_condition(api.clone(), name, ok)).await {
        Ok(r) => {
            r?;
            Ok(())
        }
        Err(_) => Err(format!(
            "ForeignCluster {name}: {what} not reached within {WAIT:?}; last seen: {:?}",
            api.get_opt(name)
                .await?
                .map(|fc| (fc.finalizers().to_vec(), fc.status))
        )
        .into()),
    }
}

fn conds(fc: Option<&ForeignCluster>) -> Vec<liqo_core::conditions::Condition> {
    fc.and_then(|f| f.status.as_ref())
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

async fn exists<K>(api: Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?.is_some())
}

/// The provider's administrator issues a bundle; a bad bundle shows as a condition naming the
/// field and stores nothing; the right one peers through the shared controller until the
/// VirtualNode exists, and the credential works in the tenant namespace only; role None
/// leaves nothing on the consumer; the administrator revokes the tenant.
#[tokio::test]
async fn peering_through_a_bundle() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "kc-a"), cluster(lab, "kc-b"));
    let (admin_a, admin_b) = (a.client()?, b.client()?);
    liqo_core::crds::install(&admin_a, &[], "liqo-test").await?;
    liqo_core::crds::install(&admin_b, &[], "liqo-test").await?;
    let (prov, cons) = (id("kc-prov"), id("kc-cons"));

    // Provider side: the administrator issues the bundle.
    let options = IssueOptions::new(
        ApiEndpoint::new(b.api_url(), b.ca_cert_pem()),
        OfferPolicy::Absolute(ResourceOffer::new("2", "4Gi", 10)),
        NetworkSource::Static(network(b)),
        network(a),
    );
    let bundle = issue_bundle(
        &admin_b,
        &ClusterIdentity::new(prov.clone(), "Provider"),
        &cons,
        None,
        &options,
    )
    .await?;
    let tenant = "liqo-tenant-kc-cons";
    assert!(exists(Api::<Namespace>::all(admin_b.clone()), tenant).await?);
    assert!(
        exists(
            Api::<liqo_core::crds::ResourceOffer>::namespaced(admin_b.clone(), tenant),
            "kc-prov"
        )
        .await?
    );

    // Consumer side: a bundle for another cluster first.
    let mut wrong = bundle.clone();
    wrong.consumer = id("someone-else");
    put_bundle(&admin_a, "kc-prov", &wrong.to_yaml()?).await?;
    let stop = CancellationToken::new();
    let ctl = tokio::spawn(
        PeeringController::new(
            admin_a.clone(),
            cons.clone(),
            Arc::new(KubeconfigAuthority::new(admin_a.clone(), cons.clone())),
        )
        .with_selector(format!("{LABEL}=yes"))
        .run(stop.clone().cancelled_owned()),
    );
    apply_fc(&admin_a, "kc-prov", "Provider").await?;
    wait_fc(&admin_a, "kc-prov", "InvalidBundle", |fc| {
        find(&conds(fc), cond::AUTHENTICATED).is_some_and(|c| {
            c.status == "False"
                && c.reason == "InvalidBundle"
                && c.message.contains("field consumer")
        })
    })
    .await?;
    let consumer_tenant = "liqo-tenant-kc-prov";
    assert!(
        !exists(Api::<Namespace>::all(admin_a.clone()), consumer_tenant).await?,
        "a bad bundle stores nothing"
    );

    // The right bundle: the retry (backoff) peers.
    put_bundle(&admin_a, "kc-prov", &bundle.to_yaml()?).await?;
    wait_fc(&admin_a, "kc-prov", "peered", |fc| {
        let c = conds(fc);
        is_true(&c, cond::AUTHENTICATED)
            && is_true(&c, cond::OFFER_ACCEPTED)
            && fc.is_some_and(|f| f.finalizers().iter().any(|x| x == names::PEERING_FINALIZER))
    })
    .await?;
    assert!(
        exists(
            Api::<VirtualNode>::namespaced(admin_a.clone(), consumer_tenant),
            "kc-prov"
        )
        .await?
    );
    // The stored credential works in the tenant namespace, and only there.
    let kubeconfig = Api::<Secret>::namespaced(admin_a.clone(), consumer_tenant)
        .get(&names::kubeconfig_secret(&prov))
        .await?
        .data
        .and_then(|d| d.get(names::KUBECONFIG_KEY).cloned())
        .ok_or("no kubeconfig stored")?;
    let remote =
        liqo_peering::client_from_kubeconfig(&prov, &String::from_utf8(kubeconfig.0)?).await?;
    Api::<RemoteNamespace>::namespaced(remote.clone(), tenant)
        .list(&Default::default())
        .await?;
    let denied = Api::<Secret>::namespaced(remote, "default")
        .list(&Default::default())
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "outside its tenant: {denied:?}"
    );

    // Role None: nothing left on the consumer (the bundle Secret is the administrator's).
    apply_fc(&admin_a, "kc-prov", "None").await?;
    wait_fc(&admin_a, "kc-prov", "released", |fc| {
        fc.is_some_and(|f| f.finalizers().is_empty())
            && find(&conds(fc), cond::OFFER_ACCEPTED).is_none()
    })
    .await?;
    let ns_api: Api<Namespace> = Api::all(admin_a.clone());
    tokio::time::timeout(WAIT, async {
        while exists(ns_api.clone(), consumer_tenant).await? {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, kube::Error>(())
    })
    .await??;
    let left = Api::<Secret>::all(admin_a.clone())
        .list(&kube::api::ListParams::default().labels(&format!(
            "{}={}",
            liqo_core::labels::REMOTE_CLUSTER_ID,
            prov
        )))
        .await?;
    assert!(
        left.items.is_empty(),
        "left on the consumer: {:?}",
        left.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    );

    stop.cancel();
    ctl.await??;
    Api::<ForeignCluster>::all(admin_a.clone())
        .delete("kc-prov", &DeleteParams::default())
        .await?;

    // The provider's administrator revokes.
    revoke(&admin_b, &prov, &cons).await?;
    assert!(!exists(Api::<Namespace>::all(admin_b.clone()), tenant).await?);
    Ok(())
}
