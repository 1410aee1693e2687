//! The filter stage: security policies (black/whitelists), limits, `tcp-strict`,
//! helpers and input logging, in a `filter` chain at prerouting (priority mangle, after
//! conntrack and before NAT).
//!
//! The chain looks the packet up in four verdict maps shaped like the NAT stage's
//! (`fsvcx`, `fsvc`, `fsvcpx`, `fsvcp`), holding only the services of farms and
//! addresses that have such features; the target chain (`ffarm-NAME`, `faddr-NAME`) runs
//! them in the original's order. Per-farm dynamic sets (rate limits, connection limits)
//! and counters exist only for the farms that use them.

use std::collections::BTreeMap;

use crate::model::*;
use crate::ruleset::{Chain, MapDef, Table, TableFamily};

use super::{addr_type, fam_matches, insert, ip_kw, kname, tag, RenderConfig};

/// Longest log prefix nft accepts.
const LOG_PREFIX_MAX: usize = 127;

/// Values for the tokens of a log-prefix template.
#[derive(Default)]
pub struct Tokens<'a> {
    /// `KNAME`: the feature.
    pub kname: &'a str,
    /// `TYPE`: IN/FWD/OUT or BL/WL.
    pub ty: &'a str,
    /// `FNAME`: farm.
    pub fname: &'a str,
    /// `ANAME`: address.
    pub aname: &'a str,
    /// `BNAME`: backend.
    pub bname: &'a str,
    /// `PNAME`: policy.
    pub pname: &'a str,
}

/// Expands a validated template, truncated to what nft accepts.
pub fn expand(template: &str, t: &Tokens) -> String {
    let mut s = template
        .replace("KNAME", t.kname)
        .replace("TYPE", t.ty)
        .replace("FNAME", t.fname)
        .replace("ANAME", t.aname)
        .replace("BNAME", t.bname)
        .replace("PNAME", t.pname);
    // Templates and names are ASCII (validated), so byte truncation is safe.
    s.truncate(LOG_PREFIX_MAX);
    s
}

/// The name of a policy's set for prefix length `len`.
pub fn policy_set(name: &str, len: u8) -> String {
    format!("pol-{name}-{len}")
}

/// The prefix length and network address of a canonical element (`addr[/len]`).
pub fn element_prefix(data: &str) -> (u8, String) {
    match data.split_once('/') {
        Some((a, l)) => (l.parse().unwrap_or(0), a.to_string()),
        None => (if data.contains(':') { 128 } else { 32 }, data.to_string()),
    }
}

/// The prefix length of a canonical element (`addr[/len]`), without copying it.
pub fn prefix_len(data: &str) -> u8 {
    match data.split_once('/') {
        Some((_, l)) => l.parse().unwrap_or(0),
        None if data.contains(':') => 128,
        None => 32,
    }
}

/// The prefix lengths a policy's elements use, longest first, and the set of each.
pub fn policy_sets(p: &Policy) -> Vec<(u8, String)> {
    let mut lens: Vec<u8> = p.elements.keys().map(|d| element_prefix(d).0).collect();
    lens.sort_unstable_by(|a, b| b.cmp(a));
    lens.dedup();
    lens.into_iter()
        .map(|l| (l, policy_set(&p.name, l)))
        .collect()
}

/// The netmask of a prefix length, in nft syntax.
fn netmask(fam: TableFamily, len: u8) -> String {
    match fam {
        TableFamily::Ip6 => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            std::net::Ipv6Addr::from(m).to_string()
        }
        _ => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            std::net::Ipv4Addr::from(m).to_string()
        }
    }
}

/// The match of a source against one prefix-length set of a policy.
fn source_in(fam: TableFamily, len: u8, set: &str) -> String {
    let ip = ip_kw(fam);
    let full = if fam == TableFamily::Ip6 { 128 } else { 32 };
    if len == full {
        format!("{ip} saddr @{set}")
    } else {
        format!("{ip} saddr and {} @{set}", netmask(fam, len))
    }
}

/// The name of a farm's counter of a policy.
pub fn policy_counter(policy: &str, farm: &str) -> String {
    kname(format!("pc-{policy}/{farm}"))
}

