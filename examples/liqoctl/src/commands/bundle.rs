//! The kubeconfig peering method: `bundle issue` and `bundle revoke` on the provider, `peer
//! --bundle` on the consumer.

use std::{
    io::Write,
    path::Path,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use liqo_core::{
    ClusterId, ClusterIdentity, NetworkParameters, PeeringError, PublicKey,
    crds::{ForeignCluster, ResourceOffer},
    info::{self, ClusterInfo, InfoError},
};
use liqo_peering::{ApiEndpoint, NetworkSource, OfferPolicy, quantity::Milli};
use liqo_peering_kubeconfig::{
    BUNDLE_KEY, BUNDLE_NAMESPACE, CheckedBundle, IssueOptions, MAX_BUNDLE_BYTES, PeeringBundle,
    bundle_secret_name,
};
use serde_json::json;

use super::peer::{apply_body, apply_fc, role_name, wait_peered, with_provider};
use crate::{
    CliError, FIELD_MANAGER,
    cli::{BundleIssueArgs, Cli, OutputFormat, PeerArgs},
    kube_util::{Target, is_not_found, load_config, watch_until},
    progress::Steps,
};

/// The CSR API's shortest certificate lifetime.
const MIN_LIFETIME: Duration = Duration::from_secs(600);
/// Key of the public key in the agent's identity Secret.
const IDENTITY_PUBLIC_KEY: &str = "public-key";

/// This cluster's published identity; an error naming the ConfigMap when the agent has not
/// published it (yet).
async fn own_info(target: &Target, role: &str) -> Result<ClusterInfo, CliError> {
    let cm = format!("{}/{}", info::NAMESPACE, info::CONFIG_MAP);
    match info::read(&target.client).await {
        Ok(Some(i)) => Ok(i),
        Ok(None) => Err(CliError::failed(
            format!(
                "the {role} cluster at {} has no ConfigMap {cm}: its liqo agent has not published this cluster's identity",
                target.url
            ),
            format!(
                "start the liqo agent (peering.method: Kubeconfig) on the {role} cluster, wait until `kubectl -n {} get configmap {}` shows it, then retry",
                info::NAMESPACE,
                info::CONFIG_MAP
            ),
        )),
        Err(InfoError::Kube(e)) => Err(target.err(format!("reading ConfigMap {cm}"))(e)),
        Err(e) => Err(CliError::failed(
            format!("this cluster's identity is unusable: {e}"),
            "the liqo agent writes it: check that agent's version and logs",
        )),
    }
}

/// The provider's public key from its agent's identity Secret, when readable and consistent
/// with the published fingerprint (so consumers can pin it); `None` with a warning otherwise.
async fn public_key(target: &Target, me: &ClusterInfo) -> Result<Option<PublicKey>, CliError> {
    let (ns, name) = (
        liqo_peering_csr::IDENTITY_NAMESPACE,
        liqo_peering_csr::IDENTITY_SECRET,
    );
    let secret = match Api::<Secret>::namespaced(target.client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(s) => s,
        Err(kube::Error::Api(s)) if s.code == 403 => {
            eprintln!(
                "warning: may not read Secret {ns}/{name}: the bundle carries no provider key, the consumer cannot pin it"
            );
            return Ok(None);
        }
        Err(e) => return Err(target.err(format!("reading Secret {ns}/{name}"))(e)),
    };
    let text = secret
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(IDENTITY_PUBLIC_KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok().map(str::to_owned));
    let Some(text) = text else {
        eprintln!(
            "warning: no key {IDENTITY_PUBLIC_KEY} in Secret {ns}/{name}: the bundle carries no provider key, the consumer cannot pin it"
        );
        return Ok(None);
    };
    let key: PublicKey = text.trim().parse().map_err(|e| {
        CliError::failed(
            format!("Secret {ns}/{name}, key {IDENTITY_PUBLIC_KEY}: {e}"),
            "the liqo agent writes that Secret: check its version and logs",
        )
    })?;
    if key.fingerprint() != me.fingerprint {
        return Err(CliError::failed(
            format!(
                "Secret {ns}/{name} holds key {}, but ConfigMap {}/{} publishes {}",
                key.fingerprint(),
                info::NAMESPACE,
                info::CONFIG_MAP,
                me.fingerprint
            ),
            "restart this cluster's liqo agent so that it publishes its current identity, then retry",
        ));
    }
    Ok(Some(key))
}

/// The API server as the consumer reaches it: the flags, else the kubeconfig's.
async fn api_endpoint(cli: &Cli, args: &BundleIssueArgs) -> Result<ApiEndpoint, CliError> {
    let config = load_config(
        cli.kubeconfig.as_deref(),
        cli.context.as_deref(),
        "local cluster",
    )
    .await?;
    let url = match &args.api_server {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned(),
    };
    if !url.starts_with("https://") || url.len() <= "https://".len() {
        return Err(CliError::Usage(format!(
            "the API server URL {url:?} is not an https:// URL (the consumer's agent only uses TLS); give one with --api-server https://HOST:PORT"
        )));
    }
    let ca_pem = match &args.api_server_ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                CliError::failed(
                    format!("cannot read --api-server-ca-file {}: {e}", path.display()),
                    "give the PEM file of the CA that signed the API server's certificate",
                )
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(CliError::failed(
                    format!(
                        "--api-server-ca-file {} holds no PEM certificate (no -----BEGIN CERTIFICATE----- line)",
                        path.display()
                    ),
                    "give the PEM file of the CA that signed the API server's certificate",
                ));
            }
            pem
        }
        None => {
            ApiEndpoint::from_kube_config(&config)
                .map_err(|e| {
                    CliError::failed(
                        format!("no CA for the API server in the kubeconfig: {e}"),
                        "give the API server's CA with --api-server-ca-file PATH",
                    )
                })?
                .ca_pem
        }
    };
    Ok(ApiEndpoint::new(url, ca_pem))
}

