//! Subnet routes and exit nodes on the control server (docs/routes.md).
//!
//! A node advertises prefixes when it opens its map stream; an administrator
//! approves them (`/api/v1/admin/routes/<node>/approve`) or the policy's
//! `autoApprovers` does. For every approved prefix one router is primary
//! (the previous primary while it stays online, else the online router with
//! the lowest id); every other node whose policy lets it reach the prefix
//! gets it in its map's `routes`, through that router. Exit routes
//! (`0.0.0.0/0`, `::/0`) have no primary: a node gets them only from the
//! exit node it chose, and only when the policy gives it `autogroup:internet`.

use super::db::{Db, Tailnet, IPV4_BASE, IPV4_PREFIX};
use super::proto::{NodeInfo, PeerRoutes, RouteInfo};
use super::store::params;
use super::ApiError;
use crate::policy::compile::routes::{auto_approvals, route_rules};
use crate::policy::Policy;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use wiremesh_core::filter::Prefix;

/// Prefixes one node may advertise.
pub const MAX_ROUTES: usize = 64;

/// How often a router's map stream carries a keepalive: writing is how the
/// server learns that a connection died, which is what failover waits for.
pub const ROUTER_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(1);

/// Sets TCP_USER_TIMEOUT on a connection: data unacknowledged this long
/// aborts it (a router gone without a FIN or RST fails over in seconds, not
/// after minutes of retransmissions). Best effort.
pub fn set_user_timeout(tcp: &tokio::net::TcpStream, timeout: std::time::Duration) {
    use std::os::fd::AsRawFd;
    let ms = timeout.as_millis().min(u128::from(u32::MAX)) as libc::c_uint;
    // SAFETY: setsockopt on a socket we own, with a pointer to a c_uint and its size.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            &ms as *const libc::c_uint as *const libc::c_void,
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        );
    }
}

/// Whether `p` is an exit route (`0.0.0.0/0` or `::/0`).
pub fn is_exit(p: &Prefix) -> bool {
    p.is_empty()
}

/// Reads one route: a canonical prefix (`10.1.0.0/24`, not `10.1.0.1/24`)
/// that is an exit route or stays clear of the tailnet's own ranges,
/// loopback and link-local addresses.
pub fn parse_route(s: &str, tailnet: &Tailnet) -> Result<Prefix, String> {
    let (addr, len) = s.split_once('/').ok_or_else(|| format!("route {s:?} needs a prefix length (a.b.c.d/n)"))?;
    let addr: IpAddr = addr.parse().map_err(|_| format!("route {s:?}: {addr:?} is no IP address"))?;
    let len: u8 = len.parse().map_err(|_| format!("route {s:?}: bad prefix length {len:?}"))?;
    let p = Prefix::new(addr, len).ok_or_else(|| format!("route {s:?}: prefix length {len} is too long"))?;
    if p.addr() != addr {
        return Err(format!("route {s:?} has host bits set; did you mean {p}?"));
    }
    if is_exit(&p) {
        return Ok(p);
    }
    let mut ula = [0u8; 16];
    ula[..6].copy_from_slice(&tailnet.ula_prefix);
    let reserved = [
        (Prefix::new(IpAddr::V4(Ipv4Addr::from(IPV4_BASE)), IPV4_PREFIX), "the tailnet's IPv4 range"),
        (Prefix::new(IpAddr::V6(Ipv6Addr::from(ula)), 48), "the tailnet's IPv6 range"),
        (Prefix::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8), "loopback"),
        (Some(Prefix::host(IpAddr::V6(Ipv6Addr::LOCALHOST))), "loopback"),
        (Prefix::new(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16), "link-local addresses"),
        (Prefix::new(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10), "link-local addresses"),
    ];
    for (r, what) in reserved.iter().filter_map(|(r, w)| r.map(|r| (r, w))) {
        if r.covers(&p) || p.covers(&r) {
            return Err(format!("route {p} overlaps {what} ({r})"));
        }
    }
    Ok(p)
}

