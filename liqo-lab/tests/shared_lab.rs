//! Tests against one real lab shared by the whole test binary: two clusters, "lab-a" and "lab-b",
//! with the same pod CIDR (10.244.0.0/16) and service CIDR (10.96.0.0/16).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        authentication::v1::SelfSubjectReview,
        certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
        core::v1::{Container, Namespace, Node, Pod, PodSpec, PodTemplateSpec, Secret},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::wait::{await_condition, conditions},
};
use liqo_lab::{CertifiedKey, Cluster, ClusterSpec, Lab, LabSpec};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(120);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_lab=info".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn lab() -> &'static Lab {
    init_tracing();
    let lab =
        liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("lab-a"), ClusterSpec::new("lab-b")]))
            .await
            .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"));
    eprintln!(
        "shared lab at {} (started in {:.1?})",
        lab.root().display(),
        lab.startup_duration()
    );
    lab
}

fn cluster<'a>(lab: &'a Lab, name: &str) -> &'a Cluster {
    lab.cluster(name)
        .unwrap_or_else(|| panic!("cluster {name} missing"))
}

async fn ensure_namespace(client: &Client, name: &str) -> TestResult {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates an nginx Deployment of `replicas` in `namespace` and waits (watch) until it completes;
/// returns its pods.
async fn deploy_and_wait(
    client: &Client,
    namespace: &str,
    name: &str,
    replicas: i32,
) -> Result<Vec<Pod>, Box<dyn std::error::Error + Send + Sync>> {
    ensure_namespace(client, namespace).await?;
    let labels = BTreeMap::from([("app".to_owned(), name.to_owned())]);
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "nginx".to_owned(),
                        image: Some("nginx".to_owned()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    tokio::time::timeout(
        WAIT,
        await_condition(deployments, name, conditions::is_deployment_completed()),
    )
    .await
    .map_err(|_| format!("deployment {namespace}/{name} not complete after {WAIT:?}"))??;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("app={name}")))
        .await?;
    Ok(list.items)
}

fn running_pod_ips(pods: &[Pod]) -> Vec<IpAddr> {
    pods.iter()
        .filter(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn ten_replicas_run_with_ips_from_the_pod_cidr() -> TestResult {
    let lab = lab().await;
    let a = cluster(lab, "lab-a");
    let client = a.client()?;
    let pods = deploy_and_wait(&client, "ten-replicas", "web", 10).await?;
    let ips = running_pod_ips(&pods);
    assert_eq!(ips.len(), 10, "running pods: {ips:?}");
    for ip in &ips {
        assert!(a.pod_cidr().contains(ip), "{ip} outside {}", a.pod_cidr());
    }
    let unique: std::collections::HashSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), 10, "pod IPs are unique: {ips:?}");
    // The scheduler spread them over the lab's kwok workers.
    let nodes: std::collections::HashSet<_> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    let workers: std::collections::HashSet<_> = a.workers().into_iter().map(|(n, _)| n).collect();
    assert!(nodes.is_subset(&workers), "{nodes:?} not in {workers:?}");
    Ok(())
}

#[tokio::test]
async fn clusters_with_the_same_pod_cidr_run_side_by_side() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "lab-a"), cluster(lab, "lab-b"));
    assert_eq!(a.pod_cidr(), b.pod_cidr());
    assert_eq!(a.service_cidr(), b.service_cidr());
    assert_ne!(a.api_url(), b.api_url());
    let (ca, cb) = (a.client()?, b.client()?);
    let (pa, pb) = tokio::try_join!(
        deploy_and_wait(&ca, "side-by-side", "app", 3),
        deploy_and_wait(&cb, "side-by-side", "app", 3),
    )?;
    for (c, pods) in [(a, &pa), (b, &pb)] {
        let ips = running_pod_ips(pods);
        assert_eq!(ips.len(), 3, "{}: {ips:?}", c.name());
        assert!(ips.iter().all(|ip| c.pod_cidr().contains(ip)));
    }
    // Each cluster sees only its own workers.
    for (c, client) in [(a, &ca), (b, &cb)] {
        let nodes: Api<Node> = Api::all(client.clone());
        let names: Vec<String> = nodes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n.starts_with(&format!("{}-worker-", c.name()))),
            "{}: {names:?}",
            c.name()
        );
    }
    Ok(())
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {s:?}"),
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn rbac_is_enforced_for_non_admin_users() -> TestResult {
    let lab = lab().await;
    let b = cluster(lab, "lab-b");
    let admin = b.client()?;
    for ns in ["team-a", "team-b"] {
        ensure_namespace(&admin, ns).await?;
    }
    let role = Role {
        metadata: ObjectMeta {
            name: Some("pod-reader".to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".to_owned()]),
            verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), "team-a")
        .create(&PostParams::default(), &role)
        .await?;
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("alice-reads-pods".to_owned()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: "pod-reader".to_owned(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "User".to_owned(),
            name: "alice".to_owned(),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), "team-a")
        .create(&PostParams::default(), &binding)
        .await?;

    let kubeconfig = b.user_kubeconfig("alice", &["lab-users"])?;
    assert!(kubeconfig.exists());
    let alice = b.user_client("alice", &["lab-users"]).await?;
    // The RBAC authorizer learns about the new binding through an informer: allow it a moment.
    let team_a: Api<Pod> = Api::namespaced(alice.clone(), "team-a");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match team_a.list(&ListParams::default()).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 403 && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("alice cannot list pods in team-a: {e}").into()),
        }
    }
    forbidden(
        Api::<Pod>::namespaced(alice.clone(), "team-b")
            .list(&ListParams::default())
            .await,
        "pods in team-b",
    );
    forbidden(
        Api::<Node>::all(alice.clone())
            .list(&ListParams::default())
            .await,
        "nodes",
    );
    forbidden(
        Api::<Secret>::namespaced(alice, "kube-system")
            .list(&ListParams::default())
            .await,
        "secrets in kube-system",
    );
    Ok(())
}

