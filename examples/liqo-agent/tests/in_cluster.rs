//! liqo-rs installed the way a user installs it: the agent's image (this build's `liqo-agent`
//! with `nft` and `ip`), imported into real nodes' containerd, and everything in `deploy/`
//! applied as `kubectl apply -k deploy/` would, with only the config a user edits changed (and
//! the peering Service exposed as a NodePort). The agents run as pods on real kubelets (their
//! probes, read-only root filesystem and dropped capabilities are the real ones), peer with each
//! other, and a pod offloaded from one cluster runs as a real container in the other.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{Error, until};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use liqo_core::crds::{DiscoverySpec, ForeignCluster, ForeignClusterSpec, PeeringRole};
use liqo_lab::{
    BUSYBOX_IMAGE, ClusterSpec, ImageSpec, Lab, LabSpec, WorkerSpec, exec_in_pod_until,
    write_oci_archive,
};

/// The NodePort of the peering Service in both clusters.
const PEERING_NODE_PORT: i64 = 30443;

const IMAGE: &str = "liqo.lab/liqo-agent:local";
const WAIT: Duration = Duration::from_secs(240);
const SELECTOR: &str = "app.kubernetes.io/name=liqo-agent";

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The agent's image: the binary and the tools it runs (`nft` for the NAT, `ip`), each with its
/// shared libraries, and a writable `/tmp`.
fn agent_image() -> Result<ImageSpec, Error> {
    Ok(ImageSpec::new(IMAGE)
        .program_from_host(
            "/usr/local/bin/liqo-agent",
            Path::new(env!("CARGO_BIN_EXE_liqo-agent")),
        )?
        .program_from_host("/usr/sbin/nft", Path::new("/usr/sbin/nft"))?
        .program_from_host("/usr/sbin/ip", Path::new("/usr/sbin/ip"))?
        .dir("/tmp", 0o1777)
        .file(
            "/etc/passwd",
            "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
            0o644,
        )
        .file("/etc/group", "root:x:0:\nnobody:x:65534:\n", 0o644)
        .entrypoint(["/usr/local/bin/liqo-agent"]))
}

/// The resources of `deploy/kustomization.yaml`, in its order.
fn kustomization() -> Result<Vec<String>, Error> {
    let k: serde_json::Value = liqo_lab::read_manifest(&deploy_dir().join("kustomization.yaml"))?
        .into_iter()
        .next()
        .ok_or("empty kustomization")?;
    Ok(k["resources"]
        .as_array()
        .ok_or("kustomization without resources")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect())
}

/// What a user edits before applying: the config's cluster name, CIDRs and addresses, the
/// image (here the lab's, which no registry serves) and how peers reach the peering endpoint (a
/// NodePort on the cluster's first real node).
fn edit(
    doc: &mut serde_json::Value,
    cluster: &liqo_lab::Cluster,
    node_ip: &str,
) -> Result<(), Error> {
    match (doc["kind"].as_str(), doc["metadata"]["name"].as_str()) {
        (Some("ConfigMap"), Some("liqo-agent-config")) => {
            let text = doc["data"]["agent.yaml"].as_str().ok_or("no agent.yaml")?;
            let mut cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)?;
            cfg["cluster"]["name"] = cluster.name().into();
            cfg["cluster"]["podCidr"] = cluster.pod_cidr().to_string().into();
            cfg["cluster"]["serviceCidr"] = cluster.service_cidr().to_string().into();
            // The routed fabric: the lab's underlay routes the clusters' (disjoint) pod CIDRs.
            cfg["network"] = serde_yaml_ng::from_str("{enabled: true, fabric: Routed}")?;
            cfg["peering"]["endpoint"] = format!("https://{node_ip}:{PEERING_NODE_PORT}").into();
            cfg["peering"]["apiServer"] =
                format!("https://{}:{}", liqo_lab::API_ADDRESS, cluster.api_port()).into();
            doc["data"]["agent.yaml"] = serde_yaml_ng::to_string(&cfg)?.into();
        }
        (Some("Deployment"), Some("liqo-agent")) => {
            let c = &mut doc["spec"]["template"]["spec"]["containers"][0];
            c["image"] = IMAGE.into();
            c["imagePullPolicy"] = "Never".into();
            doc["spec"]["template"]["spec"]["nodeSelector"] =
                serde_json::json!({ liqo_lab::REAL_NODE_LABEL: "true" });
        }
        (Some("Service"), Some("liqo-agent-peering")) => {
            doc["spec"]["type"] = "NodePort".into();
            doc["spec"]["ports"][0]["nodePort"] = PEERING_NODE_PORT.into();
        }
        _ => {}
    }
    Ok(())
}

