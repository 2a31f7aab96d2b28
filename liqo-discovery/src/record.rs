//! The discovery record: what a cluster publishes about itself in TXT data (mDNS TXT records, DNS
//! TXT records next to the SRV ones).
//!
//! Each entry is `key=value`:
//!
//! | key | meaning | required |
//! |---|---|---|
//! | `v` | protocol version ([`liqo_core::PROTOCOL_VERSION`]) | yes |
//! | `id` | cluster id (DNS-1123 label) | yes |
//! | `name` | cluster name, UTF-8, at most 63 bytes | no (defaults to the id) |
//! | `ep` | peering endpoint, an `https://host:port` URL (port 1-65535) | yes, unless the medium gives one ([`DiscoveryRecord::from_txt_with_endpoint`]) |
//! | `fp` | `sha256:<hex>` fingerprint of the cluster's public key | no |
//!
//! Unknown keys are ignored (newer publishers may add some); a repeated known key, a missing
//! required key, an entry over 255 bytes or a record over [`MAX_RECORD_BYTES`] is an error.

use std::{str::FromStr, time::Duration};

use liqo_core::{ClusterId, DiscoverySource, KeyFingerprint, PROTOCOL_VERSION, PeerAdvertisement};

/// The largest TXT record accepted, all entries together (a typical mDNS packet budget).
pub const MAX_RECORD_BYTES: usize = 1300;
/// The largest single TXT entry: a DNS character-string holds at most 255 bytes.
pub const MAX_ENTRY_BYTES: usize = 255;
/// The longest cluster name.
pub const MAX_NAME_BYTES: usize = 63;

/// Why a record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The whole record is too large.
    #[error("record is {0} bytes; at most {MAX_RECORD_BYTES} are accepted")]
    TooLarge(usize),
    /// One entry is too large.
    #[error("entry {key:?} is {len} bytes; at most {MAX_ENTRY_BYTES} are accepted")]
    EntryTooLarge {
        /// The entry's key (or its start, when it has no `=`).
        key: String,
        /// Its length.
        len: usize,
    },
    /// An entry is not UTF-8.
    #[error("entry {index} is not UTF-8")]
    NotUtf8 {
        /// Its position in the record.
        index: usize,
    },
    /// A required key is missing.
    #[error("required key {0:?} is missing")]
    Missing(&'static str),
    /// A known key appears twice.
    #[error("key {0:?} appears more than once")]
    Duplicate(String),
    /// A value is malformed.
    #[error("key {key:?}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// The publisher speaks a protocol version this crate does not.
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
}

/// The fields of a discovery record, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryRecord {
    /// The cluster id.
    pub cluster_id: ClusterId,
    /// The cluster name.
    pub cluster_name: String,
    /// The peering endpoint (`https://host:port`).
    pub peering_endpoint: String,
    /// The fingerprint of the cluster's public key.
    pub key_fingerprint: Option<KeyFingerprint>,
    /// The protocol version.
    pub protocol_version: u16,
}

