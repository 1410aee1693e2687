//! Rendering of the ingress (netdev) topologies: `dsr` (direct server return) and
//! `stlsdnat` (stateless destination NAT), into `table netdev nftlb`. Pure: everything
//! it knows about the network comes from the [`NetView`] gathered before rendering.
//!
//! Layout:
//! - One base chain per input interface, `ingress-IF` (`hook ingress device "IF"
//!   priority 101`), dispatches on `meta l4proto . ip daddr . th dport` (`ip6 daddr` for
//!   IPv6; `meta l4proto` skips IPv6 extension headers and works at netdev ingress) and,
//!   for port-only services, `meta protocol ip meta l4proto . th dport`, each with an
//!   exact-match rule (single ports) and an interval rule (port ranges, one element
//!   each, never expanded), to the farm's chain `lb-NAME`. The lookups are anonymous
//!   verdict maps in the base chain's rules, holding every ingress farm of that
//!   interface: ingress farms are few, the rule is replaced as a whole in the
//!   transaction that changes it, and an anonymous map goes with its rule, so that
//!   removing a farm never leaves an element pointing at a chain being deleted. (Base
//!   chains are named so that they sort before the chains they jump to.)
//! - `dsr`, per family served: `ether saddr set <output MAC> ether daddr set <scheduler>
//!   map { buckets : backend MAC } fwd to "<output interface>"`. The frame leaves
//!   unchanged above layer 2: backends hold the virtual address (on `lo`, not answering
//!   ARP for it) and answer the client directly. Backends behind several output
//!   interfaces: `ether saddr set ether daddr map { MAC : output MAC } fwd to ether daddr
//!   map { MAC : "IF" }`.
//! - `stlsdnat`, per family: `update @cli4-NAME-tTTL { ip saddr : ether saddr }` learns
//!   the client's (or its router's) MAC (`persist-ttl`, 60 s when 0, is the timeout
//!   and part of the map's name so that a change re-creates it), then `ip daddr set
//!   <scheduler> map { buckets : backend address } ether daddr set ip daddr map { address
//!   : MAC } [tcp dport set ip daddr map { address : port }] ether saddr set <output MAC>
//!   fwd to "<output interface>"` (one rule per protocol when ports are translated:
//!   `th dport set` would not fix the checksum). Replies enter `ingress/dnat-OF`
//!   (`priority 100`) on the output interface and are looked up by source (`meta
//!   l4proto . ip saddr . th sport vmap { proto . backend . port : goto reply-NAME }`):
//!   `ether daddr set ip daddr map @cli4-… ip saddr set <VIP> [tcp sport
//!   set <virtual port>] ether saddr set <input MAC> fwd to "<input interface>"`. The
//!   client lookup comes first, so that the host's own traffic with a backend (health
//!   checks) is left alone. No conntrack is involved.
//!
//! Scheduling. There is no connection tracking in these modes, so the scheduler must
//! pick the same backend for every packet of a flow: `rr` and `weight` use `jhash ip
//! saddr . th sport` (a deliberate difference from nftlb, whose `numgen` picks per
//! packet and breaks TCP); `hash` uses the farm's `sched-param` fields and `symhash`
//! `symhash`. The hash selects one of a fixed number of buckets (256, more for farms
//! with more than 16 backends) and each bucket is given to a backend by weighted
//! rendezvous hashing of the backend's address. Taking a backend out moves only its own
//! flows; bringing one in takes its share from every other backend evenly. (Contiguous
//! weight ranges, as the NAT modes use, would move most flows of every backend on any
//! change, which without conntrack resets their connections.) The bucket map is an
//! anonymous map in the farm's one rule: ingress farms are few, and the rule is replaced
//! as a whole in the transaction that changes it. The shared bucket
//! [`Slots`](crate::render::Slots) are not used.
//!
//! Persistence (`persistence`, `persist-ttl`, static `sessions`): per family, a static
//! map `ssN-NAME-TAG` and a kernel-learnt map `psN-NAME-TAG` (`key : backend MAC` for
//! dsr, `key : backend address` for stlsdnat). A packet whose key is in either map goes
//! to that backend if it is still usable (`ether daddr { usable MACs }`); a learnt entry
//! for a backend that no longer is gets deleted and the packet is scheduled again; the
//! scheduler rule records its choice (`update @ps…`).
//!
//! `log input` logs every packet that reaches a farm's chain (`log-rtlimit` limits the
//! rate); `log forward/output`, limits, policies and marks are not enforced for these
//! farms (a note says so).
//!
//! Backend states: only `up` backends of the active priority group get traffic. `off`
//! cannot drain without connection tracking: it is treated as `down` (a note says so).
//! A backend whose output interface or MAC is unknown gets no traffic and is reported
//! (see [`backend_errors`]); a farm whose input side cannot be resolved is not rendered
//! at all and is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::*;
use crate::netinfo::{Neigh, NetView, Route};
use crate::render::filter::{expand, Tokens};
use crate::render::Note;
use crate::ruleset::{Chain, MapDef, Ruleset, Table, TableFamily};

/// Priority of the service lookup at ingress (nftlb's).
const PRIO_INGRESS: i32 = 101;
/// Priority of the stateless-DNAT return lookup at ingress (nftlb's).
const PRIO_RETURN: i32 = 100;
/// Size of the client-MAC maps of `stlsdnat` farms.
const CLIENT_MAP_SIZE: u32 = 262_144;

/// Address family of one part of a farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn of(ip: &IpAddr) -> Fam {
        if ip.is_ipv4() {
            Fam::V4
        } else {
            Fam::V6
        }
    }
    fn ip(self) -> &'static str {
        match self {
            Fam::V4 => "ip",
            Fam::V6 => "ip6",
        }
    }
    fn digit(self) -> &'static str {
        match self {
            Fam::V4 => "4",
            Fam::V6 => "6",
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4_addr",
            Fam::V6 => "ipv6_addr",
        }
    }
    fn families(f: Family) -> &'static [Fam] {
        match f {
            Family::Ipv4 => &[Fam::V4],
            Family::Ipv6 => &[Fam::V6],
            Family::Inet => &[Fam::V4, Fam::V6],
        }
    }
}

/// Chain of a farm in the netdev table. (Farm chains sort after the `ingress-…` base
/// chains that jump to them, so that a plan removing both flushes the base chain first.)
pub fn farm_chain(farm: &str) -> String {
    format!("lb-{farm}")
}

/// Return chain of a `stlsdnat` farm (sorts after `ingress/dnat-…` too).
pub fn back_chain(farm: &str) -> String {
    format!("reply-{farm}")
}

fn client_map(farm: &Farm, fam: Fam) -> String {
    format!("cli{}-{}-t{}", fam.digit(), farm.name, client_ttl(farm))
}

fn client_ttl(farm: &Farm) -> u32 {
    if farm.persist_ttl == 0 {
        60
    } else {
        farm.persist_ttl
    }
}

/// A backend that will get traffic.
#[derive(Debug, Clone)]
struct Target<'a> {
    backend: &'a Backend,
    ip: IpAddr,
    mac: Mac,
    oface: String,
    omac: Mac,
}

