//! The declarative path: `ForeignCluster.spec.role` on the consumer drives the
//! `PeeringController`, which peers over HTTPS with the provider's `PeeringServer`. Part of the
//! `peering` test binary (its shared lab). Each test has its own cluster ids and runs its
//! controller on a label selector of its own, so the other tests' ForeignClusters are left alone.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::wait::{await_condition, conditions},
};
use liqo_core::{
    ClusterInfo, KeyFingerprint,
    conditions::{find, is_true},
    crds::{ForeignCluster, VirtualNode, foreign_cluster_condition as cond},
    info,
};
use liqo_peering_csr::{HttpsConnector, LocalIdentity, PeeringPolicy, PeeringServer, names};
use tokio_util::sync::CancellationToken;

use crate::common::*;

const LABEL: &str = "liqo-test";

/// Applies (as an administrator or liqoctl would) the spec of ForeignCluster `provider`.
async fn apply_fc(
    client: &Client,
    selector_value: &str,
    provider: &str,
    endpoint: Option<String>,
    fingerprint: Option<KeyFingerprint>,
    role: &str,
) -> TestResult {
    let mut spec = serde_json::json!({
        "clusterId": provider,
        "discovery": {"source": "Manual"},
        "role": role,
    });
    if let Some(e) = endpoint {
        spec["peeringEndpoint"] = e.into();
    }
    if let Some(f) = fingerprint {
        spec["publicKeyFingerprint"] = f.to_string().into();
    }
    let fc = serde_json::json!({
        "apiVersion": "liqo.io/v1alpha1", "kind": "ForeignCluster",
        "metadata": {"name": provider, "labels": {LABEL: selector_value}},
        "spec": spec,
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

/// Waits (watching) until ForeignCluster `name` satisfies `ok`; says what it last saw otherwise.
async fn wait_fc(
    client: &Client,
    name: &str,
    what: &str,
    ok: impl Fn(Option<&ForeignCluster>) -> bool,
) -> BoxResult<Option<ForeignCluster>> {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    match tokio::time::timeout(WAIT, await_condition(api.clone(), name, ok)).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            let last = api.get_opt(name).await?;
            Err(format!(
                "ForeignCluster {name}: {what} not reached within {WAIT:?}; last seen: {:?}",
                last.map(|fc| (fc.finalizers().to_vec(), fc.status))
            )
            .into())
        }
    }
}

fn consumer_conditions(fc: Option<&ForeignCluster>) -> Vec<liqo_core::conditions::Condition> {
    fc.and_then(|f| f.status.as_ref())
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

fn peered(fc: Option<&ForeignCluster>) -> bool {
    let c = consumer_conditions(fc);
    is_true(&c, cond::AUTHENTICATED)
        && is_true(&c, cond::OFFER_ACCEPTED)
        && fc.is_some_and(|f| f.finalizers().iter().any(|x| x == names::PEERING_FINALIZER))
}

fn reason_is(reason: &'static str) -> impl Fn(Option<&ForeignCluster>) -> bool {
    move |fc| {
        find(&consumer_conditions(fc), cond::AUTHENTICATED)
            .is_some_and(|c| c.status == "False" && c.reason == reason)
    }
}

async fn wait_namespace_gone(client: &Client, name: &str) -> TestResult {
    let api: Api<Namespace> = Api::all(client.clone());
    if let Some(ns) = api.get_opt(name).await? {
        let uid = ns.uid().unwrap_or_default();
        tokio::time::timeout(
            WAIT,
            await_condition(api, name, conditions::is_deleted(&uid)),
        )
        .await
        .map_err(|_| format!("namespace {name} still exists"))??;
    }
    Ok(())
}

async fn exists<K>(api: Api<K>, name: &str) -> BoxResult<bool>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?.is_some())
}

