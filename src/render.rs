//! Rendering: a pure function from the desired [`State`] (and the bucket [`Slots`]) to
//! the [`Ruleset`] that implements it.
//!
//! Layout, per family (`table ip nftlb`, `table ip6 nftlb`):
//! - `prerouting` (nat, dstnat) looks each new flow up in two interval verdict maps:
//!   `svc` (`l4proto . vip . port-range`) and `svcp` for port-only services
//!   (`l4proto . port-range`). A port range is one interval element, never expanded, and
//!   the lookup cost does not depend on the number of farms.
//! - Each served farm has one small chain, `farm-NAME`, holding one rule per transport
//!   protocol: `dnat to <scheduler> mod W offset O map @bk_tcp`. Every farm owns a block
//!   `[O, O + size)` of a shared 32-bit bucket space (its [`Slot`]); the shared maps
//!   `bk_tcp`/`bk_udp`/`bk_sctp` (backend address and port) and `bki` (address only) map
//!   each bucket to a backend with exact-match hash elements, so a backend change adds and
//!   deletes only that farm's W elements, each in O(1), and rewrites its one-line chain.
//! - `postrouting` (nat, srcnat) applies per-backend or per-farm source addresses from the
//!   `srcaddr`/`srcaddrp` maps (keyed on the original destination and the chosen backend),
//!   then masquerades flows whose conntrack mark carries the masquerade bit (`-m`).
//! - There are no per-farm sets or anonymous maps: both make kernel loading quadratic.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::*;
use crate::ruleset::{Chain, MapDef, Ruleset, Table, TableFamily};

/// Settings that rendering depends on.
#[derive(Debug, Clone, Copy)]
pub struct RenderConfig {
    /// The conntrack mark bit that means "masquerade this flow".
    pub masquerade_mark: u32,
}

/// Something in the state that is accepted but not rendered: (farm, message).
pub type Note = (String, String);

/// A farm's block of the shared bucket space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// First bucket.
    pub offset: u32,
    /// Number of buckets reserved (a power of two, at least 16).
    pub size: u32,
}

/// Allocation of bucket blocks to farms. Kept by the engine and persisted with the
/// state, so that a restart renders the same rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Slots {
    by_farm: HashMap<String, Slot>,
    free: BTreeMap<u32, Vec<u32>>,
    next: u64,
}

/// Size of the bucket space (numgen and jhash results are 32-bit).
const BUCKET_SPACE: u64 = 1 << 32;

impl Slots {
    /// The block of a farm, if it has one.
    pub fn get(&self, farm: &str) -> Option<Slot> {
        self.by_farm.get(farm).copied()
    }

    /// Frees the blocks of farms that are gone and gives every farm a block large enough
    /// for its buckets. Blocks never shrink, so weight changes do not move a farm.
    pub fn sync(&mut self, state: &State) -> Result<(), String> {
        let gone: Vec<String> = self
            .by_farm
            .keys()
            .filter(|n| !state.farms.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            if let Some(s) = self.by_farm.remove(&n) {
                self.free.entry(s.size).or_default().push(s.offset);
            }
        }
        for farm in state.farms.values() {
            let need = buckets_needed(state, farm).max(16).next_power_of_two();
            match self.by_farm.get(&farm.name) {
                Some(s) if s.size >= need => continue,
                Some(s) => {
                    let s = *s;
                    self.free.entry(s.size).or_default().push(s.offset);
                }
                None => {}
            }
            let offset = self.alloc(need).ok_or_else(|| {
                format!(
                    "farm '{}': no room left for {need} scheduling buckets (too many farms or weights)",
                    farm.name
                )
            })?;
            self.by_farm
                .insert(farm.name.clone(), Slot { offset, size: need });
        }
        Ok(())
    }

    fn alloc(&mut self, size: u32) -> Option<u32> {
        if let Some(off) = self.free.get_mut(&size).and_then(Vec::pop) {
            return Some(off);
        }
        if self.next + u64::from(size) > BUCKET_SPACE {
            return None;
        }
        let off = self.next as u32;
        self.next += u64::from(size);
        Some(off)
    }
}

fn ip_kw(fam: TableFamily) -> &'static str {
    match fam {
        TableFamily::Ip => "ip",
        TableFamily::Ip6 => "ip6",
    }
}

