//! Peering against one real lab of three clusters shared by the whole test binary.
//!
//! Tests run in parallel on the same clusters, so each uses cluster ids of its own (generated
//! identities), except the one-command test, which uses the clusters' real identity Secrets.

mod common;
#[path = "peering_controller/mod.rs"]
mod peering_controller;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::{
    authentication::v1::SelfSubjectReview,
    certificates::v1::CertificateSigningRequest,
    core::v1::{Namespace, Node, Pod, ResourceQuota, Secret},
    rbac::v1::{ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        wait::{await_condition, conditions},
        watcher,
    },
};
use liqo_core::{
    PeeringError, PeeringRequest, PeeringTarget,
    conditions::{find, is_true},
    crds::{
        ForeignCluster, NetworkConfig, PeeringRole, RemoteNamespace, ResourceOffer, VirtualNode,
        foreign_cluster_condition as cond,
    },
};
use liqo_peering_csr::{
    AdminPeering, ClientKey, HttpsConnector, IN_PROCESS_ENDPOINT, InProcessConnector,
    LocalIdentity, PeeringPolicy, PeeringServer, Purpose, QuotaController, RotationController,
    client_from_kubeconfig, credential, names,
};
use tokio_util::sync::CancellationToken;

fn in_process_target(p: &liqo_peering_csr::Provider) -> PeeringTarget {
    PeeringTarget {
        cluster_id: Some(p.identity().id().clone()),
        endpoint: IN_PROCESS_ENDPOINT.into(),
        expected_fingerprint: Some(p.identity().fingerprint()),
    }
}

async fn fc(client: &Client, name: &str) -> BoxResult<ForeignCluster> {
    Ok(Api::<ForeignCluster>::all(client.clone()).get(name).await?)
}

fn remote_namespace(name: &str, consumer: &str) -> RemoteNamespace {
    RemoteNamespace::new(
        name,
        liqo_core::crds::RemoteNamespaceSpec {
            namespace: format!("{name}-{consumer}"),
            consumer_cluster_id: id(consumer),
            source_namespace: name.into(),
        },
    )
}

/// One command with both admin kubeconfigs: every stage shows on both ForeignClusters, the
/// credential does what offloading needs, and unpeering leaves nothing of ours on either side.
#[tokio::test]
async fn one_command_peering_and_unpeer_leaves_nothing() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "lab-a"), cluster(lab, "lab-b"));
    let (ca, cb) = (a.client()?, b.client()?);
    install_crds(&ca).await?;
    install_crds(&cb).await?;
    let admin = AdminPeering::new(&ca, &cb, provider_config(b, small_offer()), network(a)).await?;
    let consumer_id = admin.consumer.identity().id().to_string();
    let provider_id = admin.provider.identity().id().to_string();
    // The identities live in each cluster's Secret and are stable across loads.
    let again = LocalIdentity::load_or_create(&cb, &Default::default()).await?;
    assert_eq!(again.fingerprint(), admin.provider.identity().fingerprint());

    let grant = admin.peer().await?;
    assert_eq!(grant.provider.id.as_str(), provider_id);
    assert_eq!(grant.offer, small_offer());
    assert_eq!(
        grant.credential.tenant_namespace,
        format!("liqo-tenant-{consumer_id}")
    );

    // Consumer side: Secret, ResourceOffer, VirtualNode, ForeignCluster with each stage.
    let ns = format!("liqo-tenant-{provider_id}");
    let kubeconfig = stored_kubeconfig(&ca, &provider_id).await?;
    assert_eq!(kubeconfig, grant.credential.kubeconfig);
    let offer = Api::<ResourceOffer>::namespaced(ca.clone(), &ns)
        .get(&provider_id)
        .await?;
    assert_eq!(offer.spec.resources, small_offer());
    assert!(is_true(
        &offer.status.clone().unwrap_or_default().conditions,
        "Accepted"
    ));
    let vn = Api::<VirtualNode>::namespaced(ca.clone(), &ns)
        .get(&provider_id)
        .await?;
    assert_eq!(
        vn.spec.kubeconfig_secret_ref.name,
        format!("liqo-kubeconfig-{provider_id}")
    );
    assert_eq!(vn.spec.kubeconfig_secret_ref.key, "kubeconfig");
    assert_eq!(vn.spec.resources, small_offer());
    let on_consumer = fc(&ca, &provider_id).await?.status.unwrap_or_default();
    for stage in [cond::AUTHENTICATED, cond::OFFER_ACCEPTED] {
        assert!(
            is_true(&on_consumer.conditions, stage),
            "{stage}: {:?}",
            on_consumer.conditions
        );
    }
    assert_eq!(on_consumer.role, PeeringRole::Provider);
    assert_eq!(
        on_consumer.tenant_namespaces.remote,
        Some(grant.credential.tenant_namespace.clone())
    );
    assert_eq!(on_consumer.network, Some(network(b)));
    let on_provider = fc(&cb, &consumer_id).await?.status.unwrap_or_default();
    for stage in [cond::CONSUMER_AUTHENTICATED, cond::TENANT_READY] {
        assert!(
            is_true(&on_provider.conditions, stage),
            "{stage}: {:?}",
            on_provider.conditions
        );
    }
    assert_eq!(on_provider.role, PeeringRole::Consumer);

    // The credential: the right user, and it can do what offloading needs in its tenant.
    let remote = client_from_kubeconfig(&id(&provider_id), &kubeconfig).await?;
    let me = Api::<SelfSubjectReview>::all(remote.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    assert_eq!(
        me.status.and_then(|s| s.user_info).and_then(|u| u.username),
        Some(format!("liqo-consumer-{consumer_id}"))
    );
    let tenant = &grant.credential.tenant_namespace;
    let rns: Api<RemoteNamespace> = Api::namespaced(remote.clone(), tenant);
    rns.create(
        &PostParams::default(),
        &remote_namespace("shop", &consumer_id),
    )
    .await?;
    assert_eq!(rns.list(&ListParams::default()).await?.items.len(), 1);
    rns.delete("shop", &DeleteParams::default()).await?;
    let offers: Api<ResourceOffer> = Api::namespaced(remote.clone(), tenant);
    assert_eq!(
        offers
            .get(&provider_id)
            .await?
            .spec
            .consumer_cluster_id
            .as_str(),
        consumer_id
    );
    let provider_quota = Api::<ResourceQuota>::namespaced(cb.clone(), tenant)
        .get(names::QUOTA_NAME)
        .await?;
    assert_eq!(
        provider_quota.spec.and_then(|s| s.hard).ok_or("no hard")?["pods"].0,
        "10"
    );

    // Unpeer: nothing of ours on either side (every listable kind, by label, name, namespace).
    admin.unpeer().await?;
    let left_on_consumer = objects_of_peering(&ca, &[&provider_id]).await?;
    assert!(
        left_on_consumer.is_empty(),
        "left on the consumer: {left_on_consumer:#?}"
    );
    let left_on_provider = objects_of_peering(&cb, &[&consumer_id]).await?;
    assert!(
        left_on_provider.is_empty(),
        "left on the provider: {left_on_provider:#?}"
    );
    Ok(())
}

