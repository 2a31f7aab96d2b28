//! The `liqo-lab` command: up (detached), status, down.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn liqo_lab(state: &Path, args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_liqo-lab"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `liqo-lab down` when the test ends, whatever happened: detached labs outlive the test.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = liqo_lab(&self.0, &["down"]);
    }
}

#[test]
fn up_status_down() -> TestResult {
    let state = std::env::temp_dir().join(format!("liqo-lab-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());

    let status = liqo_lab(&state, &["status"])?;
    assert_eq!(status.status.code(), Some(1));
    assert!(text(&status.stdout).contains("no lab is up"));

    let up = liqo_lab(
        &state,
        &[
            "up",
            "--clusters",
            "2",
            "--workers",
            "1",
            "--name-prefix",
            "cli",
        ],
    )?;
    let out = text(&up.stdout);
    assert!(
        up.status.success(),
        "up failed: {}\n{}",
        out,
        text(&up.stderr)
    );
    let export = out
        .lines()
        .find_map(|l| l.strip_prefix("export KUBECONFIG="))
        .ok_or("no export line")?;
    let paths: Vec<&str> = export.split(':').collect();
    assert_eq!(paths.len(), 2, "{export}");
    assert!(paths.iter().all(|p| Path::new(p).exists()));
    assert!(out.contains("cli-1: https://127.0.0.1:") && out.contains("cli-2: https://127.0.0.1:"));

    // The processes outlived `up`.
    let status = liqo_lab(&state, &["status"])?;
    let table = text(&status.stdout);
    assert!(status.status.success(), "{table}\n{}", text(&status.stderr));
    for name in ["cli-1", "cli-2"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or(format!("no row for {name}: {table}"))?;
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[2..5], ["yes", "1", "4/4"], "{row}");
    }

    let again = liqo_lab(&state, &["up", "--clusters", "1"])?;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already up"),
        "{}",
        text(&again.stderr)
    );

    let down = liqo_lab(&state, &["down"])?;
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        text(&down.stdout).contains("stopped 9 process(es)"),
        "{}",
        text(&down.stdout)
    );
    assert!(!state.exists());

    let down = liqo_lab(&state, &["down"])?;
    assert!(down.status.success());
    assert!(text(&down.stdout).contains("no lab is up"));
    Ok(())
}

/// `up --dataplane` with explicit names, per-cluster pod CIDRs and small workers; `http` from a
/// pod's namespace; `status` shows the gateway; `down` removes every namespace.
#[tokio::test]
async fn up_dataplane_http_down() -> TestResult {
    use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};
    use kube::{
        Api,
        api::{ObjectMeta, PostParams},
        runtime::wait::await_condition,
    };

    let state = std::env::temp_dir().join(format!("liqo-lab-cli-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());

    let up = liqo_lab(
        &state,
        &[
            "up",
            "--names",
            "dpc",
            "--pod-cidrs",
            "10.246.0.0/16",
            "--workers",
            "1",
            "--worker-cpu",
            "2",
            "--worker-memory",
            "4Gi",
            "--dataplane",
        ],
    )?;
    let out = text(&up.stdout);
    assert!(
        up.status.success(),
        "up failed: {out}\n{}",
        text(&up.stderr)
    );
    assert!(out.contains("(pods 10.246.0.0/16"), "{out}");
    let gw_line = out
        .lines()
        .find(|l| l.starts_with("dpc: gateway netns /run/netns/liqo-"))
        .ok_or(format!("no gateway line: {out}"))?;
    assert!(gw_line.ends_with("wan 192.168.240.1/24"), "{gw_line}");
    let gw_path = gw_line
        .split_whitespace()
        .nth(3)
        .ok_or("no gateway path")?
        .to_owned();
    assert!(Path::new(&gw_path).exists(), "{gw_path}");

    let status = liqo_lab(&state, &["status", "-o", "json"])?;
    assert!(status.status.success(), "{}", text(&status.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(doc["dataplane"]["running"], true, "{doc}");
    assert_eq!(doc["clusters"][0]["gateway"]["netnsPath"], gw_path.as_str());
    let kubeconfig = doc["clusters"][0]["kubeconfig"]
        .as_str()
        .ok_or("no kubeconfig")?
        .to_owned();
    let id = doc["dataplane"]["id"].as_str().ok_or("no id")?.to_owned();

    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    config.proxy_url = None;
    let client = kube::Client::try_from(config)?;
    // Small workers, as asked.
    let node = Api::<Node>::all(client.clone()).get("dpc-worker-0").await?;
    let capacity = node
        .status
        .and_then(|s| s.capacity)
        .ok_or("no node capacity")?;
    assert_eq!(capacity.get("cpu").map(|q| q.0.as_str()), Some("2"));
    assert_eq!(capacity.get("memory").map(|q| q.0.as_str()), Some("4Gi"));

    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("echo".to_owned()),
            labels: Some([("lab.liqo.io/netns".to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "echo".to_owned(),
                image: Some("example.invalid/echo:1".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    pods.create(&PostParams::default(), &pod).await?;
    let has_ip = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.pod_ip.as_ref())
            .is_some()
    };
    let ready = tokio::time::timeout(
        std::time::Duration::from_secs(90),
        await_condition(pods.clone(), "echo", has_ip),
    )
    .await??
    .ok_or("pod gone")?;
    let pod_ip = ready.status.and_then(|s| s.pod_ip).ok_or("no pod IP")?;

    // The data plane makes the namespace right after the IP appears; give it a moment.
    let url = format!("http://{pod_ip}:8080/x");
    let mut answer = None;
    for _ in 0..40 {
        let o = liqo_lab(
            &state,
            &["http", "--cluster", "dpc", "--pod", "default/echo", &url],
        )?;
        if o.status.success() {
            answer = Some(text(&o.stdout));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let answer = answer.ok_or("liqo-lab http never succeeded")?;
    assert_eq!(
        answer.trim(),
        format!("pod=echo namespace=default cluster=dpc ip={pod_ip} client={pod_ip}")
    );
    let bad = liqo_lab(
        &state,
        &["http", "--cluster", "dpc", "--pod", "default/none", &url],
    )?;
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("no network namespace for pod default/none"),
        "{}",
        text(&bad.stderr)
    );

    let down = liqo_lab(&state, &["down"])?;
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        text(&down.stdout).contains("stopped 6 process(es)"),
        "{}",
        text(&down.stdout)
    );
    let left: Vec<String> = std::fs::read_dir("/run/netns")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("liqo-{id}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    Ok(())
}