/// Role Provider peers (conditions, finalizer, virtual node, tenant on the provider); a
/// restarted controller does not request again; role None releases on both sides; deleting the
/// ForeignCluster while peered releases, then lets it go.
#[tokio::test]
async fn peering_controller_follows_spec_role() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "lab-a"), cluster(lab, "lab-b"));
    let (admin_a, admin_b) = (a.client()?, b.client()?);
    let stop = CancellationToken::new();
    let p = provider(b, "ctl-prov", provider_config(b, small_offer())).await?;
    let (addr, server) = PeeringServer::new(p.clone())
        .spawn("127.0.0.1:0".parse()?, stop.clone().cancelled_owned())
        .await?;
    let c = consumer(a, "ctl-cons", Arc::new(HttpsConnector::default())).await?;
    let first = CancellationToken::new();
    let ctl = tokio::spawn(
        liqo_peering_csr::peering_controller(admin_a.clone(), c.clone())
            .with_selector(format!("{LABEL}=ctl-follow"))
            .run(first.clone().cancelled_owned()),
    );
    let endpoint = Some(format!("https://{addr}"));
    let fp = Some(p.identity().fingerprint());

    apply_fc(
        &admin_a,
        "ctl-follow",
        "ctl-prov",
        endpoint.clone(),
        fp,
        "Provider",
    )
    .await?;
    wait_fc(&admin_a, "ctl-prov", "peered", peered).await?;
    let tenant_a = "liqo-tenant-ctl-prov";
    assert!(
        exists(
            Api::<VirtualNode>::namespaced(admin_a.clone(), tenant_a),
            "ctl-prov"
        )
        .await?
    );
    assert!(
        exists(
            Api::<Namespace>::all(admin_b.clone()),
            "liqo-tenant-ctl-cons"
        )
        .await?
    );
    let secrets: Api<Secret> = Api::namespaced(admin_a.clone(), tenant_a);
    let before = secrets
        .get("liqo-kubeconfig-ctl-prov")
        .await?
        .resource_version();

    // Restart: the new controller finds the grant and does not ask again.
    first.cancel();
    ctl.await??;
    let second = CancellationToken::new();
    let ctl = tokio::spawn(
        liqo_peering_csr::peering_controller(admin_a.clone(), c.clone())
            .with_selector(format!("{LABEL}=ctl-follow"))
            .run(second.clone().cancelled_owned()),
    );
    // A spec change (the name) makes it reconcile this object for sure.
    let fcs: Api<ForeignCluster> = Api::all(admin_a.clone());
    fcs.patch(
        "ctl-prov",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"clusterName": "Provider B"}})),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        secrets
            .get("liqo-kubeconfig-ctl-prov")
            .await?
            .resource_version(),
        before,
        "a restarted controller must not request the grant again"
    );
    assert!(peered(fcs.get_opt("ctl-prov").await?.as_ref()));

    // Role None: released on both sides, finalizer gone, the ForeignCluster kept.
    apply_fc(
        &admin_a,
        "ctl-follow",
        "ctl-prov",
        endpoint.clone(),
        fp,
        "None",
    )
    .await?;
    wait_fc(&admin_a, "ctl-prov", "released", |fc| {
        fc.is_some_and(|f| f.finalizers().is_empty())
            && find(&consumer_conditions(fc), cond::OFFER_ACCEPTED).is_none()
    })
    .await?;
    wait_namespace_gone(&admin_b, "liqo-tenant-ctl-cons").await?;
    assert!(!exists(secrets.clone(), "liqo-kubeconfig-ctl-prov").await?);
    assert!(
        !exists(
            Api::<VirtualNode>::namespaced(admin_a.clone(), tenant_a),
            "ctl-prov"
        )
        .await?
    );

    // Peered again, then the ForeignCluster deleted: released first, then it goes.
    apply_fc(&admin_a, "ctl-follow", "ctl-prov", endpoint, fp, "Both").await?;
    wait_fc(&admin_a, "ctl-prov", "peered again", peered).await?;
    fcs.delete("ctl-prov", &DeleteParams::default()).await?;
    wait_fc(&admin_a, "ctl-prov", "deleted", |fc| fc.is_none()).await?;
    wait_namespace_gone(&admin_b, "liqo-tenant-ctl-cons").await?;
    wait_namespace_gone(&admin_a, tenant_a).await?;

    second.cancel();
    ctl.await??;
    stop.cancel();
    server.await??;
    Ok(())
}

