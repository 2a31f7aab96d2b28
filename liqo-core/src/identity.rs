//! Who a cluster is: a stable id, a human name and the public key it proves itself with.

use std::{borrow::Cow, fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::ParseError;

/// Longest cluster id: it must fit in a label value and leave room in `<namespace>-<cluster-id>`.
const MAX_CLUSTER_ID_LEN: usize = 63;

/// The stable identity of a cluster: a DNS-1123 label (lower-case letters, digits and `-`,
/// starting and ending with an alphanumeric, at most 63 characters).
///
/// It appears in object names (`<namespace>-<cluster-id>` twin namespaces), label values and
/// discovery records, hence the strict format.
///
/// ```
/// use liqo_core::ClusterId;
/// let id: ClusterId = "rome-1".parse().unwrap();
/// assert_eq!(id.as_str(), "rome-1");
/// assert!("Rome_1".parse::<ClusterId>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(String);

impl ClusterId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ClusterId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseError::new("cluster id", s, reason);
        if s.is_empty() {
            return Err(err("must not be empty"));
        }
        if s.len() > MAX_CLUSTER_ID_LEN {
            return Err(err("must be at most 63 characters"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
        {
            return Err(err(&format!(
                "character {c:?} is not allowed (use lower-case letters, digits and '-')"
            )));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(err("must start and end with a letter or digit"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ClusterId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for ClusterId {
    fn schema_name() -> Cow<'static, str> {
        "ClusterId".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_CLUSTER_ID_LEN,
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
            "description": "A cluster id: a DNS-1123 label (lower-case letters, digits and '-', at most 63 characters)."
        })
    }
}

/// A cluster's public key (raw bytes, Ed25519 by convention of the bundled peering provider).
/// Serialized as standard base64.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey(Vec<u8>);

impl PublicKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key's fingerprint, the short form discovery advertises and peers pin.
    pub fn fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint(Sha256::digest(&self.0).into())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(&self.0))
    }
}

impl FromStr for PublicKey {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| ParseError::new("public key", s, format!("not base64: {e}")))?;
        if bytes.is_empty() {
            return Err(ParseError::new("public key", s, "must not be empty"));
        }
        Ok(Self(bytes))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The SHA-256 fingerprint of a [`PublicKey`], written `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint([u8; 32]);

impl KeyFingerprint {
    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for KeyFingerprint {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseError::new("key fingerprint", s, reason);
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| err("must start with 'sha256:'"))?;
        if hex.len() != 64 {
            return Err(err("must have 64 hex digits after 'sha256:'"));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).map_err(|_| err("not ASCII"))?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| err("not hexadecimal"))?;
        }
        Ok(Self(out))
    }
}

impl Serialize for KeyFingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyFingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for KeyFingerprint {
    fn schema_name() -> Cow<'static, str> {
        "KeyFingerprint".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^sha256:[0-9a-f]{64}$",
            "description": "SHA-256 fingerprint of the cluster's public key: 'sha256:' and 64 lower-case hex digits."
        })
    }
}

/// Everything that identifies a cluster to its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterIdentity {
    /// Stable id, unique among peers.
    pub id: ClusterId,
    /// Human-readable name (free text).
    pub name: String,
    /// The key the cluster proves itself with, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
}

impl ClusterIdentity {
    /// An identity without a key yet.
    pub fn new(id: ClusterId, name: impl Into<String>) -> Self {
        Self {
            id,
            name: name.into(),
            public_key: None,
        }
    }

    /// Sets the public key.
    pub fn with_public_key(mut self, key: PublicKey) -> Self {
        self.public_key = Some(key);
        self
    }

    /// The fingerprint of the public key, if any.
    pub fn fingerprint(&self) -> Option<KeyFingerprint> {
        self.public_key.as_ref().map(PublicKey::fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_accepts_dns_labels() {
        for ok in ["a", "cluster-1", "0abc", &"x".repeat(63)] {
            assert_eq!(ok.parse::<ClusterId>().unwrap().as_str(), ok);
        }
    }

    #[test]
    fn cluster_id_rejects_with_reason() {
        let cases = [
            ("", "empty"),
            ("-a", "start and end"),
            ("a-", "start and end"),
            ("A", "'A'"),
            ("a_b", "'_'"),
            ("a.b", "'.'"),
        ];
        for (bad, why) in cases {
            let err = bad.parse::<ClusterId>().unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        let long = "x".repeat(64);
        assert!(
            long.parse::<ClusterId>()
                .unwrap_err()
                .to_string()
                .contains("63")
        );
    }

    #[test]
    fn cluster_id_deserialization_validates() {
        assert!(serde_json::from_str::<ClusterId>("\"ok-1\"").is_ok());
        let err = serde_json::from_str::<ClusterId>("\"Not OK\"").unwrap_err();
        assert!(err.to_string().contains("cluster id"), "{err}");
    }

    #[test]
    fn fingerprint_round_trips_and_is_sha256() {
        let key = PublicKey::from_bytes(b"abc".to_vec());
        let fp = key.fingerprint();
        // SHA-256("abc"), a published test vector.
        assert_eq!(
            fp.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(fp.to_string().parse::<KeyFingerprint>().unwrap(), fp);
        assert!("sha256:zz".parse::<KeyFingerprint>().is_err());
        assert!("md5:00".parse::<KeyFingerprint>().is_err());
    }

    #[test]
    fn public_key_base64_round_trip() {
        let key = PublicKey::from_bytes(vec![1, 2, 3, 250]);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), key);
        assert!(
            "!!".parse::<PublicKey>()
                .unwrap_err()
                .to_string()
                .contains("base64")
        );
    }
}