/// Checks a peering endpoint: an `https` URL with a host and nothing after the authority but `/`.
pub fn validate_endpoint(ep: &str) -> Result<(), String> {
    let url = url::Url::parse(ep).map_err(|e| format!("{ep:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("{ep:?} must use https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{ep:?} has no host"));
    }
    if url.port() == Some(0) {
        return Err(format!("{ep:?} has port 0"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{ep:?} must not carry credentials"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{ep:?} must be scheme, host and port only"));
    }
    Ok(())
}

/// The peering endpoint URL for a host and port as DNS gives them (`https://host:port`): a
/// trailing dot of a fully qualified name is dropped and an IPv6 address is bracketed.
///
/// ```
/// use liqo_discovery::record::endpoint_url;
/// assert_eq!(endpoint_url("gw.example.org.", 8443), "https://gw.example.org:8443");
/// assert_eq!(endpoint_url("fd00::1", 443), "https://[fd00::1]:443");
/// ```
pub fn endpoint_url(host: &str, port: u16) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

impl DiscoveryRecord {
    /// The record describing `ad`.
    pub fn from_advertisement(ad: &PeerAdvertisement) -> Self {
        Self {
            cluster_id: ad.cluster_id.clone(),
            cluster_name: ad.cluster_name.clone(),
            peering_endpoint: ad.peering_endpoint.clone(),
            key_fingerprint: ad.key_fingerprint,
            protocol_version: ad.protocol_version,
        }
    }

    /// The advertisement for this record, as reported by `source` and valid for `ttl`.
    pub fn into_advertisement(
        self,
        source: DiscoverySource,
        ttl: Option<Duration>,
    ) -> PeerAdvertisement {
        PeerAdvertisement {
            cluster_id: self.cluster_id,
            cluster_name: self.cluster_name,
            peering_endpoint: self.peering_endpoint,
            key_fingerprint: self.key_fingerprint,
            protocol_version: self.protocol_version,
            source,
            ttl,
        }
    }

    /// The TXT entries, `key=value` each, in a fixed order.
    pub fn to_txt(&self) -> Vec<String> {
        let mut out = vec![
            format!("v={}", self.protocol_version),
            format!("id={}", self.cluster_id),
            format!("name={}", self.cluster_name),
            format!("ep={}", self.peering_endpoint),
        ];
        if let Some(fp) = &self.key_fingerprint {
            out.push(format!("fp={fp}"));
        }
        out
    }

    /// The TXT entries as `(key, value)` pairs, for libraries that take properties.
    pub fn to_properties(&self) -> Vec<(String, String)> {
        self.to_txt()
            .into_iter()
            .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect()
    }

    /// Decodes TXT entries (raw bytes each, as DNS carries them).
    pub fn from_txt<I, B>(entries: I) -> Result<Self, RecordError>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        Self::decode(entries, None)
    }

    /// Decodes TXT entries where the medium supplies the peering endpoint itself (an SRV record
    /// gives host and port): `endpoint` is used when the record has no `ep` key, and is validated
    /// like one. With `endpoint` `None` this is [`from_txt`](Self::from_txt).
    pub fn from_txt_with_endpoint<I, B>(
        entries: I,
        endpoint: Option<String>,
    ) -> Result<Self, RecordError>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        Self::decode(entries, endpoint)
    }

    fn decode<I, B>(entries: I, fallback_endpoint: Option<String>) -> Result<Self, RecordError>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let mut total = 0usize;
        let mut fields: [Option<String>; 5] = Default::default();
        const KEYS: [&str; 5] = ["v", "id", "name", "ep", "fp"];
        for (index, entry) in entries.into_iter().enumerate() {
            let entry = entry.as_ref();
            total += entry.len();
            if total > MAX_RECORD_BYTES {
                return Err(RecordError::TooLarge(total));
            }
            let text = std::str::from_utf8(entry).map_err(|_| RecordError::NotUtf8 { index })?;
            let (key, value) = text.split_once('=').unwrap_or((text, ""));
            if entry.len() > MAX_ENTRY_BYTES {
                return Err(RecordError::EntryTooLarge {
                    key: key.chars().take(32).collect(),
                    len: entry.len(),
                });
            }
            // Keys are case-insensitive (RFC 6763 section 6.4).
            let key = key.to_ascii_lowercase();
            if let Some(slot) = KEYS.iter().position(|k| *k == key) {
                if fields[slot].is_some() {
                    return Err(RecordError::Duplicate(key));
                }
                fields[slot] = Some(value.to_owned());
            }
        }
        let [v, id, name, ep, fp] = fields;
        let v = v.ok_or(RecordError::Missing("v"))?;
        let protocol_version = u16::from_str(&v).map_err(|_| RecordError::Invalid {
            key: "v",
            reason: format!("{v:?} is not a version number"),
        })?;
        if protocol_version != PROTOCOL_VERSION {
            return Err(RecordError::UnsupportedVersion(protocol_version));
        }
        let id = id.ok_or(RecordError::Missing("id"))?;
        let cluster_id = ClusterId::from_str(&id).map_err(|e| RecordError::Invalid {
            key: "id",
            reason: e.reason,
        })?;
        let cluster_name = match name {
            Some(n) if n.len() > MAX_NAME_BYTES => {
                return Err(RecordError::Invalid {
                    key: "name",
                    reason: format!("{} bytes; at most {MAX_NAME_BYTES}", n.len()),
                });
            }
            Some(n) if n.chars().any(char::is_control) => {
                return Err(RecordError::Invalid {
                    key: "name",
                    reason: "contains control characters".into(),
                });
            }
            Some(n) if !n.is_empty() => n,
            _ => cluster_id.to_string(),
        };
        let peering_endpoint = ep.or(fallback_endpoint).ok_or(RecordError::Missing("ep"))?;
        validate_endpoint(&peering_endpoint)
            .map_err(|reason| RecordError::Invalid { key: "ep", reason })?;
        let key_fingerprint = fp
            .map(|f| {
                KeyFingerprint::from_str(&f).map_err(|e| RecordError::Invalid {
                    key: "fp",
                    reason: e.reason,
                })
            })
            .transpose()?;
        Ok(Self {
            cluster_id,
            cluster_name,
            peering_endpoint,
            key_fingerprint,
            protocol_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DiscoveryRecord {
        DiscoveryRecord {
            cluster_id: "rome-1".parse().unwrap(),
            cluster_name: "Rome één".into(),
            peering_endpoint: "https://10.0.0.1:8443".into(),
            key_fingerprint: Some(liqo_core::PublicKey::from_bytes(vec![1, 2, 3]).fingerprint()),
            protocol_version: PROTOCOL_VERSION,
        }
    }

    fn decode(entries: &[&str]) -> Result<DiscoveryRecord, RecordError> {
        DiscoveryRecord::from_txt(entries.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(DiscoveryRecord::from_txt(r.to_txt()).unwrap(), r);
        let ad = r
            .clone()
            .into_advertisement(DiscoverySource::Dns, Some(Duration::from_secs(30)));
        assert_eq!(DiscoveryRecord::from_advertisement(&ad), r);
        assert_eq!(r.to_properties()[1], ("id".to_owned(), "rome-1".to_owned()));
    }

    #[test]
    fn unknown_keys_ignored_and_keys_case_insensitive() {
        let r = decode(&["V=1", "ID=a", "ep=https://h:1", "future=x", "flag"]).unwrap();
        assert_eq!(r.cluster_name, "a", "name defaults to the id");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[&str], &str)] = &[
            (&["id=a", "ep=https://h:1"], "\"v\" is missing"),
            (&["v=1", "ep=https://h:1"], "\"id\" is missing"),
            (&["v=1", "id=a"], "\"ep\" is missing"),
            (&["v=x", "id=a", "ep=https://h:1"], "not a version"),
            (&["v=9", "id=a", "ep=https://h:1"], "protocol version 9"),
            (&["v=1", "id=A!", "ep=https://h:1"], "key \"id\""),
            (&["v=1", "id=a", "ep=http://h:1"], "must use https"),
            (&["v=1", "id=a", "ep=https://h:99999"], "not a URL"),
            (&["v=1", "id=a", "ep=https://h:0"], "port 0"),
            (&["v=1", "id=a", "ep=https://h:-1"], "not a URL"),
            (&["v=1", "id=a", "ep=https://u:p@h:1"], "credentials"),
            (&["v=1", "id=a", "ep=https://h:1/x"], "host and port only"),
            (&["v=1", "id=a", "ep=not a url"], "not a URL"),
            (
                &["v=1", "id=a", "ep=https://h:1", "fp=md5:00"],
                "key \"fp\"",
            ),
            (&["v=1", "id=a", "id=b", "ep=https://h:1"], "more than once"),
            (
                &["v=1", "id=a", "ep=https://h:1", "name=a\u{7}b"],
                "control",
            ),
        ];
        for (entries, want) in cases {
            let err = decode(entries).unwrap_err().to_string();
            assert!(err.contains(want), "{entries:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn endpoint_from_the_medium_when_ep_is_absent() {
        let entries = ["v=1", "id=a"];
        let r = DiscoveryRecord::from_txt_with_endpoint(
            entries.iter().map(|s| s.as_bytes()),
            Some(endpoint_url("gw.example.org.", 7443)),
        )
        .unwrap();
        assert_eq!(r.peering_endpoint, "https://gw.example.org:7443");
        // The record's own `ep` wins over the medium's.
        let entries = ["v=1", "id=a", "ep=https://h:1"];
        let r = DiscoveryRecord::from_txt_with_endpoint(
            entries.iter().map(|s| s.as_bytes()),
            Some("https://other:2".into()),
        )
        .unwrap();
        assert_eq!(r.peering_endpoint, "https://h:1");
        // The medium's endpoint is validated like `ep`.
        let err = DiscoveryRecord::from_txt_with_endpoint(
            ["v=1", "id=a"].iter().map(|s| s.as_bytes()),
            Some("http://h:1".into()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        assert_eq!(endpoint_url("10.0.0.1", 1), "https://10.0.0.1:1");
    }

    #[test]
    fn oversized_input_is_rejected() {
        let long_name = format!("name={}", "x".repeat(64));
        assert!(
            decode(&["v=1", "id=a", "ep=https://h:1", &long_name])
                .unwrap_err()
                .to_string()
                .contains("at most 63")
        );
        let long_entry = format!("pad={}", "x".repeat(300));
        assert!(matches!(
            decode(&["v=1", &long_entry]),
            Err(RecordError::EntryTooLarge { .. })
        ));
        let many: Vec<String> = (0..20)
            .map(|i| format!("k{i}={}", "y".repeat(100)))
            .collect();
        assert!(matches!(
            DiscoveryRecord::from_txt(many.iter().map(String::as_bytes)),
            Err(RecordError::TooLarge(_))
        ));
        assert!(matches!(
            DiscoveryRecord::from_txt([&[0xff, 0xfe][..]]),
            Err(RecordError::NotUtf8 { index: 0 })
        ));
    }
}
