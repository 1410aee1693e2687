//! Rendering: a pure function from the desired [`State`] to the [`Ruleset`] that
//! implements it.
//!
//! Layout, per family (`table ip nftlb`, `table ip6 nftlb`):
//! - `prerouting` (nat, dstnat) looks the new flow up in two interval verdict maps:
//!   `svc` (`l4proto . vip . port-range`) and `svcp` for port-only services
//!   (`l4proto . port-range`). Port ranges are single interval elements, never expanded,
//!   and the lookup cost does not depend on the number of farms.
//! - Each served farm has a small chain (`farm-NAME`, `farmp-NAME` for its port-only
//!   addresses) holding its scheduler: `dnat to l4proto . vip . port . <sched> mod W map @bk…`.
//!   The backend choice lives in shared maps (`bk_tcp`, `bkp_udp`, ...: per protocol,
//!   VIP or port-only, with or without backend port) whose elements are
//!   `vip . port-range . bucket-range : backend`, so a backend change touches
//!   only that farm's elements and its one-line chain.
//! - `postrouting` (nat, srcnat) applies per-backend or per-farm source addresses from the
//!   `srcaddr`/`srcaddrp` maps (keyed on the original destination and the chosen backend), then
//!   masquerades flows whose conntrack mark carries the masquerade bit (`-m`).
//! - There are no per-farm sets or anonymous maps (both make kernel loading quadratic).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::*;
use crate::ruleset::{Chain, MapDef, Ruleset, Table, TableFamily};

/// Settings that rendering depends on.
#[derive(Debug, Clone, Copy)]
pub struct RenderConfig {
    /// The conntrack mark bit that means "masquerade this flow".
    pub masquerade_mark: u32,
}

/// Something in the state that is accepted but not rendered, reported to the client.
pub type Note = String;

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

fn any_addr(fam: TableFamily) -> &'static str {
    match fam {
        TableFamily::Ip => "0.0.0.0/0",
        TableFamily::Ip6 => "::/0",
    }
}

/// Chain name of a farm's VIP services.
pub fn farm_chain(farm: &str) -> String {
    format!("farm-{farm}")
}

/// Chain name of a farm's port-only services.
pub fn farm_port_chain(farm: &str) -> String {
    format!("farmp-{farm}")
}

fn map(spec: String) -> MapDef {
    MapDef {
        kind: "map",
        spec,
        elements: BTreeMap::new(),
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
    // Backend maps, one set per transport protocol so that each is declared with that
    // protocol's port field (nft 1.0.6 refuses a port mapping whose map is declared with
    // `th dport` after a protocol match). The bucket is typed like numgen's result (a
    // 32-bit integer); the modulus in the declaration does not matter.
    for p in ["tcp", "udp", "sctp"] {
        for (name, key, data) in [
            (
                bk_map(false, true, p),
                format!("{ip} daddr . {p} dport"),
                format!("{ip} daddr . {p} dport"),
            ),
            (
                bk_map(false, false, p),
                format!("{ip} daddr . {p} dport"),
                format!("{ip} daddr"),
            ),
            (
                bk_map(true, true, p),
                format!("{p} dport"),
                format!("{ip} daddr . {p} dport"),
            ),
            (
                bk_map(true, false, p),
                format!("{p} dport"),
                format!("{ip} daddr"),
            ),
        ] {
            t.maps.insert(
                name,
                map(format!(
                    "typeof {key} . numgen inc mod 1 : {data}; flags interval;"
                )),
            );
        }
    }
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

/// Name of the backend map for port-only or VIP services, with or without backend
/// ports, for transport protocol `p`.
fn bk_map(port_only: bool, with_port: bool, p: &str) -> String {
    let base = match (port_only, with_port) {
        (false, true) => "bk",
        (false, false) => "bki",
        (true, true) => "bkp",
        (true, false) => "bkpi",
    };
    format!("{base}_{p}")
}

/// The scheduler expression for `modulus` buckets in a rule for transport protocol `p`.
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

/// A backend chosen for scheduling in one family, with its bucket range.
struct Slot<'a> {
    backend: &'a Backend,
    ip: IpAddr,
    lo: u32,
    hi: u32,
}

/// A bucket range, always written `lo-hi`: nft 1.0.6 encodes a single value of this
/// host-endian field differently when deleting than when adding, so `delete element` of
/// `… . 1` fails with ENOENT while `… . 1-1` round-trips.
fn bucket(lo: u32, hi: u32) -> String {
    format!("{lo}-{hi}")
}

/// Renders the whole state. Also returns notes about accepted but unrendered settings.
pub fn render(state: &State, cfg: &RenderConfig) -> (Ruleset, Vec<Note>) {
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
                notes.push(format!(
                    "Farm '{}': mode '{}' is stored but not served by this version",
                    farm.name,
                    other.as_str()
                ));
                continue;
            }
        }
        let statuses = state.backend_statuses(farm);
        for fam in TableFamily::ALL {
            let table = rs.tables.get_mut(&fam).expect("base tables exist");
            render_farm(state, farm, &statuses, fam, cfg, table);
        }
    }
    (rs, notes)
}

