//! Typed values of the nftlb JSON model. Every value that can reach nft text is parsed
//! into one of these types first; their `Display` output is what the renderer uses, so an
//! API string never reaches nft text unvalidated.

use std::fmt;
use std::net::IpAddr;

/// Why a value was refused; the document layer adds the key and the object.
pub type ValueResult<T> = Result<T, String>;

/// Longest object name accepted (farms, backends, addresses, policies). Kernel object
/// names derived from one name stay well under nft's 255 bytes (see `render::kname`).
pub const MAX_NAME_LEN: usize = 128;

/// Longest `fqdn` accepted (a DNS name is at most 253 characters).
pub const MAX_FQDN_LEN: usize = 253;

/// Longest value of other stored free-text fields (policy element `time`).
pub const MAX_TEXT_LEN: usize = 255;

/// Longest log prefix (template) accepted: nft's limit (the kernel's 128 bytes with the
/// terminating NUL). Expanded templates are cut to this length too.
pub const MAX_LOG_PREFIX_LEN: usize = 127;

/// Largest timeout in seconds (`persist-ttl`, `limits-ttl`): nft 1.0.6 reads at most 8
/// digits per time unit (`timeout 100000000s` is "value too large"), about 3.2 years.
pub const MAX_TTL: u32 = 99_999_999;

/// A part of a refused value for an error message: at most 64 characters, so that a
/// huge value does not make a huge reply.
pub fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => s.to_string(),
        Some((i, _)) => format!("{}...", &s[..i]),
    }
}

/// Validates an object name: 1..=128 characters of `[A-Za-z0-9_.-]`, starting with a
/// letter, digit or underscore. Kernel object names always put a fixed prefix before
/// a name (a name may start with a digit, which nft identifiers may not).
pub fn parse_name(s: &str) -> ValueResult<String> {
    parse_name_max(s, MAX_NAME_LEN)
}

/// Longest address name read from a state file: older versions derived `FARM-addr` from
/// 128-character farm names. Kernel names made from it still fit nft's 255 bytes.
pub const MAX_STORED_NAME_LEN: usize = 200;

/// [`parse_name`] with another length limit.
pub fn parse_name_max(s: &str, max: usize) -> ValueResult<String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!(
            "is {} bytes long; names are at most {max} characters",
            s.len()
        ));
    }
    let first = s.as_bytes()[0];
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err("must start with a letter, a digit or '_'".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "contains {c:?}; allowed are letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(s.to_string())
}

/// Address family of a farm or address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Family {
    /// IPv4 only (`ip` table).
    #[default]
    Ipv4,
    /// IPv6 only (`ip6` table).
    Ipv6,
    /// Dual stack: rendered in both tables.
    Inet,
}

impl Family {
    /// Parses `ipv4`, `ipv6` or `inet`.
    pub fn parse(s: &str) -> ValueResult<Self> {
        match s {
            "ipv4" => Ok(Self::Ipv4),
            "ipv6" => Ok(Self::Ipv6),
            "inet" => Ok(Self::Inet),
            _ => Err("expected one of ipv4, ipv6, inet".into()),
        }
    }
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::Inet => "inet",
        }
    }
    /// Whether an address of this IP version may be used with this family.
    pub fn admits(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Self::Inet, _) | (Self::Ipv4, IpAddr::V4(_)) | (Self::Ipv6, IpAddr::V6(_))
        )
    }
}

/// Layer-4 protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// TCP, UDP and SCTP.
    All,
}