/// With the consumer's credential, everything outside its grant is Forbidden.
#[tokio::test]
async fn rbac_is_tight() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "lab-a"), cluster(lab, "lab-b"));
    let p = provider(b, "rbac-prov", provider_config(b, small_offer())).await?;
    let connector = Arc::new(InProcessConnector::new([p.clone()]));
    let c = consumer(a, "rbac-cons", connector.clone()).await?;
    // Another tenant, from another cluster (one cluster holds one credential per provider).
    let other = consumer(cluster(lab, "lab-c"), "rbac-other", connector).await?;
    c.request(&in_process_target(&p)).await?;
    other.request(&in_process_target(&p)).await?;
    let remote = c.provider_client(&id("rbac-prov")).await?;
    let own = "liqo-tenant-rbac-cons";
    let foreign = "liqo-tenant-rbac-other";

    // What it needs works.
    let rns: Api<RemoteNamespace> = Api::namespaced(remote.clone(), own);
    rns.create(
        &PostParams::default(),
        &remote_namespace("web", "rbac-cons"),
    )
    .await?;
    rns.delete("web", &DeleteParams::default()).await?;
    // The network view exchange: it publishes its NetworkConfigs (and their status) there.
    Api::<NetworkConfig>::namespaced(remote.clone(), own)
        .list(&ListParams::default())
        .await?;
    for (verb, sub) in [
        ("get", ""),
        ("list", ""),
        ("watch", ""),
        ("create", ""),
        ("patch", ""),
        ("update", ""),
        ("get", "status"),
        ("patch", "status"),
        ("update", "status"),
    ] {
        assert!(
            can_sub(&remote, verb, "liqo.io", "networkconfigs", sub, own).await?,
            "{verb} networkconfigs/{sub} in its tenant"
        );
    }
    assert!(!can_sub(&remote, "create", "liqo.io", "networkconfigs", "", foreign).await?);

    let mut attempts = 0;
    let mut denied = |result: Result<(), kube::Error>, what: &str| {
        attempts += 1;
        assert_forbidden(result, what);
    };
    let secrets = |ns: &str| Api::<Secret>::namespaced(remote.clone(), ns);
    denied(
        secrets("kube-system")
            .list(&ListParams::default())
            .await
            .map(drop),
        "list Secrets in kube-system",
    );
    denied(
        secrets("kube-system").get("anything").await.map(drop),
        "get a Secret in kube-system",
    );
    denied(
        secrets(own).list(&ListParams::default()).await.map(drop),
        "list Secrets in its own tenant",
    );
    denied(
        Api::<Node>::all(remote.clone())
            .list(&ListParams::default())
            .await
            .map(drop),
        "list Nodes",
    );
    denied(
        Api::<Namespace>::all(remote.clone())
            .list(&ListParams::default())
            .await
            .map(drop),
        "list Namespaces",
    );
    denied(
        Api::<Namespace>::all(remote.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "evil"}}))?,
            )
            .await
            .map(drop),
        "create a Namespace",
    );
    denied(
        Api::<RemoteNamespace>::namespaced(remote.clone(), foreign)
            .create(&PostParams::default(), &remote_namespace("x", "rbac-other"))
            .await
            .map(drop),
        "create a RemoteNamespace in another tenant",
    );
    denied(
        Api::<ResourceOffer>::namespaced(remote.clone(), foreign)
            .list(&ListParams::default())
            .await
            .map(drop),
        "read another tenant's offer",
    );
    denied(
        Api::<Pod>::namespaced(remote.clone(), own).create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}))?).await.map(drop),
        "create a Pod in its tenant",
    );
    let offers: Api<ResourceOffer> = Api::namespaced(remote.clone(), own);
    denied(
        offers
            .patch(
                "rbac-prov",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"cordoned": false}})),
            )
            .await
            .map(drop),
        "edit its own offer",
    );
    denied(
        offers
            .delete("rbac-prov", &DeleteParams::default())
            .await
            .map(drop),
        "delete its own offer",
    );
    denied(
        Api::<ResourceQuota>::namespaced(remote.clone(), own)
            .delete(names::QUOTA_NAME, &DeleteParams::default())
            .await
            .map(drop),
        "delete its quota",
    );
    // Escalation: widen its Role, bind something stronger, go cluster-wide.
    denied(
        Api::<Role>::namespaced(remote.clone(), own).patch(names::TENANT_ROLE, &PatchParams::default(), &Patch::Merge(serde_json::json!({"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}))).await.map(drop),
        "widen its own Role",
    );
    let admin_binding = serde_json::json!({
        "metadata": {"name": "escalate"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "liqo-consumer-rbac-cons"}],
    });
    denied(
        Api::<RoleBinding>::namespaced(remote.clone(), own)
            .create(
                &PostParams::default(),
                &serde_json::from_value(admin_binding.clone())?,
            )
            .await
            .map(drop),
        "bind cluster-admin in its tenant",
    );
    denied(
        Api::<ClusterRoleBinding>::all(remote.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(admin_binding)?,
            )
            .await
            .map(drop),
        "bind cluster-admin cluster-wide",
    );
    denied(
        Api::<CertificateSigningRequest>::all(remote.clone())
            .list(&ListParams::default())
            .await
            .map(drop),
        "list CSRs (to mint credentials)",
    );
    let netcfg = |ns: &str| Api::<NetworkConfig>::namespaced(remote.clone(), ns);
    denied(
        netcfg(own)
            .delete("anything", &DeleteParams::default())
            .await
            .map(drop),
        "delete a NetworkConfig in its tenant",
    );
    denied(
        netcfg(foreign).list(&ListParams::default()).await.map(drop),
        "list another tenant's NetworkConfigs",
    );
    denied(
        netcfg("default")
            .list(&ListParams::default())
            .await
            .map(drop),
        "list NetworkConfigs outside its tenant",
    );
    assert_eq!(attempts, 19, "every attempt above was made and denied");

    c.release(&id("rbac-prov")).await?;
    other.release(&id("rbac-prov")).await?;
    Ok(())
}

/// Forged signature, replayed nonce, wrong ids, expired nonce: each rejected with its reason, and
/// nothing created on the provider.
#[tokio::test]
async fn bad_handshakes_are_rejected_and_create_nothing() -> TestResult {
    let lab = lab().await;
    let (a, c) = (cluster(lab, "lab-a"), cluster(lab, "lab-c"));
    let p = provider(c, "rej-prov", provider_config(c, small_offer())).await?;
    let legit = consumer(
        a,
        "rej-cons",
        Arc::new(InProcessConnector::new([p.clone()])),
    )
    .await?;
    legit.request(&in_process_target(&p)).await?;
    let admin = c.client()?;

    // Other tests peer through the same lab cluster at the same time: compare only what a request
    // from the clusters of this test could create (every such object carries a `rej-` id).
    let snapshot = || async {
        let mut s = BTreeSet::new();
        for n in Api::<Namespace>::all(admin.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            s.insert(format!(
                "ns {} {}",
                n.name_any(),
                n.resource_version().unwrap_or_default()
            ));
        }
        for r in Api::<ResourceOffer>::all(admin.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            s.insert(format!(
                "offer {} {}",
                r.name_any(),
                r.resource_version().unwrap_or_default()
            ));
        }
        for x in Api::<CertificateSigningRequest>::all(admin.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            s.insert(format!("csr {}", x.name_any()));
        }
        for x in Api::<ForeignCluster>::all(admin.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            s.insert(format!(
                "fc {} {}",
                x.name_any(),
                x.resource_version().unwrap_or_default()
            ));
        }
        s.retain(|entry: &String| entry.contains("rej-"));
        Ok::<_, kube::Error>(s)
    };
    let before = snapshot().await?;

    let legit_key = LocalIdentity::generate(id("rej-cons"), "legit")?; // stands in for a thief's key
    let consumer_identity = legit.identity().clone();
    // Every grant request carries the consumer's CSR, bound into the signature.
    let key = ClientKey::generate(&names::consumer_user(&id("rej-cons")))?;
    let csr = key.csr_pem().to_owned();
    let sign = |who: &LocalIdentity, consumer: &str, provider: &str, nonce: &[u8]| {
        who.sign(&PeeringRequest::signed_payload(
            &id(consumer),
            &id(provider),
            nonce,
            Some(&csr),
        ))
    };
    let request = |nonce: Vec<u8>,
                   signature: Vec<u8>,
                   provider: &str,
                   identity: liqo_core::ClusterIdentity| PeeringRequest {
        consumer: identity,
        provider: id(provider),
        nonce,
        signature,
        network: network(a),
        csr: Some(csr.clone()),
    };
    let expect = |r: Result<liqo_core::PeeringGrant, PeeringError>, want: &str, case: &str| match r
    {
        Err(PeeringError::Unauthenticated { reason, .. }) => assert!(
            reason.contains(want),
            "{case}: reason {reason:?} lacks {want:?}"
        ),
        other => panic!("{case}: expected Unauthenticated, got {other:?}"),
    };

    // A forged signature: the legit identity, signed with another key.
    let n = p.challenge(&id("rej-cons"), Purpose::Grant)?.nonce;
    let forged = request(
        n.clone(),
        sign(&legit_key, "rej-cons", "rej-prov", &n),
        "rej-prov",
        consumer_identity.identity(),
    );
    expect(
        p.grant(forged).await,
        "signature does not verify",
        "forged signature",
    );
    assert_eq!(
        snapshot().await?,
        before,
        "a forged request changed the provider"
    );

    // A replayed nonce: a valid request, sent twice.
    let n = p.challenge(&id("rej-cons"), Purpose::Grant)?.nonce;
    let valid = request(
        n.clone(),
        sign(&consumer_identity, "rej-cons", "rej-prov", &n),
        "rej-prov",
        consumer_identity.identity(),
    );
    let grant = p.grant(valid.clone()).await?;
    // The provider never sends a private key: only the certificate for the consumer's key.
    let wire = serde_json::to_string(&grant)?;
    assert!(
        !wire.contains("PRIVATE KEY"),
        "the grant carries a private key"
    );
    assert!(!credential::kubeconfig_has_private_key(
        &grant.credential.kubeconfig
    )?);
    // Completed with the consumer's key, the credential reads its offer.
    let kubeconfig = credential::complete_kubeconfig(&grant.credential.kubeconfig, &key)?;
    let tenant_client = client_from_kubeconfig(&id("rej-prov"), &kubeconfig).await?;
    Api::<ResourceOffer>::namespaced(tenant_client, "liqo-tenant-rej-cons")
        .get("rej-prov")
        .await?;
    // The renewal changed resource versions: compare against the state after it.
    let before = snapshot().await?;
    expect(p.grant(valid).await, "already used", "replayed nonce");

    // The signature covers the CSR: another CSR under the same signature does not verify.
    let n = p.challenge(&id("rej-cons"), Purpose::Grant)?.nonce;
    let mut swapped = request(
        n.clone(),
        sign(&consumer_identity, "rej-cons", "rej-prov", &n),
        "rej-prov",
        consumer_identity.identity(),
    );
    swapped.csr = Some(
        ClientKey::generate(&names::consumer_user(&id("rej-cons")))?
            .csr_pem()
            .to_owned(),
    );
    expect(
        p.grant(swapped).await,
        "signature does not verify",
        "CSR swapped after signing",
    );

    // Refusals of the CSR itself, from a consumer never seen before: nothing is made for it.
    let newcomer = LocalIdentity::generate(id("rej-csr"), "rej-csr")?;
    let refused = |r: Result<liqo_core::PeeringGrant, PeeringError>, want: &str, case: &str| match r
    {
        Err(PeeringError::Refused { reason, .. }) => assert!(
            reason.contains(want),
            "{case}: reason {reason:?} lacks {want:?}"
        ),
        other => panic!("{case}: expected Refused, got {other:?}"),
    };
    let signed = |nonce: Vec<u8>, csr: Option<String>| {
        let mut r = PeeringRequest {
            consumer: newcomer.identity(),
            provider: id("rej-prov"),
            nonce,
            signature: vec![],
            network: network(a),
            csr,
        };
        r.signature = newcomer.sign(&r.payload());
        r
    };
    // A CSR for another user (here: the user of the already peered consumer).
    let n = p.challenge(&id("rej-csr"), Purpose::Grant)?.nonce;
    refused(
        p.grant(signed(n, Some(csr.clone()))).await,
        "CN is \"liqo-consumer-rej-cons\", but this consumer's user is \"liqo-consumer-rej-csr\"",
        "CSR with the wrong CN",
    );
    // No CSR at all (a consumer expecting the provider to make its key): refused.
    let n = p.challenge(&id("rej-csr"), Purpose::Grant)?.nonce;
    refused(
        p.grant(signed(n, None)).await,
        "no certificate signing request",
        "no CSR",
    );
    assert!(
        Api::<Namespace>::all(admin.clone())
            .get_opt("liqo-tenant-rej-csr")
            .await?
            .is_none(),
        "a refused CSR left a tenant"
    );

    // Wrong cluster ids: addressed to another provider; another key claiming a peered id; a
    // nonce issued to someone else.
    let n = p.challenge(&id("rej-cons"), Purpose::Grant)?.nonce;
    let elsewhere = request(
        n.clone(),
        sign(&consumer_identity, "rej-cons", "someone-else", &n),
        "someone-else",
        consumer_identity.identity(),
    );
    expect(
        p.grant(elsewhere).await,
        "addressed to cluster someone-else",
        "wrong provider id",
    );
    let n = p.challenge(&id("rej-cons"), Purpose::Grant)?.nonce;
    let impostor = request(
        n.clone(),
        sign(&legit_key, "rej-cons", "rej-prov", &n),
        "rej-prov",
        legit_key.identity(),
    );
    expect(
        p.grant(impostor).await,
        "is not the key pinned for cluster rej-cons",
        "impostor key",
    );
    let n = p.challenge(&id("rej-other"), Purpose::Grant)?.nonce;
    let stolen = request(
        n.clone(),
        sign(&consumer_identity, "rej-cons", "rej-prov", &n),
        "rej-prov",
        consumer_identity.identity(),
    );
    expect(
        p.grant(stolen).await,
        "issued to cluster rej-other",
        "nonce of another consumer",
    );
    let n = p.challenge(&id("rej-cons"), Purpose::Release)?.nonce;
    let wrong_purpose = request(
        n.clone(),
        sign(&consumer_identity, "rej-cons", "rej-prov", &n),
        "rej-prov",
        consumer_identity.identity(),
    );
    expect(
        p.grant(wrong_purpose).await,
        "issued for Release",
        "release nonce used to grant",
    );
    let n = p.challenge(&id("rej-cons"), Purpose::Grant)?.nonce;
    let mut keyless = consumer_identity.identity();
    keyless.public_key = None;
    expect(
        p.grant(request(
            n.clone(),
            sign(&consumer_identity, "rej-cons", "rej-prov", &n),
            "rej-prov",
            keyless,
        ))
        .await,
        "no public key",
        "no key",
    );

    // An expired nonce.
    let hasty = provider(c, "rej-prov", {
        let mut cfg = provider_config(c, small_offer());
        cfg.challenge_ttl = Duration::ZERO;
        cfg
    })
    .await?;
    let n = hasty.challenge(&id("rej-new"), Purpose::Grant)?.nonce;
    let fresh = LocalIdentity::generate(id("rej-new"), "new")?;
    let late = request(
        n.clone(),
        sign(&fresh, "rej-new", "rej-prov", &n),
        "rej-prov",
        fresh.identity(),
    );
    match hasty.grant(late).await {
        Err(PeeringError::Unauthenticated { reason, .. }) => {
            assert!(reason.contains("expired"), "{reason}")
        }
        other => panic!("expired nonce: {other:?}"),
    }

    assert_eq!(
        snapshot().await?,
        before,
        "a rejected request changed the provider"
    );
    legit.release(&id("rej-prov")).await?;
    Ok(())
}

/// A revoked credential is authorized for nothing it could do before; an expired one is refused
/// by our client with its expiry and by the API server with 401.
#[tokio::test]
async fn revoked_and_expired_credentials_are_rejected() -> TestResult {
    let lab = lab().await;
    let (a, c) = (cluster(lab, "lab-a"), cluster(lab, "lab-c"));
    let p = provider(c, "rev-prov", provider_config(c, small_offer())).await?;
    let cons = consumer(
        a,
        "rev-cons",
        Arc::new(InProcessConnector::new([p.clone()])),
    )
    .await?;
    let grant = cons.request(&in_process_target(&p)).await?;

    // The certificate's lifetime is what was asked (600 s, the CSR API's minimum).
    let cert = credential::kubeconfig_certificate(&grant.credential.kubeconfig)?;
    let (_, not_after) = credential::certificate_validity(&cert)?;
    let left = not_after.duration_since(std::time::SystemTime::now())?;
    assert!(
        left <= Duration::from_secs(600) && left > Duration::from_secs(500),
        "{left:?}"
    );

    let remote = cons.provider_client(&id("rev-prov")).await?;
    let tenant = "liqo-tenant-rev-cons";
    let rns: Api<RemoteNamespace> = Api::namespaced(remote.clone(), tenant);
    let offers: Api<ResourceOffer> = Api::namespaced(remote.clone(), tenant);
    rns.list(&ListParams::default()).await?;
    offers.get("rev-prov").await?;

    p.revoke(&id("rev-cons")).await?;
    let mut attempts = 0;
    for (what, r) in [
        (
            "list RemoteNamespaces",
            rns.list(&ListParams::default()).await.map(drop),
        ),
        (
            "create a RemoteNamespace",
            rns.create(&PostParams::default(), &remote_namespace("x", "rev-cons"))
                .await
                .map(drop),
        ),
        ("read its offer", offers.get("rev-prov").await.map(drop)),
        (
            "watch its offers",
            offers.list(&ListParams::default()).await.map(drop),
        ),
    ] {
        attempts += 1;
        match r {
            // 403 while the namespace is gone or going: authenticated, authorized for nothing.
            Err(kube::Error::Api(s)) if s.code == 403 => {
                assert!(
                    s.message.contains("liqo-consumer-rev-cons"),
                    "{what}: {}",
                    s.message
                );
            }
            other => panic!("{what} after revocation: expected 403, got {other:?}"),
        }
    }
    assert_eq!(attempts, 4);
    assert!(
        Api::<Namespace>::all(c.client()?)
            .get_opt(tenant)
            .await?
            .is_none()
    );

    // An expired credential for the same user, signed by the provider's CA.
    let expired = expired_kubeconfig(c, "liqo-consumer-rev-cons")?;
    let Err(err) = client_from_kubeconfig(&id("rev-prov"), &expired).await else {
        panic!("an expired credential must be refused");
    };
    assert!(err.to_string().contains("expired at"), "{err}");
    let raw = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::from_yaml(&expired)?,
            &Default::default(),
        )
        .await?,
    )?;
    match Api::<RemoteNamespace>::namespaced(raw, tenant)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 401 => {}
        other => panic!("the API server must answer 401 to an expired certificate, got {other:?}"),
    }
    cons.release(&id("rev-prov")).await.ok();
    Ok(())
}

