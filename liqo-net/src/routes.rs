//! Links, routes and policy rules through rtnetlink, in the network namespace of the process.
//!
//! Routes to peers live in a routing table of their own and are reached through one policy
//! rule per remote range (`to <range> lookup <table>`), so nothing of ours sits in the main
//! table and removal is exact: delete our rules, flush our table. Routes carry a protocol number
//! of ours so a sync never touches a route somebody else put in that table.

use std::net::IpAddr;

use futures::TryStreamExt;
use liqo_core::{Cidr, FabricError};
use netlink_packet_route::{
    link::LinkAttribute,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

/// Where the gateway's routes and rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingConfig {
    /// The routing table holding the routes to peers.
    pub table: u32,
    /// The priority of the policy rules sending remote ranges to [`table`](Self::table).
    pub rule_priority: u32,
    /// The route protocol number marking our routes.
    pub protocol: u8,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            table: 1818,
            rule_priority: 1818,
            // Unassigned in rt_protos; identifies routes made by liqo-net.
            protocol: 218,
        }
    }
}

/// An rtnetlink connection in the current network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

fn nl_err(action: impl std::fmt::Display, e: rtnetlink::Error) -> FabricError {
    FabricError::Backend {
        backend: "rtnetlink".into(),
        message: format!("{action}: {e}"),
    }
}

/// The errno of a netlink error, if it is one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;

fn route_dst(r: &RouteMessage) -> Option<Cidr> {
    let addr = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    ipnet::IpNet::new(addr, r.header.destination_prefix_length)
        .ok()
        .map(Cidr::new)
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn rule_priority(r: &RuleMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    })
}

fn rule_dst(r: &RuleMessage) -> Option<Cidr> {
    let addr = r.attributes.iter().find_map(|a| match a {
        RuleAttribute::Destination(ip) => Some(*ip),
        _ => None,
    })?;
    ipnet::IpNet::new(addr, r.header.dst_len)
        .ok()
        .map(Cidr::new)
}

fn route_message(
    dst: Cidr,
    ifindex: Option<u32>,
    cfg: &RoutingConfig,
) -> Result<RouteMessage, FabricError> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.net().network(), dst.prefix_len())
        .map_err(|e| FabricError::InvalidConfig(format!("route to {dst}: {e}")))?
        .table_id(cfg.table)
        .protocol(RouteProtocol::Other(cfg.protocol));
    b = match ifindex {
        // A device route without a gateway reaches its destination directly: link scope, as
        // `ip route add <dst> dev <if>` makes it.
        Some(i) => b.output_interface(i).scope(RouteScope::Link),
        // Deleting: match our route whatever its scope (`ip route del` does the same).
        None => b.scope(RouteScope::NoWhere),
    };
    Ok(b.build())
}