/// One served address of a farm.
#[derive(Debug, Clone)]
struct Entry<'a> {
    addr: &'a Address,
    fam: Fam,
    iface: String,
    imac: Option<Mac>,
}

/// Where each backend of a farm goes, or why it cannot get traffic.
fn resolve_backend<'a>(
    farm: &'a Farm,
    b: &'a Backend,
    net: &NetView,
) -> Result<Target<'a>, String> {
    let ip = b.ip_addr.ok_or_else(|| "it has no address".to_string())?;
    let oface = match &farm.oface {
        Some(o) => o.clone(),
        None => match net.routes.get(&ip) {
            Some(Route::Via { oif, gateway: None }) => oif.clone(),
            Some(Route::Via {
                oif,
                gateway: Some(gw),
            }) => {
                return Err(format!(
                    "it is not on a link of this host (routed through {gw} on {oif}); \
                     {} needs backends on the same layer-2 network",
                    farm.mode.as_str()
                ))
            }
            Some(Route::Local) => return Err("it is an address of this host".into()),
            Some(Route::Unreachable(e)) => return Err(format!("no route to it ({e})")),
            None => return Err("its route is unknown".into()),
        },
    };
    // Interface names become part of chain names and rules: only plain ones are used.
    parse_ifname(&oface).map_err(|e| format!("output interface name '{oface}' {e}"))?;
    let link = net
        .links
        .get(&oface)
        .ok_or_else(|| format!("output interface '{oface}' does not exist"))?;
    let omac = farm
        .oether_addr
        .or(link.mac)
        .ok_or_else(|| format!("output interface '{oface}' has no MAC address"))?;
    let mac = match b.ether_addr {
        Some(m) => m,
        None => match net.neighbours.get(&(oface.clone(), ip)) {
            Some(Neigh::Known(m)) => *m,
            Some(Neigh::Failed) => {
                return Err(format!(
                    "its MAC address is unknown: {ip} does not answer on '{oface}'"
                ))
            }
            _ => {
                return Err(format!(
                    "its MAC address is unknown yet (resolving {ip} on '{oface}')"
                ))
            }
        },
    };
    Ok(Target {
        backend: b,
        ip,
        mac,
        oface,
        omac,
    })
}

/// The backends of an ingress farm that are meant to get traffic (state up, in the
/// active priority group) but cannot, with the reason. For GET (`config_error`).
pub fn backend_errors(state: &State, farm: &Farm, net: &NetView) -> Vec<(String, String)> {
    if !matches!(farm.mode, Mode::Dsr | Mode::Stlsdnat) || !net.gathered {
        return Vec::new();
    }
    let statuses = state.backend_statuses(farm);
    farm.backends
        .iter()
        .zip(&statuses)
        .filter(|(_, st)| **st == BackendStatus::Up)
        .filter_map(|(b, _)| {
            resolve_backend(farm, b, net)
                .err()
                .map(|e| (b.name.clone(), e))
        })
        .collect()
}