fn expired_kubeconfig(c: &liqo_lab::Cluster, user: &str) -> BoxResult<String> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    };
    let ca_key = KeyPair::from_pem(c.ca_key_pem())?;
    let issuer = Issuer::from_ca_cert_pem(c.ca_cert_pem(), ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, user);
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(2);
    params.not_after = now - time::Duration::days(1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    Ok(serde_yaml_ng::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "p", "cluster": {"server": c.api_url(), "certificate-authority-data": b64(c.ca_cert_pem())}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(&cert.pem()), "client-key-data": b64(&key.serialize_pem())}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "p", "user": user}}],
        "current-context": "ctx",
    }))?)
}

async fn create_pod(client: &Client, ns: &str, name: &str, cpu: &str) -> Result<Pod, kube::Error> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "nginx", "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]},
    }))
    .map_err(kube::Error::SerdeError)?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
}

fn exceeded(r: Result<Pod, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{what}: {s:?}");
            assert!(
                s.message.contains("exceeded quota"),
                "{what}: {}",
                s.message
            );
        }
        other => panic!("{what}: expected 403 exceeded quota, got {other:?}"),
    }
}

/// Waits until the quota in `ns` allows `pods` pods and its status caught up.
async fn quota_allows(admin: &Client, ns: &str, pods: &str) -> TestResult {
    let want = pods.to_owned();
    tokio::time::timeout(
        WAIT,
        await_condition(
            Api::<ResourceQuota>::namespaced(admin.clone(), ns),
            names::QUOTA_NAME,
            move |q: Option<&ResourceQuota>| {
                q.and_then(|q| q.status.as_ref())
                    .and_then(|s| s.hard.as_ref())
                    .and_then(|h| h.get("pods"))
                    .is_some_and(|p| p.0 == want)
            },
        ),
    )
    .await
    .map_err(|_| format!("quota in {ns} never allowed {pods} pods"))??;
    Ok(())
}

