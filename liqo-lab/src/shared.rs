//! One lab shared by every test of a test binary.

use std::sync::OnceLock;

use tokio::{runtime::Runtime, sync::OnceCell};

use crate::{
    error::{LabError, Result},
    lab::Lab,
    spec::{LabSpec, Lifetime},
};

static SHARED: OnceCell<Result<Lab, String>> = OnceCell::const_new();
static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

fn runtime() -> Result<&'static Runtime> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("liqo-lab-shared")
                .enable_all()
                .build()
                .map_err(|e| format!("building the shared lab's Tokio runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| LabError::Shared(e.clone()))
}

/// The lab shared by every caller in this process, started on first use from `spec()`.
///
/// Meant for test binaries: each `#[tokio::test]` calls
/// `liqo_lab::shared(|| LabSpec::new([...])).await?` and they all get the same lab, started
/// once. Only the first call's `spec` is used, and it is forced to be
/// [attached](Lifetime::Attached): the lab is never dropped, its processes die with the test binary
/// (parent-death signal) and a watchdog removes its directory afterwards.
///
/// The lab starts on a dedicated runtime that lives as long as the process, so it does not depend
/// on the runtime of the test that happened to start it. Do not keep a [`kube::Client`] across
/// tests: each test's runtime ends with the test; call [`Cluster::client`](crate::Cluster::client)
/// in every test instead.
///
/// If the start fails, every later call returns the same error (as [`LabError::Shared`]) without
/// trying again.
pub async fn shared(spec: impl FnOnce() -> LabSpec) -> Result<&'static Lab> {
    let slot = SHARED
        .get_or_init(|| async move {
            let mut spec = spec();
            spec.lifetime = Lifetime::Attached;
            let rt = runtime().map_err(|e| e.to_string())?;
            match rt.spawn(Lab::start(spec)).await {
                Ok(Ok(lab)) => Ok(lab),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the start-up task failed: {e}")),
            }
        })
        .await;
    slot.as_ref().map_err(|e| LabError::Shared(e.clone()))
}