async fn ready_agent(pods: &Api<Pod>, not: Option<&str>) -> Result<Pod, Error> {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        for p in pods.list(&ListParams::default().labels(SELECTOR)).await? {
            let status = p.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .as_ref()
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let name = p.metadata.name.clone().unwrap_or_default();
            if ready && Some(name.as_str()) != not && p.metadata.deletion_timestamp.is_none() {
                return Ok(p);
            }
            last = format!(
                "{name}: phase {:?}, containers {:?}",
                status.phase, status.container_statuses
            );
        }
        if Instant::now() > deadline {
            return Err(format!("no Ready agent pod within {WAIT:?}; last: {last}").into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Installs liqo from deploy/ into `cluster` (whose real nodes have the agent image) and returns
/// its agent pod once Ready.
async fn install(lab: &Lab, cluster: &liqo_lab::Cluster, archive: &Path) -> Result<Pod, Error> {
    lab.import_image(cluster.name(), archive).await?;
    let node_ip = lab
        .real_nodes()
        .into_iter()
        .find(|n| n.cluster == cluster.name())
        .ok_or("no real node")?
        .ip
        .to_string();
    let admin = cluster.client()?;
    for file in kustomization()? {
        for mut doc in liqo_lab::read_manifest(&deploy_dir().join(&file))? {
            edit(&mut doc, cluster, &node_ip)?;
            liqo_lab::apply_document(&admin, &doc, "liqo-install-test", false)
                .await
                .map_err(|e| format!("deploy/{file}: {e}"))?;
        }
    }
    ready_agent(&Api::namespaced(admin, "liqo-system"), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_installed_from_deploy_peer_and_offload_real_containers() -> Result<(), Error> {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    // No kwok workers: every pod, the offloaded one too, runs in a real container.
    let lab = Lab::start(LabSpec::new([
        ClusterSpec::new("rome")
            .pod_cidr("10.244.0.0/16".parse()?)
            .workers(0, WorkerSpec::default())
            .real_nodes(1),
        ClusterSpec::new("milan")
            .pod_cidr("10.245.0.0/16".parse()?)
            .workers(0, WorkerSpec::default())
            .real_nodes(1),
    ]))
    .await?;
    let (rome, milan) = (
        lab.cluster("rome").ok_or("no rome")?,
        lab.cluster("milan").ok_or("no milan")?,
    );
    let archive = lab.root().join("images").join("liqo-agent.tar");
    write_oci_archive(&agent_image()?, &archive)?;
    let (a, b) = (rome.client()?, milan.client()?);
    lab.route_pod_network("rome", "milan").await?;
    lab.route_pod_network("milan", "rome").await?;

    let first = install(&lab, rome, &archive).await?;
    install(&lab, milan, &archive).await?;
    let pods: Api<Pod> = Api::namespaced(a.clone(), "liqo-system");
    let first_name = first.metadata.name.clone().unwrap_or_default();
    let node = first.spec.and_then(|s| s.node_name).unwrap_or_default();
    assert_eq!(node, "rome-node-0");
    let restarts: i32 = first
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .map(|c| c.restart_count)
        .sum();
    assert_eq!(restarts, 0, "the agent restarted");
    // Its log, as `kubectl logs` shows it: JSON lines, nothing refused by the API server.
    let logs = pods.logs(&first_name, &LogParams::default()).await?;
    for wanted in ["identity loaded", "serving the HTTPS peering endpoint"] {
        assert!(
            logs.lines()
                .any(|l| l.starts_with('{') && l.contains(wanted)),
            "the agent's log has no JSON line {wanted:?}: {logs}"
        );
    }

    // Deleted, it comes back from its Deployment and is Ready again.
    pods.delete(&first_name, &DeleteParams::default()).await?;
    let second = ready_agent(&pods, Some(&first_name)).await?;
    assert_ne!(second.metadata.name, Some(first_name));

    // rome's admin declares milan as a provider, from what milan's agent publishes; milan's
    // admin approves the request.
    let info = until("milan's cluster info", &[], WAIT, || async {
        liqo_core::info::read(&b).await.ok().flatten()
    })
    .await?;
    let endpoint = info.peering_endpoint.clone().ok_or("no peering endpoint")?;
    assert!(
        endpoint.ends_with(&format!(":{PEERING_NODE_PORT}")),
        "{endpoint}"
    );
    let rome_info = until("rome's cluster info", &[], WAIT, || async {
        liqo_core::info::read(&a).await.ok().flatten()
    })
    .await?;
    let prov = info.cluster_id.clone();
    let fc = ForeignCluster::new(
        prov.as_str(),
        ForeignClusterSpec {
            cluster_id: prov.clone(),
            cluster_name: info.cluster_name.clone(),
            peering_endpoint: Some(endpoint),
            public_key_fingerprint: Some(info.fingerprint),
            discovery: DiscoverySpec {
                source: liqo_core::DiscoverySource::Manual,
                auto_peer: false,
            },
            role: PeeringRole::Provider,
        },
    );
    Api::<ForeignCluster>::all(a.clone())
        .patch(
            prov.as_str(),
            &PatchParams::apply("liqo-install-test").force(),
            &Patch::Apply(&fc),
        )
        .await?;
    let fcs_b: Api<ForeignCluster> = Api::all(b.clone());
    let consumer_name = rome_info.cluster_id.as_str().to_owned();
    until("rome's request on milan", &[], WAIT, || async {
        fcs_b.get_opt(&consumer_name).await.ok().flatten()
    })
    .await?;
    fcs_b
        .patch(
            &consumer_name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                "liqo.io/peering-approved": "true"
            }}})),
        )
        .await?;

    // milan becomes a Ready virtual node of rome.
    let vnode = liqo_vk::names::node_name(&prov);
    let nodes: Api<Node> = Api::all(a.clone());
    until("milan's virtual node Ready in rome", &[], WAIT, || async {
        nodes.get_opt(&vnode).await.ok().flatten().filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    })
    .await?;

    // A pod of an offloaded namespace runs as a real container on milan's node.
    let ns = "offloaded";
    common::workload::offload_namespace(&a, ns, &[]).await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "web",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", SERVE_MILAN],
            }],
        }
    }))?;
    let local: Api<Pod> = Api::namespaced(a.clone(), ns);
    until("the pod created (webhook ready)", &[], WAIT, || async {
        match local.create(&PostParams::default(), &pod).await {
            Ok(p) => Some(p),
            Err(kube::Error::Api(s)) if s.code == 409 => local.get_opt("web").await.ok().flatten(),
            Err(_) => None,
        }
    })
    .await?;
    let remote_all: Api<Pod> = Api::all(b.clone());
    let remote = until(
        "the remote pod Running on milan's real node",
        &[],
        WAIT,
        || async {
            remote_all
                .list(
                    &ListParams::default()
                        .labels(liqo_vk::names::ORIGIN_POD_UID)
                        .fields("metadata.name=web"),
                )
                .await
                .ok()?
                .items
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        },
    )
    .await?;
    assert_eq!(
        remote.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("milan-node-0")
    );
    let twin = remote.metadata.namespace.clone().ok_or("no namespace")?;
    let remote_logs = Api::<Pod>::namespaced(b.clone(), &twin)
        .logs("web", &LogParams::default())
        .await?;
    assert!(
        remote_logs.contains("offloaded web started"),
        "{remote_logs}"
    );
    // The consumer sees its pod Running on the virtual node.
    until(
        "the local pod Running on the virtual node",
        &[],
        WAIT,
        || async {
            local.get_opt("web").await.ok().flatten().filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(vnode.as_str())
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
        },
    )
    .await?;

    // Real containers talk across the clusters, both ways: a pod of rome fetches the page of
    // the offloaded pod at the address rome shows for it, and the remote pod fetches a page from
    // the rome pod.
    let client: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "client"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "client",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", SERVE_ROME],
            }],
        }
    }))?;
    let home: Api<Pod> = Api::namespaced(a.clone(), "default");
    home.create(&PostParams::default(), &client).await?;
    let client_ip = until("the rome client Running", &[], WAIT, || {
        running_ip(&home, "client")
    })
    .await?;
    let web_ip = until("the offloaded pod's IP in rome", &[], WAIT, || {
        running_ip(&local, "web")
    })
    .await?;
    // `timeout`, not wget's own -T: Debian's static busybox wget crashes with -T.
    let fetched = exec_in_pod_until(
        &home,
        "client",
        &format!("timeout 10 wget -qO- http://{web_ip}:8080/ 2>&1"),
        "hello-from-milan",
        WAIT,
    )
    .await?;
    assert!(fetched.contains("hello-from-milan"));
    let remote_pods: Api<Pod> = Api::namespaced(b.clone(), &twin);
    exec_in_pod_until(
        &remote_pods,
        "web",
        &format!("timeout 10 wget -qO- http://{client_ip}:8080/ 2>&1"),
        "hello-from-rome",
        WAIT,
    )
    .await?;

    lab.stop().await?;
    Ok(())
}

const SERVE_MILAN: &str = "mkdir -p /www && echo hello-from-milan > /www/index.html && \
                           echo offloaded web started && exec httpd -f -p 8080 -h /www";
const SERVE_ROME: &str = "mkdir -p /www && echo hello-from-rome > /www/index.html && \
                          exec httpd -f -p 8080 -h /www";

/// The pod's IP once it is Running.
async fn running_ip(pods: &Api<Pod>, name: &str) -> Option<String> {
    let status = pods.get_opt(name).await.ok().flatten()?.status?;
    (status.phase.as_deref() == Some("Running"))
        .then_some(status.pod_ip)
        .flatten()
}
