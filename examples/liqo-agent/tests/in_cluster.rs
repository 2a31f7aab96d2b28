//! liqo-rs installed the way a user installs it: the agent's image (this build's `liqo-agent`
//! with `nft` and `ip`), imported into a real node's containerd, and everything in `deploy/`
//! applied as `kubectl apply -k deploy/` would, with only the config a user edits changed. The
//! agent then runs as a pod on a real kubelet: its probes, read-only root filesystem and dropped
//! capabilities are the real ones.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams};
use liqo_lab::{ClusterSpec, ImageSpec, Lab, LabSpec, WorkerSpec, write_oci_archive};

type Error = Box<dyn std::error::Error + Send + Sync>;

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

/// What a user edits before applying: the config's cluster name, CIDRs and addresses, and the
/// image (here the lab's, which no registry serves).
fn edit(doc: &mut serde_json::Value, cluster: &liqo_lab::Cluster) -> Result<(), Error> {
    match (doc["kind"].as_str(), doc["metadata"]["name"].as_str()) {
        (Some("ConfigMap"), Some("liqo-agent-config")) => {
            let text = doc["data"]["agent.yaml"].as_str().ok_or("no agent.yaml")?;
            let mut cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)?;
            cfg["cluster"]["name"] = cluster.name().into();
            cfg["cluster"]["podCidr"] = cluster.pod_cidr().to_string().into();
            cfg["cluster"]["serviceCidr"] = cluster.service_cidr().to_string().into();
            cfg["peering"]["endpoint"] = "https://liqo-agent-peering.liqo-system.svc:443".into();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_installed_from_deploy_runs_on_a_real_node() -> Result<(), Error> {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let lab = Lab::start(LabSpec::new([ClusterSpec::new("home")
        .workers(1, WorkerSpec::default())
        .real_nodes(1)]))
    .await?;
    let cluster = lab.cluster("home").ok_or("no cluster")?;
    let archive = lab.root().join("images").join("liqo-agent.tar");
    write_oci_archive(&agent_image()?, &archive)?;
    lab.import_image("home", &archive).await?;

    let admin = cluster.client()?;
    for file in kustomization()? {
        for mut doc in liqo_lab::read_manifest(&deploy_dir().join(&file))? {
            edit(&mut doc, cluster)?;
            liqo_lab::apply_document(&admin, &doc, "liqo-install-test", false)
                .await
                .map_err(|e| format!("deploy/{file}: {e}"))?;
        }
    }

    let pods: Api<Pod> = Api::namespaced(admin.clone(), "liqo-system");
    let first = ready_agent(&pods, None).await?;
    let first_name = first.metadata.name.clone().unwrap_or_default();
    let node = first.spec.and_then(|s| s.node_name).unwrap_or_default();
    assert!(node.starts_with("home-node-"), "agent on {node}");
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
    let refused: Vec<&str> = logs
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");

    // Deleted, it comes back from its Deployment and is Ready again.
    pods.delete(&first_name, &DeleteParams::default()).await?;
    let second = ready_agent(&pods, Some(&first_name)).await?;
    assert_ne!(second.metadata.name, Some(first_name));

    lab.stop().await?;
    Ok(())
}