/// Reads a list of routes (`exit` stands for both exit routes), sorted and
/// without repeats; at most [`MAX_ROUTES`].
pub fn parse_routes(list: &[String], tailnet: &Tailnet) -> Result<Vec<Prefix>, ApiError> {
    if list.len() > MAX_ROUTES {
        return Err(ApiError::new(400, "bad_route", &format!("at most {MAX_ROUTES} routes")));
    }
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        if s == "exit" {
            out.extend([Prefix::ANY_V4, Prefix::ANY_V6]);
            continue;
        }
        out.push(parse_route(s.trim(), tailnet).map_err(|e| ApiError::new(400, "bad_route", &e))?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The routes table as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// (node id, prefix) to (advertised, approved).
    pub routes: BTreeMap<(i64, Prefix), (bool, bool)>,
    /// Node id to the name of the exit node it chose.
    pub exit_choice: HashMap<i64, String>,
}

/// Records what node `id` advertises now and the exit node it chose; rows
/// neither advertised nor approved go.
pub fn set_advertised(db: &mut Db, id: i64, routes: &[Prefix], exit_node: Option<&str>) -> Result<(), ApiError> {
    let texts: Vec<String> = routes.iter().map(Prefix::to_string).collect();
    db.write(|c| {
        c.execute("UPDATE routes SET advertised = 0 WHERE node_id = $1", params![id])?;
        for t in &texts {
            c.execute(
                "INSERT INTO routes (node_id, prefix, advertised, approved) VALUES ($1, $2, 1, 0)
                 ON CONFLICT (node_id, prefix) DO UPDATE SET advertised = 1",
                params![id, t.as_str()],
            )?;
        }
        c.execute("DELETE FROM routes WHERE node_id = $1 AND advertised = 0 AND approved = 0", params![id])?;
        c.execute("UPDATE nodes SET exit_node = $2 WHERE id = $1", params![id, exit_node])?;
        Ok(())
    })
}

/// Approves (or withdraws approval of) `routes` of node `id`; an approval
/// may come before the node advertises the route.
pub fn set_approved(db: &mut Db, id: i64, routes: &[Prefix], approved: bool) -> Result<(), ApiError> {
    let texts: Vec<String> = routes.iter().map(Prefix::to_string).collect();
    db.write(|c| {
        for t in &texts {
            if approved {
                c.execute(
                    "INSERT INTO routes (node_id, prefix, advertised, approved) VALUES ($1, $2, 0, 1)
                     ON CONFLICT (node_id, prefix) DO UPDATE SET approved = 1",
                    params![id, t.as_str()],
                )?;
            } else {
                c.execute(
                    "UPDATE routes SET approved = 0 WHERE node_id = $1 AND prefix = $2",
                    params![id, t.as_str()],
                )?;
            }
        }
        c.execute("DELETE FROM routes WHERE node_id = $1 AND advertised = 0 AND approved = 0", params![id])?;
        Ok(())
    })
}

/// Reads the routes table and the exit node choices.
pub fn load(db: &mut Db) -> Result<Stored, ApiError> {
    let mut out = Stored::default();
    for r in db.conn().query("SELECT node_id, prefix, advertised, approved FROM routes", &[])? {
        let text = r.text(1)?;
        // Written only after parse_route; a row that no longer reads is skipped.
        let Some(p) = crate::policy::model::parse_prefix(&text) else { continue };
        out.routes.insert((r.int(0)?, p), (r.bool(2)?, r.bool(3)?));
    }
    for r in db.conn().query("SELECT id, exit_node FROM nodes WHERE exit_node IS NOT NULL", &[])? {
        out.exit_choice.insert(r.int(0)?, r.text(1)?);
    }
    Ok(out)
}

/// The routes of one snapshot: who routes what, and what each node gets.
#[derive(Debug, Default)]
pub struct Routing {
    /// Every stored route with its state (admin list).
    pub list: Vec<RouteInfo>,
    /// Subnet prefix to its primary router's id.
    pub primaries: BTreeMap<Prefix, i64>,
    /// Each node's `routes` for its map, JSON (in the order of the nodes).
    pub json: Vec<Arc<str>>,
    /// Each router's approved, advertised prefixes (what its filter and
    /// peers must account for), by node id.
    pub routers: BTreeMap<i64, Vec<Prefix>>,
}

impl Routing {
    /// Node index `i`'s routes, JSON (`[]` when none).
    pub fn json_of(&self, i: usize) -> Arc<str> {
        self.json.get(i).cloned().unwrap_or_else(|| Arc::from("[]"))
    }
}

/// Computes a snapshot's routing: approvals (stored or by `autoApprovers`),
/// primaries (keeping `previous` ones that are still online), and each
/// node's routes. `policy` is `None` when no policy is set: every node may
/// use every route. Expired nodes neither route nor get routes.
pub fn compute(
    nodes: &[NodeInfo],
    expired: &HashSet<i64>,
    stored: &Stored,
    policy: Option<&Policy>,
    previous: &BTreeMap<Prefix, i64>,
) -> Routing {
    let index: HashMap<i64, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let policy_nodes: Vec<crate::policy::Node> = match policy {
        Some(_) if !stored.routes.is_empty() => nodes.iter().map(crate::policy::wire::node_of).collect(),
        _ => Vec::new(),
    };
    let auto = match policy {
        Some(p) if !policy_nodes.is_empty() => auto_approvals(p, &policy_nodes),
        _ => Vec::new(),
    };
    let rules = match policy {
        Some(p) if !policy_nodes.is_empty() => route_rules(p, &policy_nodes),
        _ => Vec::new(),
    };
    let mut out = Routing::default();
    let mut candidates: BTreeMap<Prefix, Vec<usize>> = BTreeMap::new();
    for (&(id, p), &(advertised, approved)) in &stored.routes {
        let Some(&i) = index.get(&id) else { continue };
        let auto_approved =
            auto.get(i).is_some_and(|a| if is_exit(&p) { a.exit_node } else { a.routes.iter().any(|r| r.covers(&p)) });
        let usable = advertised && (approved || auto_approved) && !expired.contains(&id);
        if usable {
            out.routers.entry(id).or_default().push(p);
            if !is_exit(&p) {
                candidates.entry(p).or_default().push(i);
            }
        }
        out.list.push(RouteInfo {
            node_id: id,
            node: nodes[i].name.clone(),
            prefix: p.to_string(),
            advertised,
            approved,
            auto_approved,
            online: nodes[i].online,
            primary: usable && is_exit(&p),
        });
    }
    for (p, routers) in &candidates {
        let online: Vec<usize> = routers.iter().copied().filter(|&i| nodes[i].online).collect();
        let keep = previous.get(p).and_then(|id| index.get(id)).copied().filter(|i| routers.contains(i));
        // Stay with the primary while it is online (no flapping when another
        // comes back); else the lowest id online; else the old one, or the lowest.
        let pick = keep
            .filter(|i| nodes[*i].online)
            .or_else(|| online.first().copied())
            .or(keep)
            .or_else(|| routers.first().copied());
        if let Some(i) = pick {
            out.primaries.insert(*p, nodes[i].id);
        }
    }
    for (r, p) in out.list.iter_mut().zip(stored.routes.keys().filter(|(id, _)| index.contains_key(id))) {
        r.primary |= out.primaries.get(&p.1) == Some(&r.node_id);
    }
    // What each node gets: the primaries' subnet routes it may reach, and
    // its exit node's exit routes.
    let may_use = |viewer: usize, p: &Prefix| -> bool {
        policy.is_none() || rules.iter().any(|r| r.reaches(p) && r.sources.contains(&viewer))
    };
    let by_name: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
    for (v, node) in nodes.iter().enumerate() {
        let mut per_peer: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        if !expired.contains(&node.id) {
            // A node never routes through others what it offers itself
            // (approved or not): it is attached to that network.
            let own = |p: &Prefix| stored.routes.get(&(node.id, *p)).is_some_and(|(advertised, _)| *advertised);
            for (p, &router) in &out.primaries {
                if router == node.id || own(p) || !may_use(v, p) {
                    continue;
                }
                per_peer.entry(router).or_default().push(p.to_string());
            }
            let exit = stored.exit_choice.get(&node.id).and_then(|name| by_name.get(name.as_str()));
            if let Some(&x) = exit.filter(|&&x| x != v) {
                let xid = nodes[x].id;
                for p in out.routers.get(&xid).into_iter().flatten().filter(|p| is_exit(p)) {
                    if may_use(v, p) {
                        per_peer.entry(xid).or_default().push(p.to_string());
                    }
                }
            }
        }
        let list: Vec<PeerRoutes> = per_peer
            .into_iter()
            .map(|(peer, mut prefixes)| {
                prefixes.sort();
                PeerRoutes { peer, prefixes }
            })
            .collect();
        out.json.push(Arc::from(serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())));
    }
    out
}