/// What to offer: the flags, checked; without them the consumer's existing offer (which the
/// tenant keeps in any case).
async fn offer(
    local: &Target,
    args: &BundleIssueArgs,
    provider: &ClusterId,
) -> Result<OfferPolicy, CliError> {
    let tenant = liqo_core::names::tenant_namespace(&args.consumer);
    let existing = Api::<ResourceOffer>::namespaced(local.client.clone(), &tenant)
        .get_opt(provider.as_str())
        .await
        .or_else(|e| if is_not_found(&e) { Ok(None) } else { Err(e) })
        .map_err(local.err(format!("reading ResourceOffer {tenant}/{provider}")))?
        .map(|ro| ro.spec.resources);
    let wanted = match (&args.offer_cpu, &args.offer_memory, args.offer_pods) {
        (Some(cpu), Some(memory), Some(pods)) => {
            let o = liqo_core::ResourceOffer::new(cpu, memory, pods);
            for (flag, q) in [("--offer-cpu", &o.cpu), ("--offer-memory", &o.memory)] {
                Milli::of(q).map_err(|e| CliError::Usage(format!("{flag} {:?}: {e}", q.0)))?;
            }
            Some(o)
        }
        _ => None,
    };
    match (existing, wanted) {
        (Some(current), None) => {
            eprintln!(
                "keeping {}'s offer: cpu {}, memory {}, pods {}",
                args.consumer, current.cpu.0, current.memory.0, current.pods
            );
            Ok(OfferPolicy::Absolute(current))
        }
        (Some(current), Some(wanted)) => {
            let same =
                |a: &k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                 b: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
                    matches!((Milli::of(a), Milli::of(b)), (Ok(x), Ok(y)) if x == y)
                };
            if same(&current.cpu, &wanted.cpu)
                && same(&current.memory, &wanted.memory)
                && current.pods == wanted.pods
            {
                Ok(OfferPolicy::Absolute(current))
            } else {
                Err(CliError::failed(
                    format!(
                        "{} already has an offer (cpu {}, memory {}, pods {}), which issuing again keeps",
                        args.consumer, current.cpu.0, current.memory.0, current.pods
                    ),
                    format!(
                        "leave out the --offer-* flags to keep it, or change it with `kubectl -n {tenant} edit resourceoffer {provider}`"
                    ),
                ))
            }
        }
        (None, Some(wanted)) => Ok(OfferPolicy::Absolute(wanted)),
        (None, None) => Err(CliError::Usage(format!(
            "{} has no offer yet: say what to offer with --offer-cpu, --offer-memory and --offer-pods",
            args.consumer
        ))),
    }
}

