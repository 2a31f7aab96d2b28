//! Real nodes: kubelet, containerd and kube-proxy in network namespaces of their own, running real
//! containers of the lab's busybox image. Needs root and the Debian packages containerd, runc,
//! containernetworking-plugins and busybox-static (scripts/test.sh installs them).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use liqo_lab::{
    BUSYBOX_IMAGE, ClusterSpec, Lab, LabSpec, REAL_NODE_LABEL, WorkerSpec, exec_in_pod_until,
};

type BoxResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(180);

fn pod(name: &str, node: &str, script: &str) -> BoxResult<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
                "ports": [{"containerPort": 8080}],
            }],
        }
    }))?)
}

async fn wait_running(pods: &Api<Pod>, name: &str) -> BoxResult<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let p = pods.get(name).await?;
        let status = p.status.unwrap_or_default();
        if let (Some("Running"), Some(ip)) = (status.phase.as_deref(), &status.pod_ip) {
            return Ok(ip.clone());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "pod {name} not Running within {WAIT:?}: phase {:?}, conditions {:?}",
                status.phase, status.conditions
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn leftovers(root: &Path, netns_prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let r = format!("{}/", root.display());
    if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
        out.extend(
            m.lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&r))
                .map(|p| format!("mount {p}")),
        );
    }
    if let Ok(d) = std::fs::read_dir("/run/netns") {
        out.extend(
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(netns_prefix))
                .map(|n| format!("netns {n}")),
        );
    }
    // Each node's cgroup is named like its namespace, in every hierarchy.
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.filter_map(|e| e.ok()) {
            if let Ok(d) = std::fs::read_dir(h.path()) {
                out.extend(
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().starts_with(netns_prefix))
                        .map(|e| format!("cgroup {}", e.path().display())),
                );
            }
        }
    }
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.filter_map(|e| e.ok()) {
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&r) && !cmd.contains("liqo-lab-watchdog") {
                    out.push(format!("process {cmd}"));
                }
            }
        }
    }
    out
}

const CHILD_ENV: &str = "LIQO_LAB_REAL_NODES_CHILD";

/// Not a test on its own: the body of [`a_killed_owner_takes_its_nodes_and_containers_along`]'s
/// child process, which starts a lab with a real node and a running container, then waits to be
/// killed.
#[tokio::test]
async fn child_process_helper() -> BoxResult {
    if std::env::var_os(CHILD_ENV).is_none() {
        return Ok(());
    }
    let lab = Lab::start(LabSpec::new([ClusterSpec::new("orphan")
        .workers(0, WorkerSpec::default())
        .real_nodes(1)]))
    .await?;
    let node = lab.real_nodes().remove(0);
    let pods: Api<Pod> = Api::namespaced(
        lab.cluster("orphan").ok_or("no cluster")?.client()?,
        "default",
    );
    pods.create(
        &PostParams::default(),
        &pod("sleeper", &node.name, "exec sleep 100000")?,
    )
    .await?;
    wait_running(&pods, "sleeper").await?;
    let prefix = node.netns.trim_end_matches(&node.name).to_owned();
    println!("\nLAB {} {prefix}", lab.root().display());
    tokio::time::sleep(Duration::from_secs(600)).await;
    Ok(())
}