/// The offer is enforced by the provider's API server across the consumer's namespaces; cordon
/// stops new pods and keeps running ones; drain deletes them.
#[tokio::test]
async fn the_offer_is_enforced_and_cordon_and_drain_work() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "lab-a"), cluster(lab, "lab-b"));
    let p = provider(
        b,
        "quota-prov",
        provider_config(b, liqo_core::ResourceOffer::new("1", "1Gi", 3)),
    )
    .await?;
    let admin = b.client()?;
    let stop = CancellationToken::new();
    let controller = tokio::spawn(
        QuotaController::new(admin.clone(), id("quota-prov")).run(stop.clone().cancelled_owned()),
    );
    let cons = consumer(
        a,
        "quota-cons",
        Arc::new(InProcessConnector::new([p.clone()])),
    )
    .await?;
    cons.request(&in_process_target(&p)).await?;
    let remote = cons.provider_client(&id("quota-prov")).await?;
    let (ns1, ns2) = ("web-quota-cons", "db-quota-cons");
    make_twin(&admin, "quota-cons", ns1).await?;
    make_twin(&admin, "quota-cons", ns2).await?;
    for ns in [ns1, ns2] {
        quota_allows(&admin, ns, "3").await?;
        wait_until_can(&remote, "create", "", "pods", ns).await?;
    }

    create_pod(&remote, ns1, "p1", "100m").await?;
    create_pod(&remote, ns1, "p2", "100m").await?;
    quota_allows(&admin, ns2, "1").await?;
    create_pod(&remote, ns2, "p3", "100m").await?;
    quota_allows(&admin, ns1, "2").await?;
    exceeded(
        create_pod(&remote, ns2, "p4", "100m").await,
        "a fourth pod in the second namespace",
    );
    exceeded(
        create_pod(&remote, ns1, "p4", "100m").await,
        "a fourth pod in the first namespace",
    );

    // CPU beyond the offer, with pod slots free.
    Api::<Pod>::namespaced(remote.clone(), ns2)
        .delete("p3", &DeleteParams::default().grace_period(0))
        .await?;
    quota_allows(&admin, ns2, "1").await?;
    exceeded(
        create_pod(&remote, ns2, "big", "2").await,
        "a pod asking for more CPU than offered",
    );

    // Cordon: no new pods, running ones stay.
    p.cordon(&id("quota-cons"), true).await?;
    quota_allows(&admin, ns2, "0").await?;
    exceeded(
        create_pod(&remote, ns2, "p5", "100m").await,
        "a pod while cordoned",
    );
    let running = Api::<Pod>::namespaced(admin.clone(), ns1)
        .list(&ListParams::default())
        .await?
        .items;
    assert_eq!(running.len(), 2, "cordon keeps running pods");
    p.cordon(&id("quota-cons"), false).await?;
    quota_allows(&admin, ns2, "1").await?;

    // Drain deletes the consumer's pods.
    assert_eq!(p.drain(&id("quota-cons")).await?, 2);
    for pod in running {
        tokio::time::timeout(
            WAIT,
            await_condition(
                Api::<Pod>::namespaced(admin.clone(), ns1),
                &pod.name_any(),
                conditions::is_deleted(&pod.uid().unwrap_or_default()),
            ),
        )
        .await??;
    }

    // The controller put its finalizer on the offer.
    let offer = Api::<ResourceOffer>::namespaced(admin.clone(), "liqo-tenant-quota-cons")
        .get("quota-prov")
        .await?;
    assert!(
        offer.finalizers().iter().any(|f| f == "liqo.io/cleanup"),
        "{:?}",
        offer.finalizers()
    );

    // A twin namespace without its quota (the controller is stopped, so none will come): the
    // admission policy refuses pods there instead of letting them in unchecked.
    stop.cancel();
    controller.await??;
    let late = "late-quota-cons";
    make_twin(&admin, "quota-cons", late).await?;
    wait_until_can(&remote, "create", "", "pods", late).await?;
    match create_pod(&remote, late, "early", "100m").await {
        // The API server answers an admission policy's denial with 422 and names the policy.
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(
                s.message.contains(liqo_peering_csr::QUOTA_GUARD)
                    && s.message.contains("no params found"),
                "{}",
                s.message
            );
        }
        other => {
            panic!("a pod in a twin namespace without quota: expected a denial, got {other:?}")
        }
    }

    // Releasing removes the twins too.
    cons.release(&id("quota-prov")).await?;
    for ns in [ns1, ns2, late, "liqo-tenant-quota-cons"] {
        assert!(
            Api::<Namespace>::all(admin.clone())
                .get_opt(ns)
                .await?
                .is_none(),
            "{ns} survived the release"
        );
    }
    Ok(())
}