/// The name of a standalone address's counter of a policy.
pub fn address_policy_counter(policy: &str, address: &str) -> String {
    kname(format!("pca-{policy}/{address}"))
}

/// Who policies are attached to: their chain and counters are named after it.
#[derive(Clone, Copy)]
enum Owner<'a> {
    Farm(&'a str),
    Address(&'a str),
}

impl Owner<'_> {
    fn chain(self) -> String {
        match self {
            Owner::Farm(f) => format!("fpol-{f}"),
            Owner::Address(a) => format!("apol-{a}"),
        }
    }
    fn counter(self, policy: &str) -> String {
        match self {
            Owner::Farm(f) => policy_counter(policy, f),
            Owner::Address(a) => address_policy_counter(policy, a),
        }
    }
}

fn set(spec: String) -> MapDef {
    MapDef {
        kind: "set",
        spec,
        elements: BTreeMap::new(),
        dynamic: false,
    }
}

fn dyn_set(spec: String) -> MapDef {
    MapDef {
        kind: "set",
        spec,
        elements: BTreeMap::new(),
        dynamic: true,
    }
}

fn object(kind: &'static str, spec: &str) -> MapDef {
    MapDef {
        kind,
        spec: spec.to_string(),
        elements: BTreeMap::new(),
        dynamic: true,
    }
}

/// Declares the filter stage's base objects.
pub fn base(t: &mut Table, fam: TableFamily) {
    let ip = ip_kw(fam);
    let at = addr_type(fam);
    for (name, spec) in [
        (
            "fsvcx",
            format!("type inet_proto . {at} . inet_service : verdict;"),
        ),
        (
            "fsvc",
            format!("type inet_proto . {at} . inet_service : verdict; flags interval;"),
        ),
        (
            "fsvcpx",
            "type inet_proto . inet_service : verdict;".to_string(),
        ),
        (
            "fsvcp",
            "type inet_proto . inet_service : verdict; flags interval;".to_string(),
        ),
    ] {
        t.maps.insert(name.into(), super::map(spec));
    }
    t.chains.insert(
        "filter".into(),
        Chain {
            base: Some("type filter hook prerouting priority mangle; policy accept;".into()),
            rules: vec![
                format!("meta l4proto . {ip} daddr . th dport vmap @fsvcx"),
                format!("meta l4proto . {ip} daddr . th dport vmap @fsvc"),
                "meta l4proto . th dport vmap @fsvcpx".into(),
                "meta l4proto . th dport vmap @fsvcp".into(),
            ],
        },
    );
}

/// Declares every policy of this family: one exact-match set per prefix length its
/// elements use, each element the masked network with its own counter. A source is
/// looked up once per prefix length (at most 33 for IPv4, 129 for IPv6), whatever the
/// number of elements; adding or removing an element is O(1) in the kernel. (Interval
/// sets were the first choice, but with 1,000,000 elements a single added element took
/// minutes: nft lists the whole set to merge intervals.)
pub fn policies(state: &State, fam: TableFamily, t: &mut Table) {
    for p in state.policies.values() {
        let matches = match p.family {
            Family::Ipv6 => fam == TableFamily::Ip6,
            _ => fam == TableFamily::Ip,
        };
        if matches {
            declare_policy(p, t);
        }
    }
}

/// Declares one policy's prefix-length sets in `t` (of the policy's family).
fn declare_policy(p: &Policy, t: &mut Table) {
    for d in p.elements.keys() {
        let (len, net) = element_prefix(d);
        t.maps
            .entry(policy_set(&p.name, len))
            .or_insert_with(|| policy_set_def(p))
            .elements
            .insert(net, String::new());
    }
}

/// A prefix-length set of a policy, empty.
pub fn policy_set_def(p: &Policy) -> MapDef {
    let at = match p.family {
        Family::Ipv6 => "ipv6_addr",
        _ => "ipv4_addr",
    };
    set(format!("type {at}; counter;"))
}

/// The table family of a policy's sets.
pub fn policy_family(p: &Policy) -> TableFamily {
    match p.family {
        Family::Ipv6 => TableFamily::Ip6,
        _ => TableFamily::Ip,
    }
}