/// The input side of every address of the farm.
fn entries<'a>(state: &'a State, farm: &'a Farm, net: &NetView) -> Result<Vec<Entry<'a>>, String> {
    let mut out = Vec::new();
    for a in state.farm_addresses(farm) {
        let iface = match (&a.iface, a.ip_addr) {
            (Some(i), _) => i.clone(),
            (None, Some(ip)) => match net.iface_of(&ip) {
                Some(i) => i.to_string(),
                None => {
                    return Err(format!(
                        "virtual address {ip} is not an address of this host; add it to the \
                         interface its traffic arrives on, or name that interface with 'iface'"
                    ))
                }
            },
            (None, None) => {
                return Err(format!(
                    "address '{}' has no virtual address: name its input interface with 'iface'",
                    a.name
                ))
            }
        };
        parse_ifname(&iface).map_err(|e| format!("input interface name '{iface}' {e}"))?;
        let link = net
            .links
            .get(&iface)
            .ok_or_else(|| format!("input interface '{iface}' does not exist"))?;
        if link.loopback {
            return Err(format!(
                "input interface '{iface}' is the loopback: name the interface the traffic \
                 arrives on with 'iface'"
            ));
        }
        let imac = a.iether_addr.or(link.mac);
        let fams: Vec<Fam> = match a.ip_addr {
            Some(ip) => vec![Fam::of(&ip)],
            None => Fam::families(a.family).to_vec(),
        };
        for fam in fams {
            out.push(Entry {
                addr: a,
                fam,
                iface: iface.clone(),
                imac,
            });
        }
    }
    if out.is_empty() {
        return Err("it has no address".into());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// scheduling

/// Number of buckets of a farm: fixed while the number of configured backends stays
/// under the same power of two (so that state changes move only what they must).
fn bucket_count(farm: &Farm) -> u32 {
    let n = (farm.backends.len() as u32).saturating_mul(16);
    n.next_power_of_two().clamp(256, 65536)
}

fn hash64(key: &str, bucket: u32) -> u64 {
    // FNV-1a over the key, then a splitmix64 finish with the bucket.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h ^ (u64::from(bucket).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Weighted rendezvous hashing: the owner (index into `targets`) of each bucket.
fn assign(keys: &[(String, u32)], n: u32) -> Vec<usize> {
    (0..n)
        .map(|bucket| {
            let mut best = (f64::NEG_INFINITY, 0usize);
            for (i, (key, w)) in keys.iter().enumerate() {
                let u = ((hash64(key, bucket) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let score = f64::from(*w) / -u.ln();
                if score > best.0 {
                    best = (score, i);
                }
            }
            best.1
        })
        .collect()
}

/// The flow hash over `n` buckets.
fn hash_expr(farm: &Farm, fam: Fam, n: u32) -> String {
    let ip = fam.ip();
    let fields: Vec<String> = match farm.scheduler {
        Scheduler::Symhash => return format!("symhash mod {n}"),
        Scheduler::Rr | Scheduler::Weight => vec![format!("{ip} saddr"), "th sport".into()],
        Scheduler::Hash => {
            let names = farm.sched_param.set_names();
            if names.is_empty() {
                vec![format!("{ip} saddr"), "th sport".into()]
            } else {
                names
                    .iter()
                    .map(|f| match *f {
                        "srcip" => format!("{ip} saddr"),
                        "dstip" => format!("{ip} daddr"),
                        "srcport" => "th sport".to_string(),
                        "dstport" => "th dport".to_string(),
                        "srcmac" => "ether saddr".to_string(),
                        _ => "ether daddr".to_string(),
                    })
                    .collect()
            }
        }
    };
    format!("jhash {} mod {n} seed 0x0", fields.join(" . "))
}

/// `<scheduler> map { buckets : value }`, or the value itself for one target.
fn pick_expr(
    farm: &Farm,
    fam: Fam,
    targets: &[&Target],
    value: impl Fn(&Target) -> String,
) -> String {
    if targets.len() == 1 {
        return value(targets[0]);
    }
    let n = bucket_count(farm);
    let keys: Vec<(String, u32)> = targets
        .iter()
        .map(|t| match t.backend.port {
            Some(p) if farm.mode == Mode::Stlsdnat => (format!("{}:{p}", t.ip), t.backend.weight),
            _ => (t.ip.to_string(), t.backend.weight),
        })
        .collect();
    let owners = assign(&keys, n);
    let mut elems = Vec::new();
    let mut lo = 0u32;
    for i in 1..=n {
        if i == n || owners[i as usize] != owners[lo as usize] {
            let v = value(targets[owners[lo as usize]]);
            if lo == i - 1 {
                elems.push(format!("{lo} : {v}"));
            } else {
                elems.push(format!("{lo}-{} : {v}", i - 1));
            }
            lo = i;
        }
    }
    format!("{} map {{ {} }}", hash_expr(farm, fam, n), elems.join(", "))
}

/// `ether saddr set … fwd to …` for the targets' output interfaces, the map keyed by
/// `key` (`ether daddr` for dsr, `ip daddr` for stlsdnat) when they differ.
fn out_stmts(targets: &[&Target], key: &str, key_of: impl Fn(&Target) -> String) -> String {
    let ofaces: BTreeSet<(&str, [u8; 6])> = targets
        .iter()
        .map(|t| (t.oface.as_str(), t.omac.0))
        .collect();
    if ofaces.len() == 1 {
        let (o, m) = ofaces.iter().next().expect("one");
        return format!("ether saddr set {} fwd to \"{o}\"", Mac(*m));
    }
    let mut smac = BTreeMap::new();
    let mut dev = BTreeMap::new();
    for t in targets {
        smac.insert(key_of(t), t.omac.to_string());
        dev.insert(key_of(t), format!("\"{}\"", t.oface));
    }
    let join = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k} : {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "ether saddr set {key} map {{ {} }} fwd to {key} map {{ {} }}",
        join(&smac),
        join(&dev)
    )
}

// ---------------------------------------------------------------------------
// table helpers

fn netdev(rs: &mut Ruleset) -> &mut Table {
    rs.tables.entry(TableFamily::Netdev).or_default()
}

/// The lookups of an ingress base chain, in rule order: (rule head, interval).
/// Service lookups (by destination) go in `ingress-IF`, return lookups of stateless
/// DNAT (by source) in `ingress/dnat-IF` (`/`: no clash with the interface `dnat-IF`).
fn lookups(ret: bool) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for fam in [Fam::V4, Fam::V6] {
        let ip = fam.ip();
        if ret {
            let key = format!("meta l4proto . {ip} saddr . th sport");
            out.push((key.clone(), false));
            out.push((key, true));
        } else {
            let full = format!("meta l4proto . {ip} daddr . th dport");
            out.push((full.clone(), false));
            out.push((full, true));
        }
    }
    if !ret {
        for fam in [Fam::V4, Fam::V6] {
            let port = format!("meta protocol {} meta l4proto . th dport", fam.ip());
            out.push((port.clone(), false));
            out.push((port, true));
        }
    }
    out
}

/// Index into [`lookups`] of a service key.
fn lookup_index(fam: Fam, with_addr: bool, interval: bool, ret: bool) -> usize {
    let f = usize::from(fam == Fam::V6);
    let base = if with_addr || ret { 0 } else { 4 };
    base + 2 * f + usize::from(interval)
}

fn ingress_chain(iface: &str, ret: bool) -> String {
    if ret {
        format!("ingress/dnat-{iface}")
    } else {
        format!("ingress-{iface}")
    }
}

/// A dispatch element: ((interface, return path), lookup index, key, verdict).
type Dispatch = ((String, bool), usize, String, String);

fn service_elems(e: &Entry, goto: &str) -> Vec<Dispatch> {
    let mut out = Vec::new();
    for p in e.addr.protocol.l4() {
        for r in e.addr.ports.ranges() {
            let interval = r.lo != r.hi;
            let (with_addr, key) = match e.addr.ip_addr {
                Some(vip) => (true, format!("{p} . {vip} . {r}")),
                None => (false, format!("{p} . {r}")),
            };
            out.push((
                (e.iface.clone(), false),
                lookup_index(e.fam, with_addr, interval, false),
                key,
                goto.to_string(),
            ));
        }
    }
    out
}

/// The base chains, with their lookups as anonymous verdict maps. (Anonymous maps go
/// with their rule: removing a farm never leaves a map element pointing at a chain
/// being deleted.)
fn base_chains(t: &mut Table, dispatch: &BTreeMap<(String, bool), Vec<BTreeMap<String, String>>>) {
    for ((iface, ret), kinds) in dispatch {
        let heads = lookups(*ret);
        let rules: Vec<String> = heads
            .iter()
            .zip(kinds)
            .filter(|(_, elems)| !elems.is_empty())
            .map(|((head, _), elems)| {
                let body: Vec<String> = elems.iter().map(|(k, v)| format!("{k} : {v}")).collect();
                format!("{head} vmap {{ {} }}", body.join(", "))
            })
            .collect();
        let prio = if *ret { PRIO_RETURN } else { PRIO_INGRESS };
        t.chains.insert(
            ingress_chain(iface, *ret),
            Chain {
                base: Some(format!(
                    "type filter hook ingress device \"{iface}\" priority {prio}; policy accept;"
                )),
                rules,
            },
        );
    }
}

// ---------------------------------------------------------------------------
// the farm

/// What one farm adds to the netdev table.
#[derive(Default)]
struct Parts {
    dispatch: Vec<Dispatch>,
    maps: Vec<(String, MapDef)>,
    chains: Vec<(String, Chain)>,
}

/// Settings of a farm that ingress farms do not enforce.
fn unserved_keys(f: &Farm) -> Vec<&'static str> {
    let d = Farm::new(String::new());
    let checks: [(&'static str, bool); 9] = [
        ("log forward", f.log.has("forward")),
        ("mark", f.mark != d.mark),
        ("new-rtlimit", f.new_rtlimit.count != 0),
        ("rst-rtlimit", f.rst_rtlimit.count != 0),
        ("est-connlimit", f.est_connlimit != 0),
        ("tcp-strict", f.tcp_strict),
        ("queue", f.queue != d.queue),
        ("flow-offload", f.flow_offload),
        ("intra-connect", f.intra_connect),
    ];
    checks
        .iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| *k)
        .collect()
}

/// Adds the rules of every `dsr` and `stlsdnat` farm that is up to `rs` (the `table
/// netdev nftlb`) and the notes about them: why a farm cannot be served, or which
/// backends get no traffic and why. The base chains hold every ingress farm's services,
/// so the ingress farms are rendered together, in one pass (in state order: a conflict
/// goes against the later farm); the cost is linear in the number of farms.
pub fn render(state: &State, net: &NetView, rs: &mut Ruleset, notes: &mut Vec<Note>) {
    let mut dispatch: BTreeMap<(String, bool), Vec<BTreeMap<String, String>>> = BTreeMap::new();
    let mut maps = Vec::new();
    let mut chains = Vec::new();
    for farm in state.farms.values() {
        if farm.state != FarmState::Up || !matches!(farm.mode, Mode::Dsr | Mode::Stlsdnat) {
            continue;
        }
        let Some(p) = farm_parts(state, farm, net, notes) else {
            continue;
        };
        // Refuse a farm whose keys another farm has (two stlsdnat farms sharing a
        // backend address and port cannot tell their replies apart).
        let conflict = p.dispatch.iter().find_map(|(chain, i, key, value)| {
            dispatch
                .get(chain)
                .and_then(|kinds| kinds[*i].get(key))
                .filter(|v| *v != value)
                .map(|v| (key.clone(), v.trim_start_matches("goto ").to_string()))
        });
        if let Some((key, other)) = conflict {
            notes.push((
                farm.name.clone(),
                format!(
                    "Farm '{}' ({}) is not served: '{key}' is already used by chain {other}",
                    farm.name,
                    farm.mode.as_str()
                ),
            ));
            continue;
        }
        for (chain, i, key, value) in p.dispatch {
            let ret = chain.1;
            dispatch
                .entry(chain)
                .or_insert_with(|| vec![BTreeMap::new(); lookups(ret).len()])[i]
                .insert(key, value);
        }
        maps.extend(p.maps);
        chains.extend(p.chains);
    }
    if dispatch.is_empty() && chains.is_empty() && maps.is_empty() {
        return;
    }
    let t = netdev(rs);
    for (name, m) in maps {
        t.maps.insert(name, m);
    }
    for (name, c) in chains {
        t.chains.insert(name, c);
    }
    base_chains(t, &dispatch);
}

#[cfg(test)]
thread_local! {
    /// Calls of [`farm_parts`] on this thread (tests check that rendering is linear).
    static FARM_PARTS_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One farm's part of the netdev table, or `None` (with a note) if it cannot be served.
fn farm_parts(state: &State, farm: &Farm, net: &NetView, notes: &mut Vec<Note>) -> Option<Parts> {
    #[cfg(test)]
    FARM_PARTS_CALLS.with(|c| c.set(c.get() + 1));
    let mode = farm.mode.as_str();
    let note = |notes: &mut Vec<Note>, m: String| notes.push((farm.name.clone(), m));
    if !net.gathered {
        note(
            notes,
            format!(
                "Farm '{}' ({mode}) is not served: the network was not discovered",
                farm.name
            ),
        );
        return None;
    }
    if let Some(e) = &net.error {
        note(
            notes,
            format!(
                "Farm '{}' ({mode}) is not served: network discovery failed: {e}",
                farm.name
            ),
        );
        return None;
    }
    let unserved = unserved_keys(farm);
    if !unserved.is_empty() {
        note(
            notes,
            format!(
                "Farm '{}': {} stored but not enforced in mode {mode} by this version",
                farm.name,
                unserved.join(", ")
            ),
        );
    }
    let entries = match entries(state, farm, net) {
        Ok(e) => e,
        Err(e) => {
            note(
                notes,
                format!("Farm '{}' ({mode}) is not served: {e}", farm.name),
            );
            return None;
        }
    };
    // Backends.
    let statuses = state.backend_statuses(farm);
    let mut targets: Vec<Target> = Vec::new();
    let mut seen_macs: BTreeMap<([u8; 6], bool), &str> = BTreeMap::new();
    let mut seen_ips: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for (b, st) in farm.backends.iter().zip(&statuses) {
        match st {
            BackendStatus::Up => {}
            BackendStatus::Off => {
                note(
                    notes,
                    format!(
                        "Farm '{}': backend '{}' is off; without connection tracking ({mode}) \
                         it gets no traffic at all, its established connections are not kept",
                        farm.name, b.name
                    ),
                );
                continue;
            }
            _ => continue,
        }
        match resolve_backend(farm, b, net) {
            Ok(t) => {
                if farm.mode == Mode::Dsr {
                    if let Some(other) = seen_macs.insert((t.mac.0, t.ip.is_ipv4()), &b.name) {
                        note(notes, format!(
                            "Farm '{}': backend '{}' gets no traffic: it has the same MAC address as backend '{other}'",
                            farm.name, b.name
                        ));
                        continue;
                    }
                    if b.port.is_some() {
                        note(notes, format!(
                            "Farm '{}': the port of backend '{}' is ignored: dsr forwards frames unchanged above layer 2",
                            farm.name, b.name
                        ));
                    }
                } else if let Some(other) = seen_ips.insert(t.ip, &b.name) {
                    note(notes, format!(
                        "Farm '{}': backend '{}' gets no traffic: it has the same address as backend '{other}'",
                        farm.name, b.name
                    ));
                    continue;
                }
                targets.push(t);
            }
            Err(e) => note(
                notes,
                format!(
                    "Farm '{}': backend '{}' gets no traffic: {e}",
                    farm.name, b.name
                ),
            ),
        }
    }
    let parts = match farm.mode {
        Mode::Dsr => Ok(dsr(farm, &entries, &targets)),
        _ => stlsdnat(farm, &entries, &targets),
    };
    match parts {
        Ok(mut p) => {
            // Policies come first in the farm's chain, as at nftlb's ingress.
            let mut scratch = Table::default();
            if let Some(rule) = crate::render::filter::ingress_policies(state, farm, &mut scratch) {
                let chain = farm_chain(&farm.name);
                if let Some((_, c)) = p.chains.iter_mut().find(|(n, _)| *n == chain) {
                    c.rules.insert(0, rule);
                }
                p.maps.extend(scratch.maps);
                p.chains.extend(scratch.chains);
            }
            Some(p)
        }
        Err(e) => {
            note(
                notes,
                format!("Farm '{}' ({mode}) is not served: {e}", farm.name),
            );
            None
        }
    }
}

fn by_family<'a, 'b>(targets: &'b [Target<'a>], fam: Fam) -> Vec<&'b Target<'a>> {
    targets.iter().filter(|t| Fam::of(&t.ip) == fam).collect()
}

/// The value a backend is chosen by: its MAC (dsr) or its address (stlsdnat).
fn val_expr(farm: &Farm, fam: Fam) -> String {
    match farm.mode {
        Mode::Dsr => "ether daddr".into(),
        _ => format!("{} daddr", fam.ip()),
    }
}

fn val_of(farm: &Farm, t: &Target) -> String {
    match farm.mode {
        Mode::Dsr => t.mac.to_string(),
        _ => t.ip.to_string(),
    }
}

fn val_type(farm: &Farm, fam: Fam) -> &'static str {
    match farm.mode {
        Mode::Dsr => "ether_addr",
        _ => fam.addr_type(),
    }
}

/// The nft expression and type of a persistence key.
fn persist_key(fields: &HashFields, fam: Fam) -> (String, String) {
    crate::render::persist_key_with(fields, fam.ip(), fam.addr_type())
}

/// Names of a farm's persistence and static-session maps in one family (`true` for
/// IPv6), in `table netdev nftlb`. The names carry a tag of what their elements depend
/// on (key type, timeout, mode), so that a change of those makes new, empty maps. The
/// persistence map holds `key : backend MAC` (dsr) or `key : backend address`
/// (stlsdnat), learnt by the kernel.
pub fn session_maps(farm: &Farm, ipv6: bool) -> (String, String) {
    let fam = if ipv6 { Fam::V6 } else { Fam::V4 };
    let (_, ty) = persist_key(&farm.persistence, fam);
    let tag = hash64(
        &format!("{ty}|{}|{}", farm.persist_ttl, farm.mode.as_str()),
        0,
    ) as u32;
    let d = fam.digit();
    (
        format!("ps{d}-{}-{tag:08x}", farm.name),
        format!("ss{d}-{}-{tag:08x}", farm.name),
    )
}

/// The rules of one family of a farm: persistence (static sessions, then learnt ones),
/// then the scheduler. Each `(match, tail)` of `deliveries` is a way to send the packet
/// on once its backend value is set (one per protocol when ports are translated).
fn pick_rules(
    farm: &Farm,
    fam: Fam,
    ts: &[&Target],
    deliveries: &[(String, String)],
    p: &mut Parts,
) -> Vec<String> {
    let val = val_expr(farm, fam);
    let pick = pick_expr(farm, fam, ts, |t| val_of(farm, t));
    let mut rules = Vec::new();
    if farm.persistence.is_empty() {
        for (m, tail) in deliveries {
            rules.push(format!("{m} {val} set {pick} {tail}"));
        }
        return rules;
    }
    let (key, key_type) = persist_key(&farm.persistence, fam);
    let (ps, ss) = session_maps(farm, fam == Fam::V6);
    let vt = val_type(farm, fam);
    let usable: BTreeSet<String> = ts.iter().map(|t| val_of(farm, t)).collect();
    let usable = format!(
        "{{ {} }}",
        usable.into_iter().collect::<Vec<_>>().join(", ")
    );
    let mut statics = BTreeMap::new();
    for sess in &farm.sessions {
        let fits = sess.client.split(" . ").all(|part| {
            part.trim()
                .parse::<IpAddr>()
                .map_or(true, |ip| Fam::of(&ip) == fam)
        });
        if let Some(t) = ts.iter().find(|t| t.backend.name == sess.backend) {
            if fits {
                statics.insert(sess.client.clone(), val_of(farm, t));
            }
        }
    }
    let has_statics = !statics.is_empty();
    p.maps.push((
        ss.clone(),
        MapDef {
            kind: "map",
            spec: format!("type {key_type} : {vt};"),
            elements: statics,
            dynamic: false,
        },
    ));
    p.maps.push((
        ps.clone(),
        MapDef {
            kind: "map",
            spec: format!(
                "type {key_type} : {vt}; size 1048576; flags dynamic,timeout; timeout {}s;",
                farm.persist_ttl.max(1)
            ),
            elements: BTreeMap::new(),
            dynamic: true,
        },
    ));
    for (m, tail) in deliveries {
        if has_statics {
            rules.push(format!(
                "{m} {val} set {key} map @{ss} {val} {usable} {tail}"
            ));
        }
        rules.push(format!(
            "{m} {val} set {key} map @{ps} {val} {usable} update @{ps} {{ {key} : {val} }} {tail}"
        ));
    }
    // A learnt backend that can no longer be used: forget it, schedule again. (The
    // kernel wants a value with a key even to delete from a map.)
    let fam_match = format!("meta protocol {}", fam.ip());
    rules.push(format!(
        "{fam_match} {val} set {key} map @{ps} delete @{ps} {{ {key} : {val} }}"
    ));
    for (m, tail) in deliveries {
        rules.push(format!(
            "{m} {val} set {pick} update @{ps} {{ {key} : {val} }} {tail}"
        ));
    }
    rules
}

/// `log input` and `log output`: every packet that reaches the farm, and every packet
/// about to be forwarded to a backend (there is no connection state to log new flows
/// only; `log-rtlimit` limits the rate). Both happen in the farm's chain, before the
/// forwarding rules, as in nftlb.
fn input_log(farm: &Farm) -> Vec<String> {
    let mut out = one_log(farm, "input", "IN");
    out.extend(one_log(farm, "output", "OUT"));
    out
}

fn one_log(farm: &Farm, which: &str, ty: &str) -> Vec<String> {
    if !farm.log.has(which) {
        return Vec::new();
    }
    let template = farm
        .log_prefix
        .clone()
        .unwrap_or_else(|| "TYPE-FNAME ".into());
    let prefix = expand(
        &template,
        &Tokens {
            kname: "log",
            ty,
            fname: &farm.name,
            ..Default::default()
        },
    );
    if farm.log_rtlimit.count > 0 {
        vec![format!(
            "limit rate {} log prefix \"{prefix}\"",
            farm.log_rtlimit
        )]
    } else {
        vec![format!("log prefix \"{prefix}\"")]
    }
}

fn dsr<'a>(farm: &Farm, entries: &[Entry<'a>], targets: &[Target<'a>]) -> Parts {
    let chain = farm_chain(&farm.name);
    let goto = format!("goto {chain}");
    let mut p = Parts::default();
    let fams: BTreeSet<Fam> = entries.iter().map(|e| e.fam).collect();
    for e in entries {
        p.dispatch.extend(service_elems(e, &goto));
    }
    let mut rules = input_log(farm);
    for fam in fams {
        let ip = fam.ip();
        let ts = by_family(targets, fam);
        if ts.is_empty() {
            rules.push(format!("meta protocol {ip} drop"));
            continue;
        }
        let out = out_stmts(&ts, "ether daddr", |t| t.mac.to_string());
        let deliveries = [(format!("meta protocol {ip}"), out)];
        rules.extend(pick_rules(farm, fam, &ts, &deliveries, &mut p));
    }
    p.chains.push((chain, Chain { base: None, rules }));
    p
}