/// The peer-to-peer path over HTTPS: key pinning, allow list, manual approval, release.
#[tokio::test]
async fn https_endpoint_pins_keys_and_applies_policies() -> TestResult {
    let lab = lab().await;
    let (a, c) = (cluster(lab, "lab-a"), cluster(lab, "lab-c"));
    let stop = CancellationToken::new();
    let allow = provider(
        c,
        "https-prov",
        provider_config(c, small_offer())
            .with_policy(PeeringPolicy::AllowList([id("https-ok")].into())),
    )
    .await?;
    let (addr, server) = PeeringServer::new(allow.clone())
        .spawn("127.0.0.1:0".parse()?, stop.clone().cancelled_owned())
        .await?;
    let manual = provider(
        c,
        "manual-prov",
        provider_config(c, small_offer()).with_policy(PeeringPolicy::Manual),
    )
    .await?;
    let (maddr, mserver) = PeeringServer::new(manual.clone())
        .spawn("127.0.0.1:0".parse()?, stop.clone().cancelled_owned())
        .await?;
    let https = Arc::new(HttpsConnector::default());
    let target = |addr: std::net::SocketAddr, p: &liqo_peering_csr::Provider| PeeringTarget {
        cluster_id: Some(p.identity().id().clone()),
        endpoint: format!("https://{addr}"),
        expected_fingerprint: Some(p.identity().fingerprint()),
    };

    // Listed: granted over HTTPS, the endpoint recorded for renewals.
    let ok = consumer(a, "https-ok", https.clone()).await?;
    let grant = ok.request(&target(addr, &allow)).await?;
    assert_eq!(grant.provider.id.as_str(), "https-prov");
    let secret = Api::<Secret>::namespaced(a.client()?, "liqo-tenant-https-prov")
        .get("liqo-kubeconfig-https-prov")
        .await?;
    assert_eq!(
        secret.annotations().get(names::ENDPOINT_ANNOTATION),
        Some(&format!("https://{addr}"))
    );
    // Knowing only the endpoint (trust on first use) works too.
    ok.request(&PeeringTarget {
        cluster_id: None,
        endpoint: format!("https://{addr}"),
        expected_fingerprint: None,
    })
    .await?;

    // A wrong pinned key: the TLS handshake fails before anything is sent.
    let other_key = LocalIdentity::generate(id("https-prov"), "x")?.fingerprint();
    match ok
        .request(&PeeringTarget {
            expected_fingerprint: Some(other_key),
            ..target(addr, &allow)
        })
        .await
    {
        Err(PeeringError::Unreachable { message, .. }) => {
            assert!(message.contains("not the pinned"), "{message}")
        }
        other => panic!("wrong pinned key: {other:?}"),
    }
    // Not listed: refused, nothing made for it.
    let no = consumer(a, "https-no", https.clone()).await?;
    match no.request(&target(addr, &allow)).await {
        Err(PeeringError::Refused { reason, .. }) => {
            assert!(reason.contains("allow list"), "{reason}")
        }
        other => panic!("unlisted consumer: {other:?}"),
    }
    assert!(
        Api::<Namespace>::all(c.client()?)
            .get_opt("liqo-tenant-https-no")
            .await?
            .is_none()
    );
    // A forged request over the wire: 401 with the reason.
    let transport =
        liqo_peering_csr::HttpsTransport::new(&target(addr, &allow), Duration::from_secs(30))?;
    use liqo_peering_csr::ProviderTransport as _;
    let (_, ch) = transport.challenge(&id("https-ok"), Purpose::Grant).await?;
    let forged = PeeringRequest {
        consumer: ok.identity().identity(),
        provider: id("https-prov"),
        nonce: ch.nonce,
        signature: vec![0; 64],
        network: network(a),
        csr: None,
    };
    match transport.grant(forged).await {
        Err(PeeringError::Unauthenticated { reason, .. }) => {
            assert!(reason.contains("signature"), "{reason}")
        }
        other => panic!("forged over HTTPS: {other:?}"),
    }

    // Manual approval: pending until an admin annotates the ForeignCluster.
    let waiting = consumer(a, "manual-cons", https.clone()).await?;
    match waiting.request(&target(maddr, &manual)).await {
        Err(PeeringError::Refused { reason, .. }) => {
            assert!(reason.contains("awaiting manual approval"), "{reason}")
        }
        other => panic!("manual policy: {other:?}"),
    }
    let admin_c = c.client()?;
    let pending = fc(&admin_c, "manual-cons").await?;
    let conds = pending.status.clone().unwrap_or_default().conditions;
    assert_eq!(
        find(&conds, cond::TENANT_READY).map(|c| c.reason.as_str()),
        Some("AwaitingApproval")
    );
    assert!(is_true(&conds, cond::CONSUMER_AUTHENTICATED));
    assert!(
        Api::<Namespace>::all(admin_c.clone())
            .get_opt("liqo-tenant-manual-cons")
            .await?
            .is_none()
    );
    Api::<ForeignCluster>::all(admin_c.clone())
        .patch("manual-cons", &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"annotations": {names::APPROVED_ANNOTATION: "true"}}})))
        .await?;
    waiting.request(&target(maddr, &manual)).await?;
    assert!(is_true(
        &fc(&admin_c, "manual-cons")
            .await?
            .status
            .unwrap_or_default()
            .conditions,
        cond::TENANT_READY
    ));

    // Release over HTTPS removes both sides; the pending-then-approved ForeignCluster was ours.
    waiting.release(&id("manual-prov")).await?;
    ok.release(&id("https-prov")).await?;
    assert!(
        Api::<ForeignCluster>::all(admin_c.clone())
            .get_opt("manual-cons")
            .await?
            .is_none()
    );
    assert!(
        Api::<Namespace>::all(admin_c)
            .get_opt("liqo-tenant-https-ok")
            .await?
            .is_none()
    );
    stop.cancel();
    server.await??;
    mserver.await??;
    Ok(())
}