/// The provider's network (flags, else what its agent publishes) and the consumer's (its
/// published cluster info, else flags).
fn networks(
    me: &info::ClusterInfo,
    args: &BundleIssueArgs,
) -> Result<(NetworkParameters, NetworkParameters), CliError> {
    let provider = match (args.pod_cidr, args.service_cidr) {
        (Some(pod), Some(svc)) => NetworkParameters::new(pod, svc),
        _ => me.network.clone().ok_or_else(|| {
            CliError::Usage(format!(
                "ConfigMap {}/{} of this cluster has no network (its agent predates it): give --pod-cidr and --service-cidr",
                info::NAMESPACE,
                info::CONFIG_MAP
            ))
        })?,
    };
    let consumer = match (
        &args.consumer_info,
        args.consumer_pod_cidr,
        args.consumer_service_cidr,
    ) {
        (Some(path), _, _) => {
            let shown = path.display();
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("--consumer-info {shown}: {e}")))?;
            let theirs = info::ClusterInfo::decode(&text)
                .map_err(|e| CliError::Usage(format!("--consumer-info {shown}: {e}")))?;
            if theirs.cluster_id != args.consumer {
                return Err(CliError::Usage(format!(
                    "--consumer-info {shown} is the info of cluster {}, not of --consumer {}",
                    theirs.cluster_id, args.consumer
                )));
            }
            theirs.network.ok_or_else(|| {
                CliError::Usage(format!(
                    "--consumer-info {shown} has no network (the consumer's agent predates it): give --consumer-pod-cidr and --consumer-service-cidr"
                ))
            })?
        }
        (None, Some(pod), Some(svc)) => NetworkParameters::new(pod, svc),
        _ => {
            return Err(CliError::Usage(
                "say the consumer's network: --consumer-info FILE (its published cluster info), or --consumer-pod-cidr and --consumer-service-cidr".into(),
            ));
        }
    };
    Ok((provider, consumer))
}

/// `bundle issue`.
pub async fn issue(cli: &Cli, local: &Target, args: &BundleIssueArgs) -> Result<(), CliError> {
    if args.lifetime < MIN_LIFETIME {
        return Err(CliError::Usage(format!(
            "--lifetime {}s is shorter than the 10m the certificate API allows",
            args.lifetime.as_secs()
        )));
    }
    let me = own_info(local, "provider").await?;
    if me.cluster_id == args.consumer {
        return Err(CliError::Usage(format!(
            "--consumer {} is this cluster: issue the bundle on the provider for the other cluster's id",
            args.consumer
        )));
    }
    let endpoint = api_endpoint(cli, args).await?;
    let key = public_key(local, &me).await?;
    let offer = offer(local, args, &me.cluster_id).await?;
    let mut provider = ClusterIdentity::new(
        me.cluster_id.clone(),
        me.cluster_name
            .clone()
            .unwrap_or_else(|| me.cluster_id.to_string()),
    );
    if let Some(key) = key {
        provider = provider.with_public_key(key);
    }
    let (provider_network, consumer_network) = networks(&me, args)?;
    let mut options = IssueOptions::new(
        endpoint.clone(),
        offer,
        NetworkSource::Static(provider_network),
        consumer_network,
    );
    options.lifetime = args.lifetime;
    options.timeout = cli.timeout;
    let bundle = liqo_peering_kubeconfig::issue_bundle(
        &local.client,
        &provider,
        &args.consumer,
        args.consumer_name.as_deref(),
        &options,
    )
    .await
    .map_err(|e| issue_error(&args.consumer, e))?;
    // What the consumer will check, checked here first.
    let checked = bundle
        .clone()
        .check(
            "just issued",
            &args.consumer,
            Some(&me.cluster_id),
            None,
            SystemTime::now(),
        )
        .map_err(|e| CliError::plain(format!("the issued bundle does not pass its check: {e}")))?;
    let text = match cli.output {
        OutputFormat::Json => serde_json::to_string_pretty(&bundle)
            .map(|s| s + "\n")
            .map_err(|e| CliError::plain(format!("rendering the bundle as JSON: {e}")))?,
        OutputFormat::Table | OutputFormat::Yaml => bundle
            .to_yaml()
            .map_err(|e| CliError::plain(format!("rendering the bundle as YAML: {e}")))?,
    };
    let consumer = &args.consumer;
    let expires = liqo_peering::rfc3339(checked.expires_at);
    match &args.file {
        Some(path) => {
            write_secret_file(path, &text)?;
            eprintln!(
                "bundle for {consumer} written to {} (mode 0600); tenant {} on {}, API server {}, certificate valid until {expires}",
                path.display(),
                bundle.tenant_namespace,
                me.cluster_id,
                endpoint.url
            );
        }
        None => print!("{text}"),
    }
    eprintln!(
        "warning: the bundle holds a credential (client certificate and key of user liqo-consumer-{consumer}): hand it over like a kubeconfig, over a private channel, and delete copies you do not need"
    );
    eprintln!(
        "next:  on {consumer}, `liqoctl peer --bundle FILE`; revoke with `liqoctl bundle revoke --consumer {consumer}`"
    );
    Ok(())
}

