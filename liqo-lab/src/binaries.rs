//! Finding the etcd, Kubernetes and kwok binaries.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::error::{LabError, Result};

/// Environment variable naming a directory that holds the binaries.
pub const BIN_DIR_ENV: &str = "LIQO_LAB_BIN_DIR";
/// Environment variable naming the script that builds (once) and prints the binaries' directory.
pub const BINARIES_SCRIPT_ENV: &str = "LIQO_LAB_BINARIES_SCRIPT";

/// The programs a lab runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Binaries {
    /// The directory they are in.
    pub dir: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
    /// `kube-apiserver`.
    pub kube_apiserver: PathBuf,
    /// `kube-controller-manager`.
    pub kube_controller_manager: PathBuf,
    /// `kube-scheduler`.
    pub kube_scheduler: PathBuf,
    /// `kwok`.
    pub kwok: PathBuf,
    /// The kwok stage files (`kwok-stages/*.yaml`), passed to kwok with `--config`.
    pub kwok_stages: Vec<PathBuf>,
    /// `kubelet`, when the directory has it (real nodes need it).
    pub kubelet: Option<PathBuf>,
    /// `kube-proxy`, when the directory has it (real nodes need it).
    pub kube_proxy: Option<PathBuf>,
}

impl Binaries {
    /// Checks that `dir` holds the five binaries and a non-empty `kwok-stages/` folder.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir: PathBuf = dir.into();
        let bin = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if is_executable(&p) {
                Ok(p)
            } else {
                Err(LabError::Binaries(format!(
                    "{} is missing or not executable",
                    p.display()
                )))
            }
        };
        let stages_dir = dir.join("kwok-stages");
        let mut kwok_stages: Vec<PathBuf> = std::fs::read_dir(&stages_dir)
            .map_err(|e| {
                LabError::Binaries(format!(
                    "cannot read the kwok stages in {}: {e}",
                    stages_dir.display()
                ))
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        kwok_stages.sort();
        if kwok_stages.is_empty() {
            return Err(LabError::Binaries(format!(
                "no kwok stage files (*.yaml) in {}",
                stages_dir.display()
            )));
        }
        Ok(Self {
            etcd: bin("etcd")?,
            kube_apiserver: bin("kube-apiserver")?,
            kube_controller_manager: bin("kube-controller-manager")?,
            kube_scheduler: bin("kube-scheduler")?,
            kwok: bin("kwok")?,
            kwok_stages,
            kubelet: bin("kubelet").ok(),
            kube_proxy: bin("kube-proxy").ok(),
            dir,
        })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The default binaries script: `scripts/lab-binaries.sh` of the liqo-rs workspace this crate was
/// built from.
pub fn default_binaries_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("lab-binaries.sh")
}

/// Finds the binaries: `explicit` if given, else `$LIQO_LAB_BIN_DIR`, else the last line printed
/// by the binaries script (`$LIQO_LAB_BINARIES_SCRIPT`, default
/// [`default_binaries_script`]), which builds them the first time (slow) and answers at once
/// afterwards. The script's progress goes to `tracing` at info level.
pub async fn locate_binaries(explicit: Option<&Path>) -> Result<Binaries> {
    if let Some(dir) = explicit {
        return Binaries::in_dir(dir);
    }
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        return Binaries::in_dir(PathBuf::from(dir))
            .map_err(|e| LabError::Binaries(format!("{BIN_DIR_ENV} is set but unusable: {e}")));
    }
    let script = std::env::var_os(BINARIES_SCRIPT_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(default_binaries_script, PathBuf::from);
    let dir = run_script(&script).await?;
    Binaries::in_dir(dir)
}

async fn run_script(script: &Path) -> Result<PathBuf> {
    let shown = script.display().to_string();
    if !script.exists() {
        return Err(LabError::Binaries(format!(
            "the binaries script {shown} does not exist; set {BIN_DIR_ENV} to a directory with \
             etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and kwok-stages/, \
             or {BINARIES_SCRIPT_ENV} to the script"
        )));
    }
    let mut child = tokio::process::Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| LabError::Binaries(format!("running {shown}: {e}")))?;
    let stderr = child.stderr.take();
    let stdout = child.stdout.take();
    let log_task = async move {
        let mut last = VecDeque::new();
        if let Some(stderr) = stderr {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "liqo_lab::binaries", "{line}");
                if last.len() == 20 {
                    last.pop_front();
                }
                last.push_back(line);
            }
        }
        last
    };
    let out_task = async move {
        let mut out = String::new();
        if let Some(stdout) = stdout {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                out = line;
            }
        }
        out
    };
    let (last_err, last_out) = tokio::join!(log_task, out_task);
    let status = child
        .wait()
        .await
        .map_err(|e| LabError::Binaries(format!("waiting for {shown}: {e}")))?;
    let tail: Vec<String> = last_err.into_iter().collect();
    if !status.success() {
        return Err(LabError::Binaries(format!(
            "{shown} failed ({status}); its last output:\n{}",
            tail.join("\n")
        )));
    }
    let dir = last_out.trim();
    if dir.is_empty() {
        return Err(LabError::Binaries(format!(
            "{shown} printed no directory; its last output:\n{}",
            tail.join("\n")
        )));
    }
    Ok(PathBuf::from(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_dir_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("liqo-lab-bins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("kwok-stages")).expect("dir");
        let err = Binaries::in_dir(&dir).expect_err("empty dir");
        assert!(err.to_string().contains("kwok stage"), "{err}");
        std::fs::write(dir.join("kwok-stages/a.yaml"), "x").expect("write");
        let err = Binaries::in_dir(&dir).expect_err("no binaries");
        assert!(err.to_string().contains("etcd is missing"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