impl Protocol {
    /// Parses `tcp`, `udp`, `sctp` or `all`.
    pub fn parse(s: &str) -> ValueResult<Self> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "sctp" => Ok(Self::Sctp),
            "all" => Ok(Self::All),
            _ => Err("expected one of tcp, udp, sctp, all".into()),
        }
    }
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
            Self::All => "all",
        }
    }
    /// The concrete transport protocols, as nft spells them.
    pub fn l4(self) -> &'static [&'static str] {
        match self {
            Self::Tcp => &["tcp"],
            Self::Udp => &["udp"],
            Self::Sctp => &["sctp"],
            Self::All => &["tcp", "udp", "sctp"],
        }
    }
}

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl PortRange {
    /// The full range 0-65535 (used for services without ports).
    pub const ALL: PortRange = PortRange { lo: 0, hi: 65535 };
    /// Whether two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Most entries in a list of ports.
pub const MAX_PORT_ENTRIES: usize = 4096;

/// A list of ports and ranges (`"80,443,1000-2000"`); empty means every port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Ports(pub Vec<PortRange>);

fn parse_port(s: &str) -> ValueResult<u16> {
    let p: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{}' is not a port number", clip(s)))?;
    if p == 0 || p > 65535 {
        return Err(format!("port {p} is out of range 1-65535"));
    }
    Ok(p as u16)
}

impl Ports {
    /// Parses a comma-separated list of ports and `lo-hi` ranges. Overlapping entries are
    /// refused: they would make the service map ambiguous.
    pub fn parse(s: &str) -> ValueResult<Self> {
        let mut out: Vec<PortRange> = Vec::new();
        if s.trim().is_empty() {
            return Ok(Ports(out));
        }
        // Counted first: overlaps are checked pairwise.
        if s.split(',').nth(MAX_PORT_ENTRIES).is_some() {
            return Err(format!("has more than {MAX_PORT_ENTRIES} entries"));
        }
        for part in s.split(',') {
            let part = part.trim();
            let range = match part.split_once('-') {
                Some((a, b)) => {
                    let (lo, hi) = (parse_port(a)?, parse_port(b)?);
                    if lo > hi {
                        return Err(format!(
                            "range '{}' has its first port above its last",
                            clip(part)
                        ));
                    }
                    PortRange { lo, hi }
                }
                None => {
                    let p = parse_port(part)?;
                    PortRange { lo: p, hi: p }
                }
            };
            if let Some(o) = out.iter().find(|o| o.overlaps(&range)) {
                return Err(format!("'{range}' overlaps '{o}'"));
            }
            out.push(range);
        }
        Ok(Ports(out))
    }
    /// Whether no port is given (the service matches every port).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The ranges a service map needs: the list, or the full range when empty.
    pub fn ranges(&self) -> Vec<PortRange> {
        if self.0.is_empty() {
            vec![PortRange::ALL]
        } else {
            self.0.clone()
        }
    }
    /// The first port, if any.
    pub fn first(&self) -> Option<u16> {
        self.0.first().map(|r| r.lo)
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Topology of a farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Destination NAT plus source NAT (masquerade or a fixed source address).
    #[default]
    Snat,
    /// Destination NAT only; backends route replies through the load balancer.
    Dnat,
    /// Direct server return (layer 2, netdev ingress).
    Dsr,
    /// Stateless destination NAT (netdev ingress).
    Stlsdnat,
    /// A local process serves the virtual address.
    Local,
}

impl Mode {
    /// Parses the JSON spelling.
    pub fn parse(s: &str) -> ValueResult<Self> {
        match s {
            "snat" => Ok(Self::Snat),
            "dnat" => Ok(Self::Dnat),
            "dsr" => Ok(Self::Dsr),
            "stlsdnat" => Ok(Self::Stlsdnat),
            "local" => Ok(Self::Local),
            _ => Err("expected one of snat, dnat, dsr, stlsdnat, local".into()),
        }
    }
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snat => "snat",
            Self::Dnat => "dnat",
            Self::Dsr => "dsr",
            Self::Stlsdnat => "stlsdnat",
            Self::Local => "local",
        }
    }
}

/// How a farm picks a backend for a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scheduler {
    /// Weighted round robin (`numgen inc`).
    #[default]
    Rr,
    /// Weighted random (`numgen random`).
    Weight,
    /// Hash of the `sched-param` fields (`jhash`).
    Hash,
    /// Symmetric hash of addresses and ports (`symhash`).
    Symhash,
}

impl Scheduler {
    /// Parses the JSON spelling.
    pub fn parse(s: &str) -> ValueResult<Self> {
        match s {
            "rr" => Ok(Self::Rr),
            "weight" => Ok(Self::Weight),
            "hash" => Ok(Self::Hash),
            "symhash" => Ok(Self::Symhash),
            _ => Err("expected one of rr, weight, hash, symhash".into()),
        }
    }
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Weight => "weight",
            Self::Hash => "hash",
            Self::Symhash => "symhash",
        }
    }
}

/// A set of named flags, such as `sched-param`, `persistence`, `log` or `verdict`.
/// `NAMES` gives the order in which they are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags<const K: usize> {
    bits: u8,
}

/// The field names of `sched-param` and `persistence`.
pub const HASH_FIELDS: [&str; 6] = ["srcip", "dstip", "srcport", "dstport", "srcmac", "dstmac"];
/// The values of `log`.
pub const LOG_FIELDS: [&str; 3] = ["input", "forward", "output"];
/// The values of `verdict`.
pub const VERDICT_FIELDS: [&str; 3] = ["log", "drop", "accept"];

