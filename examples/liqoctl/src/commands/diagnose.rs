//! `diagnose`: proves a peering step by step and stops at the first failing step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::{
    api::core::v1::{Pod, Secret},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, ListParams},
    config::Kubeconfig,
};
use liqo_core::{
    ClusterId,
    crds::{ForeignCluster, PeeringRole, ResourceOffer, Tunnel, foreign_cluster_condition as cond},
};
use liqo_peering_csr::credential;
use serde::Serialize;

use super::{CondView, ago, discover, fc_conditions, kubeconfig_secret};
use crate::{
    CliError,
    cli::{Cli, DiagnoseArgs, OutputFormat},
    kube_util::{Target, api_error, is_not_found, watch_until_kind},
    output,
    progress::{Reporter, Steps, human},
};

/// How long the provider's API server may take to answer.
const PROVIDER_API_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Outcome {
    Ok,
    Failed,
    Skipped,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Check {
    step: String,
    outcome: Outcome,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    /// The peer, or `None` for the local checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
    ok: bool,
    checks: Vec<Check>,
    #[serde(skip)]
    live: bool,
}

impl Report {
    fn new(cluster_id: Option<&ClusterId>, format: OutputFormat) -> Self {
        let live = format == OutputFormat::Table;
        if live && let Some(id) = cluster_id {
            println!("\npeer {id}");
        }
        Self {
            cluster_id: cluster_id.map(ToString::to_string),
            ok: true,
            checks: vec![],
            live,
        }
    }

    fn push(&mut self, step: &str, outcome: Outcome, detail: String, hint: Option<String>) {
        if self.live {
            let mark = match outcome {
                Outcome::Ok => "✓",
                Outcome::Failed => "✗",
                Outcome::Skipped => "-",
            };
            println!("{mark} {step}: {detail}");
            if let Some(h) = &hint {
                println!("    → {h}");
            }
        }
        if outcome == Outcome::Failed {
            self.ok = false;
        }
        self.checks.push(Check {
            step: step.to_owned(),
            outcome,
            detail,
            hint,
        });
    }

    fn pass(&mut self, step: &str, detail: impl Into<String>) {
        self.push(step, Outcome::Ok, detail.into(), None);
    }

    fn skip(&mut self, step: &str, detail: impl Into<String>) {
        self.push(step, Outcome::Skipped, detail.into(), None);
    }

    /// Records a failure; the caller stops.
    fn fail(&mut self, step: &str, detail: impl Into<String>, hint: impl Into<String>) {
        self.push(step, Outcome::Failed, detail.into(), Some(hint.into()));
    }

    fn fail_with(&mut self, step: &str, e: CliError) {
        match e {
            CliError::Failed { what, next } => self.push(
                step,
                Outcome::Failed,
                what,
                Some(next.unwrap_or_else(|| "see the error above".into())),
            ),
            CliError::Usage(m) => self.push(step, Outcome::Failed, m, None),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{secs}s after the epoch"))
}

fn has_provider(r: PeeringRole) -> bool {
    matches!(r, PeeringRole::Provider | PeeringRole::Both)
}

fn has_consumer(r: PeeringRole) -> bool {
    matches!(r, PeeringRole::Consumer | PeeringRole::Both)
}

/// `diagnose`.
pub async fn diagnose(cli: &Cli, local: &Target, args: &DiagnoseArgs) -> Result<(), CliError> {
    let mut reports = vec![];
    let mut base = Report::new(None, cli.output);
    match local.client.apiserver_version().await {
        Ok(v) => base.pass(
            "local API server reachable",
            format!("Kubernetes {} at {}", v.git_version, local.url),
        ),
        Err(e) => base.fail_with(
            "local API server reachable",
            api_error(local.who, &local.url, "asking the version", e),
        ),
    }
    let base_ok = base.ok;
    reports.push(base);
    if base_ok {
        let peers: Vec<ForeignCluster> = match &args.cluster_id {
            Some(id) => {
                let fc = Api::<ForeignCluster>::all(local.client.clone())
                    .get_opt(id.as_str())
                    .await
                    .map_err(local.err(format!("reading ForeignCluster {id}")))?;
                match fc {
                    Some(fc) => vec![fc],
                    None => {
                        let mut r = Report::new(Some(id), cli.output);
                        r.fail(
                            &format!("ForeignCluster {id}"),
                            "not found on the local cluster",
                            "list the known clusters with `liqoctl discover`; peer with `liqoctl peer`",
                        );
                        reports.push(r);
                        vec![]
                    }
                }
            }
            None => discover::list(local)
                .await?
                .into_iter()
                .filter(|f| {
                    f.spec.role != PeeringRole::None
                        || f.status
                            .as_ref()
                            .is_some_and(|s| s.role != PeeringRole::None)
                })
                .collect(),
        };
        if peers.is_empty() && args.cluster_id.is_none() && cli.output == OutputFormat::Table {
            println!("no peers to check (no ForeignCluster with a role)");
        }
        for fc in &peers {
            let mut r = Report::new(Some(&fc.spec.cluster_id), cli.output);
            check_peer(local, fc, args, &mut r).await;
            reports.push(r);
        }
    }
    if cli.output != OutputFormat::Table {
        output::emit(cli.output, &reports, String::new)?;
    }
    let failed = reports.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        Ok(())
    } else {
        Err(CliError::plain(format!(
            "diagnose: {failed} check(s) failed (see ✗ above)"
        )))
    }
}

async fn check_peer(local: &Target, fc: &ForeignCluster, args: &DiagnoseArgs, r: &mut Report) {
    let id = &fc.spec.cluster_id;
    let conds = fc_conditions(fc);
    let status_role = fc.status.as_ref().map(|s| s.role).unwrap_or_default();
    let step = format!("ForeignCluster {id}");
    if let Some(c) = CondView::of(conds, cond::KEY_MISMATCH).filter(CondView::is_true) {
        return r.fail(
            &step,
            format!("key mismatch: {}", c.message),
            "another key announced this cluster id; if the peer rotated its key on purpose, delete the ForeignCluster and peer again with --provider-kubeconfig",
        );
    }
    let (want, have) = (fc.spec.role, status_role);
    if want == PeeringRole::None && have == PeeringRole::None {
        return r.fail(
            &step,
            "role None: not peered",
            format!("peer with `liqoctl peer {id}`"),
        );
    }
    r.pass(&step, format!("role {want:?} (established {have:?})"));

    if has_provider(want) || has_provider(have) {
        for (type_, hint) in [
            (
                cond::AUTHENTICATED,
                format!(
                    "the handshake with {id} failed or did not run: check that the local agent runs and reaches {}, and the provider agent's logs",
                    fc.spec.peering_endpoint.as_deref().unwrap_or("the peering endpoint")
                ),
            ),
            (
                cond::OFFER_ACCEPTED,
                "the provider made no offer yet: it may await approval (annotation liqo.io/peering-approved=true on its ForeignCluster) or have nothing free".to_owned(),
            ),
        ] {
            match CondView::of(conds, type_) {
                Some(c) if c.is_true() => r.pass(type_, c.short()),
                Some(c) => return r.fail(type_, c.short(), hint),
                None => return r.fail(type_, "no such condition yet", hint),
            }
        }
        if !check_credential(local, fc, r).await {
            return;
        }
    }
    if has_consumer(want) || has_consumer(have) {
        for (type_, hint) in [
            (
                cond::CONSUMER_AUTHENTICATED,
                format!("{id} has not proved its key to this cluster yet: check its agent's logs"),
            ),
            (
                cond::TENANT_READY,
                format!(
                    "the tenant of {id} is not ready: a reason AwaitingApproval means an administrator must annotate ForeignCluster {id} with liqo.io/peering-approved=true"
                ),
            ),
        ] {
            match CondView::of(conds, type_) {
                Some(c) if c.is_true() => r.pass(type_, c.short()),
                Some(c) => return r.fail(type_, c.short(), hint),
                None => return r.fail(type_, "no such condition yet", hint),
            }
        }
    }
    check_network(local, fc, args, r).await;
    if has_provider(want) || has_provider(have) {
        check_admission(local, fc, r).await;
    }
}

/// Pods on the peer's virtual node that the provider refuses to run (or would refuse now).
async fn check_admission(local: &Target, fc: &ForeignCluster, r: &mut Report) {
    let id = &fc.spec.cluster_id;
    let node = super::node_name(id);
    let step = "offloaded pods admitted";
    let pods = match Api::<Pod>::all(local.client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
    {
        Ok(p) => p.items,
        Err(e) => return r.fail_with(step, local.err(format!("listing pods on node {node}"))(e)),
    };
    let refused: Vec<_> = pods.iter().filter_map(super::info::refusal).collect();
    match refused.first() {
        None => r.pass(step, format!("{} pods on {node}, none refused", pods.len())),
        Some(first) => r.fail(
            step,
            format!(
                "{} of {} pods refused, e.g. {}/{}: {}",
                refused.len(),
                pods.len(),
                first.namespace,
                first.name,
                first.message
            ),
            format!(
                "{id}'s pod security level forbids them: change the pods (the message names the field), or ask {id}'s admin for another level (docs/security.md); `liqoctl info {id}` lists them all"
            ),
        ),
    }
}

/// The credential's steps; false when one failed.
async fn check_credential(local: &Target, fc: &ForeignCluster, r: &mut Report) -> bool {
    let id = &fc.spec.cluster_id;
    let (ns, name) = kubeconfig_secret(id);
    let step = "credential present";
    let repeer = format!(
        "get a new credential: `liqoctl unpeer {id} && liqoctl peer {id}`; check the local agent's logs for why it was not stored or renewed"
    );
    let secret = match Api::<Secret>::namespaced(local.client.clone(), &ns)
        .get_opt(&name)
        .await
    {
        Ok(Some(s)) => s,
        Ok(None) => {
            r.fail(
                step,
                format!("Secret {ns}/{name} not found"),
                format!("the peering stored no credential for {id}: {repeer}"),
            );
            return false;
        }
        Err(e) => {
            r.fail_with(step, local.err(format!("reading Secret {ns}/{name}"))(e));
            return false;
        }
    };
    let key = liqo_peering_csr::names::KUBECONFIG_KEY;
    let Some(kubeconfig) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
    else {
        r.fail(
            step,
            format!("Secret {ns}/{name} has no UTF-8 key {key}"),
            repeer,
        );
        return false;
    };
    r.pass(step, format!("Secret {ns}/{name}, key {key}"));

    let step = "credential valid";
    let validity = credential::kubeconfig_certificate(&kubeconfig)
        .and_then(|pem| credential::certificate_validity(&pem));
    let (not_before, not_after) = match validity {
        Ok(v) => v,
        Err(e) => {
            r.fail(
                step,
                format!("cannot read the client certificate: {e}"),
                repeer,
            );
            return false;
        }
    };
    let now = SystemTime::now();
    if not_after <= now {
        let ago = now.duration_since(not_after).unwrap_or_default();
        r.fail(
            step,
            format!(
                "the client certificate expired at {} ({} ago)",
                rfc3339(not_after),
                human(ago)
            ),
            format!(
                "the agent's credential rotation did not renew it (is the agent running, does it reach {}?); {repeer}",
                fc.spec.peering_endpoint.as_deref().unwrap_or("the provider's peering endpoint")
            ),
        );
        return false;
    }
    if now < not_before {
        r.fail(
            step,
            format!(
                "the client certificate is valid only from {}",
                rfc3339(not_before)
            ),
            "the clocks of this machine and the provider disagree: fix time synchronisation (NTP)",
        );
        return false;
    }
    let left = not_after.duration_since(now).unwrap_or_default();
    r.pass(
        step,
        format!(
            "client certificate valid until {} (in {})",
            rfc3339(not_after),
            human(left)
        ),
    );

    let step = "provider API reachable with the credential";
    let server = Kubeconfig::from_yaml(&kubeconfig)
        .ok()
        .and_then(|k| k.clusters.into_iter().next())
        .and_then(|c| c.cluster)
        .and_then(|c| c.server)
        .unwrap_or_else(|| "the provider's API server".into());
    let client = match credential::client_from_kubeconfig(id, &kubeconfig).await {
        Ok(c) => c,
        Err(e) => {
            r.fail(step, format!("cannot use the credential: {e}"), repeer);
            return false;
        }
    };
    let tenant = client.default_namespace().to_owned();
    let remote = Target {
        client: client.clone(),
        url: server.clone(),
        who: "provider cluster",
    };
    let get = tokio::time::timeout(
        PROVIDER_API_TIMEOUT,
        Api::<ResourceOffer>::namespaced(client, &tenant).get(id.as_str()),
    )
    .await;
    match get {
        Ok(Ok(offer)) => {
            let o = &offer.spec.resources;
            r.pass(
                step,
                format!(
                    "read ResourceOffer {tenant}/{id} at {server}: cpu={} memory={} pods={}",
                    o.cpu.0, o.memory.0, o.pods
                ),
            );
            true
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 401 || s.code == 403 => {
            r.fail(
                step,
                format!("{server} answered {} {}: {}", s.code, s.reason, s.message),
                format!(
                    "the provider no longer accepts this consumer (revoked or unpeered on its side): {repeer}"
                ),
            );
            false
        }
        Ok(Err(e)) if is_not_found(&e) => {
            r.fail(
                step,
                format!("the provider has no ResourceOffer {tenant}/{id} for this cluster"),
                format!("the provider withdrew its offer (unpeered on its side?): {repeer}"),
            );
            false
        }
        Ok(Err(e)) => {
            r.fail_with(
                step,
                api_error(remote.who, &remote.url, "reading the offer", e),
            );
            false
        }
        Err(_) => {
            r.fail(
                step,
                format!("{server} did not answer within {}", human(PROVIDER_API_TIMEOUT)),
                "the provider's API server is unreachable from here: check routing/firewalls to it, and that the URL in the credential is the one the provider advertises",
            );
            false
        }
    }
}

/// Numeric counters of a Tunnel's status: `rxBytes` and any whose name starts with `nat`.
fn counters(status: &serde_json::Value) -> (u64, Vec<(String, u64)>) {
    let rx = status.get("rxBytes").and_then(|v| v.as_u64()).unwrap_or(0);
    let mut nat = vec![];
    if let Some(obj) = status.as_object() {
        for (k, v) in obj {
            if !k.to_ascii_lowercase().starts_with("nat") {
                continue;
            }
            match v {
                serde_json::Value::Number(n) => nat.extend(n.as_u64().map(|n| (k.clone(), n))),
                serde_json::Value::Object(inner) => nat.extend(
                    inner
                        .iter()
                        .filter_map(|(ik, iv)| iv.as_u64().map(|n| (format!("{k}.{ik}"), n))),
                ),
                _ => {}
            }
        }
    }
    (rx, nat)
}

async fn check_network(local: &Target, fc: &ForeignCluster, args: &DiagnoseArgs, r: &mut Report) {
    let id = &fc.spec.cluster_id;
    let tenant = liqo_core::names::tenant_namespace(id);
    let ready = CondView::of(fc_conditions(fc), cond::NETWORK_READY);
    let tunnel = match Api::<Tunnel>::namespaced(local.client.clone(), &tenant)
        .get_opt(id.as_str())
        .await
    {
        Ok(t) => t,
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => {
            return r.fail_with(
                "tunnel",
                local.err(format!("reading Tunnel {tenant}/{id}"))(e),
            );
        }
    };
    let Some(tunnel) = tunnel else {
        match ready {
            None => {
                r.skip(
                    "tunnel handshake recent",
                    "no Tunnel and no NetworkReady condition: this peering has no network fabric",
                );
                r.skip("traffic through the tunnel", "no network fabric");
            }
            Some(c) => r.fail(
                "tunnel",
                format!("NetworkReady={} but no Tunnel {tenant}/{id}", c.short()),
                "the network agent has not made the tunnel: check its logs (gateway, WireGuard backend)",
            ),
        }
        return;
    };
    if let Some(c) = &ready {
        if c.is_true() {
            r.pass(cond::NETWORK_READY, c.short());
        } else {
            return r.fail(
                cond::NETWORK_READY,
                c.short(),
                format!(
                    "the network agent reports the link down: inspect `kubectl -n {tenant} get tunnel {id} -o yaml` and the gateway logs"
                ),
            );
        }
    }
    let status = tunnel.status.clone().unwrap_or_default();
    let endpoint = tunnel
        .spec
        .endpoint
        .clone()
        .unwrap_or_else(|| "(listening only)".into());
    let step = "tunnel handshake recent";
    let hint = format!(
        "the gateways do not complete WireGuard handshakes: check UDP reachability of {endpoint} from this gateway (and back), that each side has the other's current public key, and the gateway logs"
    );
    match &status.latest_handshake {
        None => return r.fail(step, format!("no handshake yet with {endpoint}"), hint),
        Some(t) => {
            let age = Timestamp::now().as_second() - t.0.as_second();
            if age > args.max_handshake_age.as_secs() as i64 {
                return r.fail(
                    step,
                    format!(
                        "the last handshake was {} (more than {})",
                        ago(t),
                        human(args.max_handshake_age)
                    ),
                    hint,
                );
            }
            r.pass(step, format!("latest handshake {} with {endpoint}", ago(t)));
        }
    }

    let step = "traffic through the tunnel";
    let ar = ApiResource::erase::<Tunnel>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(local.client.clone(), &tenant, &ar);
    let steps = Steps::new(args.traffic_window);
    let name = id.to_string();
    let watched = steps
        .run(
            &format!("watching the counters of Tunnel {tenant}/{id}"),
            "",
            |rep: Reporter| async move {
                let mut first: Option<(u64, Vec<(String, u64)>)> = None;
                watch_until_kind(local, api, "Tunnel", &name, &rep, |t, rep| {
                    let status = t
                        .and_then(|t| t.data.get("status"))
                        .cloned()
                        .unwrap_or_default();
                    let now = counters(&status);
                    let Some(start) = &first else {
                        rep.note(format!("rx {} bytes", now.0));
                        first = Some(now);
                        return None;
                    };
                    for (k, v) in &now.1 {
                        if let Some((_, v0)) = start.1.iter().find(|(k0, _)| k0 == k)
                            && v > v0
                        {
                            return Some(format!("NAT counter {k} grew by {}", v - v0));
                        }
                    }
                    if now.0 > start.0 {
                        return Some(format!("received {} bytes", now.0 - start.0));
                    }
                    rep.note(format!("rx {} bytes, unchanged", now.0));
                    None
                })
                .await
            },
        )
        .await;
    match watched {
        Ok(detail) => r.pass(step, detail),
        Err(_) => r.fail(
            step,
            format!(
                "no packets came through Tunnel {tenant}/{id} in {} (rx {} bytes)",
                human(args.traffic_window),
                status.rx_bytes
            ),
            format!(
                "handshakes work but no traffic passes: check the NAT table (`nft list table inet liqo-{}`), the routes (`ip route show table 1818`) and the peer's gateway; a longer --traffic-window helps when the agent reports rarely",
                status.interface.as_deref().unwrap_or("<iface>").trim_start_matches("liqo-")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_counters_are_found_flat_or_nested() {
        let s = serde_json::json!({"rxBytes": 10, "natPackets": 4, "nat": {"translated": 7}, "txBytes": 1});
        let (rx, mut nat) = counters(&s);
        nat.sort();
        assert_eq!(rx, 10);
        assert_eq!(
            nat,
            vec![("nat.translated".into(), 7), ("natPackets".into(), 4)]
        );
    }
}
