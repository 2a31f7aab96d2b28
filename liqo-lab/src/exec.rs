//! Running a shell command in a pod's container through the API server and the kubelet, as
//! `kubectl exec` does (WebSocket): for tests on the lab's real nodes.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams};
use tokio::io::AsyncReadExt;

use crate::error::{LabError, Result};

/// Runs `sh -c script` in the first container of pod `name`; returns its stdout followed by its
/// stderr.
pub async fn exec_in_pod(pods: &Api<Pod>, name: &str, script: &str) -> Result<String> {
    let fail = |message: String| LabError::Exec {
        pod: name.to_owned(),
        script: script.to_owned(),
        message,
    };
    let mut attached = pods
        .exec(
            name,
            ["sh", "-c", script],
            &AttachParams::default().stderr(true).stdout(true),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut out = String::new();
    if let Some(mut s) = attached.stdout() {
        s.read_to_string(&mut out)
            .await
            .map_err(|e| fail(format!("reading stdout: {e}")))?;
    }
    if let Some(mut s) = attached.stderr() {
        s.read_to_string(&mut out)
            .await
            .map_err(|e| fail(format!("reading stderr: {e}")))?;
    }
    attached
        .join()
        .await
        .map_err(|e| fail(format!("ending the session: {e}")))?;
    Ok(out)
}

/// Runs [`exec_in_pod`] again until its output contains `want` or `wait` has passed (a new
/// Service or route takes a moment to be programmed); the error shows the last output or failure.
pub async fn exec_in_pod_until(
    pods: &Api<Pod>,
    name: &str,
    script: &str,
    want: &str,
    wait: Duration,
) -> Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        let last = match exec_in_pod(pods, name, script).await {
            Ok(out) if out.contains(want) => return Ok(out),
            Ok(out) => format!("last output {out:?}"),
            Err(e) => format!("last attempt failed: {e}"),
        };
        if Instant::now() > deadline {
            return Err(LabError::Exec {
                pod: name.to_owned(),
                script: script.to_owned(),
                message: format!("never printed {want:?} within {wait:?}; {last}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
