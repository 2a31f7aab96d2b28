//! The kubeconfig peering method through liqoctl, against a lab of its own: the provider's
//! administrator runs `liqoctl bundle issue`, the consumer's `liqoctl peer --bundle`, with each
//! cluster running what liqo-agent composes for `peering.method: Kubeconfig` (identity and
//! cluster info published; on the consumer the shared peering controller over
//! `KubeconfigAuthority` and the virtual kubelet), until the virtual node is Ready; then
//! `liqoctl bundle revoke`. Hostile bundle files are refused before anything is created.

mod common;

use common::{cluster, id, liqoctl};

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::{Api, Client};
use liqo_core::crds::{ForeignCluster, PeeringRole};
use liqo_lab::{ClusterSpec, Lab, LabSpec};
use liqo_peering::PeeringController;
use liqo_peering_csr::{IdentityOptions, LocalIdentity};
use liqo_peering_kubeconfig::{BUNDLE_NAMESPACE, KubeconfigAuthority, bundle_secret_name};
use liqo_vk::{ConsumerAgent, ConsumerConfig};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn lab() -> &'static Lab {
    liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("bun-a"), ClusterSpec::new("bun-b")]))
        .await
        .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// What the agent does at start: CRDs, identity Secret, cluster info.
async fn agent_identity(client: &Client, me: &str, name: &str) -> TestResult {
    liqo_core::crds::install(client, &[], "liqoctl-test").await?;
    let identity = LocalIdentity::load_or_create(
        client,
        &IdentityOptions {
            cluster_id: Some(id(me)),
            cluster_name: Some(name.into()),
            ..IdentityOptions::default()
        },
    )
    .await?;
    liqo_core::info::publish(
        client,
        &liqo_core::ClusterInfo {
            cluster_id: id(me),
            cluster_name: Some(name.into()),
            peering_endpoint: None,
            fingerprint: identity.fingerprint(),
            network: None,
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn issue_peer_with_a_bundle_and_revoke() -> TestResult {
    let lab = lab().await;
    let (a, b) = (cluster(lab, "bun-a"), cluster(lab, "bun-b"));
    let (ca, cb) = (a.client()?, b.client()?);
    let (prov, cons) = ("cli-bundle-prov", "cli-bundle-cons");
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let dir = std::env::temp_dir().join(format!("liqoctl-bundle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("bundle.yaml");
    let file_s = file.to_string_lossy().into_owned();
    let (pod_a, svc_a) = (a.pod_cidr().to_string(), a.service_cidr().to_string());
    let (pod_b, svc_b) = (b.pod_cidr().to_string(), b.service_cidr().to_string());
    let issue_args = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "bundle",
            "issue",
            "--consumer",
            cons,
            "--consumer-name",
            "Consumer C",
            "--consumer-pod-cidr",
            &pod_a,
            "--consumer-service-cidr",
            &svc_a,
            "--pod-cidr",
            &pod_b,
            "--service-cidr",
            &svc_b,
            "-f",
            &file_s,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // The provider's agent has not published its identity: refused, naming the ConfigMap.
    liqo_core::crds::install(&cb, &[], "liqoctl-test").await?;
    let args = issue_args(&[
        "--offer-cpu",
        "2",
        "--offer-memory",
        "4Gi",
        "--offer-pods",
        "10",
    ]);
    let run = liqoctl(b, &strs(&args)).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("has no ConfigMap liqo-system/liqo-cluster-info"),
        "{run:?}"
    );
    assert!(!file.exists(), "nothing written: {run:?}");

    agent_identity(&cb, prov, "Provider P").await?;
    agent_identity(&ca, cons, "Consumer C").await?;

    // No offer yet and no --offer-* flags: a usage error saying what to give.
    let run = liqoctl(b, &strs(&issue_args(&[]))).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--offer-cpu"), "{run:?}");

    // Issued: written 0600, with the credential warning.
    let run = liqoctl(b, &strs(&args)).await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains("warning: the bundle holds a credential"),
        "{run:?}"
    );
    assert!(
        run.stdout.is_empty(),
        "the bundle went to the file: {run:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "bundle file mode");
    }
    let text = std::fs::read_to_string(&file)?;
    assert!(text.contains("kind: PeeringBundle"), "{text}");
    assert!(
        text.contains("publicKey"),
        "the provider's key is in: {text}"
    );
    // Issuing again with another offer is refused: the tenant keeps its offer.
    let other = issue_args(&[
        "--offer-cpu",
        "3",
        "--offer-memory",
        "4Gi",
        "--offer-pods",
        "10",
    ]);
    let run = liqoctl(b, &strs(&other)).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("already has an offer"), "{run:?}");

    // Hostile bundle files on the consumer: refused naming the problem, nothing created.
    let secrets: Api<Secret> = Api::namespaced(ca.clone(), BUNDLE_NAMESPACE);
    let fcs: Api<ForeignCluster> = Api::all(ca.clone());
    let garbage = dir.join("garbage.yaml");
    std::fs::write(&garbage, "{this is: [not a bundle")?;
    let tampered = dir.join("tampered.yaml");
    std::fs::write(
        &tampered,
        text.replace(&format!("consumer: {cons}"), "consumer: someone-else"),
    )?;
    let missing = dir.join("missing.yaml");
    for (path, says) in [
        (&garbage, "not a PeeringBundle"),
        (&tampered, "field consumer"),
        (&missing, "cannot read the bundle"),
    ] {
        let p = path.to_string_lossy();
        let run = liqoctl(a, &["peer", "--bundle", &p, "--timeout", "10s"]).await;
        assert_eq!(run.code, 1, "{run:?}");
        assert!(
            run.stderr.contains(says) && run.stderr.contains(p.as_ref()),
            "{says}: {run:?}"
        );
        assert!(run.stderr.contains("next:"), "{run:?}");
    }
    assert!(
        secrets
            .get_opt(&bundle_secret_name(&id(prov)))
            .await?
            .is_none(),
        "no bundle Secret after refused bundles"
    );
    assert!(
        fcs.get_opt(prov).await?.is_none(),
        "no ForeignCluster after refused bundles"
    );

    // The consumer's agent with peering.method: Kubeconfig: the shared peering controller over
    // KubeconfigAuthority, and the virtual kubelet.
    let s = stop.clone();
    tokio::spawn(
        PeeringController::new(
            ca.clone(),
            id(cons),
            Arc::new(KubeconfigAuthority::new(ca.clone(), id(cons))),
        )
        .run(async move { s.cancelled().await }),
    );
    let vk = ConsumerAgent::builder(ca.clone(), id(cons))
        .config(ConsumerConfig {
            heartbeat: Duration::from_secs(2),
            webhook: None,
            ..ConsumerConfig::default()
        })
        .build();
    let s = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = vk.run(async move { s.cancelled().await }).await {
            eprintln!("consumer agent failed: {e}");
        }
    });

    let run = liqoctl(a, &["peer", "--bundle", &file_s, "--timeout", "150s"]).await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    for line in [
        format!("✓ authenticated with {prov}"),
        format!("✓ offer from {prov} accepted"),
        format!("✓ virtual node liqo-{prov} Ready"),
    ] {
        assert!(run.stderr.contains(&line), "{line}: {run:?}");
    }
    let fc = fcs.get(prov).await?;
    assert_eq!(fc.spec.role, PeeringRole::Provider);
    assert_eq!(fc.spec.peering_endpoint, None);
    assert_eq!(fc.spec.cluster_name.as_deref(), Some("Provider P"));
    let published = liqo_core::info::read(&cb).await?.expect("provider info");
    assert_eq!(fc.spec.public_key_fingerprint, Some(published.fingerprint));
    assert!(
        secrets
            .get_opt(&bundle_secret_name(&id(prov)))
            .await?
            .is_some(),
        "bundle Secret stored"
    );
    let node = Api::<Node>::all(ca.clone())
        .get(&format!("liqo-{prov}"))
        .await?;
    assert_eq!(
        node.status
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("cpu").cloned())
            .map(|q| q.0),
        Some("2".to_owned())
    );

    // The consumer releases the provider (the bundle Secret stays, it is the administrator's).
    let run = liqoctl(a, &["unpeer", prov, "--timeout", "120s"]).await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("✓ peering with {prov} released")),
        "{run:?}"
    );
    assert_eq!(fcs.get(prov).await?.spec.role, PeeringRole::None);

    // Revoked on the provider: no tenant namespace is left.
    let run = liqoctl(
        b,
        &["bundle", "revoke", "--consumer", cons, "--timeout", "120s"],
    )
    .await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("✓ tenant namespace liqo-tenant-{cons} deleted")),
        "{run:?}"
    );
    assert!(
        Api::<Namespace>::all(cb.clone())
            .get_opt(&format!("liqo-tenant-{cons}"))
            .await?
            .is_none()
    );
    // Revoking again: nothing to do.
    let run = liqoctl(b, &["bundle", "revoke", "--consumer", cons]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("nothing was issued"), "{run:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