fn issue_error(consumer: &ClusterId, e: PeeringError) -> CliError {
    match &e {
        PeeringError::Refused { .. } | PeeringError::Invalid { .. } => CliError::failed(
            format!("issuing a bundle for {consumer}: {e}"),
            "fix what is named above and retry",
        ),
        _ => CliError::failed(
            format!("issuing a bundle for {consumer}: {e}"),
            "the kubeconfig must be the provider's administrator's (namespaces, RBAC, certificatesigningrequests); check that kube-controller-manager signs CSRs",
        ),
    }
}

/// Writes `text` to `path`, readable by the owner only (created so, or narrowed first).
fn write_secret_file(path: &Path, text: &str) -> Result<(), CliError> {
    let fail = |e: std::io::Error| {
        CliError::failed(
            format!("cannot write the bundle to {}: {e}", path.display()),
            "choose a writable path with -f, or leave -f out to print it",
        )
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        // An existing file keeps its mode on open: narrow it before writing the secret.
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        }
    }
    let mut f = opts.open(path).map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)
}

/// `bundle revoke`.
pub async fn revoke(cli: &Cli, local: &Target, consumer: &ClusterId) -> Result<(), CliError> {
    let me = own_info(local, "provider").await?;
    let tenant = liqo_core::names::tenant_namespace(consumer);
    let namespaces: Api<Namespace> = Api::all(local.client.clone());
    let present = namespaces
        .get_opt(&tenant)
        .await
        .map_err(local.err(format!("reading namespace {tenant}")))?
        .is_some();
    liqo_peering_kubeconfig::revoke(&local.client, &me.cluster_id, consumer)
        .await
        .map_err(|e| {
            CliError::failed(
                format!("revoking {consumer}'s bundle: {e}"),
                "the kubeconfig must be the provider's administrator's; retry (revoking is idempotent)",
            )
        })?;
    if !present {
        eprintln!(
            "{consumer} has no tenant namespace {tenant} here: nothing was issued, or it was revoked already"
        );
        return Ok(());
    }
    eprintln!(
        "revoked {consumer}: its credential may do nothing any more; tenant namespace {tenant} is being deleted"
    );
    if !cli.wait {
        eprintln!("not waiting (--wait=false)");
        return Ok(());
    }
    Steps::new(cli.timeout)
        .run(
            &format!("tenant namespace {tenant} deleted"),
            &format!(
                "check what holds it: `kubectl get namespace {tenant} -o yaml` (finalizers, conditions)"
            ),
            |rep| async move {
                watch_until(local, namespaces, &tenant, &rep, |ns, rep| match ns {
                    None => Some(()),
                    Some(_) => {
                        rep.note("still present");
                        None
                    }
                })
                .await
            },
        )
        .await?;
    eprintln!(
        "next:  the consumer's administrator may now `liqoctl unpeer {}`",
        me.cluster_id
    );
    Ok(())
}

