//! Shared by the agent tests: installs what `deploy/` installs (the CRDs, the namespace, the
//! ServiceAccount with its least-privilege RBAC and the admission guard) as the admin, hands out
//! a kubeconfig for the agent's ServiceAccount, and finds the API server's refusals in an agent's
//! log (the agents log a refusal and retry, so a flow can end well while a step was refused).

pub mod dataplane;
pub mod scenario;
pub mod workload;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::{authorization::v1::ResourceAttributes, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Client;
use liqo_lab::Cluster;

/// The tests' error type.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long installing (and the authorizer and admission learning of it) may take.
const WAIT: Duration = Duration::from_secs(120);
const FIELD_MANAGER: &str = "liqo-agent-test";
/// The agent's ServiceAccount, as the API server names it.
const SA_USER: &str = "system:serviceaccount:liqo-system:liqo-agent";
/// Its groups but `system:authenticated`, which the API server adds itself.
const SA_GROUPS: [&str; 2] = [
    "system:serviceaccounts",
    "system:serviceaccounts:liqo-system",
];

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The documents of one manifest of `deploy/`, as JSON (comment-only documents skipped).
fn documents(file: &str) -> Result<Vec<serde_json::Value>, Error> {
    Ok(liqo_lab::read_manifest(&deploy_dir().join(file))?)
}

/// Server-side applies one document of `file` for real.
async fn apply_doc(client: &Client, file: &str, doc: &serde_json::Value) -> Result<(), Error> {
    liqo_lab::apply_document(client, doc, FIELD_MANAGER, false)
        .await
        .map_err(|e| format!("deploy/{file}: {e}"))?;
    Ok(())
}

/// One request per rule of `deploy/rbac.yaml` (its first verb, group, resource and name), in the
/// rule's namespace for a Role.
fn one_request_per_rule() -> Result<Vec<ResourceAttributes>, Error> {
    let first = |rule: &serde_json::Value, field: &str| -> Option<String> {
        rule[field].as_array()?.first()?.as_str().map(str::to_owned)
    };
    let mut out = vec![];
    for doc in documents("rbac.yaml")? {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind != "ClusterRole" && kind != "Role" {
            continue;
        }
        let namespace = doc["metadata"]["namespace"].as_str().map(str::to_owned);
        let role = doc["metadata"]["name"].as_str().unwrap_or_default();
        for rule in doc["rules"].as_array().into_iter().flatten() {
            let (Some(verb), Some(group), Some(resource)) = (
                first(rule, "verbs"),
                first(rule, "apiGroups"),
                first(rule, "resources"),
            ) else {
                return Err(
                    format!("deploy/rbac.yaml: {kind} {role}: incomplete rule {rule}").into(),
                );
            };
            let (resource, subresource) = match resource.split_once('/') {
                Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
                None => (resource, None),
            };
            out.push(ResourceAttributes {
                verb: Some(verb),
                group: Some(group),
                resource: Some(resource),
                subresource,
                name: first(rule, "resourceNames"),
                namespace: namespace.clone(),
                ..ResourceAttributes::default()
            });
        }
    }
    Ok(out)
}

/// Waits until the admission guard (guard.yaml) is in force: it refuses the ServiceAccount a
/// Secret in kube-system (dry run).
async fn wait_for_guard(sa: &Client) -> Result<(), Error> {
    let probe = Secret {
        metadata: ObjectMeta {
            name: Some("liqo-guard-probe".into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    let refusal = liqo_lab::wait_until_refused(sa, "kube-system", &probe, WAIT).await?;
    if !refusal.message.contains("liqo-agent-guard") {
        return Err(
            format!("a Secret in kube-system was refused, not by the guard: {refusal:?}").into(),
        );
    }
    Ok(())
}

/// On `cluster`, as the admin: installs the liqo CRDs (the agents run with `installCrds: false`,
/// as `deploy/config.yaml` does) and applies `deploy/namespace.yaml`, `deploy/rbac.yaml` and
/// `deploy/guard.yaml`; waits until the authorizer grants every rule of the RBAC and the guard is
/// in force; returns a kubeconfig for the agent's ServiceAccount.
pub async fn install_deploy(cluster: &Cluster) -> Result<PathBuf, Error> {
    let admin = cluster.client()?;
    liqo_core::crds::install(&admin, &[liqo_vk::shadow::shadow_pod_crd()], FIELD_MANAGER).await?;
    for file in ["namespace.yaml", "rbac.yaml", "guard.yaml"] {
        for doc in documents(file)? {
            apply_doc(&admin, file, &doc).await?;
        }
    }
    let sa = cluster.user_client(SA_USER, &SA_GROUPS).await?;
    for attrs in one_request_per_rule()? {
        liqo_lab::wait_until_allowed(&sa, &attrs, WAIT).await?;
    }
    wait_for_guard(&sa).await?;
    Ok(cluster.user_kubeconfig(SA_USER, &SA_GROUPS)?)
}

/// SIGTERM to both agents: each must exit 0, and the API server must have refused none of their
/// requests (the agents log a refusal and retry, so a flow can end well while one of its steps,
/// a status update or a cleanup, was refused).
pub async fn stop_cleanly(consumer: Agent, provider: Agent) -> Result<(), Error> {
    let logs = [consumer.log.clone(), provider.log.clone()];
    assert_eq!(consumer.terminate().await?, 0, "consumer exit code");
    assert_eq!(provider.terminate().await?, 0, "provider exit code");
    let refused: Vec<String> = logs.iter().flat_map(|l| refusals(l)).collect();
    assert!(
        refused.is_empty(),
        "the agents (ServiceAccount liqo-system/liqo-agent) were refused by the API server:\n{}",
        refused.join("\n")
    );
    Ok(())
}

/// The lines of an agent's log that report a refusal by the API server (RBAC's 403 or the
/// guard's denial).
pub fn refusals(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .map(str::to_owned)
        .collect()
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One liqo-agent process; killed if the test ends without stopping it.
pub struct Agent {
    child: tokio::process::Child,
    /// The address of its /metrics, /healthz and /readyz.
    pub metrics: String,
    /// Its log (JSON lines).
    pub log: PathBuf,
}

impl Agent {
    /// Runs the agent with `config` and `args`, its log in `log`, serving metrics on `metrics`
    /// (which `config` or `args` must make it listen on).
    pub fn spawn(
        config: &Path,
        args: &[String],
        metrics: String,
        log: PathBuf,
        rust_log: &str,
    ) -> Result<Self, Error> {
        Self::spawn_with_env(config, args, metrics, log, rust_log, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables.
    pub fn spawn_with_env(
        config: &Path,
        args: &[String],
        metrics: String,
        log: PathBuf,
        rust_log: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self, Error> {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_liqo-agent"))
            .envs(env.iter().copied())
            .arg("--config")
            .arg(config)
            .args(args)
            .arg("--log-format")
            .arg("json")
            .env("RUST_LOG", rust_log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            child,
            metrics,
            log,
        })
    }

    /// The refusals the agent logged (all of them), then the last lines of its log.
    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let refused = refusals(&self.log);
        format!(
            "refusals: {}\n{}",
            if refused.is_empty() {
                "none".to_owned()
            } else {
                refused.join("\n")
            },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// SIGKILL, as a crash: the agent cleans nothing up.
    // Only the restart test crashes agents; each test binary compiles this module.
    #[allow(dead_code)]
    pub async fn kill(mut self) -> Result<(), Error> {
        self.child.kill().await?;
        Ok(())
    }

    /// Sends SIGTERM (to this child, by pid) and waits for the exit code.
    pub async fn terminate(mut self) -> Result<i32, Error> {
        let pid = self.child.id().ok_or("the agent already exited")?;
        let rc = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        assert!(rc.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(Duration::from_secs(45), self.child.wait())
            .await
            .map_err(|_| {
                format!(
                    "the agent did not exit within 45s after SIGTERM:\n{}",
                    self.logs()
                )
            })??;
        Ok(status.code().unwrap_or(-1))
    }
}

/// An error naming what failed, with every agent's refusals and last log lines.
pub fn failure(what: &str, agents: &[&Agent], detail: impl std::fmt::Display) -> Error {
    let logs: Vec<String> = agents.iter().map(|a| a.logs()).collect();
    format!("{what}: {detail}; agent logs:\n{}", logs.join("\n-----\n")).into()
}

/// GET over plain HTTP/1.0 on loopback: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Polls `f` every 300 ms for up to `wait` (for what cannot be watched: an HTTP endpoint, a
/// published ConfigMap's contents); fails at once if an agent was refused by the API server.
pub async fn until<F, Fut, T>(
    what: &str,
    agents: &[&Agent],
    wait: Duration,
    mut f: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        // A refusal fails the test anyway: stop waiting at the first one.
        if agents.iter().any(|a| !refusals(&a.log).is_empty()) {
            return Err(failure(
                what,
                agents,
                "an agent was refused by the API server",
            ));
        }
        if std::time::Instant::now() > deadline {
            return Err(failure(what, agents, format!("not within {wait:?}")));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
