//! The desired state: farms, backends, addresses, policies and static sessions.
//! Pure data and validation, no I/O.

pub mod table;
pub mod types;

use std::collections::HashMap;
use std::net::IpAddr;

use indexmap::IndexMap;
pub use table::Table;

pub use types::*;

/// A virtual IP with ports and a protocol, used by farms or standalone with policies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Address {
    /// Identity.
    pub name: String,
    /// Address family.
    pub family: Family,
    /// The virtual IP; `None` is a port-only service (any destination).
    pub ip_addr: Option<IpAddr>,
    /// Ports; empty means every port.
    pub ports: Ports,
    /// Protocol.
    pub protocol: Protocol,
    /// Input interface (auto-discovered when unset).
    pub iface: Option<String>,
    /// Input interface MAC.
    pub iether_addr: Option<Mac>,
    /// What policies attached to a standalone address do.
    pub verdict: Option<VerdictFlags>,
    /// Log prefix template.
    pub log_prefix: Option<String>,
    /// Rate limit of policy log rules.
    pub log_rtlimit: Rate,
    /// Attached policies (top-level addresses only), in attachment order.
    pub policies: Vec<String>,
    /// Stored only.
    pub fqdn: String,
}

impl Address {
    /// The effective verdict flags.
    pub fn verdict(&self) -> VerdictFlags {
        self.verdict.unwrap_or_else(VerdictFlags::all)
    }
}

/// A real server of a farm.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Backend {
    /// Identity inside the farm.
    pub name: String,
    /// Address; required for the backend to be usable.
    pub ip_addr: Option<IpAddr>,
    /// Next-hop MAC (DSR / stateless DNAT).
    pub ether_addr: Option<Mac>,
    /// Destination port; `None` keeps the virtual port.
    pub port: Option<u16>,
    /// Source address for flows to this backend (overrides the farm's).
    pub source_addr: Option<IpAddr>,
    /// Share of new flows relative to the other backends.
    pub weight: u32,
    /// Failover group: used while its priority is at most the farm's priority.
    pub priority: u32,
    /// Mark for policy routing (0 = none).
    pub mark: Mark,
    /// Maximum concurrent connections to this backend (0 = none).
    pub est_connlimit: u32,
    /// Log prefix of the connection-limit rule.
    pub est_connlimit_log_prefix: Option<String>,
    /// Requested state.
    pub state: BackendState,
    /// Stored only.
    pub fqdn: String,
}

impl Backend {
    /// A backend with the original's defaults.
    pub fn new(name: String) -> Self {
        Backend {
            name,
            weight: 1,
            priority: 1,
            ..Default::default()
        }
    }
}

/// A static session: a persistence key pinned to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The persistence key in nft syntax, e.g. `198.18.0.2 . 80`.
    pub client: String,
    /// Backend name.
    pub backend: String,
}

