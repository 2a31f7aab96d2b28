//! Starting and stopping separate small labs: nothing may be left behind, whether the lab is
//! stopped, dropped, or its process is killed.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use liqo_lab::{ClusterSpec, Component, Lab, LabSpec, ProcessToken, WorkerSpec};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const CHILD_ENV: &str = "LIQO_LAB_TEST_CHILD";

fn small_spec(name: &str) -> LabSpec {
    LabSpec::new([ClusterSpec::new(name).workers(1, WorkerSpec::default())])
}

fn reservation_file(port: u16) -> PathBuf {
    std::env::temp_dir()
        .join("liqo-lab-ports")
        .join(port.to_string())
}

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn stop_leaves_no_process_and_no_directory() -> TestResult {
    let started = Instant::now();
    let lab = Lab::start(small_spec("solo")).await?;
    eprintln!("1-cluster lab started in {:.1?}", started.elapsed());
    let c = lab.cluster("solo").ok_or("no cluster")?;
    let root = lab.root().to_owned();
    assert!(root.join("lab.json").exists());
    assert!(c.log_path(Component::ApiServer).exists());
    assert!(lab.etcd_log_path().exists());

    let rss_kib: u64 = lab
        .processes()
        .iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum();
    eprintln!(
        "RSS of the 1-cluster lab (etcd + 4 components): {} MiB",
        rss_kib / 1024
    );

    // Cutting the API server off and bringing it back.
    let old_pid = c.pid(Component::ApiServer).ok_or("no apiserver pid")?;
    c.stop_component(Component::ApiServer).await?;
    assert_eq!(c.pid(Component::ApiServer), None);
    assert!(!proc_exists(old_pid));
    assert!(!c.is_ready().await);
    c.stop_component(Component::ApiServer).await?; // idempotent
    c.start_component(Component::ApiServer).await?;
    assert!(c.is_ready().await);
    assert!(matches!(
        c.start_component(Component::ApiServer).await,
        Err(liqo_lab::LabError::AlreadyRunning { .. })
    ));

    let processes = lab.processes();
    assert_eq!(processes.len(), 5, "{processes:?}");
    let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
    assert!(pids.iter().all(|p| proc_exists(*p)));
    let api_reservation = reservation_file(c.api_port());
    assert!(api_reservation.exists());

    lab.stop().await?;
    for pid in &pids {
        assert!(!proc_exists(*pid), "pid {pid} still exists");
    }
    assert!(!root.exists(), "{} still exists", root.display());
    assert!(!api_reservation.exists(), "port reservation kept");
    Ok(())
}

#[tokio::test]
async fn dropping_an_attached_lab_kills_it() -> TestResult {
    let lab = Lab::start(small_spec("dropped")).await?;
    let root = lab.root().to_owned();
    let pids: Vec<u32> = lab.processes().iter().map(|p| p.pid).collect();
    assert_eq!(pids.len(), 5);
    drop(lab);
    for pid in &pids {
        assert!(!proc_exists(*pid), "pid {pid} still exists");
    }
    assert!(!root.exists());
    Ok(())
}

/// Not a test on its own: the body of [`a_killed_process_takes_its_lab_along`]'s child process.
#[tokio::test]
async fn child_process_helper() -> TestResult {
    if std::env::var_os(CHILD_ENV).is_none() {
        return Ok(());
    }
    let lab = Lab::start(small_spec("orphan")).await?;
    let pids: Vec<String> = lab.processes().iter().map(|p| p.pid.to_string()).collect();
    let port = lab.clusters()[0].api_port();
    println!("\nLAB {} {port} {}", lab.root().display(), pids.join(","));
    tokio::time::sleep(Duration::from_secs(600)).await;
    Ok(())
}