/// The policies of an ingress (`dsr`, `stlsdnat`) farm, for its netdev chain: declares
/// the attached policies' sets, the farm's counters and the `fpol-FARM` chain in `t`, and
/// returns the rule that runs it (nothing if no policy is attached).
pub fn ingress_policies(state: &State, f: &Farm, t: &mut Table) -> Option<String> {
    for name in &f.policies {
        if let Some(p) = state.policies.get(name) {
            declare_policy(p, t);
        }
    }
    policy_rules(
        state,
        &[TableFamily::Ip, TableFamily::Ip6],
        t,
        "",
        Owner::Farm(&f.name),
        &f.policies,
        f.verdict,
        f.log_rtlimit,
        &f.name,
        "",
    )
    .pop()
}

/// What a rule does once its match fired, per the owner's `verdict` flags: log (rate
/// limited by `log-rtlimit` through a small sub-chain `CHAIN/SUB_NAME`, so the match is
/// evaluated once), then drop. Returns the statement text (possibly empty) and adds any sub-chain.
fn action(
    t: &mut Table,
    chain: &str,
    sub_name: &str,
    verdict: VerdictFlags,
    drop: bool,
    prefix: &str,
    log_rate: Rate,
) -> String {
    let log = verdict.has("log");
    let drop = drop && verdict.has("drop");
    match (log, log_rate.count > 0) {
        (true, true) => {
            let sub = kname(format!("{chain}/{sub_name}"));
            let mut rules = vec![format!("limit rate {} log prefix \"{prefix}\"", log_rate)];
            if drop {
                rules.push("drop".into());
            }
            t.chains.insert(sub.clone(), Chain { base: None, rules });
            format!("counter jump {sub}")
        }
        (true, false) => {
            let d = if drop { " drop" } else { "" };
            format!("counter log prefix \"{prefix}\"{d}")
        }
        (false, _) => {
            if drop {
                "counter drop".into()
            } else {
                "counter".into()
            }
        }
    }
}

/// The policies of an owner (farm or address), in attachment order, as a chain
/// `fpol-FARM` or `apol-ADDRESS`: the first match decides. A blacklist match drops (per `verdict`), a
/// whitelist match returns (accepts; later policies are not consulted), and when
/// whitelists are attached a source that matched none of them is dropped. Returns the
/// rule that runs the chain, or nothing when no policy applies in this family.
#[allow(clippy::too_many_arguments)]
fn policy_rules(
    state: &State,
    families: &[TableFamily],
    t: &mut Table,
    chain: &str,
    owner: Owner,
    names: &[String],
    verdict: VerdictFlags,
    log_rate: Rate,
    fname: &str,
    aname: &str,
) -> Vec<String> {
    let pol_chain = owner.chain();
    let mut rules = Vec::new();
    // The netdev table sees both families: its rules name the one they are for.
    let mixed = families.len() > 1;
    let mut first_whitelist: BTreeMap<TableFamily, String> = BTreeMap::new();
    for pname in names {
        let Some(p) = state.policies.get(pname) else {
            continue;
        };
        let fam = match p.family {
            Family::Ipv6 => TableFamily::Ip6,
            _ => TableFamily::Ip,
        };
        if !families.contains(&fam) {
            continue;
        }
        let ty = match p.ptype {
            PolicyType::Blacklist => "BL",
            PolicyType::Whitelist => "WL",
        };
        let template = p
            .log_prefix
            .clone()
            .unwrap_or_else(|| "KNAME-TYPE-PNAME-FNAME ".into());
        let prefix = expand(
            &template,
            &Tokens {
                kname: "policy",
                ty,
                fname: if fname.is_empty() { aname } else { fname },
                aname,
                pname,
                ..Default::default()
            },
        );
        // Counts this owner's matches; the set itself counts per element.
        let counter = owner.counter(pname);
        t.maps.insert(counter.clone(), object("counter", ""));
        let sets = policy_sets(p);
        match p.ptype {
            PolicyType::Blacklist => {
                let act = action(
                    t,
                    &pol_chain,
                    &format!("BL-{pname}"),
                    verdict,
                    true,
                    &prefix,
                    log_rate,
                );
                let act = act.replacen("counter", &format!("counter name \"{counter}\""), 1);
                for (len, set) in &sets {
                    rules.push(format!("{} {act}", source_in(fam, *len, set)));
                }
            }
            PolicyType::Whitelist => {
                // A member is admitted: the policies end here for it.
                for (len, set) in &sets {
                    rules.push(format!(
                        "{} counter name \"{counter}\" return",
                        source_in(fam, *len, set)
                    ));
                }
                first_whitelist.entry(fam).or_insert(prefix);
            }
        }
    }
    for (fam, prefix) in first_whitelist {
        // Whitelists of this family are attached and none matched.
        let act = action(t, &pol_chain, "WL", verdict, true, &prefix, log_rate);
        if mixed {
            rules.push(format!("meta protocol {} {act}", ip_kw(fam)));
        } else {
            rules.push(act);
        }
    }
    let _ = chain;
    if rules.is_empty() {
        return Vec::new();
    }
    t.chains
        .insert(pol_chain.clone(), Chain { base: None, rules });
    vec![format!("jump {pol_chain}")]
}