/// A virtual service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Farm {
    /// Identity.
    pub name: String,
    /// Names of the addresses it serves, in attachment order.
    pub addresses: Vec<String>,
    /// Output interface.
    pub oface: Option<String>,
    /// Output interface MAC.
    pub oether_addr: Option<Mac>,
    /// SNAT source instead of masquerade.
    pub source_addr: Option<IpAddr>,
    /// Topology.
    pub mode: Mode,
    /// Stored only (stateless DNAT).
    pub responsettl: u32,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// Hash fields of the `hash` scheduler.
    pub sched_param: HashFields,
    /// Persistence key fields.
    pub persistence: HashFields,
    /// Persistence timeout in seconds.
    pub persist_ttl: u32,
    /// Conntrack helper.
    pub helper: Helper,
    /// Where to log.
    pub log: LogFlags,
    /// Log prefix template.
    pub log_prefix: Option<String>,
    /// Rate limit of security log rules.
    pub log_rtlimit: Rate,
    /// Farm mark.
    pub mark: Mark,
    /// Requested state.
    pub state: FarmState,
    /// Timeout of dynamic limit sets, seconds.
    pub limits_ttl: u32,
    /// New connections per source per unit.
    pub new_rtlimit: Rate,
    /// Burst of `new-rtlimit`.
    pub new_rtlimit_burst: u32,
    /// Log prefix of `new-rtlimit`.
    pub new_rtlimit_log_prefix: Option<String>,
    /// TCP RST packets per source per unit.
    pub rst_rtlimit: Rate,
    /// Burst of `rst-rtlimit`.
    pub rst_rtlimit_burst: u32,
    /// Log prefix of `rst-rtlimit`.
    pub rst_rtlimit_log_prefix: Option<String>,
    /// Concurrent connections per source.
    pub est_connlimit: u32,
    /// Log prefix of `est-connlimit`.
    pub est_connlimit_log_prefix: Option<String>,
    /// Drop invalid TCP.
    pub tcp_strict: bool,
    /// Log prefix of `tcp-strict`.
    pub tcp_strict_log_prefix: Option<String>,
    /// NFQUEUE number, -1 = off.
    pub queue: i32,
    /// What limits and policies do.
    pub verdict: VerdictFlags,
    /// Flowtable offload.
    pub flow_offload: bool,
    /// Also match locally generated traffic.
    pub intra_connect: bool,
    /// Backends, in creation order.
    pub backends: Vec<Backend>,
    /// Static sessions.
    pub sessions: Vec<Session>,
    /// Attached policies, in attachment order.
    pub policies: Vec<String>,
    /// Stored only.
    pub fqdn: String,
}

impl Farm {
    /// A farm with the original's defaults.
    pub fn new(name: String) -> Self {
        Farm {
            name,
            addresses: Vec::new(),
            oface: None,
            oether_addr: None,
            source_addr: None,
            mode: Mode::Snat,
            responsettl: 60,
            scheduler: Scheduler::Rr,
            sched_param: HashFields::default(),
            persistence: HashFields::default(),
            persist_ttl: 60,
            helper: Helper::None,
            log: LogFlags::default(),
            log_prefix: None,
            log_rtlimit: Rate::default(),
            mark: Mark(0),
            state: FarmState::Up,
            limits_ttl: 120,
            new_rtlimit: Rate::default(),
            new_rtlimit_burst: 0,
            new_rtlimit_log_prefix: None,
            rst_rtlimit: Rate::default(),
            rst_rtlimit_burst: 0,
            rst_rtlimit_log_prefix: None,
            est_connlimit: 0,
            est_connlimit_log_prefix: None,
            tcp_strict: false,
            tcp_strict_log_prefix: None,
            queue: -1,
            verdict: VerdictFlags::all(),
            flow_offload: false,
            intra_connect: false,
            backends: Vec::new(),
            sessions: Vec::new(),
            policies: Vec::new(),
            fqdn: String::new(),
        }
    }

    /// An error naming the key if an `rr` farm needs more than [`MAX_RR_BUCKETS`]
    /// buckets: one (a map element) per unit of weight, after dividing the weights by
    /// their greatest common divisor (co-prime weights of 10,000 made a million elements
    /// of 100 backends, 45 s to apply).
    pub fn check_rr_buckets(&self) -> Result<(), String> {
        if self.scheduler != Scheduler::Rr {
            return Ok(());
        }
        let g = self.backends.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight / g)).sum();
        match self.backends.iter().max_by_key(|b| b.weight) {
            Some(b) if total > MAX_RR_BUCKETS => Err(format!(
                "Invalid value '{}' of key 'weight' in backend '{}' of farm '{}': the rr scheduler needs one bucket per unit of weight (weights divided by their greatest common divisor): {total} buckets, at most {MAX_RR_BUCKETS}; use smaller weights or the weight scheduler",
                b.weight, b.name, self.name
            )),
            _ => Ok(()),
        }
    }

    /// Index of the backend called `name`.
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name == name)
    }
}