fn addr_type(fam: TableFamily) -> &'static str {
    match fam {
        TableFamily::Ip => "ipv4_addr",
        TableFamily::Ip6 => "ipv6_addr",
    }
}

fn fam_matches(fam: TableFamily, ip: &IpAddr) -> bool {
    matches!(
        (fam, ip),
        (TableFamily::Ip, IpAddr::V4(_)) | (TableFamily::Ip6, IpAddr::V6(_))
    )
}

/// Chain name of a farm.
pub fn farm_chain(farm: &str) -> String {
    format!("farm-{farm}")
}

fn map(spec: String) -> MapDef {
    MapDef {
        kind: "map",
        spec,
        elements: BTreeMap::new(),
    }
}

/// Name of the backend map: with backend ports, one per transport protocol (the data is
/// declared with that protocol's port field; nft 1.0.6 refuses `th dport` there after a
/// protocol match); without ports, one for all.
fn bk_map(with_port: bool, p: &str) -> String {
    if with_port {
        format!("bk_{p}")
    } else {
        "bki".to_string()
    }
}

fn base_table(fam: TableFamily, cfg: &RenderConfig) -> Table {
    let ip = ip_kw(fam);
    let at = addr_type(fam);
    let mut t = Table::default();
    t.maps.insert(
        "svc".into(),
        map(format!(
            "type inet_proto . {at} . inet_service : verdict; flags interval;"
        )),
    );
    t.maps.insert(
        "svcp".into(),
        map("type inet_proto . inet_service : verdict; flags interval;".into()),
    );
    // The bucket is typed like numgen's result (a 32-bit integer); the modulus in the
    // declaration does not matter.
    for p in ["tcp", "udp", "sctp"] {
        t.maps.insert(
            bk_map(true, p),
            map(format!("typeof numgen inc mod 1 : {ip} daddr . {p} dport;")),
        );
    }
    t.maps.insert(
        bk_map(false, "tcp"),
        map(format!("typeof numgen inc mod 1 : {ip} daddr;")),
    );
    t.maps.insert(
        "srcaddr".into(),
        map(format!(
            "type inet_proto . {at} . inet_service . {at} . inet_service : {at}; flags interval;"
        )),
    );
    t.maps.insert(
        "srcaddrp".into(),
        map(format!(
            "type inet_proto . inet_service . {at} . inet_service : {at}; flags interval;"
        )),
    );
    t.chains.insert(
        "prerouting".into(),
        Chain {
            base: Some("type nat hook prerouting priority dstnat; policy accept;".into()),
            rules: vec![
                format!("meta l4proto . {ip} daddr . th dport vmap @svc"),
                "meta l4proto . th dport vmap @svcp".into(),
            ],
        },
    );
    let masq = cfg.masquerade_mark;
    t.chains.insert(
        "postrouting".into(),
        Chain {
            base: Some("type nat hook postrouting priority srcnat; policy accept;".into()),
            rules: vec![
                format!("meta l4proto {{ tcp, udp, sctp }} snat {ip} to meta l4proto . ct original {ip} daddr . ct original proto-dst . {ip} daddr . th dport map @srcaddr"),
                format!("meta l4proto {{ tcp, udp, sctp }} snat {ip} to meta l4proto . ct original proto-dst . {ip} daddr . th dport map @srcaddrp"),
                format!("ct mark and 0x{masq:x} == 0x{masq:x} masquerade"),
            ],
        },
    );
    t
}

/// The scheduler expression over `modulus` buckets in a rule for transport protocol `p`.
fn sched_expr(farm: &Farm, fam: TableFamily, p: &str, modulus: u32) -> String {
    let ip = ip_kw(fam);
    match farm.scheduler {
        Scheduler::Rr => format!("numgen inc mod {modulus}"),
        Scheduler::Weight => format!("numgen random mod {modulus}"),
        Scheduler::Symhash => format!("symhash mod {modulus}"),
        Scheduler::Hash => {
            let fields: Vec<String> = farm
                .sched_param
                .set_names()
                .iter()
                .map(|f| match *f {
                    "srcip" => format!("{ip} saddr"),
                    "dstip" => format!("{ip} daddr"),
                    "srcport" => format!("{p} sport"),
                    "dstport" => format!("{p} dport"),
                    "srcmac" => "ether saddr".to_string(),
                    _ => "ether daddr".to_string(),
                })
                .collect();
            format!("jhash {} mod {modulus} seed 0x0", fields.join(" . "))
        }
    }
}

