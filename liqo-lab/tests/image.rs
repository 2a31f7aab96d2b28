//! Images written by `liqo_lab::write_oci_archive` against a real containerd: each test starts
//! its own `containerd` (config, root, state, socket and runc root in a temporary directory),
//! imports an archive with `ctr images import` and runs it with `ctr run`. Needs root and the
//! Debian packages `containerd`, `runc` and `busybox-static`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use liqo_lab::{ImageDigests, ImageSpec, busybox_image, pause_image, write_oci_archive};

type Error = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), Error>;

/// The namespace kubelets' containerd uses (CRI); the test uses it too.
const NAMESPACE: &str = "k8s.io";
/// How long containerd may take to answer, and any one `ctr` command to finish.
const DEADLINE: Duration = Duration::from_secs(120);

/// A containerd of its own, killed and removed (with its directory) when dropped, pass or fail.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    snapshotter: String,
}

impl Containerd {
    /// Starts containerd in a fresh temporary directory and waits until it answers.
    fn start(test: &str) -> Result<Self, Error> {
        require_root()?;
        for (command, package) in [
            ("containerd", "containerd"),
            ("ctr", "containerd"),
            ("runc", "runc"),
        ] {
            if !on_path(command) {
                return Err(format!(
                    "`{command}` is not on PATH: install the Debian package {package}"
                )
                .into());
            }
        }
        let dir = std::env::temp_dir().join(format!("liqo-lab-ctrd-{test}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        // From here on, dropping the guard removes the directory.
        let mut containerd = Self {
            socket: dir.join("containerd.sock"),
            dir,
            child: None,
            snapshotter: String::new(),
        };
        let d = containerd.dir.display();
        // Only ctr talks to it: no CRI. `opt` would otherwise be /opt/containerd.
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        let config_path = containerd.dir.join("config.toml");
        fs::write(&config_path, config)?;
        let log = fs::File::create(containerd.dir.join("containerd.log"))?;
        // setpriv --pdeathsig: containerd dies with the test even if the test is killed.
        let mut command = if on_path("setpriv") {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "containerd"]);
            c
        } else {
            Command::new("containerd")
        };
        containerd.child = Some(
            command
                .arg("--config")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        containerd.wait_ready()?;
        containerd.snapshotter = containerd.pick_snapshotter()?;
        eprintln!(
            "containerd up in {}, snapshotter {}",
            containerd.dir.display(),
            containerd.snapshotter
        );
        Ok(containerd)
    }

    /// Polls `ctr version` until the server answers, failing early if containerd exits.
    fn wait_ready(&mut self) -> TestResult {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(format!(
                    "containerd exited ({status}) before answering; log:\n{}",
                    self.log_tail()
                )
                .into());
            }
            let out = self.ctr_global(&["version"])?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Server:") {
                eprintln!("containerd answered after {:.1?}", started.elapsed());
                return Ok(());
            }
            if started.elapsed() > DEADLINE {
                return Err(format!(
                    "containerd did not answer on {} within {DEADLINE:?} (last: {}); log:\n{}",
                    self.socket.display(),
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log_tail()
                )
                .into());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// overlayfs (containerd's default) if its plugin loaded on this file system, else native.
    fn pick_snapshotter(&self) -> Result<String, Error> {
        let plugins = self.ok(&["plugins", "ls"])?;
        let status = |name: &str| {
            plugins
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| {
                    f.first() == Some(&"io.containerd.snapshotter.v1") && f.get(1) == Some(&name)
                })
                .and_then(|f| f.get(3).map(|s| s.to_string()))
        };
        for name in ["overlayfs", "native"] {
            if status(name).as_deref() == Some("ok") {
                return Ok(name.to_owned());
            }
        }
        Err(format!("neither the overlayfs nor the native snapshotter loaded:\n{plugins}").into())
    }

    /// `ctr -a <socket> <args>` (no namespace), bounded by [`DEADLINE`].
    fn ctr_global(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("timeout")
            .args([
                "--kill-after=5",
                &DEADLINE.as_secs().to_string(),
                "ctr",
                "-a",
            ])
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// `ctr -a <socket> -n k8s.io <args>`, bounded by [`DEADLINE`].
    fn ctr(&self, args: &[&str]) -> std::io::Result<Output> {
        let mut all = vec!["-n", NAMESPACE];
        all.extend_from_slice(args);
        self.ctr_global(&all)
    }

    /// [`Self::ctr`], failing unless it succeeds; its standard output.
    fn ok(&self, args: &[&str]) -> Result<String, Error> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            return Err(format!(
                "ctr {} failed ({}): {}{}\ncontainerd log:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            )
            .into());
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `ctr run` with this containerd's snapshotter, runc state directory (rather than
    /// /run/containerd/runc) and FIFO directory (rather than /run/containerd/fifo).
    fn run(&self, args: &[&str]) -> Result<String, Error> {
        let runc_root = self.dir.join("runc").display().to_string();
        let fifo_dir = self.dir.join("fifo").display().to_string();
        let mut all = vec![
            "run",
            "--snapshotter",
            &self.snapshotter,
            "--runc-root",
            &runc_root,
            "--fifo-dir",
            &fifo_dir,
        ];
        all.extend_from_slice(args);
        self.ok(&all)
    }

    /// Writes `spec` into the directory and imports it; checks `ctr images ls` lists it.
    fn import(&self, spec: &ImageSpec) -> Result<ImageDigests, Error> {
        let archive = self
            .dir
            .join(format!("{}.tar", spec.name().replace(['/', ':'], "_")));
        let digests = write_oci_archive(spec, &archive)?;
        let archive = archive.display().to_string();
        let imported = self.ok(&[
            "images",
            "import",
            "--snapshotter",
            &self.snapshotter,
            &archive,
        ])?;
        eprintln!("imported {}: {}", spec.name(), imported.trim());

        // REF TYPE DIGEST SIZE PLATFORMS LABELS
        let list = self.ok(&["images", "ls"])?;
        let row = list
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&spec.name()))
            .ok_or_else(|| format!("{} is not listed by ctr images ls:\n{list}", spec.name()))?;
        assert_eq!(row.get(1), Some(&liqo_lab::MEDIA_TYPE_MANIFEST), "{list}");
        assert_eq!(row.get(2), Some(&digests.manifest.as_str()), "{list}");
        let platform = format!("linux/{}", spec.architecture_name());
        assert!(row.contains(&platform.as_str()), "{list}");
        // REF TYPE DIGEST STATUS SIZE UNPACKED: every blob present, unpacked into the snapshotter.
        let check = self.ok(&["images", "check"])?;
        let line = check
            .lines()
            .find(|l| l.starts_with(spec.name()))
            .ok_or_else(|| format!("{} missing from ctr images check:\n{check}", spec.name()))?;
        assert!(line.contains(" complete "), "{check}");
        assert_eq!(line.split_whitespace().last(), Some("true"), "{check}");
        Ok(digests)
    }