/// Blacklist or whitelist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyType {
    /// Drop matching sources.
    #[default]
    Blacklist,
    /// Accept only matching sources.
    Whitelist,
}

impl PolicyType {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blacklist => "blacklist",
            Self::Whitelist => "whitelist",
        }
    }
}

/// One element of a policy: an address or a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Canonical `addr` or `addr/prefix`.
    pub data: String,
    /// Stored only.
    pub time: String,
}

/// A set of source addresses with a type.
#[derive(Debug, Clone, Eq, Default)]
pub struct Policy {
    /// Identity (also the nft set name).
    pub name: String,
    /// Blacklist or whitelist.
    pub ptype: PolicyType,
    /// IPv4 or IPv6 (inet is refused).
    pub family: Family,
    /// Stored only.
    pub timeout: u32,
    /// `in` or `out`; parsed and returned, ignored like the original.
    pub route: String,
    /// Log prefix template.
    pub log_prefix: Option<String>,
    /// Elements keyed by canonical data, in insertion order.
    pub elements: IndexMap<String, Element>,
}

/// Equal with the elements in the same order (compared in order: no hashing of a million
/// keys to tell that two versions of a policy differ).
impl PartialEq for Policy {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name
            && self.ptype == o.ptype
            && self.family == o.family
            && self.timeout == o.timeout
            && self.route == o.route
            && self.log_prefix == o.log_prefix
            && self.elements.len() == o.elements.len()
            && self.elements.iter().eq(o.elements.iter())
    }
}

impl Policy {
    /// A policy with the original's defaults.
    pub fn new(name: String) -> Self {
        Policy {
            name,
            route: "in".into(),
            ..Default::default()
        }
    }
}

/// Parses a policy element: an IP address or a network `addr/prefix` of the family.
pub fn parse_element(s: &str, family: Family) -> ValueResult<String> {
    let (addr, prefix) = match s.trim().split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s.trim(), None),
    };
    let ip = parse_ip(addr)?;
    if !family.admits(&ip) || family == Family::Inet {
        return Err(format!("is not an address of family {}", family.as_str()));
    }
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix {
        None => Ok(ip.to_string()),
        Some(p) => {
            let n: u8 = p
                .parse()
                .map_err(|_| format!("prefix '{}' is not a number", clip(p)))?;
            if n > max {
                return Err(format!("prefix /{n} is longer than {max}"));
            }
            // Canonicalise to the network address so that nft accepts it.
            let net = match ip {
                IpAddr::V4(v4) => {
                    let m = if n == 0 { 0 } else { u32::MAX << (32 - n) };
                    IpAddr::from((u32::from(v4) & m).to_be_bytes())
                }
                IpAddr::V6(v6) => {
                    let m = if n == 0 { 0 } else { u128::MAX << (128 - n) };
                    IpAddr::from((u128::from(v6) & m).to_be_bytes())
                }
            };
            if n == max {
                Ok(net.to_string())
            } else {
                Ok(format!("{net}/{n}"))
            }
        }
    }
}

/// The whole desired state. Maps keep creation order, which is the order of GET output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// Farms by name.
    pub farms: Table<Farm>,
    /// Policies by name.
    pub policies: Table<Policy>,
    /// Addresses by name.
    pub addresses: Table<Address>,
}

/// The effective state of a backend as GET shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendStatus {
    /// Scheduled.
    Up,
    /// Up but outside the active priority group.
    Available,
    /// Health failure.
    Down,
    /// Draining.
    Off,
    /// Invalid.
    ConfigError,
}

impl BackendStatus {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Available => "available",
            Self::Down => "down",
            Self::Off => "off",
            Self::ConfigError => "config_error",
        }
    }
}

impl State {
    /// The addresses of a farm, in order.
    pub fn farm_addresses<'a>(&'a self, farm: &'a Farm) -> impl Iterator<Item = &'a Address> {
        farm.addresses
            .iter()
            .filter_map(|n| self.addresses.get(n).map(|a| &**a))
    }