#[tokio::test]
async fn csrs_for_the_apiserver_client_signer_get_signed() -> TestResult {
    let lab = lab().await;
    let a = cluster(lab, "lab-a");
    let admin = a.client()?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "lab-peers");
    dn.push(DnType::CommonName, "bob");
    params.distinguished_name = dn;
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some("bob".to_owned()),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(csr_pem.into_bytes()),
            signer_name: "kubernetes.io/kube-apiserver-client".to_owned(),
            usages: Some(vec!["client auth".to_owned()]),
            expiration_seconds: Some(3600),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    let csrs: Api<CertificateSigningRequest> = Api::all(admin);
    csrs.create(&PostParams::default(), &csr).await?;
    let approval = serde_json::json!({
        "status": {
            "conditions": [{
                "type": "Approved",
                "status": "True",
                "reason": "LiqoLabTest",
                "message": "approved by the liqo-lab test",
            }]
        }
    });
    csrs.patch_subresource(
        "approval",
        "bob",
        &PatchParams::default(),
        &Patch::Merge(&approval),
    )
    .await?;
    let signed = tokio::time::timeout(
        WAIT,
        await_condition(csrs, "bob", |csr: Option<&CertificateSigningRequest>| {
            csr.and_then(|c| c.status.as_ref())
                .and_then(|s| s.certificate.as_ref())
                .is_some_and(|c| !c.0.is_empty())
        }),
    )
    .await
    .map_err(|_| format!("CSR not signed after {WAIT:?}"))??
    .ok_or("CSR deleted")?;
    let cert_pem = String::from_utf8(
        signed
            .status
            .and_then(|s| s.certificate)
            .ok_or("no certificate")?
            .0,
    )?;
    assert!(cert_pem.contains("BEGIN CERTIFICATE"));

    // The signed certificate authenticates "bob" (403, not 401: known but not authorized).
    let bob = a
        .client_with_cert(&CertifiedKey {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
        .await?;
    forbidden(
        Api::<Pod>::namespaced(bob.clone(), "default")
            .list(&ListParams::default())
            .await,
        "pods as bob",
    );
    let review = Api::<SelfSubjectReview>::all(bob)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .ok_or("no user info")?;
    assert_eq!(user.username.as_deref(), Some("bob"));
    assert!(
        user.groups
            .unwrap_or_default()
            .contains(&"lab-peers".to_owned())
    );
    Ok(())
}

/// Applies every liqo-rs CRD, waits until each is Established, then checks that the API server
/// itself rejects invalid objects with a message naming the problem, and accepts valid ones.
#[tokio::test]
async fn crds_apply_and_the_api_server_enforces_their_schemas() -> TestResult {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};

    let lab = lab().await;
    let client = cluster(lab, "lab-b").client()?;
    liqo_core::crds::install(&client, &[], "liqo-lab-test").await?;
    ensure_namespace(&client, "crd-test").await?;

    let api = |kind: &str, plural: &str, namespaced: bool| -> Api<DynamicObject> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("liqo.io", "v1alpha1", kind),
            plural,
        );
        if namespaced {
            Api::namespaced_with(client.clone(), "crd-test", &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        }
    };
    let create = |api: Api<DynamicObject>, body: serde_json::Value| async move {
        let obj: DynamicObject =
            serde_json::from_value(body).expect("test object is well-formed JSON");
        api.create(&PostParams::default(), &obj).await
    };
    // Each case: an invalid object and a fragment the API server's message must contain.
    let fc = api("ForeignCluster", "foreignclusters", false);
    let nso = api("NamespaceOffloading", "namespaceoffloadings", true);
    let nc = api("NetworkConfig", "networkconfigs", true);
    let tun = api("Tunnel", "tunnels", true);
    let cases: Vec<(Api<DynamicObject>, serde_json::Value, &str)> = vec![
        (
            fc.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"ForeignCluster","metadata":{"name":"bad-id"},
            "spec":{"clusterId":"Not_A_Label","discovery":{"source":"Manual"}}}),
            "spec.clusterId",
        ),
        (
            fc.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"ForeignCluster","metadata":{"name":"bad-ep"},
            "spec":{"clusterId":"rome","peeringEndpoint":"http://rome:443","discovery":{"source":"Manual"}}}),
            "peeringEndpoint must be an https:// URL",
        ),
        (
            fc.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"ForeignCluster","metadata":{"name":"bad-src"},
            "spec":{"clusterId":"rome","discovery":{"source":"Carrier-Pigeon"}}}),
            "spec.discovery.source",
        ),
        (
            nso.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"NamespaceOffloading","metadata":{"name":"other"},
            "spec":{}}),
            "must be named 'offloading'",
        ),
        (
            nso.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"NamespaceOffloading","metadata":{"name":"offloading"},
            "spec":{"namespaceMappingStrategy":"SelectedName"}}),
            "remoteNamespaceName is required",
        ),
        (
            nso.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"NamespaceOffloading","metadata":{"name":"offloading"},
            "spec":{"podOffloadingStrategy":"Elsewhere"}}),
            "spec.podOffloadingStrategy",
        ),
        (
            nc.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"NetworkConfig","metadata":{"name":"bad-cidr"},
            "spec":{"clusterId":"rome","remotePodCidr":"10.244.0.0/33"}}),
            "must be a CIDR",
        ),
        (
            nc.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"NetworkConfig","metadata":{"name":"host-bits"},
            "spec":{"clusterId":"rome","remotePodCidr":"10.244.0.1/16"}}),
            "host bits zero",
        ),
        (
            tun.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"Tunnel","metadata":{"name":"bad-key"},
            "spec":{"clusterId":"rome","peerPublicKey":"not-a-key"}}),
            "spec.peerPublicKey",
        ),
        (
            tun.clone(),
            serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"Tunnel","metadata":{"name":"bad-mtu"},
            "spec":{"clusterId":"rome","peerPublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","mtu":100}}),
            "spec.mtu",
        ),
    ];
    for (api, body, want) in cases {
        let name = body["metadata"]["name"].as_str().unwrap_or("?").to_owned();
        match create(api, body).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{name}: {status:?}");
                assert!(
                    status.message.contains(want),
                    "{name}: message {:?} lacks {want:?}",
                    status.message
                );
            }
            other => panic!("{name}: expected a 422 from the API server, got {other:?}"),
        }
    }

    // Valid objects are accepted, and defaults come from the schema.
    let ok_nso = create(
        nso,
        serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"NamespaceOffloading",
        "metadata":{"name":"offloading"},"spec":{}}),
    )
    .await?;
    assert_eq!(
        ok_nso.data["spec"]["podOffloadingStrategy"],
        "LocalAndRemote"
    );
    assert_eq!(
        ok_nso.data["spec"]["namespaceMappingStrategy"],
        "DefaultName"
    );
    create(nc, serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"NetworkConfig","metadata":{"name":"good"},
        "spec":{"clusterId":"rome","remotePodCidr":"10.244.0.0/16"}})).await?;
    let good_fc = create(fc.clone(), serde_json::json!({"apiVersion":"liqo.io/v1alpha1","kind":"ForeignCluster","metadata":{"name":"rome"},
        "spec":{"clusterId":"rome","peeringEndpoint":"https://rome.example:8443","discovery":{"source":"DNS"}}})).await?;
    assert_eq!(
        good_fc.data["spec"]["discovery"]["autoPeer"], false,
        "auto-peering is off by default"
    );

    // clusterId is immutable: an update that changes it is rejected by a CEL transition rule.
    let patch = serde_json::json!({"spec":{"clusterId":"milan"}});
    match fc
        .patch("rome", &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains("clusterId is immutable"),
            "{}",
            s.message
        ),
        other => panic!("changing clusterId must be refused, got {other:?}"),
    }
    fc.delete("rome", &Default::default()).await?;
    Ok(())
}