impl Netlink {
    /// Opens a connection; its I/O task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, FabricError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| FabricError::Backend {
            backend: "rtnetlink".into(),
            message: format!("opening a netlink socket: {e}"),
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The raw handle, for what this type does not cover.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The index of link `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, FabricError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(None),
            Err(e) => Err(nl_err(format_args!("looking up link {name}"), e)),
        }
    }

    /// The MTU and up flag of link `index`.
    pub async fn link_state(&self, index: u32) -> Result<Option<(u32, bool)>, FabricError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(l)) => {
                let mtu = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                });
                let up = l
                    .header
                    .flags
                    .contains(netlink_packet_route::link::LinkFlags::Up);
                Ok(Some((mtu.unwrap_or(0), up)))
            }
            Ok(None) => Ok(None),
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(None),
            Err(e) => Err(nl_err(format_args!("reading link {index}"), e)),
        }
    }

    /// Sets the MTU of link `index` and brings it up.
    pub async fn set_up(&self, index: u32, mtu: u32) -> Result<(), FabricError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_err(format_args!("setting link {index} up with MTU {mtu}"), e))
    }

    /// Deletes link `name` if it exists.
    pub async fn delete_link(&self, name: &str) -> Result<(), FabricError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(()),
            Err(e) => Err(nl_err(format_args!("deleting link {name}"), e)),
        }
    }

    /// The destinations of our routes (by protocol) in the configured table.
    pub async fn routes(&self, cfg: &RoutingConfig) -> Result<Vec<Cidr>, FabricError> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let mut req = match v {
                IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            };
            req.header.table = 0;
            let mut s = self.handle.route().get(req).execute();
            while let Some(r) = s
                .try_next()
                .await
                .map_err(|e| nl_err("listing routes", e))?
            {
                if route_table(&r) == cfg.table
                    && r.header.protocol == RouteProtocol::Other(cfg.protocol)
                {
                    out.extend(route_dst(&r));
                }
            }
        }
        Ok(out)
    }

    /// Makes our routes in the table exactly `dsts` through link `ifindex`.
    pub async fn sync_routes(
        &self,
        cfg: &RoutingConfig,
        ifindex: u32,
        dsts: &[Cidr],
    ) -> Result<(), FabricError> {
        for d in dsts {
            self.handle
                .route()
                .add(route_message(*d, Some(ifindex), cfg)?)
                .replace()
                .execute()
                .await
                .map_err(|e| nl_err(format_args!("adding route {d} to table {}", cfg.table), e))?;
        }
        for stale in self
            .routes(cfg)
            .await?
            .into_iter()
            .filter(|r| !dsts.contains(r))
        {
            match self
                .handle
                .route()
                .del(route_message(stale, None, cfg)?)
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => {}
                Err(e) => {
                    return Err(nl_err(
                        format_args!("deleting route {stale} from table {}", cfg.table),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    async fn our_rules(&self, cfg: &RoutingConfig) -> Result<Vec<RuleMessage>, FabricError> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let mut s = self.handle.rule().get(v).execute();
            while let Some(r) = s.try_next().await.map_err(|e| nl_err("listing rules", e))? {
                if rule_table(&r) == cfg.table && rule_priority(&r) == Some(cfg.rule_priority) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// The destinations of our policy rules.
    pub async fn rules(&self, cfg: &RoutingConfig) -> Result<Vec<Cidr>, FabricError> {
        Ok(self
            .our_rules(cfg)
            .await?
            .iter()
            .filter_map(rule_dst)
            .collect())
    }

    /// Makes our policy rules exactly `to <d> lookup <table>` for each of `dsts`.
    pub async fn sync_rules(&self, cfg: &RoutingConfig, dsts: &[Cidr]) -> Result<(), FabricError> {
        let existing = self.our_rules(cfg).await?;
        for r in &existing {
            if rule_dst(r).is_none_or(|d| !dsts.contains(&d)) {
                match self.handle.rule().del(r.clone()).execute().await {
                    Ok(()) => {}
                    Err(e) if matches!(errno(&e), Some(ENOENT)) => {}
                    Err(e) => return Err(nl_err("deleting a stale policy rule", e)),
                }
            }
        }
        let present: Vec<Cidr> = existing.iter().filter_map(rule_dst).collect();
        for d in dsts.iter().filter(|d| !present.contains(d)) {
            let add = self
                .handle
                .rule()
                .add()
                .table_id(cfg.table)
                .priority(cfg.rule_priority)
                .action(RuleAction::ToTable);
            let res = match d.net().network() {
                IpAddr::V4(a) => {
                    add.v4()
                        .destination_prefix(a, d.prefix_len())
                        .execute()
                        .await
                }
                IpAddr::V6(a) => {
                    add.v6()
                        .destination_prefix(a, d.prefix_len())
                        .execute()
                        .await
                }
            };
            match res {
                Ok(()) => {}
                Err(e) if matches!(errno(&e), Some(EEXIST)) => {}
                Err(e) => {
                    return Err(nl_err(
                        format_args!("adding rule to {d} lookup {}", cfg.table),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Removes our rules and routes.
    pub async fn clear(&self, cfg: &RoutingConfig) -> Result<(), FabricError> {
        self.sync_rules(cfg, &[]).await?;
        for r in self.routes(cfg).await? {
            match self
                .handle
                .route()
                .del(route_message(r, None, cfg)?)
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => {}
                Err(e) => return Err(nl_err(format_args!("deleting route {r}"), e)),
            }
        }
        Ok(())
    }
}

/// Turns on IPv4 (and IPv6, when remote ranges use it) forwarding in this network namespace:
/// a gateway forwards between pods and the tunnel.
pub async fn enable_forwarding(ipv6: bool) -> Result<(), FabricError> {
    let mut knobs = vec!["/proc/sys/net/ipv4/ip_forward"];
    if ipv6 {
        knobs.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for k in knobs {
        let cur = tokio::fs::read_to_string(k).await.unwrap_or_default();
        if cur.trim() != "1" {
            tokio::fs::write(k, "1")
                .await
                .map_err(|e| FabricError::Backend {
                    backend: "sysctl".into(),
                    message: format!("enabling forwarding ({k}): {e}"),
                })?;
        }
    }
    Ok(())
}