    /// The family a farm serves: the union of its addresses' families.
    pub fn farm_family(&self, farm: &Farm) -> Family {
        let mut v4 = false;
        let mut v6 = false;
        for a in self.farm_addresses(farm) {
            match a.family {
                Family::Ipv4 => v4 = true,
                Family::Ipv6 => v6 = true,
                Family::Inet => {
                    v4 = true;
                    v6 = true
                }
            }
        }
        match (v4, v6) {
            (true, true) => Family::Inet,
            (false, true) => Family::Ipv6,
            _ => Family::Ipv4,
        }
    }

    /// Whether a backend can be used at all (it has an address of a family the farm serves).
    pub fn backend_valid(&self, farm: &Farm, b: &Backend) -> bool {
        match b.ip_addr {
            Some(ip) => self.farm_family(farm).admits(&ip),
            None => false,
        }
    }

    /// The farm priority derived from backend states (reference §4.4): start at 1 and
    /// raise it by the number of unusable backends at or below the current level until
    /// it no longer changes.
    pub fn farm_priority(&self, farm: &Farm) -> u32 {
        let mut prio = 1u32;
        // Monotonic and bounded by 1 + the number of backends.
        for _ in 0..=farm.backends.len() {
            let failed = farm
                .backends
                .iter()
                .filter(|b| b.priority <= prio)
                .filter(|b| b.state != BackendState::Up || !self.backend_valid(farm, b))
                .count() as u32;
            let next = 1 + failed;
            if next == prio {
                break;
            }
            prio = next;
        }
        prio
    }

    /// The effective status of each backend of a farm, in order.
    pub fn backend_statuses(&self, farm: &Farm) -> Vec<BackendStatus> {
        let prio = self.farm_priority(farm);
        farm.backends
            .iter()
            .map(|b| {
                if !self.backend_valid(farm, b) {
                    BackendStatus::ConfigError
                } else {
                    match b.state {
                        BackendState::Up if b.priority <= prio => BackendStatus::Up,
                        BackendState::Up => BackendStatus::Available,
                        BackendState::Down => BackendStatus::Down,
                        BackendState::Off => BackendStatus::Off,
                        BackendState::ConfigError => BackendStatus::ConfigError,
                    }
                }
            })
            .collect()
    }

    /// How many farms use an address.
    pub fn address_used(&self, name: &str) -> usize {
        self.farms
            .values()
            .filter(|f| f.addresses.iter().any(|a| a == name))
            .count()
    }

    /// How many farms and addresses use a policy.
    pub fn policy_used(&self, name: &str) -> usize {
        self.farms
            .values()
            .filter(|f| f.policies.iter().any(|p| p == name))
            .count()
            + self
                .addresses
                .values()
                .filter(|a| a.policies.iter().any(|p| p == name))
                .count()
    }