fn render_farm(
    state: &State,
    farm: &Farm,
    statuses: &[BackendStatus],
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
    // Usable backends of this family, each given a contiguous bucket range by weight.
    let mut slots: Vec<Slot> = Vec::new();
    let mut total = 0u32;
    for (b, st) in farm.backends.iter().zip(statuses) {
        let Some(bip) = b.ip_addr else { continue };
        if *st != BackendStatus::Up || !fam_matches(fam, &bip) {
            continue;
        }
        slots.push(Slot {
            backend: b,
            ip: bip,
            lo: total,
            hi: total + b.weight - 1,
        });
        total += b.weight;
    }
    let with_port = slots.iter().all(|s| s.backend.port.is_some());
    let src_farm = farm.source_addr.filter(|s| fam_matches(fam, s));
    let masquerade = farm.mode == Mode::Snat && src_farm.is_none();
    let mask = cfg.masquerade_mark;

    for port_only in [false, true] {
        let group: Vec<&Address> = addrs
            .iter()
            .copied()
            .filter(|a| a.ip_addr.is_none() == port_only)
            .collect();
        if group.is_empty() {
            continue;
        }
        let (chain_name, svc_map) = if port_only {
            (farm_port_chain(&farm.name), "svcp")
        } else {
            (farm_chain(&farm.name), "svc")
        };
        let mut protos: Vec<&'static str> = Vec::new();
        for a in &group {
            for p in a.protocol.l4() {
                if !protos.contains(p) {
                    protos.push(p);
                }
                for r in a.ports.ranges() {
                    let svc_key = match a.ip_addr {
                        Some(vip) => format!("{p} . {vip} . {r}"),
                        None => format!("{p} . {r}"),
                    };
                    let bk_key = match a.ip_addr {
                        Some(vip) => format!("{vip} . {r}"),
                        None => r.to_string(),
                    };
                    t.maps
                        .get_mut(svc_map)
                        .expect("base map")
                        .elements
                        .insert(svc_key.clone(), format!("goto {chain_name}"));
                    for s in &slots {
                        let data = match (with_port, s.backend.port) {
                            (true, Some(bp)) => format!("{} . {bp}", s.ip),
                            _ => s.ip.to_string(),
                        };
                        t.maps
                            .get_mut(&bk_map(port_only, with_port, p))
                            .expect("base map")
                            .elements
                            .insert(format!("{bk_key} . {}", bucket(s.lo, s.hi)), data);
                        // Source address for this farm and backend (snat mode only).
                        let src = s
                            .backend
                            .source_addr
                            .filter(|x| fam_matches(fam, x))
                            .or(src_farm);
                        if let (Mode::Snat, Some(src)) = (farm.mode, src) {
                            let bport = match s.backend.port {
                                Some(bp) if with_port => bp.to_string(),
                                _ => r.to_string(),
                            };
                            let (snat_map, key) = match a.ip_addr {
                                Some(vip) => {
                                    ("srcaddr", format!("{p} . {vip} . {r} . {} . {bport}", s.ip))
                                }
                                None => ("srcaddrp", format!("{p} . {r} . {} . {bport}", s.ip)),
                            };
                            t.maps
                                .get_mut(snat_map)
                                .expect("base map")
                                .elements
                                .insert(key, src.to_string());
                        }
                    }
                }
            }
        }
        let mut rules = Vec::new();
        if total > 0 {
            let masq = if masquerade {
                format!("ct mark set ct mark or 0x{mask:x} ")
            } else {
                String::new()
            };
            // The key names the protocol's own port field (`tcp dport`): with `th dport`
            // nft 1.0.6 refuses the port mapping after a protocol match.
            for p in &protos {
                let key = if port_only {
                    format!("{p} dport")
                } else {
                    format!("{ip} daddr . {p} dport")
                };
                let sched = sched_expr(farm, fam, p, total);
                rules.push(format!(
                    "meta l4proto {p} {masq}dnat {ip} to {key} . {sched} map @{}",
                    bk_map(port_only, with_port, p)
                ));
            }
        }
        // No usable backend (or a lookup miss): refuse the new flow rather than let it
        // reach a local socket on the virtual address.
        rules.push("drop".into());
        t.chains.insert(chain_name, Chain { base: None, rules });
    }
    let _ = any_addr;
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

    fn text(st: &State) -> String {
        plan(&Ruleset::default(), &render(st, &CFG).0).to_text()
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
        let (rs, notes) = render(&st, &CFG);
        assert_eq!(rs, render(&State::default(), &CFG).0);
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
        let tx = plan(&render(&before, &CFG).0, &render(&after, &CFG).0);
        assert!(
            tx.commands
                .iter()
                .all(|c| c.contains("f7") || c.contains("198.18.0.7 ")),
            "{tx:?}"
        );
        assert!(tx.commands.len() <= 6, "{}", tx.to_text());
    }
}
