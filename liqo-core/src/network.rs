//! Network parameters exchanged at peering, and the CIDR mappings that let pod CIDRs overlap.

use std::{borrow::Cow, fmt, net::IpAddr, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ClusterId, FabricError, ParseError};

/// An IPv4 or IPv6 network in canonical form (host bits zero), written `10.244.0.0/16`.
///
/// Parsing rejects host bits set (`10.244.0.1/16`) instead of silently masking them: a typo in
/// a CIDR should surface, not widen a route.
///
/// ```
/// use liqo_core::Cidr;
/// let c: Cidr = "10.244.0.0/16".parse().unwrap();
/// assert!(c.contains("10.244.3.4".parse().unwrap()));
/// assert!("10.244.0.1/16".parse::<Cidr>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Wraps a network, masking host bits.
    pub fn new(net: IpNet) -> Self {
        Self(net.trunc())
    }

    /// The underlying network.
    pub fn net(&self) -> IpNet {
        self.0
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }

    /// Whether the two networks share at least one address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0.network()) || other.0.contains(&self.0.network())
    }
}

impl From<Cidr> for IpNet {
    fn from(c: Cidr) -> Self {
        c.0
    }
}

impl FromStr for Cidr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net: IpNet = s.trim().parse().map_err(|_| {
            ParseError::new(
                "CIDR",
                s,
                "expected an address and a prefix length, e.g. 10.0.0.0/16",
            )
        })?;
        if net.trunc() != net {
            return Err(ParseError::new(
                "CIDR",
                s,
                format!("host bits are set; did you mean {}?", net.trunc()),
            ));
        }
        Ok(Self(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // The API server checks the format itself (CEL's CIDR library), so a bad object is
        // rejected at admission with this message rather than failing in a controller later.
        json_schema!({
            "type": "string",
            "maxLength": 43,
            "description": "A network in CIDR notation with host bits zero, e.g. 10.244.0.0/16.",
            "x-kubernetes-validations": [{
                "rule": "isCIDR(self) && cidr(self).masked() == cidr(self)",
                "message": "must be a CIDR with host bits zero, e.g. 10.244.0.0/16"
            }]
        })
    }
}

/// A WireGuard public key: 32 bytes, written in standard base64 (44 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireGuardKey([u8; 32]);

impl WireGuardKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireGuardKey({self})")
    }
}

impl FromStr for WireGuardKey {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| ParseError::new("WireGuard key", s, format!("not base64: {e}")))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            ParseError::new(
                "WireGuard key",
                s,
                format!("decodes to {} bytes, not 32", b.len()),
            )
        })?;
        Ok(Self(arr))
    }
}

impl Serialize for WireGuardKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WireGuardKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for WireGuardKey {
    fn schema_name() -> Cow<'static, str> {
        "WireGuardKey".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$",
            "description": "A WireGuard public key: 32 bytes in standard base64 (44 characters)."
        })
    }
}

/// The network facts one cluster tells a peer at peering time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkParameters {
    /// The CIDR pods get their IPs from.
    pub pod_cidr: Cidr,
    /// The CIDR of ClusterIP services.
    pub service_cidr: Cidr,
    /// A CIDR that stands for addresses outside the pod network (nodes, external IPs), if used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_cidr: Option<Cidr>,
    /// Where the cluster's gateway listens (`host:port`), if it has one yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_endpoint: Option<String>,
    /// The gateway's WireGuard public key, if it has one yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<WireGuardKey>,
}

impl NetworkParameters {
    /// Parameters with the two mandatory CIDRs.
    pub fn new(pod_cidr: Cidr, service_cidr: Cidr) -> Self {
        Self {
            pod_cidr,
            service_cidr,
            external_cidr: None,
            gateway_endpoint: None,
            wireguard_public_key: None,
        }
    }
}

/// How one remote network is seen locally: `real` is the CIDR in the remote cluster, `remapped`
/// the CIDR local pods use to reach it (equal to `real` when nothing overlapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CidrMapping {
    /// The network as the remote cluster knows it.
    pub real: Cidr,
    /// The network as the local cluster addresses it.
    pub remapped: Cidr,
}