    /// The services a farm claims: (protocol, virtual address, port range, address name).
    pub fn farm_services<'a>(
        &'a self,
        farm: &'a Farm,
    ) -> impl Iterator<Item = (ServiceKey, PortRange, &'a str)> + 'a {
        self.farm_addresses(farm).flat_map(|a| {
            a.protocol.l4().iter().flat_map(move |&proto| {
                a.ports
                    .ranges()
                    .into_iter()
                    .map(move |r| ((proto, a.ip_addr), r, a.name.as_str()))
            })
        })
    }

    /// Cross-object checks that parsing one object cannot do, over the whole state.
    /// Returns the first problem.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = ServiceIndex::default();
        for farm in self.farms.values() {
            for (key, r, addr) in self.farm_services(farm) {
                seen.check(key, r, &farm.name, addr, |_| true)?;
                seen.add(key, r, &farm.name, addr);
            }
            self.validate_farm(farm)?;
        }
        for a in self.addresses.values() {
            Self::validate_address(a)?;
        }
        Ok(())
    }

    /// The checks of one farm that do not involve other farms.
    pub fn validate_farm(&self, farm: &Farm) -> Result<(), String> {
        if !farm.helper.fits(self.farm_protocol(farm)) {
            return Err(format!(
                "farm '{}' doesn't validate helper protocol: helper '{}' does not work with protocol '{}'",
                farm.name,
                farm.helper.as_str(),
                self.farm_protocol(farm).as_str()
            ));
        }
        if let Some(src) = farm.source_addr {
            if !self.farm_family(farm).admits(&src) {
                return Err(format!(
                    "farm '{}': source-addr '{}' is not of the farm's family {}",
                    farm.name,
                    src,
                    self.farm_family(farm).as_str()
                ));
            }
        }
        if !farm.persistence.is_empty() {
            // nft 1.0.6 aborts (an assertion in netlink_linearize.c) on `update @map`
            // with a key over 16 bytes, so such keys are refused here.
            let v6 = matches!(self.farm_family(farm), Family::Ipv6 | Family::Inet);
            let size: usize = farm
                .persistence
                .set_names()
                .iter()
                .map(|f| match *f {
                    "srcip" | "dstip" if v6 => 16,
                    "srcip" | "dstip" | "srcport" | "dstport" => 4,
                    _ => 8,
                })
                .sum();
            if size > 16 {
                return Err(format!(
                    "Invalid value '{}' of key 'persistence' in farm '{}': this key is {size} bytes{}; nftables supports persistence keys of at most 16 bytes",
                    farm.persistence.to_spaced(),
                    farm.name,
                    if v6 { " with IPv6" } else { "" }
                ));
            }
        }
        for (key, rate, burst) in [
            ("new-rtlimit", farm.new_rtlimit, farm.new_rtlimit_burst),
            ("rst-rtlimit", farm.rst_rtlimit, farm.rst_rtlimit_burst),
        ] {
            if let Some(max) = rate.max_burst() {
                if u64::from(burst) > max {
                    return Err(format!(
                        "Invalid value '{burst}' of key '{key}-burst' in farm '{}': must be at most {max} with {key} {rate} (the kernel's token bucket would overflow)",
                        farm.name
                    ));
                }
            }
        }
        for s in &farm.sessions {
            if farm.backend_index(&s.backend).is_none() {
                return Err(format!(
                    "unknown backend '{}' in session '{}' of farm '{}'",
                    s.backend, s.client, farm.name
                ));
            }
        }
        Ok(())
    }

    /// The checks of one address on its own.
    pub fn validate_address(a: &Address) -> Result<(), String> {
        if let Some(ip) = a.ip_addr {
            if !a.family.admits(&ip) {
                return Err(format!(
                    "address '{}': ip-addr '{}' is not of family {}",
                    a.name,
                    ip,
                    a.family.as_str()
                ));
            }
        }
        Ok(())
    }

    /// The protocol of a farm's first address (what the legacy `protocol` key shows).
    pub fn farm_protocol(&self, farm: &Farm) -> Protocol {
        self.farm_addresses(farm)
            .next()
            .map(|a| a.protocol)
            .unwrap_or_default()
    }
}