/// Flag tables, indexed by the `K` parameter of [`Flags`].
const FLAG_NAMES: [&[&str]; 3] = [&HASH_FIELDS, &LOG_FIELDS, &VERDICT_FIELDS];

/// `sched-param` and `persistence`.
pub type HashFields = Flags<0>;
/// `log`.
pub type LogFlags = Flags<1>;
/// `verdict`.
pub type VerdictFlags = Flags<2>;

impl<const K: usize> Flags<K> {
    fn names() -> &'static [&'static str] {
        FLAG_NAMES[K]
    }
    /// Parses space-separated names; `none` (alone) is the empty set when `allow_none`.
    pub fn parse(s: &str, allow_none: bool) -> ValueResult<Self> {
        let mut bits = 0u8;
        let words: Vec<&str> = s.split_whitespace().collect();
        if words == ["none"] && allow_none {
            return Ok(Self { bits: 0 });
        }
        if words.is_empty() {
            return Err(format!(
                "expected some of {}{}",
                Self::names().join(" "),
                if allow_none { ", or none" } else { "" }
            ));
        }
        for w in words {
            match Self::names().iter().position(|n| *n == w) {
                Some(i) => bits |= 1 << i,
                None => {
                    return Err(format!(
                        "'{}' is not one of {}{}",
                        clip(w),
                        Self::names().join(" "),
                        if allow_none { " none" } else { "" }
                    ))
                }
            }
        }
        Ok(Self { bits })
    }
    /// All flags set.
    pub fn all() -> Self {
        Self {
            bits: (1u8 << Self::names().len()) - 1,
        }
    }
    /// Whether no flag is set.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }
    /// Whether the flag called `name` is set.
    pub fn has(&self, name: &str) -> bool {
        Self::names()
            .iter()
            .position(|n| *n == name)
            .is_some_and(|i| self.bits & (1 << i) != 0)
    }
    /// The names that are set, in canonical order.
    pub fn set_names(&self) -> Vec<&'static str> {
        Self::names()
            .iter()
            .enumerate()
            .filter(|(i, _)| self.bits & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect()
    }
    /// The original's output form: each name followed by a space, or `none`.
    pub fn to_trailing(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        self.set_names().iter().map(|n| format!("{n} ")).collect()
    }
    /// Names joined by single spaces (used for `verdict`), or `none`.
    pub fn to_spaced(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        self.set_names().join(" ")
    }
}

/// Conntrack helper of a farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Helper {
    /// No helper.
    #[default]
    None,
    /// FTP (tcp).
    Ftp,
    /// PPTP (tcp).
    Pptp,
    /// SIP (tcp or udp).
    Sip,
    /// SNMP (udp).
    Snmp,
    /// TFTP (udp).
    Tftp,
}

impl Helper {
    /// Parses the JSON spelling.
    pub fn parse(s: &str) -> ValueResult<Self> {
        match s {
            "none" => Ok(Self::None),
            "ftp" => Ok(Self::Ftp),
            "pptp" => Ok(Self::Pptp),
            "sip" => Ok(Self::Sip),
            "snmp" => Ok(Self::Snmp),
            "tftp" => Ok(Self::Tftp),
            _ => Err("expected one of none, ftp, pptp, sip, snmp, tftp".into()),
        }
    }
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Ftp => "ftp",
            Self::Pptp => "pptp",
            Self::Sip => "sip",
            Self::Snmp => "snmp",
            Self::Tftp => "tftp",
        }
    }
    /// Whether the helper works with the protocol.
    pub fn fits(self, p: Protocol) -> bool {
        match self {
            Self::None => true,
            Self::Ftp | Self::Pptp => p == Protocol::Tcp,
            Self::Snmp | Self::Tftp => p == Protocol::Udp,
            Self::Sip => matches!(p, Protocol::Tcp | Protocol::Udp | Protocol::All),
        }
    }
}

/// Time unit of a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RateUnit {
    /// Per second.
    #[default]
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
    /// Per day.
    Day,
    /// Per week.
    Week,
}

/// A rate such as `10/second`; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rate {
    /// Events per unit.
    pub count: u32,
    /// The unit.
    pub unit: RateUnit,
}

impl Rate {
    /// Parses `N` or `N/unit`.
    pub fn parse(s: &str) -> ValueResult<Self> {
        let (n, u) = match s.split_once('/') {
            Some((n, u)) => (n, u),
            None => (s, "second"),
        };
        let n = n.trim();
        let count: u32 = n.parse().map_err(|_| {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                format!("'{}' is larger than {}", clip(n), u32::MAX)
            } else {
                format!("'{}' is not a non-negative integer", clip(n))
            }
        })?;
        let unit = match u.trim() {
            "second" => RateUnit::Second,
            "minute" => RateUnit::Minute,
            "hour" => RateUnit::Hour,
            "day" => RateUnit::Day,
            "week" => RateUnit::Week,
            other => {
                return Err(format!(
                    "unit '{}' is not one of second, minute, hour, day, week",
                    clip(other)
                ))
            }
        };
        Ok(Rate { count, unit })
    }
}

