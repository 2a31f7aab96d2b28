//! One module per command.

mod bundle;
mod diagnose;
mod discover;
mod info;
mod offload;
mod peer;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use liqo_core::{ClusterId, crds::ForeignCluster};
use serde::Serialize;

use crate::{
    CliError,
    cli::{BundleAction, Cli, Command, OffloadTarget, OutputFormat, UnoffloadTarget},
    kube_util::connect,
    output,
};

/// Runs the parsed command.
pub async fn dispatch(cli: Cli) -> Result<(), CliError> {
    if let Command::Version = cli.command {
        return version(cli.output);
    }
    let local = connect(
        cli.kubeconfig.as_deref(),
        cli.context.as_deref(),
        "local cluster",
    )
    .await?;
    match &cli.command {
        Command::Peer(args) => peer::peer(&cli, &local, args).await,
        Command::Unpeer { cluster_id } => peer::unpeer(&cli, &local, cluster_id).await,
        Command::Offload {
            target: OffloadTarget::Namespace(args),
        } => offload::offload(&cli, &local, args).await,
        Command::Unoffload {
            target: UnoffloadTarget::Namespace { name },
        } => offload::unoffload(&cli, &local, name).await,
        Command::Discover => discover::discover(&cli, &local).await,
        Command::Info { cluster_id } => info::info(&cli, &local, cluster_id.as_ref()).await,
        Command::Diagnose(args) => diagnose::diagnose(&cli, &local, args).await,
        Command::Bundle {
            action: BundleAction::Issue(args),
        } => bundle::issue(&cli, &local, args).await,
        Command::Bundle {
            action: BundleAction::Revoke { consumer },
        } => bundle::revoke(&cli, &local, consumer).await,
        Command::Version => Ok(()),
    }
}

#[derive(Serialize)]
struct Version {
    client: &'static str,
}

fn version(format: OutputFormat) -> Result<(), CliError> {
    let v = Version {
        client: env!("CARGO_PKG_VERSION"),
    };
    output::emit(format, &v, || format!("liqoctl {}\n", v.client))
}

/// A condition as shown to people and programs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CondView {
    status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
}

impl CondView {
    fn of(conds: &[Condition], type_: &str) -> Option<Self> {
        conds.iter().find(|c| c.type_ == type_).map(|c| Self {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
    }

    fn is_true(&self) -> bool {
        self.status == "True"
    }

    fn short(&self) -> String {
        match (self.reason.is_empty(), self.message.is_empty()) {
            (true, true) => self.status.clone(),
            (false, true) => format!("{} ({})", self.status, self.reason),
            (_, false) => format!("{} ({}: {})", self.status, self.reason, self.message),
        }
    }
}

/// The conditions of a ForeignCluster (empty without status).
pub(crate) fn fc_conditions(fc: &ForeignCluster) -> &[Condition] {
    fc.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// The consumer's Secret holding the credential for `provider`.
pub(crate) fn kubeconfig_secret(provider: &ClusterId) -> (String, String) {
    (
        liqo_core::names::tenant_namespace(provider),
        liqo_peering_csr::names::kubeconfig_secret(provider),
    )
}

/// The Node standing for `provider` on the consumer.
pub(crate) fn node_name(provider: &ClusterId) -> String {
    format!("liqo-{provider}")
}

/// `3m05s ago` for a past timestamp.
pub(crate) fn ago(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs = now.as_second() - t.0.as_second();
    match secs {
        ..0 => "in the future".into(),
        0..60 => format!("{secs}s ago"),
        _ => format!(
            "{} ago",
            crate::progress::human(std::time::Duration::from_secs(secs.unsigned_abs()))
        ),
    }
}