/// A backend chosen for scheduling in one family and its buckets `[lo, lo + n)`.
struct Pick<'a> {
    backend: &'a Backend,
    ip: IpAddr,
    lo: u32,
    n: u32,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The usable backends of a farm in one family, with contiguous bucket ranges by weight
/// (weights divided by their greatest common divisor), and the total W.
fn picks<'a>(farm: &'a Farm, statuses: &[BackendStatus], fam: TableFamily) -> (Vec<Pick<'a>>, u32) {
    let usable: Vec<(&Backend, IpAddr)> = farm
        .backends
        .iter()
        .zip(statuses)
        .filter(|(_, st)| **st == BackendStatus::Up)
        .filter_map(|(b, _)| {
            b.ip_addr
                .filter(|ip| fam_matches(fam, ip))
                .map(|ip| (b, ip))
        })
        .collect();
    let g = usable.iter().fold(0, |g, (b, _)| gcd(g, b.weight)).max(1);
    let mut out = Vec::with_capacity(usable.len());
    let mut total = 0u32;
    for (b, ip) in usable {
        let n = b.weight / g;
        out.push(Pick {
            backend: b,
            ip,
            lo: total,
            n,
        });
        total += n;
    }
    (out, total)
}

/// The largest number of buckets a farm needs in any family.
fn buckets_needed(state: &State, farm: &Farm) -> u32 {
    let statuses = state.backend_statuses(farm);
    TableFamily::ALL
        .iter()
        .map(|fam| picks(farm, &statuses, *fam).1)
        .max()
        .unwrap_or(0)
}

/// Renders the whole state. Also returns notes about accepted but unrendered settings.
/// Every farm must have a slot (see [`Slots::sync`]).
pub fn render(state: &State, slots: &Slots, cfg: &RenderConfig) -> (Ruleset, Vec<Note>) {
    let mut rs = Ruleset::default();
    let mut notes = Vec::new();
    for fam in TableFamily::ALL {
        rs.tables.insert(fam, base_table(fam, cfg));
    }
    for farm in state.farms.values() {
        if farm.state != FarmState::Up {
            continue;
        }
        match farm.mode {
            Mode::Snat | Mode::Dnat => {}
            other => {
                notes.push((
                    farm.name.clone(),
                    format!(
                        "Farm '{}': mode '{}' is stored but not served by this version",
                        farm.name,
                        other.as_str()
                    ),
                ));
                continue;
            }
        }
        let unserved = unserved_keys(farm);
        if !unserved.is_empty() {
            notes.push((
                farm.name.clone(),
                format!(
                    "Farm '{}': {} stored but not enforced by this version",
                    farm.name,
                    unserved.join(", ")
                ),
            ));
        }
        let Some(slot) = slots.get(&farm.name) else {
            notes.push((
                farm.name.clone(),
                format!("Farm '{}' has no scheduling slot", farm.name),
            ));
            continue;
        };
        let statuses = state.backend_statuses(farm);
        for fam in TableFamily::ALL {
            let table = rs.tables.get_mut(&fam).expect("base tables exist");
            render_farm(state, farm, &statuses, slot, fam, cfg, table);
        }
    }
    (rs, notes)
}

/// The keys of a farm set to something this version does not turn into rules yet.
fn unserved_keys(f: &Farm) -> Vec<&'static str> {
    let d = Farm::new(String::new());
    let mut out = Vec::new();
    let checks: [(&'static str, bool); 13] = [
        ("persistence", f.persistence != d.persistence),
        ("sessions", !f.sessions.is_empty()),
        ("helper", f.helper != d.helper),
        ("log", f.log != d.log),
        ("mark", f.mark != d.mark),
        ("new-rtlimit", f.new_rtlimit.count != 0),
        ("rst-rtlimit", f.rst_rtlimit.count != 0),
        ("est-connlimit", f.est_connlimit != 0),
        ("tcp-strict", f.tcp_strict),
        ("queue", f.queue != d.queue),
        ("flow-offload", f.flow_offload),
        ("intra-connect", f.intra_connect),
        ("policies", !f.policies.is_empty()),
    ];
    for (k, set) in checks {
        if set {
            out.push(k);
        }
    }
    if f.backends
        .iter()
        .any(|b| b.est_connlimit != 0 || b.mark.0 != 0)
    {
        out.push("backend est-connlimit/mark");
    }
    out
}