fn stlsdnat<'a>(
    farm: &Farm,
    entries: &[Entry<'a>],
    targets: &[Target<'a>],
) -> Result<Parts, String> {
    let chain = farm_chain(&farm.name);
    let back = back_chain(&farm.name);
    let goto = format!("goto {chain}");
    let goto_back = format!("goto {back}");
    let mut p = Parts::default();
    let mut rules = input_log(farm);
    let mut back_rules = Vec::new();
    let mut fams_seen = BTreeSet::new();
    for e in entries {
        let fam = e.fam;
        let ip = fam.ip();
        let vip = e.addr.ip_addr.ok_or_else(|| {
            format!(
                "address '{}' has no virtual address: stlsdnat replies need one",
                e.addr.name
            )
        })?;
        if !fams_seen.insert(fam) {
            return Err(format!(
                "it has more than one IPv{} virtual address: replies could not tell which to restore",
                fam.digit()
            ));
        }
        let imac = e
            .imac
            .ok_or_else(|| format!("input interface '{}' has no MAC address", e.iface))?;
        p.dispatch.extend(service_elems(e, &goto));
        let cmap = client_map(farm, fam);
        p.maps.push((
            cmap.clone(),
            MapDef {
                kind: "map",
                spec: format!(
                    "type {} : ether_addr; size {CLIENT_MAP_SIZE}; flags dynamic,timeout; timeout {}s;",
                    fam.addr_type(),
                    client_ttl(farm)
                ),
                elements: BTreeMap::new(),
                dynamic: true,
            },
        ));
        let ts = by_family(targets, fam);
        if ts.is_empty() {
            rules.push(format!("meta protocol {ip} drop"));
            continue;
        }
        rules.push(format!("update @{cmap} {{ {ip} saddr : ether saddr }}"));
        // Ports are translated only when every backend has one (as in the NAT modes).
        let with_port = ts.iter().all(|t| t.backend.port.is_some());
        let vports = e.addr.ports.ranges();
        let vport = match (with_port, vports.as_slice()) {
            (false, _) => None,
            (true, [r]) if r.lo == r.hi && !e.addr.ports.is_empty() => Some(r.lo),
            (true, _) => {
                return Err(
                    "backends with ports need exactly one virtual port: replies could not tell which to restore"
                        .into(),
                )
            }
        };
        let macs = if ts.len() == 1 {
            ts[0].mac.to_string()
        } else {
            let m: BTreeMap<String, String> = ts
                .iter()
                .map(|t| (t.ip.to_string(), t.mac.to_string()))
                .collect();
            format!(
                "{ip} daddr map {{ {} }}",
                m.iter()
                    .map(|(k, v)| format!("{k} : {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let out = out_stmts(&ts, &format!("{ip} daddr"), |t| t.ip.to_string());
        let protos = e.addr.protocol.l4();
        let mut deliveries = Vec::new();
        if with_port {
            for proto in protos {
                let ports = if ts.len() == 1 {
                    ts[0].backend.port.expect("with_port").to_string()
                } else {
                    let m: BTreeMap<String, u16> = ts
                        .iter()
                        .map(|t| (t.ip.to_string(), t.backend.port.expect("with_port")))
                        .collect();
                    format!(
                        "{ip} daddr map {{ {} }}",
                        m.iter()
                            .map(|(k, v)| format!("{k} : {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                deliveries.push((
                    format!("meta protocol {ip} meta l4proto {proto}"),
                    format!("ether daddr set {macs} {proto} dport set {ports} {out}"),
                ));
            }
        } else {
            deliveries.push((
                format!("meta protocol {ip}"),
                format!("ether daddr set {macs} {out}"),
            ));
        }
        rules.extend(pick_rules(farm, fam, &ts, &deliveries, &mut p));
        // Return path.
        for t in &ts {
            for proto in protos {
                let sports: Vec<PortRange> = match t.backend.port {
                    Some(bp) if with_port => vec![PortRange { lo: bp, hi: bp }],
                    _ => vports.clone(),
                };
                for r in sports {
                    p.dispatch.push((
                        (t.oface.clone(), true),
                        lookup_index(fam, true, r.lo != r.hi, true),
                        format!("{proto} . {} . {r}", t.ip),
                        goto_back.clone(),
                    ));
                }
            }
        }
        let lookup = format!("ether daddr set {ip} daddr map @{cmap}");
        let tail = format!("ether saddr set {imac} fwd to \"{}\"", e.iface);
        match vport {
            Some(vp) => {
                for proto in protos {
                    back_rules.push(format!(
                        "meta protocol {ip} meta l4proto {proto} {lookup} {ip} saddr set {vip} {proto} sport set {vp} {tail}"
                    ));
                }
            }
            None => back_rules.push(format!(
                "meta protocol {ip} {lookup} {ip} saddr set {vip} {tail}"
            )),
        }
    }
    // Anything else that reached the farm (a lookup that failed) must not go on to
    // the host's stack with a rewritten address.
    rules.push("drop".into());
    p.chains.push((chain, Chain { base: None, rules }));
    p.chains.push((
        back,
        Chain {
            base: None,
            rules: back_rules,
        },
    ));
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netinfo::Link;
    use crate::render::tests::{state, CFG};
    use crate::render::{bucket_space, render, Slots};
    use crate::ruleset::plan;
    use serde_json::json;

    fn mac(last: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, last])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// eth0 holds 198.18.0.1 and the VIP 198.18.0.100; backends .11 .12 on eth0 (.13
    /// unresolved); eth1 holds 198.18.1.1 with backends .21 (.22 routed via .1.254).
    fn net() -> NetView {
        let mut n = NetView {
            gathered: true,
            ..Default::default()
        };
        for (name, index, m, lo) in [
            ("lo", 1, None, true),
            ("eth0", 2, Some(mac(1)), false),
            ("eth1", 3, Some(mac(2)), false),
        ] {
            n.links.insert(
                name.into(),
                Link {
                    index,
                    mac: m,
                    up: true,
                    loopback: lo,
                },
            );
        }
        for (a, i) in [
            ("198.18.0.1", "eth0"),
            ("198.18.0.100", "eth0"),
            ("2001:2::100", "eth0"),
            ("198.18.1.1", "eth1"),
            ("127.0.0.1", "lo"),
        ] {
            n.addrs.insert(ip(a), i.into());
        }
        for (b, i, m) in [
            ("198.18.0.11", "eth0", 0x11),
            ("198.18.0.12", "eth0", 0x12),
            ("198.18.1.21", "eth1", 0x21),
            ("2001:2::11", "eth0", 0x61),
        ] {
            n.routes.insert(
                ip(b),
                Route::Via {
                    oif: i.into(),
                    gateway: None,
                },
            );
            n.neighbours.insert((i.into(), ip(b)), Neigh::Known(mac(m)));
        }
        n.routes.insert(
            ip("198.18.0.13"),
            Route::Via {
                oif: "eth0".into(),
                gateway: None,
            },
        );
        n.neighbours
            .insert(("eth0".into(), ip("198.18.0.13")), Neigh::Failed);
        n.routes.insert(
            ip("198.18.1.22"),
            Route::Via {
                oif: "eth1".into(),
                gateway: Some(ip("198.18.1.254")),
            },
        );
        n
    }

    fn render_text(st: &State, n: &NetView) -> (String, Vec<String>) {
        let mut slots = Slots::default();
        slots.sync(st, bucket_space(0x8000_0000)).unwrap();
        let (rs, notes) = render(st, &slots, n, &CFG);
        let only_netdev = Ruleset {
            tables: rs
                .tables
                .into_iter()
                .filter(|(f, _)| *f == TableFamily::Netdev)
                .collect(),
        };
        (
            plan(&Ruleset::default(), &only_netdev).to_text(),
            notes.into_iter().map(|(_, m)| m).collect(),
        )
    }

    fn dsr_farm(extra: serde_json::Value) -> serde_json::Value {
        let mut f = json!({"name":"d","virtual-addr":"198.18.0.100","virtual-ports":"80,1000-2000",
            "mode":"dsr","backends":[{"name":"b1","ip-addr":"198.18.0.11"},{"name":"b2","ip-addr":"198.18.0.12"}]});
        for (k, v) in extra.as_object().unwrap() {
            f[k] = v.clone();
        }
        json!({"farms":[f]})
    }

    #[test]
    fn dsr_two_backends() {
        let (text, notes) = render_text(&state(dsr_farm(json!({}))), &net());
        assert!(notes.is_empty(), "{notes:?}");
        assert!(text.contains("add chain netdev nftlb ingress-eth0 { type filter hook ingress device \"eth0\" priority 101; policy accept; }"), "{text}");
        for elems in [
            "tcp . 198.18.0.100 . 80 : goto lb-d",
            "tcp . 198.18.0.100 . 1000-2000 : goto lb-d",
        ] {
            let rule = format!("add rule netdev nftlb ingress-eth0 meta l4proto . ip daddr . th dport vmap {{ {elems} }}");
            assert!(text.contains(&rule), "{rule}\n{text}");
        }
        assert!(!text.contains("add map"), "{text}");
        let rule = text
            .lines()
            .find(|l| l.starts_with("add rule netdev nftlb lb-d"))
            .map(crate::ruleset::untagged)
            .unwrap();
        assert!(rule.starts_with("add rule netdev nftlb lb-d meta protocol ip ether daddr set jhash ip saddr . th sport mod 256 seed 0x0 map { 0"), "{rule}");
        assert!(
            rule.ends_with("} ether saddr set 02:00:00:00:00:01 fwd to \"eth0\""),
            "{rule}"
        );
        assert!(rule.contains("02:00:00:00:00:11") && rule.contains("02:00:00:00:00:12"));
        assert!(!text.contains("ingress/dnat"), "{text}");
    }

    /// The ingress farms share the base chains' lookups, yet each is rendered once per
    /// whole render (it used to be once per ingress farm: quadratic, minutes for 10,000
    /// dsr farms), and each farm's notes are reported once.
    #[test]
    fn each_ingress_farm_is_rendered_once() {
        const N: usize = 30;
        let farms: Vec<serde_json::Value> = (0..N)
            .map(|i| {
                json!({"name":format!("d{i}"),"virtual-addr":format!("198.18.2.{}", i + 1),
                    "virtual-ports":"80","mode":"dsr","iface":"eth0","backends":[
                    {"name":"b1","ip-addr":"198.18.0.11"},
                    {"name":"b3","ip-addr":"198.18.0.13"}]})
            })
            .collect();
        let st = state(json!({ "farms": farms }));
        FARM_PARTS_CALLS.with(|c| c.set(0));
        let (text, notes) = render_text(&st, &net());
        assert_eq!(FARM_PARTS_CALLS.with(|c| c.get()), N);
        // One note per farm (backend b3 is unresolved), in state order.
        assert_eq!(notes.len(), N, "{notes:?}");
        for (i, note) in notes.iter().enumerate() {
            assert!(
                note.starts_with(&format!("Farm 'd{i}': backend 'b3' gets no traffic")),
                "{note}"
            );
        }
        // Every farm has its chain and its element in the one dispatch map.
        let dispatch = text
            .lines()
            .find(|l| {
                l.starts_with(
                    "add rule netdev nftlb ingress-eth0 meta l4proto . ip daddr . th dport vmap",
                )
            })
            .unwrap();
        for i in 0..N {
            let elem = format!("tcp . 198.18.2.{} . 80 : goto lb-d{i}", i + 1);
            assert!(dispatch.contains(&elem), "{elem}\n{dispatch}");
            assert!(
                text.contains(&format!("add chain netdev nftlb lb-d{i}\n")),
                "{text}"
            );
        }
    }

    #[test]
    fn rendezvous_moves_only_the_removed_backends_buckets() {
        let keys: Vec<(String, u32)> = (1..=5).map(|i| (format!("198.18.0.{i}"), 1)).collect();
        let all = assign(&keys, 256);
        let fewer = assign(&keys[..4], 256);
        for (a, b) in all.iter().zip(&fewer) {
            if *a != 4 {
                assert_eq!(a, b);
            }
        }
        // Shares follow weights.
        let w: Vec<(String, u32)> = vec![("a".into(), 1), ("b".into(), 3)];
        let owners = assign(&w, 4096);
        let b = owners.iter().filter(|o| **o == 1).count();
        assert!((2900..3250).contains(&b), "{b}");
    }

    #[test]
    fn dsr_backend_problems_and_states() {
        let st = state(dsr_farm(
            json!({"scheduler":"hash","sched-param":"srcip","backends":[
            {"name":"b1","ip-addr":"198.18.0.11"},
            {"name":"b2","ip-addr":"198.18.0.12","state":"down"},
            {"name":"b3","ip-addr":"198.18.0.13"},
            {"name":"b4","ip-addr":"198.18.1.22"},
            {"name":"b5","ip-addr":"198.18.0.12","state":"off"}]}),
        ));
        let (text, notes) = render_text(&st, &net());
        // One usable backend: no hash at all.
        assert!(text.contains("add rule netdev nftlb lb-d meta protocol ip ether daddr set 02:00:00:00:00:11 ether saddr set 02:00:00:00:00:01 fwd to \"eth0\""), "{text}");
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(
            notes[0].contains("'b3'") && notes[0].contains("does not answer"),
            "{notes:?}"
        );
        assert!(
            notes[1].contains("'b4'") && notes[1].contains("198.18.1.254"),
            "{notes:?}"
        );
        assert!(notes[2].contains("'b5' is off"), "{notes:?}");
        let errs = backend_errors(&st, &st.farms["d"], &net());
        assert_eq!(
            errs.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            ["b3", "b4"]
        );
    }

    #[test]
    fn unresolvable_input_renders_nothing() {
        for (extra, what) in [
            (
                json!({"iface":"nonexistent0"}),
                "input interface 'nonexistent0' does not exist",
            ),
            (
                json!({"virtual-addr":"198.18.7.7"}),
                "198.18.7.7 is not an address of this host",
            ),
            (json!({"virtual-addr":"127.0.0.1"}), "loopback"),
            (
                json!({"virtual-addr":""}),
                "name its input interface with 'iface'",
            ),
        ] {
            let (text, notes) = render_text(&state(dsr_farm(extra.clone())), &net());
            assert!(text.is_empty(), "{extra}: {text}");
            assert_eq!(notes.len(), 1, "{extra}: {notes:?}");
            assert!(notes[0].contains(what), "{extra}: {notes:?}");
        }
        // Not gathered (unit tests elsewhere): a note, nothing rendered.
        let (text, notes) = render_text(&state(dsr_farm(json!({}))), &NetView::default());
        assert!(text.is_empty() && notes.len() == 1);
    }

    #[test]
    fn dsr_port_only_inet_and_two_output_interfaces() {
        let st = state(
            json!({"farms":[{"name":"p","family":"inet","virtual-addr":"","virtual-ports":"53",
            "protocol":"udp","mode":"dsr","iface":"eth0","scheduler":"symhash","backends":[
            {"name":"a","ip-addr":"198.18.0.11"},{"name":"b","ip-addr":"198.18.1.21"},{"name":"c","ip-addr":"2001:2::11"}]}]}),
        );
        let (text, notes) = render_text(&st, &net());
        assert!(notes.is_empty(), "{notes:?}");
        for ip in ["ip", "ip6"] {
            let rule = format!("ingress-eth0 meta protocol {ip} meta l4proto . th dport vmap {{ udp . 53 : goto lb-p }}");
            assert!(text.contains(&rule), "{rule}\n{text}");
        }
        assert!(text.contains("symhash mod 256 map"), "{text}");
        assert!(text.contains("ether saddr set ether daddr map { 02:00:00:00:00:11 : 02:00:00:00:00:01, 02:00:00:00:00:21 : 02:00:00:00:00:02 } fwd to ether daddr map { 02:00:00:00:00:11 : \"eth0\", 02:00:00:00:00:21 : \"eth1\" }"), "{text}");
        assert!(text.contains("lb-p meta protocol ip6 ether daddr set 02:00:00:00:00:61 ether saddr set 02:00:00:00:00:01 fwd to \"eth0\""), "{text}");
    }

    #[test]
    fn stlsdnat_with_port_translation() {
        let st = state(
            json!({"farms":[{"name":"s","virtual-addr":"198.18.0.100","virtual-ports":"80",
            "mode":"stlsdnat","protocol":"all","backends":[
            {"name":"a","ip-addr":"198.18.1.21","port":"8080"},{"name":"b","ip-addr":"198.18.0.11","port":"8081"}]}]}),
        );
        let (text, notes) = render_text(&st, &net());
        assert!(notes.is_empty(), "{notes:?}");
        assert!(text.contains("add map netdev nftlb cli4-s-t60 { type ipv4_addr : ether_addr; size 262144; flags dynamic,timeout; timeout 60s; }"), "{text}");
        assert!(
            text.contains(
                "add rule netdev nftlb lb-s update @cli4-s-t60 { ip saddr : ether saddr }"
            ),
            "{text}"
        );
        for proto in ["tcp", "udp", "sctp"] {
            assert!(text.contains(&format!("{proto} dport set ip daddr map {{ 198.18.0.11 : 8081, 198.18.1.21 : 8080 }} ether saddr set ip daddr map {{ 198.18.0.11 : 02:00:00:00:00:01, 198.18.1.21 : 02:00:00:00:00:02 }} fwd to ip daddr map {{ 198.18.0.11 : \"eth0\", 198.18.1.21 : \"eth1\" }}")), "{text}");
            assert!(text.contains(&format!("add rule netdev nftlb reply-s meta protocol ip meta l4proto {proto} ether daddr set ip daddr map @cli4-s-t60 ip saddr set 198.18.0.100 {proto} sport set 80 ether saddr set 02:00:00:00:00:01 fwd to \"eth0\"")), "{text}");
        }
        assert!(text.contains("add rule netdev nftlb ingress/dnat-eth1 meta l4proto . ip saddr . th sport vmap { sctp . 198.18.1.21 . 8080 : goto reply-s, tcp . 198.18.1.21 . 8080 : goto reply-s, udp . 198.18.1.21 . 8080 : goto reply-s }"), "{text}");
        assert!(text.contains("add chain netdev nftlb ingress/dnat-eth1 { type filter hook ingress device \"eth1\" priority 100; policy accept; }"), "{text}");
        assert!(text.contains("add rule netdev nftlb lb-s drop"), "{text}");
    }

    #[test]
    fn stlsdnat_refusals() {
        // Port translation with a range of virtual ports.
        let st = state(
            json!({"farms":[{"name":"s","virtual-addr":"198.18.0.100","virtual-ports":"80,81",
            "mode":"stlsdnat","backends":[{"name":"a","ip-addr":"198.18.1.21","port":"8080"}]}]}),
        );
        let (text, notes) = render_text(&st, &net());
        assert!(
            text.is_empty() && notes[0].contains("exactly one virtual port"),
            "{notes:?}"
        );
        // Two farms sharing a backend address and port: the second is refused.
        let st = state(json!({"farms":[
            {"name":"s1","virtual-addr":"198.18.0.100","virtual-ports":"80","mode":"stlsdnat",
             "backends":[{"name":"a","ip-addr":"198.18.1.21","port":"8080"}]},
            {"name":"s2","virtual-addr":"198.18.0.1","virtual-ports":"80","mode":"stlsdnat",
             "backends":[{"name":"a","ip-addr":"198.18.1.21","port":"8080"}]}]}));
        let (text, notes) = render_text(&st, &net());
        assert!(text.contains("lb-s1") && !text.contains("lb-s2"), "{text}");
        assert!(
            notes.len() == 1 && notes[0].contains("Farm 's2'") && notes[0].contains("reply-s1"),
            "{notes:?}"
        );
    }

    #[test]
    fn dsr_persistence_rules() {
        let st = state(dsr_farm(
            json!({"persistence":"srcip srcport","persist-ttl":"30",
            "sessions":[{"client":"198.18.0.2 . 1234","backend":"b2"},{"client":"2001:2::2 . 1","backend":"b1"}]}),
        ));
        let (text, notes) = render_text(&st, &net());
        assert!(notes.is_empty(), "{notes:?}");
        let (ps, ss) = session_maps(&st.farms["d"], false);
        assert!(text.contains(&format!("add map netdev nftlb {ps} {{ type ipv4_addr . inet_service : ether_addr; size 1048576; flags dynamic,timeout; timeout 30s; }}")), "{text}");
        assert!(
            text.contains(&format!(
                "add element netdev nftlb {ss} {{ 198.18.0.2 . 1234 : 02:00:00:00:00:12 }}"
            )),
            "{text}"
        );
        let rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add rule netdev nftlb lb-d"))
            .map(crate::ruleset::untagged)
            .collect();
        let usable = "ether daddr { 02:00:00:00:00:11, 02:00:00:00:00:12 }";
        let out = "ether saddr set 02:00:00:00:00:01 fwd to \"eth0\"";
        assert_eq!(rules.len(), 4, "{rules:#?}");
        assert!(
            rules[0].ends_with(&format!(
                "meta protocol ip ether daddr set ip saddr . th sport map @{ss} {usable} {out}"
            )),
            "{}",
            rules[0]
        );
        assert!(rules[1].ends_with(&format!("meta protocol ip ether daddr set ip saddr . th sport map @{ps} {usable} update @{ps} {{ ip saddr . th sport : ether daddr }} {out}")), "{}", rules[1]);
        assert!(rules[2].ends_with(&format!("meta protocol ip ether daddr set ip saddr . th sport map @{ps} delete @{ps} {{ ip saddr . th sport : ether daddr }}")), "{}", rules[2]);
        assert!(
            rules[3].contains(&format!(
                "update @{ps} {{ ip saddr . th sport : ether daddr }} {out}"
            )),
            "{}",
            rules[3]
        );
    }

    #[test]
    fn input_logging() {
        let st = state(dsr_farm(json!({"log":"input","log-rtlimit":"5/second"})));
        let (text, notes) = render_text(&st, &net());
        assert!(notes.is_empty(), "{notes:?}");
        assert!(
            text.contains("add rule netdev nftlb lb-d limit rate 5/second log prefix \"IN-d \""),
            "{text}"
        );
        let st = state(dsr_farm(json!({"log":"output"})));
        let (text, notes) = render_text(&st, &net());
        assert!(notes.is_empty(), "{notes:?}");
        assert!(
            text.contains("add rule netdev nftlb lb-d log prefix \"OUT-d \""),
            "{text}"
        );
        let st = state(dsr_farm(json!({"log":"forward"})));
        let (_, notes) = render_text(&st, &net());
        assert!(notes[0].contains("log forward"), "{notes:?}");
    }

    #[test]
    fn no_ingress_farm_no_netdev_table() {
        let st = state(
            json!({"farms":[{"name":"n","virtual-addr":"198.18.0.100","virtual-ports":"80",
            "backends":[{"name":"a","ip-addr":"198.18.1.21"}]}]}),
        );
        let (text, _) = render_text(&st, &NetView::default());
        assert!(text.is_empty(), "{text}");
    }
}