/// Two clusters consuming from each other, and a third: roles, the shared tenant namespace, and
/// removing one direction without disturbing the other.
#[tokio::test]
async fn bidirectional_and_three_cluster_peering() -> TestResult {
    let lab = lab().await;
    let (a, b, c) = (
        cluster(lab, "lab-a"),
        cluster(lab, "lab-b"),
        cluster(lab, "lab-c"),
    );
    let pa = provider(a, "bi-a", provider_config(a, small_offer())).await?;
    let pb = provider(b, "bi-b", provider_config(b, small_offer())).await?;
    let pc = provider(c, "bi-c", provider_config(c, small_offer())).await?;
    let connector = Arc::new(InProcessConnector::new([
        pa.clone(),
        pb.clone(),
        pc.clone(),
    ]));
    let with_identity = |cl: &liqo_lab::Cluster,
                         p: &Arc<liqo_peering_csr::Provider>|
     -> BoxResult<Arc<liqo_peering_csr::Consumer>> {
        Ok(Arc::new(liqo_peering_csr::Consumer::new(
            cl.client()?,
            p.identity().clone(),
            liqo_peering_csr::NetworkSource::Static(network(cl)),
            connector.clone(),
        )))
    };
    let (ca, cb) = (with_identity(a, &pa)?, with_identity(b, &pb)?);
    ca.request(&in_process_target(&pb)).await?;
    cb.request(&in_process_target(&pa)).await?;
    ca.request(&in_process_target(&pc)).await?;

    let (admin_a, admin_b) = (a.client()?, b.client()?);
    assert_eq!(
        fc(&admin_a, "bi-b").await?.status.unwrap_or_default().role,
        PeeringRole::Both
    );
    assert_eq!(
        fc(&admin_b, "bi-a").await?.status.unwrap_or_default().role,
        PeeringRole::Both
    );
    assert_eq!(
        fc(&admin_a, "bi-c").await?.status.unwrap_or_default().role,
        PeeringRole::Provider
    );
    // On lab-a, one namespace holds both roles' offers for bi-b.
    let offers: Vec<String> = Api::<ResourceOffer>::namespaced(admin_a.clone(), "liqo-tenant-bi-b")
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|o| o.name_any())
        .collect();
    assert_eq!(offers, ["bi-a", "bi-b"]);

    // a stops consuming from b; b keeps consuming from a.
    ca.release(&id("bi-b")).await?;
    let b_on_a = cb.provider_client(&id("bi-a")).await?;
    Api::<RemoteNamespace>::namespaced(b_on_a.clone(), "liqo-tenant-bi-b")
        .list(&ListParams::default())
        .await?;
    assert!(
        Api::<Secret>::namespaced(admin_a.clone(), "liqo-tenant-bi-b")
            .get_opt("liqo-kubeconfig-bi-b")
            .await?
            .is_none()
    );
    assert_eq!(
        fc(&admin_a, "bi-b").await?.status.unwrap_or_default().role,
        PeeringRole::Consumer
    );
    assert!(
        Api::<Namespace>::all(admin_b.clone())
            .get_opt("liqo-tenant-bi-a")
            .await?
            .is_some(),
        "b's consumer side stays"
    );

    cb.release(&id("bi-a")).await?;
    for (admin, peer) in [(&admin_a, "bi-b"), (&admin_b, "bi-a")] {
        let left = objects_of_peering(admin, &[peer]).await?;
        assert!(
            left.is_empty(),
            "left after both directions were removed: {left:#?}"
        );
    }
    // The third cluster's peering is untouched.
    Api::<RemoteNamespace>::namespaced(ca.provider_client(&id("bi-c")).await?, "liqo-tenant-bi-a")
        .list(&ListParams::default())
        .await?;
    ca.release(&id("bi-c")).await?;
    Ok(())
}