#[test]
fn a_killed_process_takes_its_lab_along() -> TestResult {
    if std::env::var_os(CHILD_ENV).is_some() {
        return Ok(());
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "child_process_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test <name> ... " without a newline before the test's own output.
            if let Some((_, rest)) = line.split_once("LAB ") {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(line) => line,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the child never reported its lab: {e}").into());
        }
    };
    let mut parts = line.split(' ');
    let root = PathBuf::from(parts.next().ok_or("no root")?);
    let port: u16 = parts.next().ok_or("no port")?.parse()?;
    let pids: Vec<u32> = parts
        .next()
        .ok_or("no pids")?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert_eq!(pids.len(), 5);
    let tokens: Vec<ProcessToken> = pids.iter().filter_map(|p| ProcessToken::of(*p)).collect();
    assert_eq!(tokens.len(), 5, "all components run before the kill");
    assert!(root.exists() && reservation_file(port).exists());

    child.kill()?; // SIGKILL: no destructor, no clean-up code runs in the child.
    child.wait()?;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive: Vec<_> = tokens.iter().filter(|t| t.is_alive()).collect();
        let left = root.exists() || reservation_file(port).exists();
        if alive.is_empty() && !left {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "20 s after SIGKILL: alive {alive:?}, root {} exists: {}, reservation exists: {}",
                root.display(),
                root.exists(),
                reservation_file(port).exists()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A copy of the real binaries' directory (symlinks) whose kube-apiserver is replaced by `script`.
async fn binaries_with_fake_apiserver(
    name: &str,
    script: &str,
) -> Result<PathBuf, liqo_lab::LabError> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let real = liqo_lab::locate_binaries(None).await?;
    let dir =
        std::env::temp_dir().join(format!("liqo-lab-fake-bins-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let io = |e: std::io::Error| liqo_lab::LabError::Binaries(e.to_string());
    std::fs::create_dir_all(&dir).map_err(io)?;
    for entry in [
        "etcd",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "kwok-stages",
    ] {
        symlink(real.dir.join(entry), dir.join(entry)).map_err(io)?;
    }
    let fake = dir.join("kube-apiserver");
    std::fs::write(&fake, format!("#!/bin/sh\n{script}\n")).map_err(io)?;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    Ok(dir)
}

#[tokio::test]
async fn a_crashing_component_is_reported_with_its_log() -> TestResult {
    let bins = binaries_with_fake_apiserver(
        "crash",
        "echo 'fake kube-apiserver: refusing to start' >&2; exit 7",
    )
    .await?;
    let err = Lab::start(small_spec("crashy").binaries(&bins))
        .await
        .err()
        .ok_or("the lab started with a broken API server")?;
    let message = err.to_string();
    eprintln!("reported: {message}");
    let liqo_lab::LabError::Exited(failure) = err else {
        return Err(format!("expected Exited, got {message}").into());
    };
    assert_eq!(failure.component, "kube-apiserver");
    assert_eq!(failure.owner, "cluster \"crashy\"");
    assert!(failure.reason.contains("exit status: 7"), "{message}");
    assert!(failure.tail.contains("refusing to start"), "{message}");
    assert!(
        message.contains(&failure.log.display().to_string()),
        "{message}"
    );
    // The failed start cleaned up after itself.
    let root = failure.log.ancestors().nth(3).ok_or("log path too short")?;
    assert!(!root.exists(), "{} left behind", root.display());
    let _ = std::fs::remove_dir_all(&bins);
    Ok(())
}

#[tokio::test]
async fn a_component_that_never_gets_ready_times_out() -> TestResult {
    let bins = binaries_with_fake_apiserver(
        "hang",
        "echo 'fake kube-apiserver: hanging'; exec sleep 600",
    )
    .await?;
    let spec = small_spec("hangs")
        .binaries(&bins)
        .ready_timeout(Duration::from_secs(3));
    let err = Lab::start(spec)
        .await
        .err()
        .ok_or("the lab started with a hanging API server")?;
    let message = err.to_string();
    eprintln!("reported: {message}");
    let liqo_lab::LabError::Timeout(failure) = err else {
        return Err(format!("expected Timeout, got {message}").into());
    };
    assert_eq!(failure.component, "kube-apiserver");
    assert!(failure.phase.contains("/readyz"), "{message}");
    assert!(failure.tail.contains("hanging"), "{message}");
    let _ = std::fs::remove_dir_all(&bins);
    Ok(())
}