impl CidrMapping {
    /// A mapping between two networks of the same family and prefix length.
    pub fn new(real: Cidr, remapped: Cidr) -> Result<Self, FabricError> {
        if real.prefix_len() != remapped.prefix_len()
            || real.net().addr().is_ipv4() != remapped.net().addr().is_ipv4()
        {
            return Err(FabricError::InvalidConfig(format!(
                "cannot map {real} onto {remapped}: family and prefix length must match"
            )));
        }
        Ok(Self { real, remapped })
    }

    /// A mapping that changes nothing.
    pub fn identity(cidr: Cidr) -> Self {
        Self {
            real: cidr,
            remapped: cidr,
        }
    }

    /// Whether this mapping changes addresses.
    pub fn is_identity(&self) -> bool {
        self.real == self.remapped
    }

    /// `ip` in `from` moved to the same host offset in `to`.
    fn shift(ip: IpAddr, from: Cidr, to: Cidr) -> Option<IpAddr> {
        if !from.contains(ip) {
            return None;
        }
        match (ip, from.net().network(), to.net().network()) {
            (IpAddr::V4(ip), IpAddr::V4(f), IpAddr::V4(t)) => {
                let host = u32::from(ip) - u32::from(f);
                Some(IpAddr::V4((u32::from(t) | host).into()))
            }
            (IpAddr::V6(ip), IpAddr::V6(f), IpAddr::V6(t)) => {
                let host = u128::from(ip) - u128::from(f);
                Some(IpAddr::V6((u128::from(t) | host).into()))
            }
            _ => None,
        }
    }

    /// A remote (real) address as local pods must address it, if it is in `real`.
    pub fn to_remapped(&self, ip: IpAddr) -> Option<IpAddr> {
        Self::shift(ip, self.real, self.remapped)
    }

    /// A locally used (remapped) address as the remote cluster knows it, if it is in `remapped`.
    pub fn to_real(&self, ip: IpAddr) -> Option<IpAddr> {
        Self::shift(ip, self.remapped, self.real)
    }
}

/// Translates addresses of one remote cluster both ways, through its [`CidrMapping`]s.
///
/// ```
/// use liqo_core::{AddressTranslator, CidrMapping};
/// let m = CidrMapping::new("10.244.0.0/16".parse().unwrap(), "10.71.0.0/16".parse().unwrap()).unwrap();
/// let t = AddressTranslator::new("rome".parse().unwrap(), vec![m]);
/// let seen = t.to_local_view("10.244.1.7".parse().unwrap()).unwrap();
/// assert_eq!(seen.to_string(), "10.71.1.7");
/// assert_eq!(t.to_remote_view(seen).unwrap().to_string(), "10.244.1.7");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressTranslator {
    cluster: ClusterId,
    mappings: Vec<CidrMapping>,
    local: Vec<CidrMapping>,
}

impl AddressTranslator {
    /// A translator for `cluster` over `mappings`.
    pub fn new(cluster: ClusterId, mappings: Vec<CidrMapping>) -> Self {
        Self {
            cluster,
            mappings,
            local: Vec::new(),
        }
    }

    /// Also knowing how the remote cluster addresses this cluster's own networks (the peer's
    /// remapping of us, [`PeerLink::local_mappings`](crate::PeerLink::local_mappings)).
    pub fn with_local(mut self, local: Vec<CidrMapping>) -> Self {
        self.local = local;
        self
    }

    /// How the remote cluster addresses this cluster's networks (empty while unknown).
    pub fn local_mappings(&self) -> &[CidrMapping] {
        &self.local
    }

    /// One of this cluster's addresses (a local pod IP) as the remote cluster reaches it.
    /// Unchanged while the remote's view of this cluster is unknown; `None` for an address
    /// outside every network the remote knows this cluster by (e.g. a third cluster's pod
    /// seen here): the remote cannot reach it through the fabric.
    ///
    /// ```
    /// use liqo_core::{AddressTranslator, CidrMapping};
    /// let us = CidrMapping::new("10.244.0.0/16".parse().unwrap(), "10.72.0.0/16".parse().unwrap()).unwrap();
    /// let t = AddressTranslator::new("milan".parse().unwrap(), vec![]).with_local(vec![us]);
    /// assert_eq!(t.local_for_remote("10.244.1.7".parse().unwrap()).unwrap().to_string(), "10.72.1.7");
    /// assert_eq!(t.local_for_remote("10.99.0.1".parse().unwrap()), None);
    /// ```
    pub fn local_for_remote(&self, ip: IpAddr) -> Option<IpAddr> {
        if self.local.is_empty() {
            return Some(ip);
        }
        self.local.iter().find_map(|m| m.to_remapped(ip))
    }