fn insert(t: &mut Table, map: &str, key: String, value: String) {
    t.maps
        .get_mut(map)
        .expect("base map exists")
        .elements
        .insert(key, value);
}

fn render_farm(
    state: &State,
    farm: &Farm,
    statuses: &[BackendStatus],
    slot: Slot,
    fam: TableFamily,
    cfg: &RenderConfig,
    t: &mut Table,
) {
    let ip = ip_kw(fam);
    // Addresses served in this family: with an IP of this family, or port-only in a
    // family that includes this one.
    let addrs: Vec<&Address> = state
        .farm_addresses(farm)
        .filter(|a| match a.ip_addr {
            Some(addr) => fam_matches(fam, &addr),
            None => match a.family {
                Family::Inet => true,
                Family::Ipv4 => fam == TableFamily::Ip,
                Family::Ipv6 => fam == TableFamily::Ip6,
            },
        })
        .collect();
    if addrs.is_empty() {
        return;
    }
    let chain_name = farm_chain(&farm.name);
    let (picks, total) = picks(farm, statuses, fam);
    let with_port = picks.iter().all(|s| s.backend.port.is_some());
    let src_farm = farm.source_addr.filter(|s| fam_matches(fam, s));
    let masquerade = farm.mode == Mode::Snat && src_farm.is_none();
    let mut protos: Vec<&'static str> = Vec::new();
    for a in &addrs {
        for p in a.protocol.l4() {
            if !protos.contains(p) {
                protos.push(p);
            }
            for r in a.ports.ranges() {
                let (svc_map, svc_key) = match a.ip_addr {
                    Some(vip) => ("svc", format!("{p} . {vip} . {r}")),
                    None => ("svcp", format!("{p} . {r}")),
                };
                insert(t, svc_map, svc_key, format!("goto {chain_name}"));
                if farm.mode != Mode::Snat {
                    continue;
                }
                // Source address per (service, backend): the backend's, else the farm's.
                for pk in &picks {
                    let Some(src) = pk
                        .backend
                        .source_addr
                        .filter(|x| fam_matches(fam, x))
                        .or(src_farm)
                    else {
                        continue;
                    };
                    let bport = match pk.backend.port {
                        Some(bp) if with_port => bp.to_string(),
                        _ => r.to_string(),
                    };
                    let (map, key) = match a.ip_addr {
                        Some(vip) => (
                            "srcaddr",
                            format!("{p} . {vip} . {r} . {} . {bport}", pk.ip),
                        ),
                        None => ("srcaddrp", format!("{p} . {r} . {} . {bport}", pk.ip)),
                    };
                    insert(t, map, key, src.to_string());
                }
            }
        }
    }
    // Bucket elements, once per backend map this farm uses.
    let maps: Vec<String> = if with_port {
        protos.iter().map(|p| bk_map(true, p)).collect()
    } else {
        vec![bk_map(false, "")]
    };
    for m in &maps {
        for pk in &picks {
            let data = match (with_port, pk.backend.port) {
                (true, Some(bp)) => format!("{} . {bp}", pk.ip),
                _ => pk.ip.to_string(),
            };
            for b in pk.lo..pk.lo + pk.n {
                insert(t, m, (slot.offset + b).to_string(), data.clone());
            }
        }
    }
    let mut rules = Vec::new();
    if total > 0 {
        let masq = if masquerade {
            format!("ct mark set ct mark or 0x{:x} ", cfg.masquerade_mark)
        } else {
            String::new()
        };
        for p in &protos {
            rules.push(format!(
                "meta l4proto {p} {masq}dnat {ip} to {} offset {} map @{}",
                sched_expr(farm, fam, p, total),
                slot.offset,
                bk_map(with_port, p)
            ));
        }
    }
    // No usable backend (or a lookup miss): refuse the new flow rather than let it reach
    // a local socket on the virtual address.
    rules.push("drop".into());
    t.chains.insert(chain_name, Chain { base: None, rules });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{apply_document, ApplyMode, ParseConfig};
    use crate::ruleset::plan;
    use serde_json::json;

    const CFG: RenderConfig = RenderConfig {
        masquerade_mark: 0x8000_0000,
    };

    fn state(v: serde_json::Value) -> State {
        let mut st = State::default();
        apply_document(
            &mut st,
            &v,
            &ApplyMode::Upsert,
            &ParseConfig {
                masquerade_mark: 0x8000_0000,
            },
        )
        .unwrap();
        st.validate().unwrap();
        st
    }

    fn slots(st: &State) -> Slots {
        let mut s = Slots::default();
        s.sync(st).unwrap();
        s
    }

    fn rendered(st: &State) -> (Ruleset, Vec<Note>) {
        render(st, &slots(st), &CFG)
    }

    fn text(st: &State) -> String {
        plan(&Ruleset::default(), &rendered(st).0).to_text()
    }

    #[test]
    fn snat_rr_two_backends() {
        let st = state(
            json!({"farms":[{"name":"lb01","virtual-addr":"198.18.0.100",
            "virtual-ports":"80,1000-2000","backends":[
            {"name":"b1","ip-addr":"198.18.1.11","port":"8080"},
            {"name":"b2","ip-addr":"198.18.1.12","port":"8080","weight":"3"}]}]}),
        );
        insta::assert_snapshot!(text(&st));
    }

    #[test]
    fn dnat_hash_inet_port_only_with_source_addresses() {
        let st = state(json!({"farms":[
            {"name":"dual","family":"inet","virtual-addr":"","virtual-ports":"53","protocol":"udp",
             "mode":"snat","source-addr":"198.18.1.2","scheduler":"hash","sched-param":"srcip srcport",
             "backends":[{"name":"v4","ip-addr":"198.18.1.11"},
                         {"name":"v6","ip-addr":"2001:2:0:1::11","source-addr":"2001:2:0:1::2"},
                         {"name":"prio2","ip-addr":"198.18.1.13","priority":"2"},
                         {"name":"off","ip-addr":"198.18.1.14","state":"off"}]},
            {"name":"d","family":"ipv6","virtual-addr":"2001:2::100","virtual-ports":"443","mode":"dnat",
             "scheduler":"symhash","protocol":"all",
             "backends":[{"name":"a","ip-addr":"2001:2:0:1::11"}]}]}));
        insta::assert_snapshot!(text(&st));
    }

    #[test]
    fn down_farm_and_unserved_modes_render_nothing() {
        let st = state(json!({"farms":[
            {"name":"x","virtual-addr":"198.18.0.1","virtual-ports":"80","state":"down",
             "backends":[{"name":"b","ip-addr":"198.18.1.1"}]},
            {"name":"y","virtual-addr":"198.18.0.2","virtual-ports":"80","mode":"dsr",
             "backends":[{"name":"b","ip-addr":"198.18.1.1"}]}]}));
        let (rs, notes) = rendered(&st);
        assert_eq!(rs, rendered(&State::default()).0);
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn one_backend_change_touches_one_farm() {
        let mut v = json!({"farms":[]});
        for i in 0..50 {
            v["farms"].as_array_mut().unwrap().push(json!({"name":format!("f{i}"),
                "virtual-addr":format!("198.18.0.{i}"),"virtual-ports":"80",
                "backends":[{"name":"a","ip-addr":"198.18.1.1"},{"name":"b","ip-addr":"198.18.1.2"}]}));
        }
        let before = state(v.clone());
        v["farms"][7]["backends"][1]["state"] = json!("down");
        let after = state(v);
        let mut sl = slots(&before);
        let old = render(&before, &sl, &CFG).0;
        sl.sync(&after).unwrap();
        let tx = plan(&old, &render(&after, &sl, &CFG).0);
        let f7 = sl.get("f7").unwrap().offset;
        // Only farm f7's chain is rewritten (W 2 -> 1) and its buckets change.
        assert_eq!(
            tx.commands,
            vec![
                "flush chain ip nftlb farm-f7".to_string(),
                format!("add rule ip nftlb farm-f7 meta l4proto tcp ct mark set ct mark or 0x80000000 dnat ip to numgen inc mod 1 offset {f7} map @bki"),
                "add rule ip nftlb farm-f7 drop".to_string(),
                format!("delete element ip nftlb bki {{ {} }}", f7 + 1),
            ]
        );
    }
}
