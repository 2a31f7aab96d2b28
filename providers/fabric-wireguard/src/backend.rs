//! The WireGuard implementations a gateway can drive, behind one trait.
//!
//! Every implementation is configured the same way, through `wireguard-control` (kernel
//! netlink or the userspace UAPI socket); what differs is how the interface comes to exist and
//! whether something must keep it alive. Provider crates implement [`WireGuardBackend`]:
//! `liqo-wireguard-kernel` (kernel module) and `liqo-wireguard-userspace` (wireguard-go or
//! in-process boringtun).

use std::time::SystemTime;

use async_trait::async_trait;
use liqo_core::FabricError;
use tokio::sync::watch;

/// A way to make a WireGuard interface exist in the current network namespace.
#[async_trait]
pub trait WireGuardBackend: Send + Sync + 'static {
    /// A short name for errors and logs, e.g. `wireguard-go`.
    fn name(&self) -> &str;

    /// How `wireguard-control` reaches the interface once it exists.
    fn control(&self) -> wireguard_control::Backend;

    /// Creates interface `iface` if it does not exist and returns once it accepts
    /// configuration. Idempotent.
    async fn create(&self, iface: &str) -> Result<(), FabricError>;

    /// Removes interface `iface` and everything the implementation left for it (daemon,
    /// control socket). Idempotent.
    async fn remove(&self, iface: &str) -> Result<(), FabricError>;

    /// Deals with what an earlier run of this program left for `iface` (it crashed or was
    /// killed): called by the gateway once before it first creates the interface. A daemon of
    /// that run still alive is replaced, a stale control socket removed; what another program
    /// owns is left alone (and [`create`](Self::create) then refuses it, naming the owner).
    /// Returns what it found and did, for the gateway's one log line; empty when nothing. The
    /// default finds nothing.
    async fn clear_leftovers(&self, iface: &str) -> Result<Vec<String>, FabricError> {
        let _ = iface;
        Ok(Vec::new())
    }

    /// Changes each time the implementation recreated an interface on its own (a supervised
    /// daemon restarted): the interface came back empty and the gateway must configure it
    /// again. The default never changes.
    fn restarts(&self) -> watch::Receiver<u64> {
        watch::channel(0).1
    }

    /// The time of the last handshake from what the implementation reported (and the bytes
    /// received from the peer). The default trusts the report; an implementation that reports
    /// something else (boringtun reports the time *since* the handshake) corrects it here.
    fn handshake_time(&self, reported: Option<SystemTime>, rx_bytes: u64) -> Option<SystemTime> {
        let _ = rx_bytes;
        reported
    }
}

#[async_trait]
impl<T: WireGuardBackend + ?Sized> WireGuardBackend for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn control(&self) -> wireguard_control::Backend {
        (**self).control()
    }
    async fn create(&self, iface: &str) -> Result<(), FabricError> {
        (**self).create(iface).await
    }
    async fn remove(&self, iface: &str) -> Result<(), FabricError> {
        (**self).remove(iface).await
    }
    async fn clear_leftovers(&self, iface: &str) -> Result<Vec<String>, FabricError> {
        (**self).clear_leftovers(iface).await
    }
    fn restarts(&self) -> watch::Receiver<u64> {
        (**self).restarts()
    }
    fn handshake_time(&self, reported: Option<SystemTime>, rx_bytes: u64) -> Option<SystemTime> {
        (**self).handshake_time(reported, rx_bytes)
    }
}

/// Checks an interface name the way the kernel will (1 to 15 bytes, no `/`, whitespace or
/// NUL), so a bad name fails before anything is created.
pub fn check_interface_name(name: &str) -> Result<wireguard_control::InterfaceName, FabricError> {
    name.parse().map_err(|e| {
        FabricError::InvalidConfig(format!("interface name {name:?}: {e} (at most 15 bytes)"))
    })
}

/// A new random WireGuard private key.
pub fn generate_private_key() -> wireguard_control::Key {
    wireguard_control::Key::generate_private()
}

/// A private key from its base64 form, with an error saying what is wrong.
pub fn parse_private_key(s: &str) -> Result<wireguard_control::Key, FabricError> {
    wireguard_control::Key::from_base64(s.trim()).map_err(|_| {
        FabricError::InvalidConfig(
            "WireGuard private key: expected 32 bytes in base64 (44 characters)".into(),
        )
    })
}

/// The public key of `private`, as exchanged at peering.
pub fn public_key_of(private: &wireguard_control::Key) -> liqo_core::WireGuardKey {
    liqo_core::WireGuardKey::from_bytes(private.get_public().0)
}