fn limit_prefix(custom: &Option<String>, kname: &str, fname: &str) -> String {
    expand(
        custom.as_deref().unwrap_or("KNAME-FNAME "),
        &Tokens {
            kname,
            fname,
            ..Default::default()
        },
    )
}

/// Whether a farm needs the filter stage.
pub fn farm_needs_filter(f: &Farm) -> bool {
    !f.policies.is_empty()
        || f.tcp_strict
        || f.new_rtlimit.count > 0
        || f.rst_rtlimit.count > 0
        || f.est_connlimit > 0
        || f.helper != Helper::None
        || f.queue >= 0
        || f.log.has("input")
}

/// The name of a farm's ct helper object.
pub fn helper_object(farm: &str, helper: Helper, proto: &str) -> String {
    format!("cth-{farm}/{}-{proto}", helper.as_str())
}

/// Adds a farm's filter chain and returns its name (or `None` when it needs none).
pub fn farm(state: &State, f: &Farm, fam: TableFamily, t: &mut Table) -> Option<String> {
    if !farm_needs_filter(f) {
        return None;
    }
    let ip = ip_kw(fam);
    let at = addr_type(fam);
    let chain = format!("ffarm-{}", f.name);
    let mut rules = policy_rules(
        state,
        &[fam],
        t,
        &chain,
        Owner::Farm(&f.name),
        &f.policies,
        f.verdict,
        f.log_rtlimit,
        &f.name,
        "",
    );
    if f.tcp_strict {
        let p = limit_prefix(&f.tcp_strict_log_prefix, "tcp-strict", &f.name);
        let act = action(t, &chain, "tcp-strict", f.verdict, true, &p, f.log_rtlimit);
        rules.push(format!("ct state invalid {act}"));
    }
    let ttl = f.limits_ttl.max(1);
    // Per-source packet rate limits: (key name, set prefix, packets it counts, rate, burst, log prefix).
    let rate_limits = [
        (
            "new-rtlimit",
            "nrl",
            "ct state new",
            f.new_rtlimit,
            f.new_rtlimit_burst,
            &f.new_rtlimit_log_prefix,
        ),
        (
            "rst-rtlimit",
            "rrl",
            "tcp flags rst",
            f.rst_rtlimit,
            f.rst_rtlimit_burst,
            &f.rst_rtlimit_log_prefix,
        ),
    ];
    for (kname, set_prefix, matched, rate, burst, log_prefix) in rate_limits {
        if rate.count == 0 {
            continue;
        }
        let spec = format!("type {at}; flags dynamic,timeout; timeout {ttl}s; size 1048576;");
        // The tag makes a new set when the declaration changes (nft cannot alter one).
        let set = format!("{set_prefix}-{}-{}", f.name, tag(&spec));
        t.maps.insert(set.clone(), dyn_set(spec));
        let burst = if burst > 0 {
            format!(" burst {burst} packets")
        } else {
            String::new()
        };
        let p = limit_prefix(log_prefix, kname, &f.name);
        let act = action(t, &chain, kname, f.verdict, true, &p, f.log_rtlimit);
        rules.push(format!(
            "{matched} add @{set} {{ {ip} saddr limit rate over {rate}{burst} }} {act}"
        ));
    }
    if f.est_connlimit > 0 {
        let spec = format!("type {at}; flags dynamic; size 1048576;");
        let set = format!("ecl-{}-{}", f.name, tag(&spec));
        t.maps.insert(set.clone(), dyn_set(spec));
        let p = limit_prefix(&f.est_connlimit_log_prefix, "est-connlimit", &f.name);
        let act = action(
            t,
            &chain,
            "est-connlimit",
            f.verdict,
            true,
            &p,
            f.log_rtlimit,
        );
        rules.push(format!(
            "ct state new add @{set} {{ {ip} saddr ct count over {} }} {act}",
            f.est_connlimit
        ));
    }
    if f.queue >= 0 {
        rules.push(format!("tcp flags syn queue num {} bypass", f.queue));
    }
    if f.helper != Helper::None {
        for p in state.farm_protocol(f).l4() {
            let fits = match f.helper {
                Helper::Ftp => *p == "tcp",
                // The kernel's PPTP helper is IPv4 only.
                Helper::Pptp => *p == "tcp" && fam != TableFamily::Ip6,
                Helper::Snmp | Helper::Tftp => *p == "udp",
                Helper::Sip => *p != "sctp",
                Helper::None => false,
            };
            if !fits {
                continue;
            }
            let obj = helper_object(&f.name, f.helper, p);
            // The kernel's helper names are nftlb's ("snmp" handles port 161 requests and
            // calls the SNMP NAT module for payload rewriting).
            let kernel_name = f.helper.as_str();
            t.maps.insert(
                obj.clone(),
                object(
                    "ct helper",
                    &format!("type \"{kernel_name}\" protocol {p};"),
                ),
            );
            rules.push(format!(
                "meta l4proto {p} ct state new ct helper set \"{obj}\""
            ));
        }
    }
    if f.log.has("input") {
        let template = f.log_prefix.clone().unwrap_or_else(|| "TYPE-FNAME ".into());
        let p = expand(
            &template,
            &Tokens {
                kname: "log",
                ty: "IN",
                fname: &f.name,
                ..Default::default()
            },
        );
        if f.log_rtlimit.count > 0 {
            rules.push(format!(
                "ct state new limit rate {} log prefix \"{p}\"",
                f.log_rtlimit
            ));
        } else {
            rules.push(format!("ct state new log prefix \"{p}\""));
        }
    }
    t.chains.insert(chain.clone(), Chain { base: None, rules });
    Some(chain)
}