    /// The line of `ctr task ls` (TASK PID STATUS) for `id`.
    fn task(&self, id: &str) -> Result<Option<(u32, String)>, Error> {
        let list = self.ok(&["task", "ls"])?;
        for line in list.lines().skip(1) {
            let f: Vec<_> = line.split_whitespace().collect();
            if f.first() == Some(&id) {
                let pid = f.get(1).ok_or("no pid")?.parse()?;
                return Ok(Some((pid, f.get(2).ok_or("no status")?.to_string())));
            }
        }
        Ok(None)
    }

    /// Polls `ctr task ls` until `id` has `status`.
    fn wait_task(&self, id: &str, status: &str) -> Result<u32, Error> {
        let started = Instant::now();
        loop {
            let task = self.task(id)?;
            if let Some((pid, s)) = &task
                && s == status
            {
                return Ok(*pid);
            }
            if started.elapsed() > DEADLINE {
                return Err(
                    format!("task {id} is {task:?}, not {status}, after {DEADLINE:?}").into(),
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn containers(&self) -> Result<String, Error> {
        self.ok(&["containers", "ls", "-q"])
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks left by a failed test: their shims outlive containerd, so kill them first.
        if let Ok(out) = self.ctr(&["task", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
                let _ = self.wait_task(id, "STOPPED");
                let _ = self.ctr(&["task", "rm", "-f", id]);
            }
        }
        if let Ok(out) = self.ctr(&["containers", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr(&["containers", "rm", id]);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Mounts a killed shim may have left (container rootfs) would make the removal fail.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.display().to_string();
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            let _ = Command::new("umount").args(["-l", mount]).status();
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

fn require_root() -> TestResult {
    let status = fs::read_to_string("/proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or("no Uid line in /proc/self/status")?;
    if euid != "0" {
        return Err(format!(
            "this test runs containerd and runc and must run as root (effective uid {euid})"
        )
        .into());
    }
    Ok(())
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
        .unwrap_or(false)
}

/// A container id of this test process (runc state is per id).
fn container_id(what: &str) -> String {
    format!("liqo-lab-image-{what}-{}", std::process::id())
}

#[test]
fn busybox_image_imports_and_runs_in_containerd() -> TestResult {
    let containerd = Containerd::start("busybox")?;
    let spec = busybox_image("liqo.lab/busybox:local")?;
    containerd.import(&spec)?;

    let run = |id: &str, args: &[&str]| {
        let mut all = vec!["--rm", spec.name(), id];
        all.extend_from_slice(args);
        containerd.run(&all)
    };
    let echo = run(&container_id("echo"), &["/bin/echo", "hello"])?;
    assert_eq!(echo, "hello\n");

    // The image's files as a process inside sees them: users, /tmp, PATH lookups of applets.
    let script = "id -un; ls -ld /tmp | cut -c1-10; grep -c . /etc/passwd; echo $PATH; \
                  readlink /bin/wget; uname -s";
    let out = run(&container_id("sh"), &["sh", "-c", script])?;
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "root",
            "drwxrwxrwt",
            "2",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "busybox",
            "Linux",
        ],
        "{out}"
    );
    assert_eq!(containerd.containers()?.trim(), "", "--rm left a container");
    Ok(())
}

#[test]
fn pause_image_runs_until_killed() -> TestResult {
    let containerd = Containerd::start("pause")?;
    let spec = pause_image("liqo.lab/pause:local")?;
    containerd.import(&spec)?;

    let id = container_id("sandbox");
    containerd.run(&["-d", spec.name(), &id])?;
    let pid = containerd.wait_task(&id, "RUNNING")?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))?;
    assert_eq!(
        cmdline, b"/bin/sleep\0infinity\0",
        "process {pid} of the sandbox"
    );

    containerd.ok(&["task", "kill", "-s", "SIGKILL", &id])?;
    containerd.wait_task(&id, "STOPPED")?;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is gone"
    );
    containerd.ok(&["task", "rm", &id])?;
    assert_eq!(containerd.task(&id)?, None);
    containerd.ok(&["containers", "rm", &id])?;
    assert_eq!(containerd.containers()?.trim(), "");
    Ok(())
}