    /// The cluster this translator is for.
    pub fn cluster(&self) -> &ClusterId {
        &self.cluster
    }

    /// The mappings it applies.
    pub fn mappings(&self) -> &[CidrMapping] {
        &self.mappings
    }

    /// A remote cluster's address (e.g. a remote pod IP) as local pods reach it.
    pub fn to_local_view(&self, ip: IpAddr) -> Result<IpAddr, FabricError> {
        self.mappings
            .iter()
            .find_map(|m| m.to_remapped(ip))
            .ok_or_else(|| FabricError::Untranslatable {
                cluster: self.cluster.clone(),
                address: ip,
            })
    }

    /// An address as used locally for the remote cluster, back to the remote cluster's own.
    pub fn to_remote_view(&self, ip: IpAddr) -> Result<IpAddr, FabricError> {
        self.mappings
            .iter()
            .find_map(|m| m.to_real(ip))
            .ok_or_else(|| FabricError::Untranslatable {
                cluster: self.cluster.clone(),
                address: ip,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_rejects_host_bits_and_garbage() {
        let e = "10.244.0.1/16".parse::<Cidr>().unwrap_err().to_string();
        assert!(e.contains("did you mean 10.244.0.0/16"), "{e}");
        assert!("10.244.0.0".parse::<Cidr>().is_err());
        assert!("300.1.1.1/8".parse::<Cidr>().is_err());
        assert!(serde_json::from_str::<Cidr>("\"10.0.0.0/33\"").is_err());
        assert_eq!(cidr("fd00::/64").to_string(), "fd00::/64");
    }

    #[test]
    fn overlap_detection() {
        assert!(cidr("10.0.0.0/8").overlaps(&cidr("10.1.0.0/16")));
        assert!(cidr("10.1.0.0/16").overlaps(&cidr("10.0.0.0/8")));
        assert!(!cidr("10.1.0.0/16").overlaps(&cidr("10.2.0.0/16")));
    }

    #[test]
    fn mapping_shifts_host_bits_both_ways() {
        let m = CidrMapping::new(cidr("10.244.0.0/16"), cidr("10.80.0.0/16")).unwrap();
        let ip: IpAddr = "10.244.255.1".parse().unwrap();
        let remapped = m.to_remapped(ip).unwrap();
        assert_eq!(remapped.to_string(), "10.80.255.1");
        assert_eq!(m.to_real(remapped).unwrap(), ip);
        assert_eq!(m.to_remapped("10.245.0.1".parse().unwrap()), None);
        let v6 = CidrMapping::new(cidr("fd00:1::/64"), cidr("fd00:2::/64")).unwrap();
        assert_eq!(
            v6.to_remapped("fd00:1::42".parse().unwrap())
                .unwrap()
                .to_string(),
            "fd00:2::42"
        );
    }

    #[test]
    fn mapping_requires_same_shape() {
        assert!(CidrMapping::new(cidr("10.0.0.0/16"), cidr("10.1.0.0/24")).is_err());
        assert!(CidrMapping::new(cidr("10.0.0.0/16"), cidr("fd00::/16")).is_err());
    }

    #[test]
    fn translator_reports_untranslatable() {
        let t = AddressTranslator::new(
            "rome".parse().unwrap(),
            vec![CidrMapping::identity(cidr("10.96.0.0/12"))],
        );
        assert_eq!(
            t.to_local_view("10.96.0.10".parse().unwrap())
                .unwrap()
                .to_string(),
            "10.96.0.10"
        );
        let e = t
            .to_local_view("192.0.2.1".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("192.0.2.1") && e.contains("rome"), "{e}");
    }

    #[test]
    fn wireguard_key_validation() {
        let k = WireGuardKey::from_bytes([7; 32]);
        assert_eq!(k.to_string().parse::<WireGuardKey>().unwrap(), k);
        let e = "AAAA".parse::<WireGuardKey>().unwrap_err().to_string();
        assert!(e.contains("3 bytes, not 32"), "{e}");
    }
}