/// Rotation renews the credential in place; a watch opened with the old one keeps working and the
/// new one works.
#[tokio::test]
async fn rotation_renews_in_place_without_breaking_clients() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "lab-a"), cluster(lab, "lab-b"));
    let p = provider(b, "rot-prov", provider_config(b, small_offer())).await?;
    let cons = consumer(
        a,
        "rot-cons",
        Arc::new(InProcessConnector::new([p.clone()])),
    )
    .await?;
    cons.request(&in_process_target(&p)).await?;
    let admin_a = a.client()?;
    let old_kubeconfig = stored_kubeconfig(&admin_a, "rot-prov").await?;
    let old_cert = credential::kubeconfig_certificate(&old_kubeconfig)?;
    let old = client_from_kubeconfig(&id("rot-prov"), &old_kubeconfig).await?;
    let tenant = "liqo-tenant-rot-cons";
    let mut events = watcher(
        Api::<ResourceOffer>::namespaced(old.clone(), tenant),
        watcher::Config::default(),
    )
    .applied_objects()
    .boxed();
    let first = tokio::time::timeout(WAIT, events.next())
        .await?
        .ok_or("watch ended")??;
    assert_eq!(first.name_any(), "rot-prov");

    // Renew when the first certificate is ~1 s old: pick the fraction from its validity.
    let (nb, na) = credential::certificate_validity(&old_cert)?;
    let lifetime = na.duration_since(nb)?.as_secs_f64();
    let elapsed = std::time::SystemTime::now()
        .duration_since(nb)?
        .as_secs_f64();
    let stop = CancellationToken::new();
    let rotation = tokio::spawn(
        RotationController::new(admin_a.clone(), cons.clone())
            .renew_at((elapsed + 1.0) / lifetime)
            .run(stop.clone().cancelled_owned()),
    );
    let secrets: Api<Secret> = Api::namespaced(admin_a.clone(), "liqo-tenant-rot-prov");
    let old_for_check = old_kubeconfig.clone();
    tokio::time::timeout(
        WAIT,
        await_condition(
            secrets,
            "liqo-kubeconfig-rot-prov",
            move |s: Option<&Secret>| {
                s.and_then(|s| s.data.as_ref())
                    .and_then(|d| d.get("kubeconfig"))
                    .is_some_and(|k| k.0 != old_for_check.as_bytes())
            },
        ),
    )
    .await
    .map_err(|_| "the credential was not renewed")??;
    stop.cancel();
    rotation.await?;

    let new_kubeconfig = stored_kubeconfig(&admin_a, "rot-prov").await?;
    let new_cert = credential::kubeconfig_certificate(&new_kubeconfig)?;
    assert_ne!(new_cert, old_cert);
    // Each renewal makes a new key on the consumer; the provider sends no key.
    let spki = |pem: &str| -> BoxResult<Vec<u8>> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())?;
        Ok(pem.parse_x509()?.tbs_certificate.subject_pki.raw.to_vec())
    };
    assert_ne!(
        spki(&new_cert)?,
        spki(&old_cert)?,
        "the renewal reused the key"
    );
    assert!(credential::kubeconfig_has_private_key(&new_kubeconfig)?);
    let new = client_from_kubeconfig(&id("rot-prov"), &new_kubeconfig).await?;
    Api::<RemoteNamespace>::namespaced(new, tenant)
        .list(&ListParams::default())
        .await?;
    // The old watch still delivers: change the offer on the provider.
    Api::<ResourceOffer>::namespaced(b.client()?, tenant)
        .patch(
            "rot-prov",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await?;
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if ev?.labels().contains_key("touched") {
                return Ok::<_, watcher::Error>(true);
            }
        }
        Ok(false)
    })
    .await??;
    assert!(
        seen,
        "the watch opened with the old credential stopped delivering"
    );
    Api::<RemoteNamespace>::namespaced(old, tenant)
        .list(&ListParams::default())
        .await?;
    cons.release(&id("rot-prov")).await?;
    Ok(())
}

/// An offer as a share of what is free: half of the workers' allocatable minus requests.
#[tokio::test]
async fn share_of_free_allocatable_offer() -> TestResult {
    let lab = lab().await;
    let c = cluster(lab, "lab-c");
    let client = c.client()?;
    let free = liqo_peering_csr::free_allocatable(&client).await?;
    // Two workers of 8 CPUs, 32Gi, 110 pods; other tests' pods may hold a little.
    assert!(free.cpu.0 > 0 && free.cpu.0 <= 16_000, "{free:?}");
    assert!(free.pods.0 > 0 && free.pods.0 <= 220_000, "{free:?}");
    let offer = liqo_peering_csr::OfferPolicy::ShareOfFree {
        percent: 50,
        labels: Default::default(),
    }
    .offer(&client)
    .await?;
    let cpu = liqo_peering_csr::quantity::Milli::of(&offer.cpu)?;
    assert!(cpu.0 > 0 && cpu.0 <= 8_000, "{offer:?}");
    assert!(offer.pods > 0 && offer.pods <= 110, "{offer:?}");
    Ok(())
}
