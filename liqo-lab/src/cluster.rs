//! One Kubernetes cluster of a lab.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt,
    fs::{self, OpenOptions},
    future::Future,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use k8s_openapi::{
    api::core::v1::{Node, NodeSpec, NodeStatus, ServiceAccount},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use kube::api::{Api, ListParams, PostParams};

use crate::{
    binaries::Binaries,
    error::{LabError, Result},
    kubeconfig::{KubeconfigSpec, client_config},
    net::{first_service_ip, node_pod_cidrs},
    pki::{CertifiedKey, ClusterPki, issue_client_cert},
    process::{CommandSpec, STOP_GRACE, Supervised},
    procfs::ProcessToken,
    spec::{ClusterSpec, Lifetime, WorkerSpec},
    state::StateFile,
};

/// Annotation that tells the lab's kwok to manage a node. Only the worker nodes the lab creates
/// carry it, so virtual nodes created later (by the SDK under test) are left alone.
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// Value of [`KWOK_NODE_ANNOTATION`] on the lab's workers.
pub const KWOK_NODE_ANNOTATION_VALUE: &str = "fake";
/// Label carrying the lab cluster's name on its worker nodes.
pub const LAB_CLUSTER_LABEL: &str = "liqo.io/lab-cluster";

/// File name of the API server's egress proxy socket in the cluster's directory.
const EGRESS_SOCKET: &str = "egress.sock";
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const POLL: Duration = Duration::from_millis(250);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A control-plane component of a lab cluster (etcd is shared by the whole lab and not one of
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// `kube-apiserver`.
    ApiServer,
    /// `kube-controller-manager`.
    ControllerManager,
    /// `kube-scheduler`.
    Scheduler,
    /// `kwok`, which plays the kubelet of the worker nodes.
    Kwok,
}

impl Component {
    /// Every component, in start order.
    pub const ALL: [Component; 4] = [
        Component::ApiServer,
        Component::ControllerManager,
        Component::Scheduler,
        Component::Kwok,
    ];

    /// The component's program name, e.g. `kube-apiserver`; also the stem of its log file.
    pub fn name(self) -> &'static str {
        match self {
            Component::ApiServer => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
            Component::Scheduler => "kube-scheduler",
            Component::Kwok => "kwok",
        }
    }

    /// The component with the given [`name`](Component::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    fn index(self) -> usize {
        match self {
            Component::ApiServer => 0,
            Component::ControllerManager => 1,
            Component::Scheduler => 2,
            Component::Kwok => 3,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One cluster of a running [`Lab`](crate::Lab).
///
/// It holds no Tokio-runtime-bound state: [`client`](Cluster::client) builds a fresh
/// [`kube::Client`] on the calling runtime each time, so a cluster of a lab shared by many
/// `#[tokio::test]`s (each with its own runtime) is safe to use from any of them.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    owner: String,
    dir: PathBuf,
    api_port: u16,
    api_url: String,
    pod_cidr: IpNet,
    service_cidr: IpNet,
    workers: Vec<WorkerSpec>,
    node_cidrs: Vec<IpNet>,
    real_node_cidrs: Vec<IpNet>,
    kubeconfig_path: PathBuf,
    admin_config: kube::Config,
    ca: CertifiedKey,
    lifetime: Lifetime,
    ready_timeout: Duration,
    components: [Supervised; 4],
    state: OnceLock<Arc<StateFile>>,
}

pub(crate) struct ClusterSetup<'a> {
    pub(crate) spec: &'a ClusterSpec,
    pub(crate) root: &'a Path,
    pub(crate) binaries: &'a Binaries,
    pub(crate) etcd_url: &'a str,
    pub(crate) api_port: u16,
    pub(crate) lifetime: Lifetime,
    pub(crate) ready_timeout: Duration,
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| LabError::io("creating", path, e))
}

/// Writes `contents` to `path` atomically (temporary file + rename) with the given mode.
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let tmp = path.with_extension(format!(
        "tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        LabError::io("writing", path, e)
    })
}

fn arg(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut s = OsString::from(format!("--{name}="));
    s.push(value.as_ref());
    s
}