impl RateUnit {
    /// The unit in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
            RateUnit::Day => 86_400,
            RateUnit::Week => 604_800,
        }
    }
}

impl Rate {
    /// The largest `burst` (packets) the kernel accepts with this rate: it keeps
    /// `unit_ns / rate * burst` tokens in a u64 and refuses an overflow (EOVERFLOW,
    /// `nft_limit_init`). `None` for no limit.
    pub fn max_burst(&self) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let per_packet = self.unit.seconds() * 1_000_000_000 / u64::from(self.count);
        Some(u64::MAX / per_packet.max(1))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = match self.unit {
            RateUnit::Second => "second",
            RateUnit::Minute => "minute",
            RateUnit::Hour => "hour",
            RateUnit::Day => "day",
            RateUnit::Week => "week",
        };
        write!(f, "{}/{}", self.count, u)
    }
}

/// A packet/conntrack mark, written in hexadecimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Mark(pub u32);

impl Mark {
    /// Parses hexadecimal, with or without `0x` (the original uses `strtol(s, 16)`).
    pub fn parse(s: &str) -> ValueResult<Self> {
        let t = s.trim();
        let digits = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        if digits.is_empty() || digits.len() > 8 {
            return Err("expected a hexadecimal 32-bit mark such as 0x10".into());
        }
        u32::from_str_radix(digits, 16)
            .map(Mark)
            .map_err(|_| "expected a hexadecimal 32-bit mark such as 0x10".into())
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff`.
    pub fn parse(s: &str) -> ValueResult<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err("expected a MAC address such as 02:00:00:00:00:01".into());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() || p.len() > 2 {
                return Err("expected a MAC address such as 02:00:00:00:00:01".into());
            }
            m[i] = u8::from_str_radix(p, 16)
                .map_err(|_| "expected a MAC address such as 02:00:00:00:00:01".to_string())?;
        }
        Ok(Mac(m))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Accepts any text of at most `max` bytes (stored, never rendered: `fqdn`, `time`).
pub fn parse_text(max: usize) -> impl Fn(&str) -> ValueResult<String> {
    move |s: &str| {
        if s.len() > max {
            return Err(format!(
                "is {} bytes long; at most {max} are accepted",
                s.len()
            ));
        }
        Ok(s.to_string())
    }
}

/// Parses an interface name as the kernel accepts it (1-15 bytes, no '/', ':' or space).
pub fn parse_ifname(s: &str) -> ValueResult<String> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 characters".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err("may contain only letters, digits, '_', '.' and '-'".into());
    }
    Ok(s.to_string())
}

/// Parses an IP address (v4 or v6).
pub fn parse_ip(s: &str) -> ValueResult<IpAddr> {
    s.trim()
        .parse::<IpAddr>()
        .map_err(|_| "expected an IPv4 or IPv6 address".into())
}

/// Parses a log-prefix template: at most 127 characters (nft's limit) of letters, digits,
/// spaces and `_ . , : - [ ] ( )`. Quotes, backslashes and control characters are refused
/// because nft strings have no escapes.
pub fn parse_log_prefix(s: &str) -> ValueResult<String> {
    if s.len() > MAX_LOG_PREFIX_LEN {
        return Err(format!(
            "is {} bytes long; log prefixes are at most {MAX_LOG_PREFIX_LEN} characters",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| {
        !(c.is_ascii_alphanumeric()
            || matches!(c, ' ' | '_' | '.' | ',' | ':' | '-' | '[' | ']' | '(' | ')'))
    }) {
        return Err(format!(
            "contains {c:?}; allowed are letters, digits, spaces and _ . , : - [ ] ( )"
        ));
    }
    Ok(s.to_string())
}

/// State of a farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FarmState {
    /// Serving.
    #[default]
    Up,
    /// Stopped (rules removed, object kept).
    Down,
    /// Stopped for maintenance.
    Off,
    /// Invalid configuration: not rendered.
    ConfigError,
}

impl FarmState {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Off => "off",
            Self::ConfigError => "config_error",
        }
    }
}

/// State of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendState {
    /// In scheduling.
    #[default]
    Up,
    /// Health failure: no new flows, sessions dropped.
    Down,
    /// Maintenance/drain: no new flows, established ones continue.
    Off,
    /// Invalid (e.g. no address, or an address of the wrong family).
    ConfigError,
}

impl BackendState {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Off => "off",
            Self::ConfigError => "config_error",
        }
    }
}

/// Parses `on`/`off`.
pub fn parse_switch(s: &str) -> ValueResult<bool> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_restricted() {
        assert!(parse_name("lb01").is_ok());
        assert!(parse_name("default--http.v1_x").is_ok());
        for bad in [
            "",
            "a; flush ruleset",
            "a\"b",
            "a\nb",
            "{x}",
            "#x",
            "-x",
            "a b",
            "é",
        ] {
            assert!(parse_name(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_name(&"a".repeat(129)).unwrap_err();
        assert!(e.contains("129 bytes") && e.contains("128"), "{e}");
        assert!(parse_name(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn ports_parse_lists_and_ranges() {
        let p = Ports::parse("80, 443,1000-2000").unwrap();
        assert_eq!(p.to_string(), "80,443,1000-2000");
        assert_eq!(p.ranges().len(), 3);
        assert!(Ports::parse("").unwrap().is_empty());
        assert_eq!(Ports::parse("").unwrap().ranges(), vec![PortRange::ALL]);
        for bad in ["0", "65536", "80-70", "a", "80,80", "10-20,15", "1-"] {
            assert!(Ports::parse(bad).is_err(), "{bad:?} accepted");
        }
        let list = |n: u32| (1..=n).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        assert_eq!(Ports::parse(&list(4096)).unwrap().0.len(), 4096);
        // Refused before the pairwise overlap check (65,535 entries took 26 s, debug build).
        let t = std::time::Instant::now();
        let e = Ports::parse(&list(65535)).unwrap_err();
        assert!(e.contains("more than 4096"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn flags_parse_and_print_like_the_original() {
        let f = HashFields::parse("srcport srcip", true).unwrap();
        assert_eq!(f.to_trailing(), "srcip srcport ");
        assert!(HashFields::parse("none", true).unwrap().is_empty());
        assert!(HashFields::parse("srcip bogus", true).is_err());
        assert!(VerdictFlags::parse("none", false).is_err());
        assert_eq!(VerdictFlags::all().to_spaced(), "log drop accept");
    }

    #[test]
    fn marks_rates_macs() {
        assert_eq!(Mark::parse("0x80000000").unwrap().0, 0x8000_0000);
        assert_eq!(Mark::parse("10").unwrap().0, 0x10);
        assert!(Mark::parse("0x123456789").is_err());
        assert!(Mark::parse("zz").is_err());
        assert_eq!(Rate::parse("10/minute").unwrap().to_string(), "10/minute");
        assert_eq!(Rate::parse("5").unwrap().to_string(), "5/second");
        assert!(Rate::parse("10/hours").is_err());
        assert_eq!(
            Mac::parse("02:00:0A:00:00:01").unwrap().to_string(),
            "02:00:0a:00:00:01"
        );
        assert!(Mac::parse("02:00:00:00:00").is_err());
    }

    #[test]
    fn bursts_the_kernel_cannot_hold_are_found() {
        // nft_limit_init: unit_ns / rate * burst must fit in a u64.
        let r = Rate::parse("1/week").unwrap();
        assert_eq!(r.max_burst(), Some(u64::MAX / 604_800_000_000_000));
        assert_eq!(r.max_burst(), Some(30_500));
        assert_eq!(Rate::parse("0").unwrap().max_burst(), None);
        assert_eq!(
            Rate::parse("4294967295/second").unwrap().max_burst(),
            Some(u64::MAX)
        );
        let e = Rate::parse("4294967296/second").unwrap_err();
        assert!(e.contains("larger than 4294967295"), "{e}");
    }

    #[test]
    fn stored_text_is_limited() {
        assert!(parse_text(253)(&"a".repeat(253)).is_ok());
        let e = parse_text(253)(&"a".repeat(254)).unwrap_err();
        assert!(e.contains("254 bytes") && e.contains("253"), "{e}");
    }

    #[test]
    fn log_prefix_refuses_quotes_and_newlines() {
        assert!(parse_log_prefix("[FNAME,IN] ").is_ok());
        assert!(parse_log_prefix("a\"b").is_err());
        assert!(parse_log_prefix("a\nb").is_err());
        assert!(parse_log_prefix(&"x".repeat(127)).is_ok());
        let e = parse_log_prefix(&"x".repeat(128)).unwrap_err();
        assert!(e.contains("128 bytes") && e.contains("127"), "{e}");
    }
}
