//! The double NAT that lets clusters with the same pod CIDR talk, as one nftables table.
//!
//! Traffic in the tunnel is addressed in *per-peer remapped ranges*: a packet from this cluster
//! to peer P carries as source the range P knows this cluster by, and as destination the range
//! this cluster knows P by. So each gateway translates only its own pods:
//!
//! - outgoing (postrouting, out of the tunnel interface, to P's range): source real local
//!   network → the range P knows it by;
//! - incoming (prerouting, before routing, from the tunnel interface, from P's range):
//!   destination in the range P knows this cluster by → the real local network.
//!
//! Both rewrites are **stateless** prefix swaps (`ip saddr set ip saddr & <hostmask> | <net>`,
//! checksums fixed by nftables): a mapping is a 1:1 function of the address, and every packet
//! crossing the tunnel in either direction, replies included, meets exactly one of the two
//! rules, so no connection tracking is needed. The table has no `nat` chain and marks the
//! rewritten packets `notrack`, so conntrack stays off the data path (on two cores conntrack's
//! per-packet cost showed as a 10 % throughput gap against a hand-made tunnel). ICMP errors
//! quoting a translated header are not rewritten inside (no conntrack to do it); path MTU
//! discovery inside the tunnel does not depend on them because the tunnel MTU is fixed.
//!
//! Every address in the tunnel is unique per peer, so one WireGuard interface serves all peers
//! (allowed-ips cannot overlap), no packet marks or extra routing tables are needed for
//! overlapping CIDRs, and `rp_filter` can stay strict: a peer's packets arrive from its
//! remapped range, which is routed back through the tunnel.
//!
//! The table is replaced whole in one `nft -f` transaction (create-if-missing, delete, add), so
//! applying is idempotent and atomic, and removing it removes exactly what was applied.

use std::process::Stdio;

use liqo_core::{Cidr, CidrMapping, ClusterId, FabricError};
use tokio::io::AsyncWriteExt;

/// The NAT of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatPeer {
    /// The peer (used in rule comments).
    pub cluster: ClusterId,
    /// The tunnel interface its traffic uses.
    pub interface: String,
    /// The ranges this cluster knows the peer by (sources of its packets, destinations of ours).
    pub remote_ranges: Vec<Cidr>,
    /// Each local network (`real`) and the range the peer knows it by (`remapped`). Identity
    /// mappings need no rule.
    pub local: Vec<CidrMapping>,
}

/// One nftables table holding the NAT of every peer of a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatTable {
    name: String,
    nft: String,
}

fn family_kw(c: &Cidr) -> &'static str {
    if c.net().addr().is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

impl NatTable {
    /// A table named `name` in family `inet` (IPv4 and IPv6), driven by the `nft` binary.
    pub fn new(name: &str) -> Result<Self, FabricError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(FabricError::InvalidConfig(format!(
                "nftables table name {name:?}: use 1-64 letters, digits, '-' or '_', starting with a letter"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            nft: "nft".into(),
        })
    }