/// kill -9 of the process that started a lab with real nodes: its watchdog removes the
/// containers (which outlive their kubelet and containerd), mounts, cgroups and namespaces.
#[test]
fn a_killed_owner_takes_its_nodes_and_containers_along() -> BoxResult {
    use std::io::BufRead;
    if std::env::var_os(CHILD_ENV).is_some() {
        return Ok(());
    }
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "child_process_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, rest)) = line.split_once("LAB ") {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(400)) {
        Ok(l) => l,
        Err(e) => {
            let _ = child.kill();
            return Err(format!("the child never reported its lab: {e}").into());
        }
    };
    let (root, prefix) = line.split_once(' ').ok_or("bad LAB line")?;
    let root = std::path::PathBuf::from(root);
    assert!(
        !leftovers(&root, prefix).is_empty(),
        "the running lab shows nothing to clean up: the check below could not fail"
    );
    child.kill()?;
    child.wait()?;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = leftovers(&root, prefix);
        if left.is_empty() && !root.exists() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "left behind after kill -9: {left:#?} (root exists: {})",
                root.exists()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_containers_run_talk_and_leave_nothing_behind() -> BoxResult {
    if std::env::var_os(CHILD_ENV).is_some() {
        return Ok(());
    }
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let lab = Lab::start(LabSpec::new([ClusterSpec::new("rn")
        .workers(1, WorkerSpec::default())
        .real_nodes(2)]))
    .await?;
    let root = lab.root().to_owned();
    let nodes = lab.real_nodes();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let netns_prefix = nodes[0].netns.trim_end_matches(&nodes[0].name).to_owned();
    let cluster = lab.cluster("rn").ok_or("no cluster")?;
    let client = cluster.client()?;

    // Both real nodes registered with their lab address and pod CIDR, beside the kwok worker.
    let node_api: Api<Node> = Api::all(client.clone());
    for n in &nodes {
        let node = node_api.get(&n.name).await?;
        let labels = node.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get(REAL_NODE_LABEL).map(String::as_str),
            Some("true")
        );
        let spec = node.spec.unwrap_or_default();
        assert_eq!(spec.pod_cidr, Some(n.pod_cidr.to_string()));
        let addrs = node
            .status
            .unwrap_or_default()
            .addresses
            .unwrap_or_default();
        assert!(
            addrs
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == n.ip.to_string()),
            "{} addresses {addrs:?}",
            n.name
        );
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let web_script = "mkdir -p /www && echo hello-from-a-real-node > /www/index.html && \
                      echo web started && exec httpd -f -v -p 8080 -h /www";
    pods.create(
        &PostParams::default(),
        &pod("web", &nodes[0].name, web_script)?,
    )
    .await?;
    pods.create(
        &PostParams::default(),
        &pod(
            "client",
            &nodes[1].name,
            "echo client started; exec sleep 100000",
        )?,
    )
    .await?;
    let web_ip = wait_running(&pods, "web").await?;
    wait_running(&pods, "client").await?;
    assert!(
        nodes[0]
            .pod_cidr
            .contains(&web_ip.parse::<std::net::IpAddr>()?)
    );

    // Logs, through the API server's egress proxy and the kubelet (`kubectl logs`).
    let logs = pods.logs("web", &LogParams::default()).await?;
    assert!(logs.contains("web started"), "logs of web: {logs:?}");

    // Pod to pod across nodes, with the pods' own addresses (no NAT between nodes).
    let out = exec_in_pod_until(
        &pods,
        "client",
        &format!("wget -qO- http://{web_ip}:8080/"),
        "hello-from-a-real-node",
        WAIT,
    )
    .await?;
    assert!(out.contains("hello-from-a-real-node"));
    let client_ip = pods
        .get("client")
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .ok_or("no ip")?;
    let mut follow = pods
        .log_stream(
            "web",
            &LogParams {
                follow: true,
                ..Default::default()
            },
        )
        .await?
        .lines();
    let deadline = Instant::now() + WAIT;
    loop {
        let line = tokio::time::timeout_at(deadline.into(), follow.try_next())
            .await
            .map_err(|_| "httpd never logged the client's address")??
            .ok_or("log stream ended")?;
        if line.contains(&client_ip) {
            break;
        }
    }

    // A ClusterIP Service, through kube-proxy on the client's node.
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))?;
    let svc = Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await?;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).ok_or("no cluster IP")?;
    exec_in_pod_until(
        &pods,
        "client",
        &format!("wget -qO- http://{cluster_ip}/"),
        "hello-from-a-real-node",
        WAIT,
    )
    .await?;

    // The `kubernetes` Service reaches the API server (plain HTTP to its TLS port is refused with
    // a 400 by the API server itself).
    exec_in_pod_until(
        &pods,
        "client",
        "wget -qO- http://kubernetes.default.svc:443/ 2>&1 || wget -qO- http://$KUBERNETES_SERVICE_HOST:443/ 2>&1",
        "400", WAIT)
    .await?;

    pods.delete("client", &DeleteParams::default()).await?;
    lab.stop().await?;
    let left = leftovers(&root, &netns_prefix);
    assert!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}
