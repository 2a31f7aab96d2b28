//! # liqo-wireguard-kernel
//!
//! A [`WireGuardBackend`] on the Linux kernel module: the interface is an rtnetlink link of
//! kind `wireguard`, configured through `wireguard-control`'s `Backend::Kernel` (generic
//! netlink). Where the module is missing, creating the link fails and [`Kernel`] says so and
//! points at the userspace backend (`liqo-wireguard-userspace`).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use async_trait::async_trait;
use liqo_core::FabricError;
use liqo_fabric_wireguard::WireGuardBackend;
use liqo_net::routes::Netlink;

/// The kernel WireGuard backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kernel;

const NAME: &str = "wireguard-kernel";
const EOPNOTSUPP: i32 = 95;

#[async_trait]
impl WireGuardBackend for Kernel {
    fn name(&self) -> &str {
        NAME
    }

    fn control(&self) -> liqo_fabric_wireguard::wireguard_control::Backend {
        liqo_fabric_wireguard::wireguard_control::Backend::Kernel
    }

    async fn create(&self, iface: &str) -> Result<(), FabricError> {
        liqo_fabric_wireguard::backend::check_interface_name(iface)?;
        let nl = Netlink::connect()?;
        if nl.link_index(iface).await?.is_some() {
            return Ok(());
        }
        let msg = rtnetlink::LinkWireguard::new(iface).build();
        match nl.handle().link().add(msg).execute().await {
            Ok(()) => Ok(()),
            // The kernel answers EOPNOTSUPP for a link kind no module provides.
            Err(e) if liqo_net::routes::errno(&e) == Some(EOPNOTSUPP) => {
                Err(FabricError::Backend {
                    backend: NAME.into(),
                    message: format!(
                        "creating interface {iface}: kernel WireGuard is not available (module missing): use the userspace backend"
                    ),
                })
            }
            Err(e) => Err(FabricError::Backend {
                backend: NAME.into(),
                message: format!("creating interface {iface}: {e}"),
            }),
        }
    }

    async fn remove(&self, iface: &str) -> Result<(), FabricError> {
        Netlink::connect()?.delete_link(iface).await
    }
}