fn sanitize(user: &str) -> String {
    user.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Cluster {
    /// Writes the cluster's PKI, kubeconfigs and directories; starts nothing.
    pub(crate) async fn prepare(setup: ClusterSetup<'_>) -> Result<Self> {
        let spec = setup.spec;
        let name = spec.name.clone();
        let owner = format!("cluster {name:?}");
        let dir = setup.root.join(&name);
        let pki_dir = dir.join("pki");
        let kc_dir = dir.join("kubeconfig");
        let log_dir = dir.join("logs");
        for d in [&dir, &pki_dir, &kc_dir, &log_dir, &dir.join("users")] {
            mkdir(d)?;
        }
        // Real nodes take the slices after the kwok workers' (the split does not depend on the
        // count while each node gets a /24).
        let mut node_cidrs = node_pod_cidrs(spec.pod_cidr, spec.workers.len() + spec.real_nodes)?;
        let real_node_cidrs = node_cidrs.split_off(spec.workers.len());
        let real = spec.real_nodes > 0;
        let mut sans = spec.extra_sans.clone();
        if real {
            sans.push(std::net::IpAddr::V4(crate::nodes::API_ADDRESS));
        }
        let pki = ClusterPki::generate(&name, first_service_ip(spec.service_cidr), &sans)?;
        let file = |n: &str| pki_dir.join(n);
        write_file(&file("ca.crt"), &pki.ca.cert_pem, 0o644)?;
        write_file(&file("ca.key"), &pki.ca.key_pem, 0o600)?;
        write_file(&file("apiserver.crt"), &pki.apiserver.cert_pem, 0o644)?;
        write_file(&file("apiserver.key"), &pki.apiserver.key_pem, 0o600)?;
        write_file(&file("sa.key"), &pki.sa_key_pem, 0o600)?;
        write_file(&file("sa.pub"), &pki.sa_pub_pem, 0o644)?;

        let api_url = format!("https://127.0.0.1:{}", setup.api_port);
        let write_kubeconfig =
            |path: &Path, context: &str, user: &str, creds: &CertifiedKey| -> Result<String> {
                let yaml = KubeconfigSpec {
                    context,
                    cluster: &name,
                    user,
                    server: &api_url,
                    ca_pem: &pki.ca.cert_pem,
                    credentials: creds,
                }
                .render(path)?;
                write_file(path, &yaml, 0o600)?;
                Ok(yaml)
            };

        let admin = issue_client_cert(&pki.ca, &owner, "liqo-lab-admin", &["system:masters"])?;
        let kubeconfig_path = dir.join("admin.kubeconfig");
        let admin_yaml =
            write_kubeconfig(&kubeconfig_path, &name, &format!("{name}-admin"), &admin)?;
        let admin_config = client_config(&admin_yaml, &kubeconfig_path).await?;

        let component_kubeconfig = |c: Component, cn: &str, groups: &[&str]| -> Result<PathBuf> {
            let creds = issue_client_cert(&pki.ca, &owner, cn, groups)?;
            let path = kc_dir.join(format!("{}.kubeconfig", c.name()));
            write_kubeconfig(&path, &name, c.name(), &creds)?;
            Ok(path)
        };
        let kcm_kc = component_kubeconfig(
            Component::ControllerManager,
            "system:kube-controller-manager",
            &[],
        )?;
        let sched_kc = component_kubeconfig(Component::Scheduler, "system:kube-scheduler", &[])?;
        let kwok_kc = component_kubeconfig(Component::Kwok, "liqo-lab-kwok", &["system:masters"])?;
        // With real nodes, the API server advertises the address the nodes reach it at (the
        // `kubernetes` Service's endpoint), and reaches kubelets and pods through the lab's egress
        // proxy, with a client certificate kubelets accept.
        let mut node_args = Vec::new();
        if real {
            let kubelet_client = issue_client_cert(
                &pki.ca,
                &owner,
                "kube-apiserver-kubelet-client",
                &["system:masters"],
            )?;
            write_file(&file("kubelet-client.crt"), &kubelet_client.cert_pem, 0o644)?;
            write_file(&file("kubelet-client.key"), &kubelet_client.key_pem, 0o600)?;
            let egress = dir.join("egress.yaml");
            write_file(
                &egress,
                &crate::nodes::config::egress_selector_yaml(&dir.join(EGRESS_SOCKET)),
                0o644,
            )?;
            node_args = vec![
                arg("advertise-address", crate::nodes::API_ADDRESS.to_string()),
                arg("endpoint-reconciler-type", "lease"),
                arg("egress-selector-config-file", &egress),
                arg("kubelet-client-certificate", file("kubelet-client.crt")),
                arg("kubelet-client-key", file("kubelet-client.key")),
                arg("kubelet-preferred-address-types", "InternalIP"),
            ];
        } else {
            node_args.extend([
                arg("advertise-address", "127.0.0.1"),
                arg("endpoint-reconciler-type", "none"),
            ]);
        }

        let bins = setup.binaries;
        let command = |c: Component, binary: &Path, args: Vec<OsString>| CommandSpec {
            owner: owner.clone(),
            component: c.name().to_owned(),
            binary: binary.to_owned(),
            args,
            log: log_dir.join(format!("{}.log", c.name())),
            workdir: dir.clone(),
        };
        let apiserver = command(
            Component::ApiServer,
            &bins.kube_apiserver,
            [
                arg("etcd-servers", setup.etcd_url),
                arg("etcd-prefix", format!("/{name}")),
                arg("bind-address", "127.0.0.1"),
                arg("secure-port", setup.api_port.to_string()),
                arg("cert-dir", &pki_dir),
                arg("tls-cert-file", file("apiserver.crt")),
                arg("tls-private-key-file", file("apiserver.key")),
                arg("client-ca-file", file("ca.crt")),
                arg("authorization-mode", "Node,RBAC"),
                arg("allow-privileged", "true"),
                arg(
                    "service-cluster-ip-range",
                    spec.service_cidr.trunc().to_string(),
                ),
                arg("service-account-issuer", SA_ISSUER),
                arg("service-account-key-file", file("sa.pub")),
                arg("service-account-signing-key-file", file("sa.key")),
                arg("profiling", "false"),
            ]
            .into_iter()
            .chain(node_args)
            .collect(),
        );
        let controller_manager = command(
            Component::ControllerManager,
            &bins.kube_controller_manager,
            vec![
                arg("kubeconfig", &kcm_kc),
                arg("leader-elect", "false"),
                arg("bind-address", "127.0.0.1"),
                arg("secure-port", "0"),
                arg("controllers", "*"),
                arg("cluster-name", &name),
                arg("service-account-private-key-file", file("sa.key")),
                arg("root-ca-file", file("ca.crt")),
                arg("cluster-signing-cert-file", file("ca.crt")),
                arg("cluster-signing-key-file", file("ca.key")),
                // Each controller acts as its own service account, bound by the bootstrap RBAC
                // roles (system:controller:*), as in kubeadm clusters.
                arg("use-service-account-credentials", "true"),
            ],
        );
        let scheduler = command(
            Component::Scheduler,
            &bins.kube_scheduler,
            vec![
                arg("kubeconfig", &sched_kc),
                arg("leader-elect", "false"),
                arg("bind-address", "127.0.0.1"),
                arg("secure-port", "0"),
            ],
        );
        let mut kwok_args = vec![arg("kubeconfig", &kwok_kc)];
        kwok_args.extend(bins.kwok_stages.iter().map(|s| arg("config", s)));
        kwok_args.extend([
            arg("manage-all-nodes", "false"),
            arg(
                "manage-nodes-with-annotation-selector",
                format!("{KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}"),
            ),
            arg("cidr", spec.pod_cidr.trunc().to_string()),
            arg("node-ip", "127.0.0.1"),
            arg("node-lease-duration-seconds", "40"),
        ]);
        let kwok = command(Component::Kwok, &bins.kwok, kwok_args);

        Ok(Self {
            owner,
            dir,
            api_port: setup.api_port,
            api_url,
            pod_cidr: spec.pod_cidr.trunc(),
            service_cidr: spec.service_cidr.trunc(),
            workers: spec.workers.clone(),
            node_cidrs,
            real_node_cidrs,
            kubeconfig_path,
            admin_config,
            ca: pki.ca,
            lifetime: setup.lifetime,
            ready_timeout: setup.ready_timeout,
            components: [
                Supervised::new(apiserver),
                Supervised::new(controller_manager),
                Supervised::new(scheduler),
                Supervised::new(kwok),
            ],
            state: OnceLock::new(),
            name,
        })
    }

    pub(crate) fn supervised(&self, c: Component) -> &Supervised {
        &self.components[c.index()]
    }

    pub(crate) fn attach_state(&self, state: Arc<StateFile>) {
        let _ = self.state.set(state);
    }

    /// Starts every component and waits until the cluster is usable: API server ready, the
    /// `default` service account of the `default` namespace created, every worker Ready and
    /// schedulable. `etcd` is watched for crashes meanwhile.
    pub(crate) async fn boot(&self, etcd: &Supervised) -> Result<()> {
        let started = Instant::now();
        self.supervised(Component::ApiServer)
            .start(self.lifetime)
            .await?;
        // Recorded at once, so that `down` can stop a lab whose start was interrupted.
        self.record_pids()?;
        self.wait_apiserver(&[etcd]).await?;
        tracing::info!(cluster = %self.name, elapsed = ?started.elapsed(), "API server ready");
        for c in [
            Component::ControllerManager,
            Component::Scheduler,
            Component::Kwok,
        ] {
            self.supervised(c).start(self.lifetime).await?;
        }
        self.record_pids()?;
        let client = quiet_client(&self.admin_config, &self.owner)?;
        self.create_workers(&client).await?;

        let all: Vec<&Supervised> = std::iter::once(etcd)
            .chain(self.components.iter())
            .collect();
        let sa_api: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        self.wait(
            Component::ControllerManager,
            "waiting for the default service account",
            &all,
            || async {
                match sa_api.get_opt("default").await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err("not created yet".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await?;
        let nodes: Api<Node> = Api::all(client);
        let selector = format!("{LAB_CLUSTER_LABEL}={}", self.name);
        let want = self.workers.len();
        self.wait(
            Component::Kwok,
            "waiting for the worker nodes to be Ready and schedulable",
            &all,
            || async {
                let list = nodes
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|e| e.to_string())?;
                let ready = list.items.iter().filter(|n| node_usable(n)).count();
                if ready >= want {
                    Ok(())
                } else {
                    Err(format!("{ready}/{want} workers Ready and untainted"))
                }
            },
        )
        .await?;
        tracing::info!(cluster = %self.name, elapsed = ?started.elapsed(), "cluster ready");
        Ok(())
    }

    async fn wait_apiserver(&self, also_watch: &[&Supervised]) -> Result<()> {
        let client = quiet_client(&self.admin_config, &self.owner)?;
        let mut watched: Vec<&Supervised> = also_watch.to_vec();
        watched.push(self.supervised(Component::ApiServer));
        self.wait(
            Component::ApiServer,
            "waiting for /readyz",
            &watched,
            || readyz(&client),
        )
        .await
    }

    /// Polls `check` until it succeeds, failing early if a watched process exits.
    async fn wait<F, Fut>(
        &self,
        component: Component,
        phase: &str,
        watched: &[&Supervised],
        mut check: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            for s in watched {
                s.ensure_running(&format!("{phase} ({})", self.owner))?;
            }
            let last = match tokio::time::timeout(ATTEMPT_TIMEOUT, check()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            };
            if Instant::now() >= deadline {
                return Err(self.supervised(component).spec.timeout(
                    phase,
                    self.ready_timeout,
                    last,
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn create_workers(&self, client: &kube::Client) -> Result<()> {
        let api: Api<Node> = Api::all(client.clone());
        for (i, (size, cidr)) in self.workers.iter().zip(&self.node_cidrs).enumerate() {
            let node = self.worker_node(i, size, *cidr);
            let name = node.metadata.name.clone().unwrap_or_default();
            match api.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(source) => {
                    return Err(LabError::Kube {
                        owner: self.owner.clone(),
                        action: format!("creating worker node {name}"),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn worker_node(&self, i: usize, size: &WorkerSpec, cidr: IpNet) -> Node {
        let name = format!("{}-worker-{i}", self.name);
        let labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_owned(), name.clone()),
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
            ("type".to_owned(), "kwok".to_owned()),
            (LAB_CLUSTER_LABEL.to_owned(), self.name.clone()),
        ]);
        let annotations = BTreeMap::from([(
            KWOK_NODE_ANNOTATION.to_owned(),
            KWOK_NODE_ANNOTATION_VALUE.to_owned(),
        )]);
        let resources = BTreeMap::from([
            ("cpu".to_owned(), Quantity(size.cpu.clone())),
            ("memory".to_owned(), Quantity(size.memory.clone())),
            ("pods".to_owned(), Quantity(size.pods.to_string())),
        ]);
        Node {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.to_string()),
                pod_cidrs: Some(vec![cidr.to_string()]),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                allocatable: Some(resources.clone()),
                capacity: Some(resources),
                ..NodeStatus::default()
            }),
        }
    }

    fn record_pids(&self) -> Result<()> {
        let Some(state) = self.state.get() else {
            return Ok(());
        };
        let pids: Vec<(Component, Option<ProcessToken>)> = Component::ALL
            .iter()
            .map(|c| (*c, self.pid(*c).and_then(ProcessToken::of)))
            .collect();
        state.update(|s| {
            if let Some(record) = s.clusters.iter_mut().find(|r| r.name == self.name) {
                for (c, token) in &pids {
                    if let Some(p) = record
                        .components
                        .iter_mut()
                        .find(|p| p.component == c.name())
                    {
                        p.process = *token;
                    }
                }
            }
        })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The API server URL, `https://127.0.0.1:<port>`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The API server's port on 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The admin kubeconfig (user `liqo-lab-admin`, group `system:masters`). Its context is named
    /// after the cluster, so the kubeconfigs of several clusters can be merged with
    /// `KUBECONFIG=a:b`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The admin client configuration.
    pub fn config(&self) -> kube::Config {
        self.admin_config.clone()
    }

    /// A new admin [`kube::Client`] bound to the calling Tokio runtime (must be called inside
    /// one). Cheap; call it in each test rather than caching a client across runtimes.
    pub fn client(&self) -> Result<kube::Client> {
        make_client(self.admin_config.clone(), &self.owner)
    }

    /// The cluster CA certificate (PEM). The same CA signs the API server's serving certificate,
    /// client certificates (`--client-ca-file`) and approved CSRs.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// The cluster CA private key (PKCS#8 PEM), for tests that sign their own certificates.
    pub fn ca_key_pem(&self) -> &str {
        &self.ca.key_pem
    }

    /// Issues a client certificate for `user` in `groups` (at most
    /// [`MAX_CERT_GROUPS`](crate::MAX_CERT_GROUPS)), signed by the cluster CA.
    pub fn issue_client_cert(&self, user: &str, groups: &[&str]) -> Result<CertifiedKey> {
        issue_client_cert(&self.ca, &self.owner, user, groups)
    }

    /// Writes a kubeconfig for `user` in `groups` (a fresh client certificate signed by the
    /// cluster CA; at most [`MAX_CERT_GROUPS`](crate::MAX_CERT_GROUPS) groups) to `<cluster dir>/users/<user>.kubeconfig` and returns its path. Use it to test
    /// RBAC as a non-admin user.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let (path, _) = self.write_user_kubeconfig(user, groups)?;
        Ok(path)
    }

    /// A new [`kube::Client`] acting as `user` in `groups` (see
    /// [`user_kubeconfig`](Self::user_kubeconfig)).
    pub async fn user_client(&self, user: &str, groups: &[&str]) -> Result<kube::Client> {
        let (path, yaml) = self.write_user_kubeconfig(user, groups)?;
        let config = client_config(&yaml, &path).await?;
        make_client(config, &self.owner)
    }

    /// A new [`kube::Client`] authenticating with the given client certificate (e.g. one obtained
    /// through a CertificateSigningRequest).
    pub async fn client_with_cert(&self, credentials: &CertifiedKey) -> Result<kube::Client> {
        let path = self.dir.join("users").join("(in-memory)");
        let yaml = KubeconfigSpec {
            context: &self.name,
            cluster: &self.name,
            user: "client-cert",
            server: &self.api_url,
            ca_pem: &self.ca.cert_pem,
            credentials,
        }
        .render(&path)?;
        let config = client_config(&yaml, &path).await?;
        make_client(config, &self.owner)
    }

    fn write_user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<(PathBuf, String)> {
        let creds = self.issue_client_cert(user, groups)?;
        let path = self
            .dir
            .join("users")
            .join(format!("{}.kubeconfig", sanitize(user)));
        let context = format!("{user}@{}", self.name);
        let yaml = KubeconfigSpec {
            context: &context,
            cluster: &self.name,
            user,
            server: &self.api_url,
            ca_pem: &self.ca.cert_pem,
            credentials: &creds,
        }
        .render(&path)?;
        write_file(&path, &yaml, 0o600)?;
        Ok((path, yaml))
    }

    /// The pod CIDR.
    pub fn pod_cidr(&self) -> IpNet {
        self.pod_cidr
    }

    /// The service CIDR.
    pub fn service_cidr(&self) -> IpNet {
        self.service_cidr
    }

    /// The worker nodes' names and pod CIDRs.
    pub fn workers(&self) -> Vec<(String, IpNet)> {
        self.node_cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("{}-worker-{i}", self.name), *c))
            .collect()
    }

    /// How many real nodes the cluster has.
    pub fn real_node_count(&self) -> usize {
        self.real_node_cidrs.len()
    }

    /// The pod CIDR slices of the real nodes, in node order.
    pub(crate) fn real_node_cidrs(&self) -> &[IpNet] {
        &self.real_node_cidrs
    }

    /// The cluster's CA.
    pub(crate) fn ca(&self) -> &CertifiedKey {
        &self.ca
    }

    /// The cluster CA's certificate file.
    pub(crate) fn ca_file(&self) -> PathBuf {
        self.dir.join("pki").join("ca.crt")
    }

    /// The unix socket of the API server's egress proxy (clusters with real nodes).
    pub(crate) fn egress_socket(&self) -> PathBuf {
        self.dir.join(EGRESS_SOCKET)
    }

    /// The cluster's directory (`<lab root>/<name>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the components' logs (`<lab root>/<name>/logs`).
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The log file of a component.
    pub fn log_path(&self, component: Component) -> &Path {
        &self.supervised(component).spec.log
    }

    /// The pid of a running component.
    pub fn pid(&self, component: Component) -> Option<u32> {
        self.supervised(component).pid()
    }

    /// Stops a component (SIGTERM, SIGKILL after 5 s), e.g. the API server to cut the cluster off
    /// and simulate a split brain. Stopping a stopped component does nothing.
    pub async fn stop_component(&self, component: Component) -> Result<()> {
        let status = self.supervised(component).stop(STOP_GRACE).await?;
        if let Some(status) = status {
            tracing::info!(cluster = %self.name, %component, %status, "stopped");
        }
        self.record_pids()
    }

    /// Starts a stopped component. For the API server, waits until it is ready again.
    pub async fn start_component(&self, component: Component) -> Result<()> {
        self.supervised(component).start(self.lifetime).await?;
        if component == Component::ApiServer {
            self.wait_apiserver(&[]).await?;
        }
        self.record_pids()
    }

    /// Whether the API server answers `ok` on `/readyz`.
    pub async fn is_ready(&self) -> bool {
        let Ok(client) = quiet_client(&self.admin_config, &self.owner) else {
            return false;
        };
        matches!(
            tokio::time::timeout(ATTEMPT_TIMEOUT, readyz(&client)).await,
            Ok(Ok(()))
        )
    }

    pub(crate) fn components(&self) -> &[Supervised; 4] {
        &self.components
    }
}

/// A client without kube's tracing layer, for readiness polling: kube logs every failed request
/// (connection refused, 500 from a starting API server) at error level, which would fill the
/// logs of every test that starts a lab.
pub(crate) fn quiet_client(config: &kube::Config, owner: &str) -> Result<kube::Client> {
    use kube::client::ConfigExt;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(LabError::NoRuntime("Cluster::client"));
    }
    let err = |source| LabError::Kube {
        owner: owner.to_owned(),
        action: "building a client".to_owned(),
        source,
    };
    let https = config.rustls_https_connector().map_err(err)?;
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(err)?)
        .map_err(|e: hyper_util::client::legacy::Error| -> tower::BoxError { Box::new(e) })
        .service(http);
    Ok(kube::Client::new(service, config.default_namespace.clone()))
}

pub(crate) fn make_client(config: kube::Config, owner: &str) -> Result<kube::Client> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(LabError::NoRuntime("Cluster::client"));
    }
    kube::Client::try_from(config).map_err(|source| LabError::Kube {
        owner: owner.to_owned(),
        action: "building a client".to_owned(),
        source,
    })
}

/// `GET /readyz` must answer `ok`.
pub(crate) async fn readyz(client: &kube::Client) -> Result<(), String> {
    let req = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match client.request_text(req).await {
        Ok(text) if text.trim() == "ok" => Ok(()),
        Ok(text) => Err(format!("/readyz answered {:?}", text.trim())),
        Err(e) => Err(e.to_string()),
    }
}

fn node_usable(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter().any(|t| {
                t.key == "node.kubernetes.io/not-ready" || t.key == "node.kubernetes.io/unreachable"
            })
        });
    ready && !tainted
}