/// Adds the filter-stage service elements of an address: to the address's own chain if
/// it has policies (which then goes on to `next`), else straight to `next`.
pub fn address_entries(
    state: &State,
    a: &Address,
    fam: TableFamily,
    next: Option<&str>,
    t: &mut Table,
    _cfg: &RenderConfig,
) {
    let served = match a.ip_addr {
        Some(ip) => fam_matches(fam, &ip),
        None => match a.family {
            Family::Inet => true,
            Family::Ipv4 => fam == TableFamily::Ip,
            Family::Ipv6 => fam == TableFamily::Ip6,
        },
    };
    if !served {
        return;
    }
    let target = if a.policies.is_empty() {
        match next {
            Some(n) => n.to_string(),
            None => return,
        }
    } else {
        let chain = format!("faddr-{}", a.name);
        let mut rules = policy_rules(
            state,
            &[fam],
            t,
            &chain,
            Owner::Address(&a.name),
            &a.policies,
            a.verdict(),
            a.log_rtlimit,
            "",
            &a.name,
        );
        if let Some(n) = next {
            rules.push(format!("goto {n}"));
        }
        t.chains.insert(chain.clone(), Chain { base: None, rules });
        chain
    };
    let goto = format!("goto {target}");
    for p in a.protocol.l4() {
        for r in a.ports.ranges() {
            let single = r.lo == r.hi;
            let (map, key) = match (a.ip_addr, single) {
                (Some(vip), true) => ("fsvcx", format!("{p} . {vip} . {r}")),
                (Some(vip), false) => ("fsvc", format!("{p} . {vip} . {r}")),
                (None, true) => ("fsvcpx", format!("{p} . {r}")),
                (None, false) => ("fsvcp", format!("{p} . {r}")),
            };
            insert(t, map, key, goto.clone());
        }
    }
}