/// Reads and checks the bundle file as hostile input.
fn read_bundle(
    path: &Path,
    me: &ClusterId,
    pin: Option<liqo_core::KeyFingerprint>,
) -> Result<(String, CheckedBundle), CliError> {
    let source = path.display().to_string();
    let next = "ask the provider's administrator for a bundle issued for this cluster (`liqoctl bundle issue --consumer ID`)";
    let meta = std::fs::metadata(path).map_err(|e| {
        CliError::failed(
            format!("cannot read the bundle {source}: {e}"),
            "check the path given to --bundle",
        )
    })?;
    if meta.len() > MAX_BUNDLE_BYTES as u64 {
        return Err(CliError::failed(
            format!(
                "the bundle {source} has {} bytes, more than the {MAX_BUNDLE_BYTES} a bundle may have",
                meta.len()
            ),
            next,
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| {
        CliError::failed(
            format!("cannot read the bundle {source}: {e}"),
            "check the path given to --bundle",
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        CliError::failed(
            format!(
                "the bundle {source} is not UTF-8 text (byte {})",
                e.utf8_error().valid_up_to()
            ),
            next,
        )
    })?;
    let checked = PeeringBundle::parse(&text, &source)
        .and_then(|b| b.check(&source, me, None, pin, SystemTime::now()))
        .map_err(|e| CliError::failed(e, next))?;
    Ok((text, checked))
}

/// `peer --bundle`.
pub async fn peer(cli: &Cli, local: &Target, args: &PeerArgs, path: &Path) -> Result<(), CliError> {
    let me = own_info(local, "consumer").await?;
    let fcs: Api<ForeignCluster> = Api::all(local.client.clone());
    // The pin of an existing ForeignCluster is only known once we know which provider: read the
    // provider's id unchecked first, then check everything with its pin.
    let (_, unpinned) = read_bundle(path, &me.cluster_id, None)?;
    let id = unpinned.bundle.provider.id.clone();
    if id == me.cluster_id {
        return Err(CliError::failed(
            format!(
                "the bundle {} is from this cluster ({id}) for itself",
                path.display()
            ),
            "a cluster does not peer with itself: use a bundle another cluster's administrator issued",
        ));
    }
    let existing = fcs
        .get_opt(id.as_str())
        .await
        .map_err(local.err(format!("reading ForeignCluster {id}")))?;
    let pin = existing
        .as_ref()
        .and_then(|f| f.spec.public_key_fingerprint);
    let (text, checked) = read_bundle(path, &me.cluster_id, pin).map_err(|e| match (e, pin) {
        (CliError::Failed { what, .. }, Some(pin)) => CliError::failed(
            what,
            format!(
                "ForeignCluster {id} pins key {pin}: if the provider's key changed on purpose, delete the pinned record (`kubectl delete foreigncluster {id}`) and peer again"
            ),
        ),
        (e, _) => e,
    })?;
    let bundle = checked.bundle;

    // 1. The bundle Secret, which the local agent reads.
    let name = bundle_secret_name(&id);
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": BUNDLE_NAMESPACE},
        "type": "Opaque",
        "stringData": {BUNDLE_KEY: text},
    });
    Api::<Secret>::namespaced(local.client.clone(), BUNDLE_NAMESPACE)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(local.err(format!("applying Secret {BUNDLE_NAMESPACE}/{name}")))?;
    eprintln!(
        "Secret {BUNDLE_NAMESPACE}/{name}: bundle from {id} for {}, certificate valid until {}",
        me.cluster_id,
        liqo_peering::rfc3339(checked.expires_at)
    );

    // 2. The ForeignCluster: the provider's name and key, the role.
    let before = existing.as_ref().map(|f| f.spec.role).unwrap_or_default();
    let role = with_provider(before);
    let mut changes = json!({ "role": role, "clusterName": bundle.provider.name });
    if let Some(fp) = bundle.provider.fingerprint() {
        changes["publicKeyFingerprint"] = json!(fp);
    }
    if existing.is_none() {
        changes["discovery"] = json!({"source": "Manual"});
    }
    let body = apply_body(&id, existing.as_ref(), changes)?;
    apply_fc(local, &id, &body).await?;
    eprintln!(
        "ForeignCluster {id}: role {} (was {}), peering through the bundle",
        role_name(role),
        role_name(before)
    );
    wait_peered(
        cli,
        local,
        &id,
        args.network,
        &format!(
            "is the liqo agent running here with peering.method: Kubeconfig, and does it reach the API server in the bundle? Check its logs and `kubectl get foreigncluster {id} -o yaml` (condition Authenticated)"
        ),
    )
    .await
}
