//! # liqo-discovery
//!
//! What every discovery provider shares:
//!
//! - [`record`]: the discovery record format, TXT key-value pairs used by mDNS and DNS alike,
//!   with a strict decoder that says which field was wrong;
//! - the composite source and the controller that turns discovery events into `ForeignCluster`
//!   objects.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod record;

pub use record::{DiscoveryRecord, RecordError};