    /// Uses another `nft` binary.
    pub fn with_nft_binary(mut self, nft: impl Into<String>) -> Self {
        self.nft = nft.into();
        self
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rules for `peers`, one line each, without the table around them.
    pub fn rules(peers: &[NatPeer]) -> (Vec<String>, Vec<String>) {
        let mut pre = Vec::new();
        let mut post = Vec::new();
        for p in peers {
            for m in p.local.iter().filter(|m| !m.is_identity()) {
                for r in p
                    .remote_ranges
                    .iter()
                    .filter(|r| family_kw(r) == family_kw(&m.real))
                {
                    let f = family_kw(r);
                    pre.push(format!(
                        "iifname \"{}\" {f} saddr {r} {f} daddr {} {f} daddr set {f} daddr & {} | {} notrack comment \"{}\"",
                        p.interface,
                        m.remapped,
                        m.real.net().hostmask(),
                        m.real.net().network(),
                        p.cluster
                    ));
                    post.push(format!(
                        "oifname \"{}\" {f} saddr {} {f} daddr {r} {f} saddr set {f} saddr & {} | {} comment \"{}\"",
                        p.interface,
                        m.real,
                        m.remapped.net().hostmask(),
                        m.remapped.net().network(),
                        p.cluster
                    ));
                }
            }
        }
        (pre, post)
    }

    /// The whole `nft -f` transaction that makes the table hold exactly the rules for `peers`
    /// (or removes it when there are none).
    pub fn render(&self, peers: &[NatPeer]) -> String {
        let t = &self.name;
        // Declaring the table first makes the delete valid when it does not exist yet.
        let mut s = format!("table inet {t} {{}}\ndelete table inet {t}\n");
        let (pre, post) = Self::rules(peers);
        if pre.is_empty() {
            return s;
        }
        s.push_str(&format!("table inet {t} {{\n"));
        s.push_str(
            // Before conntrack (raw) so `notrack` keeps it off; before routing so the route
            // lookup sees the real destination.
            "  chain prerouting {\n    type filter hook prerouting priority raw; policy accept;\n",
        );
        for r in &pre {
            s.push_str(&format!("    {r}\n"));
        }
        s.push_str("  }\n  chain postrouting {\n    type filter hook postrouting priority srcnat; policy accept;\n");
        for r in &post {
            s.push_str(&format!("    {r}\n"));
        }
        s.push_str("  }\n}\n");
        s
    }

    /// Makes the table hold exactly the rules for `peers`, atomically. Idempotent.
    pub async fn apply(&self, peers: &[NatPeer]) -> Result<(), FabricError> {
        self.run(&self.render(peers), "applying").await
    }

    /// Removes the table if it exists.
    pub async fn remove(&self) -> Result<(), FabricError> {
        self.run(&self.render(&[]), "removing").await
    }

    /// Whether the table exists in the current network namespace.
    pub async fn exists(&self) -> Result<bool, FabricError> {
        Ok(self.listing().await?.is_some())
    }

    /// The table as `nft` lists it, `None` if it does not exist: what to compare with a
    /// listing taken earlier to see whether anybody changed it.
    pub async fn listing(&self) -> Result<Option<String>, FabricError> {
        let out = tokio::process::Command::new(&self.nft)
            .args(["list", "table", "inet", &self.name])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| self.spawn_err(e))?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    fn spawn_err(&self, e: std::io::Error) -> FabricError {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (install the nftables package)"
        } else {
            ""
        };
        FabricError::Backend {
            backend: "nftables".into(),
            message: format!("cannot run {}{hint}: {e}", self.nft),
        }
    }

    async fn run(&self, script: &str, action: &str) -> Result<(), FabricError> {
        let mut child = tokio::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_err(e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|e| self.spawn_err(e))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| self.spawn_err(e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(FabricError::Backend {
            backend: "nftables".into(),
            message: format!(
                "{action} table inet {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn renders_both_translations_per_peer_and_skips_identity() {
        let peers = vec![
            NatPeer {
                cluster: "milan".parse().unwrap(),
                interface: "liqo-gw".into(),
                remote_ranges: vec![c("10.70.0.0/16")],
                local: vec![CidrMapping::new(c("10.244.0.0/16"), c("10.71.0.0/16")).unwrap()],
            },
            NatPeer {
                cluster: "turin".parse().unwrap(),
                interface: "liqo-gw".into(),
                remote_ranges: vec![c("10.200.0.0/16")],
                local: vec![CidrMapping::identity(c("10.244.0.0/16"))],
            },
        ];
        let t = NatTable::new("liqo-a").unwrap();
        let s = t.render(&peers);
        assert!(
            s.starts_with("table inet liqo-a {}\ndelete table inet liqo-a\n"),
            "{s}"
        );
        assert!(s.contains("iifname \"liqo-gw\" ip saddr 10.70.0.0/16 ip daddr 10.71.0.0/16 ip daddr set ip daddr & 0.0.255.255 | 10.244.0.0 notrack comment \"milan\""), "{s}");
        assert!(s.contains("oifname \"liqo-gw\" ip saddr 10.244.0.0/16 ip daddr 10.70.0.0/16 ip saddr set ip saddr & 0.0.255.255 | 10.71.0.0 comment \"milan\""), "{s}");
        assert!(!s.contains("turin"), "identity mappings need no rule: {s}");
        assert_eq!(t.render(&peers[1..]), t.render(&[]));
    }

    #[test]
    fn rejects_bad_table_names() {
        for bad in ["", "1abc", "a b", "a;delete", &"x".repeat(65)] {
            assert!(NatTable::new(bad).is_err(), "{bad}");
        }
    }
}
