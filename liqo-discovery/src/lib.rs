//! # liqo-discovery
//!
//! What every discovery provider shares:
//!
//! - [`record`]: the discovery record format, TXT key-value pairs used by mDNS and DNS alike,
//!   with a strict decoder that says which field was wrong;
//! - [`claims`]: which service instance speaks for a cluster id when several claim it;
//! - [`composite`]: [`CompositeDiscovery`], several sources merged into one (dedupe by cluster id,
//!   precedence Manual > DNS > mDNS, failing sources restarted without stopping the others);
//! - [`controller`]: [`DiscoveryController`], which turns what discovery reports into
//!   `ForeignCluster` objects (creation, status conditions, key pinning, expiry);
//! - [`channel`]: [`ChannelDiscovery`], a source driven from code.
//!
//! The providers live in their own crates: `liqo-discovery-mdns`, `liqo-discovery-dns` and
//! `liqo-discovery-static`.
//!
//! ```no_run
//! # async fn demo(client: kube::Client, mdns: impl liqo_core::Discovery,
//! #               dns: impl liqo_core::Discovery) -> Result<(), Box<dyn std::error::Error>> {
//! use liqo_discovery::{CompositeDiscovery, DiscoveryController};
//!
//! let discovery = CompositeDiscovery::builder().source(mdns).source(dns).build();
//! DiscoveryController::new(client, discovery)
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod channel;
pub mod claims;
pub mod composite;
pub mod controller;
pub mod record;

pub use channel::{ChannelDiscovery, ChannelHandle};
pub use claims::{ClaimConflict, InstanceTable};
pub use composite::{CompositeDiscovery, PeerView, ViewEvent};
pub use controller::{AutoPeerPolicy, ControllerConfig, ControllerError, DiscoveryController};
pub use record::{DiscoveryRecord, RecordError};