/// The admin API under `/api/v1/admin/routes`: `GET` lists every route;
/// `POST <node>/approve` and `POST <node>/unapprove` with
/// `{"prefixes": [...]}` change approvals and answer the node's routes.
pub(super) async fn admin(
    app: &Arc<super::server::App>,
    segments: &[&str],
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<super::server::Body>, ApiError> {
    use super::server::{json_response, read_json};
    let method = req.method().clone();
    match (segments, &method) {
        ([], &hyper::Method::GET) => Ok(json_response(200, &app.snapshot().routing.list)),
        ([which, action @ ("approve" | "unapprove")], &hyper::Method::POST) => {
            let approve = *action == "approve";
            let which = which.to_string();
            let r: super::proto::RoutesRequest = read_json(req).await?;
            if r.prefixes.is_empty() {
                return Err(ApiError::new(400, "bad_route", "name at least one prefix"));
            }
            let prefixes = parse_routes(&r.prefixes, app.tailnet())?;
            let id = app
                .with_db(move |db| {
                    let Some(id) = db.node_id(&which)? else {
                        return Err(ApiError::not_found("no such node"));
                    };
                    if db.node(id)?.is_none() {
                        return Err(ApiError::not_found("no such node"));
                    }
                    set_approved(db, id, &prefixes, approve)?;
                    Ok(id)
                })
                .await?;
            app.publish();
            let list: Vec<RouteInfo> =
                app.snapshot().routing.list.iter().filter(|r| r.node_id == id).cloned().collect();
            Ok(json_response(200, &list))
        }
        ([] | [_, "approve" | "unapprove"], _) => Err(ApiError::new(405, "method_not_allowed", "method not allowed")),
        _ => Err(ApiError::not_found("no such endpoint")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::db::Registration;
    use crate::control::proto::{NetworkMap, StreamMessage};
    use crate::control::server::App;
    use std::time::Duration;

    fn tailnet() -> Tailnet {
        Tailnet { domain: "wiremesh.internal".into(), ula_prefix: [0xfd, 1, 2, 3, 4, 5] }
    }

    #[test]
    fn routes_must_be_canonical_and_clear_of_the_tailnet() {
        let t = tailnet();
        assert_eq!(parse_route("10.1.0.0/24", &t).unwrap().to_string(), "10.1.0.0/24");
        assert_eq!(parse_route("0.0.0.0/0", &t).unwrap(), Prefix::ANY_V4);
        assert_eq!(parse_route("::/0", &t).unwrap(), Prefix::ANY_V6);
        assert!(parse_route("2001:db8::/32", &t).is_ok());
        for (bad, says) in [
            ("10.1.0.1/24", "host bits"),
            ("10.1.0.0", "prefix length"),
            ("10.1.0.0/33", "too long"),
            ("10.1.0.0/x", "bad prefix length"),
            ("nope/8", "no IP address"),
            ("100.64.0.0/10", "tailnet's IPv4"),
            ("100.100.0.0/16", "tailnet's IPv4"),
            ("100.0.0.0/8", "tailnet's IPv4"),
            ("fd01:203:405::/64", "tailnet's IPv6"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.1.0/24", "link-local"),
        ] {
            let e = parse_route(bad, &t).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ROUTES).map(|i| format!("10.{i}.0.0/16")).collect();
        assert_eq!(parse_routes(&many, &t).unwrap_err().code, "bad_route");
        let both = parse_routes(&["exit".into(), "::/0".into()], &t).unwrap();
        assert_eq!(both, vec![Prefix::ANY_V4, Prefix::ANY_V6]);
    }

    fn map(app: &App, id: i64) -> NetworkMap {
        let snap = app.snapshot();
        let line = format!("{{\"map\":{{\"version\":1,{}}}}}", app.map_body(&snap, id).unwrap());
        let StreamMessage::Map(m) = serde_json::from_str(&line).unwrap() else { panic!("not a map") };
        *m
    }

    fn routes_of(app: &App, id: i64) -> Vec<(i64, Vec<String>)> {
        map(app, id).routes.into_iter().map(|r| (r.peer, r.prefixes)).collect()
    }

    #[test]
    fn one_primary_per_prefix_fails_over_and_exit_routes_go_to_who_chose_them() {
        let (mut db, _) = Db::open_in_memory().unwrap();
        let (key, _) = db.create_auth_key(true, false, &[], None, None).unwrap();
        let mut ids = Vec::new();
        for n in 1..=4u8 {
            let reg = Registration {
                auth_key: key.clone(),
                machine_key: [n; 32],
                node_key: [n + 10; 32],
                hostname: format!("n{n}"),
                endpoints: vec![],
            };
            ids.push(db.register(&reg).unwrap().id);
        }
        let (client, r1, r2, exit) = (ids[0], ids[1], ids[2], ids[3]);
        let t = db.tailnet().clone();
        let subnet = parse_routes(&["10.1.0.0/24".into()], &t).unwrap();
        set_advertised(&mut db, r1, &subnet, None).unwrap();
        set_advertised(&mut db, r2, &subnet, None).unwrap();
        set_advertised(&mut db, exit, &[Prefix::ANY_V4, Prefix::ANY_V6], None).unwrap();
        for id in &ids {
            db.set_presence(*id, 1).unwrap();
        }
        let app = App::new(db, [0; 32], Duration::from_secs(1));
        let db = |f: &mut dyn FnMut(&mut Db)| app.with_db_blocking(f);
        // Advertised but not approved: nobody gets it.
        assert!(routes_of(&app, client).is_empty());
        db(&mut |d| set_approved(d, r2, &subnet, true).unwrap());
        app.publish();
        assert_eq!(routes_of(&app, client), vec![(r2, vec!["10.1.0.0/24".to_string()])]);
        // r1 offers the prefix too (not approved yet): it is attached to that
        // network, so it does not route it through r2.
        assert!(routes_of(&app, r1).is_empty());
        // Both approved: the primary stays r2 (no flapping to the lower id).
        db(&mut |d| set_approved(d, r1, &subnet, true).unwrap());
        app.publish();
        assert_eq!(routes_of(&app, client), vec![(r2, vec!["10.1.0.0/24".to_string()])]);
        // A router gets no route for its own prefix; the other router neither.
        assert!(routes_of(&app, r1).is_empty() && routes_of(&app, r2).is_empty());
        // r2 goes offline: r1 takes over; r2 back: r1 stays.
        db(&mut |d| d.set_presence(r2, 0).unwrap());
        app.publish();
        assert_eq!(routes_of(&app, client), vec![(r1, vec!["10.1.0.0/24".to_string()])]);
        db(&mut |d| d.set_presence(r2, 1).unwrap());
        app.publish();
        assert_eq!(routes_of(&app, client), vec![(r1, vec!["10.1.0.0/24".to_string()])]);
        let listed = app.snapshot().routing.list.clone();
        assert_eq!(listed.iter().filter(|r| r.primary && r.prefix == "10.1.0.0/24").count(), 1);
        // Exit routes: approved, but only for the node that chose the exit node.
        db(&mut |d| set_approved(d, exit, &[Prefix::ANY_V4, Prefix::ANY_V6], true).unwrap());
        app.publish();
        assert!(routes_of(&app, client).iter().all(|(p, _)| *p != exit));
        db(&mut |d| set_advertised(d, client, &[], Some("n4")).unwrap());
        app.publish();
        let got = routes_of(&app, client);
        assert!(got.contains(&(exit, vec!["0.0.0.0/0".to_string(), "::/0".to_string()])), "{got:?}");
        assert!(routes_of(&app, r1).iter().all(|(p, _)| *p != exit));
        // A policy without autogroup:internet for the client takes the exit
        // routes away; one that lets it reach 10.1.0.0/16 keeps the subnet.
        db(&mut |d| {
            d.set_policy(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["10.1.0.0/16:*"]}]}"#).unwrap();
        });
        app.publish();
        assert_eq!(routes_of(&app, client), vec![(r1, vec!["10.1.0.0/24".to_string()])]);
        // The router's filter lets the client's traffic to the prefix in, and they see each other.
        let router = map(&app, r1);
        assert!(router.filter.iter().any(|f| f.dst == vec!["10.1.0.0/24".to_string()]), "{:?}", router.filter);
        assert!(router.peers.iter().any(|p| p.id == client));
        assert!(map(&app, client).peers.iter().any(|p| p.id == r1));
        db(&mut |d| {
            d.set_policy(
                r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:internet:*"]}],
                    "autoApprovers": {"exitNode": ["autogroup:member"]}}"#,
            )
            .unwrap();
        });
        app.publish();
        let got = routes_of(&app, client);
        assert_eq!(got, vec![(exit, vec!["0.0.0.0/0".to_string(), "::/0".to_string()])]);
        // Unapproved by the admin: the subnet routes stay unused (no autoApprovers for them).
        db(&mut |d| {
            d.set_policy(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#).unwrap();
            set_approved(d, r1, &subnet, false).unwrap();
            set_approved(d, r2, &subnet, false).unwrap();
        });
        app.publish();
        assert!(routes_of(&app, client).iter().all(|(p, _)| *p == exit));
        // autoApprovers approves routes inside its prefixes.
        db(&mut |d| {
            d.set_policy(
                r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                    "autoApprovers": {"routes": {"10.0.0.0/8": ["autogroup:member"]}}}"#,
            )
            .unwrap();
        });
        app.publish();
        let got = routes_of(&app, client);
        assert!(got.iter().any(|(_, p)| p == &vec!["10.1.0.0/24".to_string()]), "{got:?}");
        assert!(app.snapshot().routing.list.iter().any(|r| r.auto_approved && !r.approved));
    }
}