/// Most buckets of an `rr` farm (the sum of its weights divided by their greatest
/// common divisor).
pub const MAX_RR_BUCKETS: u64 = 1 << 16;

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A service's protocol and virtual address (`None`: any address).
pub type ServiceKey = (&'static str, Option<IpAddr>);

/// Which farm claims each service, to refuse overlapping ones (the service maps would be
/// ambiguous). Kept up to date by the engine, so that a change checks only the farms it
/// touched.
#[derive(Debug, Clone, Default)]
pub struct ServiceIndex {
    by_key: HashMap<ServiceKey, Vec<(PortRange, String, String)>>,
}

impl ServiceIndex {
    /// An index of every farm of `st`.
    pub fn of(st: &State) -> Self {
        let mut ix = Self::default();
        for farm in st.farms.values() {
            ix.add_farm(st, farm);
        }
        ix
    }

    /// Records a service of `farm` (through address `addr`).
    pub fn add(&mut self, key: ServiceKey, r: PortRange, farm: &str, addr: &str) {
        self.by_key
            .entry(key)
            .or_default()
            .push((r, farm.to_string(), addr.to_string()));
    }

    /// Every entry as text, sorted (to compare indexes).
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_key
            .iter()
            .flat_map(|((p, ip), list)| {
                list.iter()
                    .map(move |(r, f, a)| format!("{p} {ip:?} {r} {f} {a}"))
            })
            .collect();
        v.sort();
        v
    }

    /// Records every service of `farm`.
    pub fn add_farm(&mut self, st: &State, farm: &Farm) {
        for (key, r, addr) in st.farm_services(farm) {
            self.add(key, r, &farm.name, addr);
        }
    }

    /// Forgets every service of the farm called `name` that `st` records for it.
    pub fn remove_farm(&mut self, st: &State, name: &str) {
        let Some(farm) = st.farms.get(name) else {
            return;
        };
        for (key, _, _) in st.farm_services(farm) {
            if let Some(v) = self.by_key.get_mut(&key) {
                v.retain(|(_, f, _)| f != name);
                if v.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// An error if the service overlaps one of a farm for which `counts` is true.
    pub fn check(
        &self,
        key: ServiceKey,
        r: PortRange,
        farm: &str,
        addr: &str,
        counts: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let Some(v) = self.by_key.get(&key) else {
            return Ok(());
        };
        match v.iter().find(|(o, f, _)| counts(f) && o.overlaps(&r)) {
            Some((_, other_farm, other_addr)) => Err(format!(
                "address '{}' of farm '{}' ({} {} port {}) overlaps address '{}' of farm '{}'",
                addr,
                farm,
                key.0,
                key.1.map(|i| i.to_string()).unwrap_or_else(|| "*".into()),
                r,
                other_addr,
                other_farm
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn farm_with(backends: &[(u32, BackendState)]) -> (State, Farm) {
        let mut st = State::default();
        let mut f = Farm::new("f".into());
        for (i, (prio, state)) in backends.iter().enumerate() {
            let mut b = Backend::new(format!("b{i}"));
            b.ip_addr = Some(format!("198.18.1.{}", 10 + i).parse().unwrap());
            b.priority = *prio;
            b.state = *state;
            f.backends.push(b);
        }
        st.farms.insert("f".into(), std::sync::Arc::new(f.clone()));
        (st, f)
    }

    #[test]
    fn priority_fails_over_one_for_one() {
        use BackendState::*;
        let (st, f) = farm_with(&[(1, Up), (1, Up), (2, Up)]);
        assert_eq!(st.farm_priority(&f), 1);
        assert_eq!(
            st.backend_statuses(&f),
            vec![
                BackendStatus::Up,
                BackendStatus::Up,
                BackendStatus::Available
            ]
        );
        let (st, f) = farm_with(&[(1, Down), (1, Up), (2, Up)]);
        assert_eq!(st.farm_priority(&f), 2);
        assert_eq!(
            st.backend_statuses(&f),
            vec![BackendStatus::Down, BackendStatus::Up, BackendStatus::Up]
        );
    }

    #[test]
    fn elements_are_canonical() {
        assert_eq!(
            parse_element("198.18.0.7/24", Family::Ipv4).unwrap(),
            "198.18.0.0/24"
        );
        assert_eq!(
            parse_element("198.18.0.7/32", Family::Ipv4).unwrap(),
            "198.18.0.7"
        );
        assert!(parse_element("2001:2::1", Family::Ipv4).is_err());
        assert!(parse_element("198.18.0.7/33", Family::Ipv4).is_err());
        assert_eq!(
            parse_element("2001:2::1/48", Family::Ipv6).unwrap(),
            "2001:2::/48"
        );
    }
}