/// Failures show as a condition whose reason says what to fix, with an Event, and make nothing:
/// a wrong fingerprint, a missing endpoint, a refusing policy. Fixing the spec peers at once.
#[tokio::test]
async fn peering_controller_reports_what_to_fix() -> TestResult {
    let lab = lab().await;
    let (a, c) = (cluster(lab, "lab-a"), cluster(lab, "lab-c"));
    let (admin_a, admin_c) = (a.client()?, c.client()?);
    let stop = CancellationToken::new();
    let p = provider(c, "ctlfp-prov", provider_config(c, small_offer())).await?;
    let (addr, server) = PeeringServer::new(p.clone())
        .spawn("127.0.0.1:0".parse()?, stop.clone().cancelled_owned())
        .await?;
    let strict = provider(
        c,
        "ctlno-prov",
        provider_config(c, small_offer())
            .with_policy(PeeringPolicy::AllowList([id("somebody-else")].into())),
    )
    .await?;
    let (saddr, sserver) = PeeringServer::new(strict.clone())
        .spawn("127.0.0.1:0".parse()?, stop.clone().cancelled_owned())
        .await?;
    let cons = consumer(a, "ctlfp-cons", Arc::new(HttpsConnector::default())).await?;
    let ctl = tokio::spawn(
        liqo_peering_csr::peering_controller(admin_a.clone(), cons)
            .with_selector(format!("{LABEL}=ctl-fix"))
            .run(stop.clone().cancelled_owned()),
    );
    let fcs: Api<ForeignCluster> = Api::all(admin_a.clone());

    // A fingerprint that is not the provider's key.
    let wrong = LocalIdentity::generate(id("ctlfp-prov"), "impostor")?.fingerprint();
    let endpoint = Some(format!("https://{addr}"));
    apply_fc(
        &admin_a,
        "ctl-fix",
        "ctlfp-prov",
        endpoint.clone(),
        Some(wrong),
        "Provider",
    )
    .await?;
    let fc = wait_fc(
        &admin_a,
        "ctlfp-prov",
        "FingerprintMismatch",
        reason_is("FingerprintMismatch"),
    )
    .await?
    .ok_or("ForeignCluster gone")?;
    let condition = find(&consumer_conditions(Some(&fc)), cond::AUTHENTICATED)
        .cloned()
        .ok_or("no Authenticated condition")?;
    assert!(
        condition.message.contains("spec.publicKeyFingerprint"),
        "{}",
        condition.message
    );
    assert_eq!(condition.observed_generation, fc.metadata.generation);
    assert!(
        !exists(
            Api::<Secret>::namespaced(admin_a.clone(), "liqo-tenant-ctlfp-prov"),
            "liqo-kubeconfig-ctlfp-prov"
        )
        .await?
    );
    assert!(
        !exists(
            Api::<Namespace>::all(admin_c.clone()),
            "liqo-tenant-ctlfp-cons"
        )
        .await?
    );
    // The finalizer went with the failed attempt.
    wait_fc(&admin_a, "ctlfp-prov", "no finalizer", |fc| {
        fc.is_some_and(|f| f.finalizers().is_empty())
    })
    .await?;
    let events = Api::<Event>::all(admin_a.clone())
        .list(&ListParams::default().fields("involvedObject.name=ctlfp-prov"))
        .await?;
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("FingerprintMismatch")
                && e.type_.as_deref() == Some("Warning")),
        "no Warning Event FingerprintMismatch: {:?}",
        events.items.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );

    // Fixing the pin peers without waiting for the backoff.
    apply_fc(
        &admin_a,
        "ctl-fix",
        "ctlfp-prov",
        endpoint,
        Some(p.identity().fingerprint()),
        "Provider",
    )
    .await?;
    wait_fc(&admin_a, "ctlfp-prov", "peered", peered).await?;
    fcs.delete("ctlfp-prov", &DeleteParams::default()).await?;
    wait_fc(&admin_a, "ctlfp-prov", "deleted", |fc| fc.is_none()).await?;
    wait_namespace_gone(&admin_c, "liqo-tenant-ctlfp-cons").await?;

    // No endpoint: says where to find it.
    apply_fc(&admin_a, "ctl-fix", "ctlnoep-prov", None, None, "Provider").await?;
    let fc = wait_fc(
        &admin_a,
        "ctlnoep-prov",
        "MissingPeeringEndpoint",
        reason_is("MissingPeeringEndpoint"),
    )
    .await?;
    let msg = find(&consumer_conditions(fc.as_ref()), cond::AUTHENTICATED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(msg.contains("liqo-cluster-info"), "{msg}");
    // Role None clears the failure; nothing holds the object.
    apply_fc(&admin_a, "ctl-fix", "ctlnoep-prov", None, None, "None").await?;
    wait_fc(&admin_a, "ctlnoep-prov", "cleared", |fc| {
        find(&consumer_conditions(fc), cond::AUTHENTICATED).is_none()
    })
    .await?;
    fcs.delete("ctlnoep-prov", &DeleteParams::default()).await?;
    wait_fc(&admin_a, "ctlnoep-prov", "deleted", |fc| fc.is_none()).await?;

    // Refused by the provider's policy: no tenant there, no finalizer here.
    apply_fc(
        &admin_a,
        "ctl-fix",
        "ctlno-prov",
        Some(format!("https://{saddr}")),
        Some(strict.identity().fingerprint()),
        "Provider",
    )
    .await?;
    let fc = wait_fc(
        &admin_a,
        "ctlno-prov",
        "RefusedByPolicy",
        reason_is("RefusedByPolicy"),
    )
    .await?;
    let msg = find(&consumer_conditions(fc.as_ref()), cond::AUTHENTICATED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("allow list") && msg.contains("ask its administrator"),
        "{msg}"
    );
    assert!(
        !exists(
            Api::<Namespace>::all(admin_c.clone()),
            "liqo-tenant-ctlfp-cons"
        )
        .await?
    );
    fcs.delete("ctlno-prov", &DeleteParams::default()).await?;
    wait_fc(&admin_a, "ctlno-prov", "deleted", |fc| fc.is_none()).await?;

    stop.cancel();
    ctl.await??;
    server.await??;
    sserver.await??;
    Ok(())
}

/// The cluster info round-trips through its ConfigMap, and a malformed one is reported as such.
#[tokio::test]
async fn cluster_info_is_published_and_read() -> TestResult {
    let lab = lab().await;
    let client = cluster(lab, "lab-c").client()?;
    let mut me = ClusterInfo {
        cluster_id: id("info-c"),
        cluster_name: Some("Cluster C".into()),
        peering_endpoint: Some("https://127.0.0.1:7443".into()),
        fingerprint: LocalIdentity::generate(id("info-c"), "c")?.fingerprint(),
        network: None,
    };
    info::publish(&client, &me).await?;
    assert_eq!(info::read(&client).await?, Some(me.clone()));
    me.peering_endpoint = None;
    info::publish(&client, &me).await?;
    assert_eq!(info::read(&client).await?, Some(me.clone()));

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), info::NAMESPACE);
    cms.patch(
        info::CONFIG_MAP,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {info::DATA_KEY: "{\"clusterId\": \"info-c\"}"}})),
    )
    .await?;
    let err = info::read(&client)
        .await
        .expect_err("malformed info")
        .to_string();
    assert!(
        err.contains("fingerprint") && err.contains("liqo-system/liqo-cluster-info"),
        "{err}"
    );
    info::publish(&client, &me).await?;
    assert_eq!(info::read(&client).await?, Some(me));
    cms.delete(info::CONFIG_MAP, &DeleteParams::default())
        .await?;
    assert_eq!(info::read(&client).await?, None);
    Ok(())
}
