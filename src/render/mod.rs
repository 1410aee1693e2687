//! Rendering: a pure function from the desired [`State`] (and the bucket [`Slots`]) to
//! the [`Ruleset`] that implements it.
//!
//! Layout, per family (`table ip nftlb`, `table ip6 nftlb`):
//! - `prerouting` (nat, dstnat) looks each new flow up by `l4proto . vip . port` in `svcx`
//!   (exact match) and `svc` (port ranges, interval), then `svcpx`/`svcp` for port-only
//!   services. A port range is one interval element, never expanded; a list of ports is
//!   one exact element per listed port. The lookup cost does not depend on the number of
//!   farms.
//! - Plain farms (`weight`, `hash`, `symhash` without persistence or per-backend
//!   connection limits; most farms) have no verdict element and no chain of their own:
//!   after each service map, one rule looks the service up in a mark map (`offx`, `offi`,
//!   `offpx`, `offp`) whose value is the farm's block offset plus its [`Kind`] in the low
//!   bits, and dispatches the kind through `kinds` to the shared chain `lb-k<n>-<sig>`,
//!   which finds the backend identity in `fbuckets` (`block . bucket`). Adding a verdict
//!   element that jumps makes the kernel validate every such element of the table, and
//!   the kernel walks every chain on each commit; neither grows with plain farms.
//! - Other farms' service elements jump to the farm's chain `farm-NAME`: persistence
//!   lookups, the scheduler (`ct mark set numgen inc mod W offset O; jump sched`), per
//!   backend connection limits. Every farm owns a block `[O, O + size)` of the
//!   conntrack-mark space (its [`Slot`]); backend identities are marks in it, with the
//!   masquerade bit (`-m`) added for farms that masquerade, as nftlb's backend marks are.
//! - One shared chain, `pick`, turns the identity into the backend: `dnat to ct mark map
//!   @bk` (address and port) or `@bki` (address only). These exact-match maps hold every
//!   farm's backends and are referenced by one rule each; a backend change adds or
//!   deletes elements only, each O(1).
//! - `postrouting` (nat, srcnat) applies per-backend source addresses (`snat to ct mark
//!   map @srcaddr`: the backend's `source-addr`, else the farm's), then masquerades flows
//!   whose conntrack mark carries the masquerade bit.
//! - No map is referenced by a per-farm rule (the kernel re-validates a map's elements
//!   for every rule bound to it), and there are no per-farm sets or anonymous maps (they
//!   make loading quadratic).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::*;
use crate::netinfo::NetView;
use crate::ruleset::{Chain, MapDef, Ruleset, Table, TableFamily};

pub mod filter;
pub mod netdev;

/// Settings that rendering depends on.
#[derive(Debug, Clone, Copy)]
pub struct RenderConfig {
    /// The conntrack mark bit that means "masquerade this flow".
    pub masquerade_mark: u32,
}

/// Something in the state that is accepted but not rendered: (farm, message).
pub type Note = (String, String);

/// A farm's block of the conntrack-mark space: its scheduling buckets and its backends'
/// identities both number from `offset` (they live in different maps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// First value of the block.
    pub offset: u32,
    /// Number of values reserved (a power of two, at least 16).
    pub size: u32,
    /// Stable identity of each backend within the block (`offset + id`), kept while the
    /// backend exists so that persistence entries and conntrack marks stay valid.
    #[serde(default)]
    pub ids: BTreeMap<String, u32>,
    /// The bucket count of a `weight`, `hash` or `symhash` farm: it only grows while the
    /// farm exists, so taking a backend out and putting it back does not change it (a
    /// change of bucket count points the farm's services at another shared chain, which
    /// the kernel validates against every service).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub buckets: u32,
    /// The scheduler kind of a plain farm (see [`Kind`]); `None` for other farms, and for
    /// plain farms when every kind number is taken (they then get a chain of their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The scheduler of a plain farm: a number in the low bits of its block offset (blocks
/// are 16-aligned) that `kinds` maps to the shared chain `lb-k<id>-<sig>` computing the
/// bucket. Services thus point at a kind through a mark map, never at a chain: a farm
/// that changes its bucket count changes mark elements only, which the kernel does not
/// validate against every service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kind {
    pub id: u32,
    pub sig: String,
}

/// The version of the rules' layout, held in the `layout` set: a restart whose saved
/// state matches the kernel's generation still rewrites the rules when they were laid out
/// by another version (the plain farms' kinds came with version 2; version 1 had no set;
/// version 4 renamed the objects that could clash or start with a digit: `cth-FARM/…`
/// helpers, `CHAIN/…` sub-chains, `apol-ADDRESS` chains, `pc-POLICY/OWNER` counters,
/// `ingress/dnat-IF` chains).
pub const LAYOUT: u32 = 4;

/// Kind numbers fit in the low bits of a block offset.
pub const KIND_MASK: u32 = 0xf;

/// Kinds whose chains are part of the skeleton (created with the tables, never removed),
/// by number: `weight` farms of up to 32 backends. Creating a chain that uses `fbuckets`
/// costs time in proportion to its elements (the kernel checks them when a rule binds the
/// map), so common kinds are not created on the fly.
const SKELETON_KINDS: [(u32, u32); 3] = [(0, 16), (1, 32), (2, 64)];

/// Allocation of mark blocks to farms. Kept by the engine and persisted with the state,
/// so that a restart renders the same rules and keeps sessions valid.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "SlotsData")]
pub struct Slots {
    /// Persistent (O(1) copy): every committed state's slots are published to readers.
    by_farm: imbl::HashMap<String, Slot>,
    free: BTreeMap<u32, Vec<u32>>,
    next: u64,
    /// Kind numbers beyond the skeleton's in use: signature and number of farms (derived
    /// from `by_farm`).
    #[serde(skip)]
    kinds: BTreeMap<u32, (String, u32)>,
}

/// The persisted part of [`Slots`].
#[derive(Deserialize)]
struct SlotsData {
    #[serde(default)]
    by_farm: HashMap<String, Slot>,
    #[serde(default)]
    free: BTreeMap<u32, Vec<u32>>,
    #[serde(default)]
    next: u64,
}

impl From<SlotsData> for Slots {
    fn from(d: SlotsData) -> Slots {
        let mut s = Slots {
            by_farm: imbl::HashMap::new(),
            free: d.free,
            next: d.next,
            kinds: BTreeMap::new(),
        };
        for (name, slot) in d.by_farm {
            s.set_entry(&name, Some(slot));
        }
        s
    }
}

/// The first offset handed out: mark 0 and its neighbours stay unused, so that a flow
/// whose conntrack mark was never set cannot match a backend.
const FIRST_OFFSET: u64 = 16;

/// The mark space under a masquerade mark: the values below its lowest bit, so that a
/// bucket or backend identity never carries the masquerade bit by itself.
pub fn bucket_space(masquerade_mark: u32) -> u64 {
    1u64 << masquerade_mark.trailing_zeros().min(32)
}

/// The blocks of some farms and the allocator, as they were before a change, so that a
/// failed change can put them back without copying every farm's block.
#[derive(Debug, Clone)]
pub struct SlotsUndo {
    entries: Vec<(String, Option<Slot>)>,
    free: BTreeMap<u32, Vec<u32>>,
    next: u64,
}

impl SlotsUndo {
    /// Puts the recorded blocks and allocator back.
    pub fn restore(&self, slots: &mut Slots) {
        for (name, slot) in &self.entries {
            slots.set_entry(name, slot.clone());
        }
        slots.free = self.free.clone();
        slots.next = self.next;
    }

    /// Whether `slots` differs from what was recorded.
    pub fn changed(&self, slots: &Slots) -> bool {
        self.free != slots.free
            || self.next != slots.next
            || self
                .entries
                .iter()
                .any(|(n, s)| slots.by_farm.get(n) != s.as_ref())
    }

    /// The recorded blocks as a `Slots` of their own (to look up the old identities).
    pub fn old_slots(&self) -> Slots {
        let mut s = Slots::default();
        for (n, slot) in &self.entries {
            s.set_entry(n, slot.clone());
        }
        s
    }
}

impl Slots {
    /// Records the named farms' blocks and the allocator (see [`SlotsUndo`]).
    pub fn checkpoint<'a>(&self, names: impl Iterator<Item = &'a String>) -> SlotsUndo {
        SlotsUndo {
            entries: names
                .map(|n| (n.clone(), self.by_farm.get(n).cloned()))
                .collect(),
            free: self.free.clone(),
            next: self.next,
        }
    }

    /// Sets (or with `None` removes) one farm's block, as recorded in the journal.
    pub fn set_entry(&mut self, farm: &str, slot: Option<Slot>) {
        if let Some(k) = slot.as_ref().and_then(|s| s.kind.clone()) {
            self.count_kind(&k, true);
        }
        let old = match slot {
            Some(s) => self.by_farm.insert(farm.to_string(), s),
            None => self.by_farm.remove(farm),
        };
        if let Some(k) = old.and_then(|s| s.kind) {
            self.count_kind(&k, false);
        }
    }

    /// Counts (or uncounts) a farm of a kind beyond the skeleton's.
    fn count_kind(&mut self, k: &Kind, add: bool) {
        if skeleton_kind(&k.sig).is_some() {
            return;
        }
        if add {
            self.kinds
                .entry(k.id)
                .or_insert_with(|| (k.sig.clone(), 0))
                .1 += 1;
        } else if let Some(e) = self.kinds.get_mut(&k.id) {
            e.1 -= 1;
            if e.1 == 0 {
                self.kinds.remove(&k.id);
            }
        }
    }

    /// The kind for scheduler signature `sig`: the skeleton's, one in use, else the
    /// lowest free number (none when all are taken). Not counted (see `count_kind`).
    fn find_kind(&self, sig: &str) -> Option<Kind> {
        let id = skeleton_kind(sig)
            .or_else(|| {
                self.kinds
                    .iter()
                    .find(|(_, (s, _))| s == sig)
                    .map(|(id, _)| *id)
            })
            .or_else(|| {
                (SKELETON_KINDS.len() as u32..=KIND_MASK).find(|id| !self.kinds.contains_key(id))
            })?;
        Some(Kind {
            id,
            sig: sig.to_string(),
        })
    }

    /// The free lists and the next unused offset (journalled whole: they are small).
    pub fn allocator(&self) -> (BTreeMap<u32, Vec<u32>>, u64) {
        (self.free.clone(), self.next)
    }

    /// Restores the free lists and the next unused offset.
    pub fn set_allocator(&mut self, free: BTreeMap<u32, Vec<u32>>, next: u64) {
        self.free = free;
        self.next = next;
    }

    /// The block of a farm, if it has one.
    pub fn get(&self, farm: &str) -> Option<&Slot> {
        self.by_farm.get(farm)
    }

    /// Frees the blocks of farms that are gone, gives every backend an identity and
    /// every farm a block large enough for its buckets and identities, below `space`.
    /// Blocks never shrink, so weight changes do not move a farm.
    pub fn sync(&mut self, state: &State, space: u64) -> Result<(), String> {
        let gone: Vec<String> = self
            .by_farm
            .keys()
            .filter(|n| !state.farms.contains_key(n))
            .cloned()
            .collect();
        let names: Vec<&String> = state.farms.keys().collect();
        self.sync_farms(state, names.into_iter().chain(gone.iter()), space)
    }

    /// [`Slots::sync`] for the named farms only (those a change touched): farms that are
    /// gone from `state` give their block back, the others get one that fits.
    pub fn sync_farms<'a>(
        &mut self,
        state: &State,
        names: impl Iterator<Item = &'a String>,
        space: u64,
    ) -> Result<(), String> {
        // Gone farms first: their blocks and kinds are free for the others.
        let (present, gone): (Vec<&String>, Vec<&String>) =
            names.partition(|n| state.farms.contains_key(n));
        for name in gone.into_iter().chain(present) {
            let Some(farm) = state.farms.get(name) else {
                if let Some(s) = self.by_farm.get(name) {
                    self.free.entry(s.size).or_default().push(s.offset);
                    self.set_entry(name, None);
                }
                continue;
            };
            // Backend identities: keep existing ones, give new backends the lowest free.
            let mut ids = self
                .by_farm
                .get(&farm.name)
                .map(|s| s.ids.clone())
                .unwrap_or_default();
            ids.retain(|name, _| farm.backend_index(name).is_some());
            let mut used: Vec<u32> = ids.values().copied().collect();
            used.sort_unstable();
            let mut next_free = 0u32;
            let mut ui = 0;
            for b in &farm.backends {
                if ids.contains_key(&b.name) {
                    continue;
                }
                while ui < used.len() && used[ui] <= next_free {
                    if used[ui] == next_free {
                        next_free += 1;
                    }
                    ui += 1;
                }
                ids.insert(b.name.clone(), next_free);
                next_free += 1;
            }
            let max_id = ids.values().copied().max().map_or(0, |m| m + 1);
            let old_buckets = self.by_farm.get(&farm.name).map_or(0, |s| s.buckets);
            let buckets = fixed_buckets(farm).map_or(0, |b| b.max(old_buckets));
            let need = buckets_needed(state, farm)
                .max(buckets)
                .max(max_id)
                .max(16)
                .next_power_of_two();
            // The kind: kept while the signature is the same, else given back first (so
            // that a farm changing kind can reuse its number).
            let old = self.by_farm.get(&farm.name).cloned();
            let sig = is_plain(farm).then(|| plain_sig(farm, buckets));
            let kind = match (&sig, old.as_ref().and_then(|s| s.kind.as_ref())) {
                (Some(sig), Some(k)) if k.sig == *sig => Some(k.clone()),
                (None, _) => None,
                (Some(sig), _) => {
                    if let Some(mut s) = old.clone() {
                        s.kind = None;
                        self.set_entry(&farm.name, Some(s));
                    }
                    self.find_kind(sig)
                }
            };
            let (offset, size) = match &old {
                Some(s) if s.size >= need => (s.offset, s.size),
                _ => {
                    if let Some(s) = &old {
                        self.free.entry(s.size).or_default().push(s.offset);
                    }
                    let offset = self.alloc(need, space).ok_or_else(|| {
                        format!(
                            "farm '{}': no room left for {need} marks (too many farms, backends or weights)",
                            farm.name
                        )
                    })?;
                    (offset, need)
                }
            };
            self.set_entry(
                &farm.name,
                Some(Slot {
                    offset,
                    size,
                    ids,
                    buckets,
                    kind,
                }),
            );
        }
        Ok(())
    }

    fn alloc(&mut self, size: u32, space: u64) -> Option<u32> {
        if let Some(off) = self.free.get_mut(&size).and_then(Vec::pop) {
            return Some(off);
        }
        self.next = self.next.max(FIRST_OFFSET);
        if self.next + u64::from(size) > space {
            return None;
        }
        let off = self.next as u32;
        self.next += u64::from(size);
        Some(off)
    }
}

pub(crate) fn ip_kw(fam: TableFamily) -> &'static str {
    match fam {
        TableFamily::Ip | TableFamily::Netdev => "ip",
        TableFamily::Ip6 => "ip6",
    }
}

pub(crate) fn addr_type(fam: TableFamily) -> &'static str {
    match fam {
        TableFamily::Ip | TableFamily::Netdev => "ipv4_addr",
        TableFamily::Ip6 => "ipv6_addr",
    }
}

pub(crate) fn fam_matches(fam: TableFamily, ip: &IpAddr) -> bool {
    matches!(
        (fam, ip),
        (TableFamily::Ip, IpAddr::V4(_)) | (TableFamily::Ip6, IpAddr::V6(_))
    )
}

// Kernel object names. Every name derived from a farm, policy or address name starts
// with a fixed prefix (names may start with a digit; nft identifiers may not, and nft
// 1.0.6 accepts no quoted names). Object names contain `[A-Za-z0-9_.-]` only, so parts
// that follow a name, or a second name, come after a `/` (valid in nft identifiers):
// `ffarm-NAME/tcp-strict` can be no other farm's `ffarm-…`. Each kind of object has its
// own prefix, so names are unique in their namespace.

/// Longest kernel object name (chains, sets, maps, objects): the kernel's 256 bytes
/// (NFT_NAME_MAXLEN) with the terminating NUL.
pub const KNAME_MAX: usize = 255;

/// A kernel object name that fits [`KNAME_MAX`]: a longer one (two long names joined)
/// keeps its first bytes and ends in `//` and a hash of the whole name. No other name
/// contains `//`, so it stays unique (up to the 64-bit hash).
pub fn kname(name: String) -> String {
    if name.len() <= KNAME_MAX {
        return name;
    }
    let h = hash64(&name);
    let keep = KNAME_MAX - 2 - 16;
    // Names are ASCII (validated), so any byte index is a character boundary.
    format!("{}//{h:016x}", &name[..keep])
}

fn hash64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Chain name of a farm.
pub fn farm_chain(farm: &str) -> String {
    format!("farm-{farm}")
}

pub(crate) fn map(spec: String) -> MapDef {
    MapDef {
        kind: "map",
        spec,
        elements: BTreeMap::new(),
        dynamic: false,
    }
}

/// FNV-1a, for short stable tags in object names (not for security).
pub(crate) fn tag(text: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// The nft expression and type of a persistence key.
fn persist_key(fields: &HashFields, fam: TableFamily) -> (String, String) {
    persist_key_with(fields, ip_kw(fam), addr_type(fam))
}

/// The nft expression and type of a persistence key, given the address keyword
/// (`ip`/`ip6`) and address type of the family (shared with the netdev renderer).
pub(crate) fn persist_key_with(fields: &HashFields, ip: &str, at: &str) -> (String, String) {
    let (exprs, types): (Vec<String>, Vec<&str>) = fields
        .set_names()
        .iter()
        .map(|f| match *f {
            "srcip" => (format!("{ip} saddr"), at),
            "dstip" => (format!("{ip} daddr"), at),
            "srcport" => ("th sport".to_string(), "inet_service"),
            "dstport" => ("th dport".to_string(), "inet_service"),
            "srcmac" => ("ether saddr".to_string(), "ether_addr"),
            _ => ("ether daddr".to_string(), "ether_addr"),
        })
        .unzip();
    (exprs.join(" . "), types.join(" . "))
}

/// Names of a farm's persistence and static-session maps in one family. The names carry
/// a tag of everything their elements depend on (key type, timeout, mark base), so that a
/// change of those makes new, empty maps instead of leaving stale entries behind.
pub fn session_maps(
    farm: &Farm,
    slot: &Slot,
    fam: TableFamily,
    cfg: &RenderConfig,
) -> (String, String) {
    let (_, ty) = persist_key(&farm.persistence, fam);
    let t = tag(&format!(
        "{ty}|{}|{}",
        farm.persist_ttl,
        id_base(farm, slot, fam, cfg)
    ));
    (
        format!("ps-{}-{t}", farm.name),
        format!("ss-{}-{t}", farm.name),
    )
}

/// The mark of backend identity 0 of a farm in one family: the block offset, plus the
/// masquerade bit for farms that masquerade there.
pub fn id_base(farm: &Farm, slot: &Slot, fam: TableFamily, cfg: &RenderConfig) -> u32 {
    let src_farm = farm.source_addr.filter(|s| fam_matches(fam, s));
    if farm.mode == Mode::Snat && src_farm.is_none() {
        slot.offset | cfg.masquerade_mark
    } else {
        slot.offset
    }
}

fn base_table(fam: TableFamily, cfg: &RenderConfig) -> Table {
    let ip = ip_kw(fam);
    let at = addr_type(fam);
    let mut t = Table::default();
    for (name, spec) in [
        (
            "svcx",
            format!("type inet_proto . {at} . inet_service : verdict;"),
        ),
        (
            "svc",
            format!("type inet_proto . {at} . inet_service : verdict; flags interval;"),
        ),
        (
            "svcpx",
            "type inet_proto . inet_service : verdict;".to_string(),
        ),
        (
            "svcp",
            "type inet_proto . inet_service : verdict; flags interval;".to_string(),
        ),
        ("buckets", "type mark : mark;".to_string()),
        ("umarks", "type mark : mark;".to_string()),
        // One element: the sequence number of the saved state the rules implement
        // (filled in by the engine), so that a restart can tell it has nothing to do.
        ("gen", "type mark;".to_string()),
        // One element: the version of this layout (see `LAYOUT`).
        ("layout", "type mark;".to_string()),
        // One element while a change that takes several kernel transactions is under
        // way (filled in by the engine): a start that finds it rewrites the rules.
        ("busy", "type mark;".to_string()),
        ("lsrc", format!("type mark : {at};")),
        // Exact marks, not intervals: nft 1.0.6 cannot add to a one-field interval map
        // created in the same transaction (it lists the kernel's elements first).
        ("fwdmarks", "type mark : verdict;".to_string()),
        (
            "osvcx",
            format!("type inet_proto . {at} . inet_service : verdict;"),
        ),
        (
            "osvc",
            format!("type inet_proto . {at} . inet_service : verdict; flags interval;"),
        ),
        (
            "osvcpx",
            "type inet_proto . inet_service : verdict;".to_string(),
        ),
        (
            "osvcp",
            "type inet_proto . inet_service : verdict; flags interval;".to_string(),
        ),
        ("bk", format!("type mark : {at} . inet_service;")),
        // Plain farms (see `plain`): the service's block offset, then (offset . bucket)
        // to the backend identity. The typeof only gives the second field its type (a
        // 32-bit integer, as any hash or numgen expression yields).
        (
            "offx",
            format!("type inet_proto . {at} . inet_service : mark;"),
        ),
        (
            "offi",
            format!("type inet_proto . {at} . inet_service : mark; flags interval;"),
        ),
        (
            "offpx",
            "type inet_proto . inet_service : mark;".to_string(),
        ),
        (
            "offp",
            "type inet_proto . inet_service : mark; flags interval;".to_string(),
        ),
        (
            "fbuckets",
            "typeof ct mark . numgen random mod 16 : ct mark;".to_string(),
        ),
        // Kind number (low bits of a plain farm's block offset) to the kind's chain.
        ("kinds", "type mark : verdict;".to_string()),
        ("bki", format!("type mark : {at};")),
        ("srcaddr", format!("type mark : {at};")),
    ] {
        let mut m = map(spec);
        if name == "gen" || name == "layout" || name == "busy" {
            m.kind = "set";
        }
        if name == "layout" {
            m.elements.insert(mark(LAYOUT), String::new());
        }
        t.maps.insert(name.into(), m);
    }
    if fam == TableFamily::Ip {
        // The daemon that manages our tables (see `kernel::owner`): claimed before
        // anything else is written, never diffed.
        t.maps.insert(
            crate::ruleset::OWNER_SET.into(),
            MapDef {
                kind: "set",
                spec: crate::ruleset::OWNER_SPEC.into(),
                elements: Default::default(),
                dynamic: true,
            },
        );
    }
    t.chains.insert(
        "prerouting".into(),
        Chain {
            base: Some("type nat hook prerouting priority dstnat; policy accept;".into()),
            // Each service map, then the plain farms of its kind of key (a service is
            // in one of the two).
            rules: vec![
                format!("meta l4proto . {ip} daddr . th dport vmap @svcx"),
                plain_dispatch("x", fam),
                format!("meta l4proto . {ip} daddr . th dport vmap @svc"),
                plain_dispatch("", fam),
                "meta l4proto . th dport vmap @svcpx".into(),
                plain_dispatch("px", fam),
                "meta l4proto . th dport vmap @svcp".into(),
                plain_dispatch("p", fam),
            ],
        },
    );
    t.chains.insert(
        "sched".into(),
        Chain {
            base: None,
            rules: vec!["ct mark set ct mark map @buckets".into()],
        },
    );
    t.chains.insert(
        "pick".into(),
        Chain {
            base: None,
            rules: vec![
                format!("meta l4proto {{ tcp, udp, sctp }} dnat {ip} to ct mark map @bk"),
                format!("dnat {ip} to ct mark map @bki"),
                // A mark without a backend: refuse the new flow.
                "drop".into(),
            ],
        },
    );
    t.chains.extend(skeleton_plain_chains(fam));
    link_kinds(&mut t);
    filter::base(&mut t, fam);
    // intra-connect: locally generated connections to the services of farms that ask.
    t.chains.insert(
        "output".into(),
        Chain {
            base: Some("type nat hook output priority -100; policy accept;".into()),
            rules: vec![
                format!("meta l4proto . {ip} daddr . th dport vmap @osvcx"),
                format!("meta l4proto . {ip} daddr . th dport vmap @osvc"),
                "meta l4proto . th dport vmap @osvcpx".into(),
                "meta l4proto . th dport vmap @osvcp".into(),
            ],
        },
    );
    // Farm and backend marks, for policy routing: every packet of a balanced flow (both
    // directions) carries them, once NAT has chosen the backend.
    t.chains.insert(
        "marks".into(),
        Chain {
            base: Some("type filter hook prerouting priority -99; policy accept;".into()),
            rules: vec!["meta mark set ct mark map @umarks".into()],
        },
    );
    // Forward logging of farms with `log: forward`.
    t.chains.insert(
        "forward".into(),
        Chain {
            base: Some("type filter hook forward priority filter; policy accept;".into()),
            rules: vec!["ct mark vmap @fwdmarks".into()],
        },
    );
    let masq = cfg.masquerade_mark;
    t.chains.insert(
        "postrouting".into(),
        Chain {
            base: Some("type nat hook postrouting priority srcnat; policy accept;".into()),
            rules: vec![
                format!("snat {ip} to ct mark map @srcaddr"),
                // Local farms: connections a local proxy opens with a backend's mark.
                format!("ct mark 0 meta mark != 0 snat {ip} to meta mark map @lsrc"),
                format!("ct mark and 0x{masq:x} == 0x{masq:x} masquerade"),
            ],
        },
    );
    t
}

/// The chain of a farm that is not plain: persistence lookups, the scheduler, per-backend
/// connection limits.
#[allow(clippy::too_many_arguments)]
fn farm_chain_rules(
    farm: &Farm,
    fam: TableFamily,
    slot: &Slot,
    cfg: &RenderConfig,
    natable: &[(&Backend, IpAddr, u32)],
    total: u32,
    hashed: Option<u32>,
    chain_name: String,
    t: &mut Table,
) {
    let mut rules = Vec::new();
    let persistent = !farm.persistence.is_empty();
    let (key, key_type) = persist_key(&farm.persistence, fam);
    let (ps, ss) = session_maps(farm, slot, fam, cfg);
    if persistent {
        // Static sessions, pinned to backends that can carry flows.
        let mut statics = map(format!("type {key_type} : mark;"));
        for sess in &farm.sessions {
            let fits = sess.client.split(" . ").all(|part| {
                part.parse::<IpAddr>()
                    .map_or(true, |ip| fam_matches(fam, &ip))
            });
            let target = natable
                .iter()
                .find(|(b, _, _)| b.name == sess.backend)
                .map(|(_, _, m)| *m);
            if let (true, Some(m)) = (fits, target) {
                statics.elements.insert(sess.client.clone(), mark(m));
            }
        }
        t.maps.insert(ss.clone(), statics);
        t.maps.insert(
            ps.clone(),
            MapDef {
                kind: "map",
                spec: format!(
                    "type {key_type} : mark; flags dynamic,timeout; timeout {}s; size 1048576;",
                    farm.persist_ttl.max(1)
                ),
                elements: BTreeMap::new(),
                dynamic: true,
            },
        );
        rules.push(format!("ct mark set {key} map @{ss} goto pick"));
        rules.push(format!("ct mark set {key} map @{ps} goto pick"));
    }
    if total > 0 {
        rules.push(format!(
            "ct mark set {} offset {}",
            sched_expr(farm, fam, hashed.unwrap_or(total)),
            mark(slot.offset)
        ));
        rules.push("jump sched".to_string());
        if persistent {
            rules.push(format!("update @{ps} {{ {key} : ct mark }}"));
        }
        for (b, _, m) in natable {
            if b.est_connlimit > 0 {
                rules.push(format!(
                    "ct mark {} ct count over {} drop",
                    mark(*m),
                    b.est_connlimit
                ));
            }
        }
        rules.push("goto pick".to_string());
    } else {
        // No usable backend: refuse new flows rather than let them reach a local
        // socket on the virtual address.
        rules.push("drop".to_string());
    }
    t.chains.insert(chain_name, Chain { base: None, rules });
}

/// Whether a NAT farm needs no chain of its own: a scheduler that keeps no per-farm state
/// (not `rr`), no persistence and no per-backend connection limit. Most farms are plain;
/// the kernel walks every chain on each commit, so per-farm chains cost every change.
fn is_plain(farm: &Farm) -> bool {
    matches!(
        farm.scheduler,
        Scheduler::Weight | Scheduler::Hash | Scheduler::Symhash
    ) && farm.persistence.is_empty()
        && farm.backends.iter().all(|b| b.est_connlimit == 0)
}

/// The name part shared by plain farms with the same scheduler expression.
fn plain_sig(farm: &Farm, modulus: u32) -> String {
    match farm.scheduler {
        Scheduler::Weight => format!("rnd-{modulus}"),
        Scheduler::Symhash => format!("sym-{modulus}"),
        _ => format!("h-{}-{modulus}", farm.sched_param.set_names().join("-")),
    }
}

/// The key of a service map variant (`x`, ``, `px`, `p`) and its block-offset map.
fn variant_lookup(variant: &str, fam: TableFamily) -> (String, &'static str) {
    match variant {
        "x" | "" => (
            format!("meta l4proto . {} daddr . th dport", ip_kw(fam)),
            if variant.is_empty() { "offi" } else { "offx" },
        ),
        _ => (
            "meta l4proto . th dport".to_string(),
            if variant == "px" { "offpx" } else { "offp" },
        ),
    }
}

/// The rule that serves plain farms for one service map variant: the service's block
/// offset and kind into the conntrack mark, then on to the kind's chain. A lookup miss
/// ends the rule, so other flows go on untouched.
fn plain_dispatch(variant: &str, fam: TableFamily) -> String {
    let (lookup, off) = variant_lookup(variant, fam);
    format!("ct mark set {lookup} map @{off} ct mark & 0x{KIND_MASK:08x} vmap @kinds")
}

/// The chain of a kind: the bucket from (block . scheduler expression), then the backend.
fn kind_chain_def(expr: &str) -> Chain {
    Chain {
        base: None,
        rules: vec![
            format!("ct mark set ct mark . {expr} map @fbuckets goto pick"),
            // A bucket without a backend: refuse the new flow.
            "drop".to_string(),
        ],
    }
}

/// The skeleton's dispatch chains (for `intra-connect` services, from the output hook)
/// and kind chains.
fn skeleton_plain_chains(fam: TableFamily) -> impl Iterator<Item = (String, Chain)> {
    let dispatch = ["x", "", "px", "p"].into_iter().map(move |v| {
        (
            dispatch_chain(v),
            Chain {
                base: None,
                rules: vec![plain_dispatch(v, fam), "drop".to_string()],
            },
        )
    });
    let kinds = SKELETON_KINDS.into_iter().map(|(id, m)| {
        (
            kind_chain(&Kind {
                id,
                sig: format!("rnd-{m}"),
            }),
            kind_chain_def(&format!("numgen random mod {m}")),
        )
    });
    dispatch.chain(kinds)
}

/// The skeleton kind number of a scheduler signature, if it has one.
fn skeleton_kind(sig: &str) -> Option<u32> {
    SKELETON_KINDS
        .iter()
        .find(|(_, m)| sig.strip_prefix("rnd-").and_then(|x| x.parse::<u32>().ok()) == Some(*m))
        .map(|(id, _)| *id)
}

/// Whether a chain is one of the skeleton's shared chains (not counted per farm).
pub fn is_skeleton_chain(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PLAIN_PREFIX) else {
        return false;
    };
    matches!(rest, "x" | "i" | "px" | "p")
        || kind_of_chain(name).is_some_and(|(id, sig)| skeleton_kind(sig) == Some(id))
}

/// The kind number and signature of a kind chain's name.
pub fn kind_of_chain(name: &str) -> Option<(u32, &str)> {
    let (id, sig) = name
        .strip_prefix(PLAIN_PREFIX)?
        .strip_prefix('k')?
        .split_once('-')?;
    Some((id.parse().ok()?, sig))
}

/// The chain of a kind.
pub fn kind_chain(k: &Kind) -> String {
    format!("{PLAIN_PREFIX}k{}-{}", k.id, k.sig)
}

/// The dispatch chain of service map variant `svc{variant}`.
fn dispatch_chain(variant: &str) -> String {
    format!(
        "{PLAIN_PREFIX}{}",
        if variant.is_empty() { "i" } else { variant }
    )
}

/// Names of the chains shared by plain farms start with this.
pub const PLAIN_PREFIX: &str = "lb-";

/// Points `kinds` at every kind chain of a table (the element goes and comes with its
/// chain, which the engine counts per farm).
pub fn link_kinds(t: &mut Table) {
    let links: Vec<(u32, String)> = t
        .chains
        .keys()
        .filter_map(|n| kind_of_chain(n).map(|(id, _)| (id, n.clone())))
        .collect();
    for (id, name) in links {
        insert(t, "kinds", mark(id), format!("goto {name}"));
    }
}

/// Adds (`Some`) or removes a shared chain of a table, with its `kinds` element.
pub fn set_shared_chain(t: &mut Table, name: &str, chain: Option<Chain>) {
    let kind = kind_of_chain(name).map(|(id, _)| mark(id));
    match chain {
        Some(c) => {
            t.chains.insert(name.to_string(), c);
            if let Some(k) = kind {
                insert(t, "kinds", k, format!("goto {name}"));
            }
        }
        None => {
            t.chains.remove(name);
            // Unless the number now belongs to another chain (a kind given back and taken
            // again in the same change).
            if let (Some(k), Some(m)) = (kind, t.maps.get_mut("kinds")) {
                if m.elements.get(&k) == Some(&format!("goto {name}")) {
                    m.elements.remove(&k);
                }
            }
        }
    }
}

/// The scheduler expression over `modulus` buckets.
fn sched_expr(farm: &Farm, fam: TableFamily, modulus: u32) -> String {
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
                    "srcport" => "th sport".to_string(),
                    "dstport" => "th dport".to_string(),
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
    let usable: Vec<&Backend> = farm
        .backends
        .iter()
        .zip(statuses)
        .filter(|(_, st)| **st == BackendStatus::Up)
        .filter(|(b, _)| b.ip_addr.is_some_and(|ip| fam_matches(fam, &ip)))
        .map(|(b, _)| b)
        .collect();
    let g = usable.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
    let mut out = Vec::with_capacity(usable.len());
    let mut total = 0u32;
    for b in usable {
        let n = b.weight / g;
        out.push(Pick {
            backend: b,
            lo: total,
            n,
        });
        total += n;
    }
    (out, total)
}

/// The largest number of buckets a farm needs in any family.
fn buckets_needed(state: &State, farm: &Farm) -> u32 {
    if let Some(b) = hash_buckets(farm).or_else(|| weight_buckets(farm)) {
        return b;
    }
    let statuses = state.backend_statuses(farm);
    TableFamily::ALL
        .iter()
        .map(|fam| picks(farm, &statuses, *fam).1)
        .max()
        .unwrap_or(0)
}

/// The fixed bucket count a `weight`, `hash` or `symhash` farm needs now (see
/// [`Slot::buckets`] for the count it gets).
fn fixed_buckets(farm: &Farm) -> Option<u32> {
    hash_buckets(farm).or_else(|| weight_buckets(farm))
}

/// The fixed bucket count of a hashing farm (`hash`, `symhash`): at least 8 per backend
/// (counting every backend, so that states do not change it) and 64, a power of two.
/// Buckets go to backends by weighted rendezvous hashing, so adding or removing a backend
/// moves only about its share of the flows, and a backend change never changes the rule.
fn hash_buckets(farm: &Farm) -> Option<u32> {
    matches!(farm.scheduler, Scheduler::Hash | Scheduler::Symhash).then(|| {
        (8 * farm.backends.len() as u32)
            .clamp(64, 1 << 16)
            .next_power_of_two()
    })
}

/// The fixed bucket count of a `weight` farm: room for every backend's weight (counting
/// every backend, so that states do not change it), at least 2 per backend and 16, a power
/// of two (at most 1024). With a fixed count a backend change only repoints buckets; the
/// rule stays as it is.
fn weight_buckets(farm: &Farm) -> Option<u32> {
    (farm.scheduler == Scheduler::Weight).then(|| {
        let g = farm.backends.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
        let sum: u32 = farm.backends.iter().map(|b| b.weight / g).sum();
        sum.max(2 * farm.backends.len() as u32)
            .clamp(16, 1024)
            .next_power_of_two()
    })
}

/// Splits `n` buckets among `picks` in proportion to their weights (largest remainder),
/// in contiguous runs; returns each pick's count.
fn proportional(picks: &[Pick], n: u32) -> Vec<u32> {
    let total: u64 = picks.iter().map(|p| u64::from(p.backend.weight)).sum();
    if total == 0 {
        return vec![0; picks.len()];
    }
    let mut counts: Vec<u32> = Vec::with_capacity(picks.len());
    let mut rems: Vec<(u64, usize)> = Vec::with_capacity(picks.len());
    for (i, p) in picks.iter().enumerate() {
        let exact = u64::from(n) * u64::from(p.backend.weight);
        counts.push((exact / total) as u32);
        rems.push((exact % total, i));
    }
    let given: u32 = counts.iter().sum();
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in rems.into_iter().take((n - given) as usize) {
        counts[i] += 1;
    }
    counts
}

/// FNV-1a over a string and a bucket number, mapped into (0, 1).
fn unit_hash(name: &str, bucket: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(bucket.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalise (FNV's low bits mix poorly), then take 53 bits.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Weighted rendezvous: the backend (index into `picks`) that owns `bucket`.
fn rendezvous(picks: &[Pick], bucket: u32) -> Option<usize> {
    picks
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let score = f64::from(p.backend.weight) / -unit_hash(&p.backend.name, bucket).ln();
            (i, score)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// The tables every ruleset has, with no farm in them: base chains and the shared maps,
/// empty. Farm fragments are rendered onto it; objects named here are shared.
pub fn skeleton(cfg: &RenderConfig) -> Ruleset {
    let mut rs = Ruleset::default();
    for fam in TableFamily::ALL {
        rs.tables.insert(fam, base_table(fam, cfg));
    }
    rs
}

/// The part of the ruleset that does not belong to one NAT farm: the skeleton, the
/// policies' sets, standalone addresses and every ingress (`dsr`, `stlsdnat`) farm, all
/// of those in one pass ([`netdev::render`]). (Ingress farms use no bucket slots.)
pub fn render_base(
    state: &State,
    _slots: &Slots,
    net: &NetView,
    cfg: &RenderConfig,
) -> (Ruleset, Vec<Note>) {
    let mut rs = skeleton(cfg);
    let mut notes = Vec::new();
    for fam in TableFamily::ALL {
        let t = rs.tables.get_mut(&fam).expect("skeleton tables exist");
        filter::policies(state, fam, t);
        // Standalone addresses with policies: a pure ingress firewall.
        for a in state.addresses.values() {
            if !a.policies.is_empty() && state.address_used(&a.name) == 0 {
                filter::address_entries(state, a, fam, None, t, cfg);
            }
        }
    }
    // Every ingress farm at once: they share the base chains' lookups.
    netdev::render(state, net, &mut rs, &mut notes);
    (rs, notes)
}

/// What one farm adds to the ruleset (nothing for farms that are not up, and for ingress
/// farms, which [`render_base`] renders): this farm's elements of the shared maps, plus
/// its own chains, maps and objects. Merge it into the skeleton (or a full ruleset).
pub fn render_fragment(
    state: &State,
    farm: &Farm,
    slots: &Slots,
    cfg: &RenderConfig,
) -> (Ruleset, Vec<Note>) {
    // Empty tables, not the skeleton: shared maps appear only with this farm's elements
    // (see `insert`), which keeps fragments small and cheap to build.
    let mut rs = Ruleset::default();
    for fam in TableFamily::ALL {
        rs.tables.insert(fam, Table::default());
    }
    let mut notes = Vec::new();
    if farm.state != FarmState::Up {
        return (rs, notes);
    }
    match farm.mode {
        Mode::Snat | Mode::Dnat => {}
        Mode::Dsr | Mode::Stlsdnat => return (rs, notes),
        Mode::Local => {
            for fam in TableFamily::ALL {
                let table = rs.tables.get_mut(&fam).expect("fragment tables exist");
                render_local(state, farm, fam, table);
            }
            return (rs, notes);
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
        return (rs, notes);
    };
    let statuses = state.backend_statuses(farm);
    for fam in TableFamily::ALL {
        let table = rs.tables.get_mut(&fam).expect("fragment tables exist");
        render_farm(state, farm, &statuses, slot, fam, cfg, table);
        if !serves(state, farm, fam) {
            continue;
        }
        let fchain = filter::farm(state, farm, fam, table);
        for a in state.farm_addresses(farm) {
            filter::address_entries(state, a, fam, fchain.as_deref(), table, cfg);
        }
    }
    (rs, notes)
}

/// Adds a fragment to a ruleset, moving its strings: its elements join the shared maps,
/// its own maps and chains are added.
pub fn merge_owned(rs: &mut Ruleset, frag: Ruleset) {
    for (fam, ft) in frag.tables {
        let t = rs.tables.entry(fam).or_default();
        for (name, m) in ft.maps {
            match t.maps.get_mut(&name) {
                Some(existing) => existing.elements.extend(m.elements),
                None => {
                    t.maps.insert(name, m);
                }
            }
        }
        for (name, c) in ft.chains {
            t.chains.entry(name).or_insert(c);
        }
    }
}

/// Renders the whole state: the base and every farm's fragment. Also returns notes about
/// settings that are accepted but not rendered. Every farm must have a slot (see
/// [`Slots::sync`]).
pub fn render(
    state: &State,
    slots: &Slots,
    net: &NetView,
    cfg: &RenderConfig,
) -> (Ruleset, Vec<Note>) {
    let (mut rs, mut notes) = render_base(state, slots, net, cfg);
    for farm in state.farms.values() {
        let (frag, n) = render_fragment(state, farm, slots, cfg);
        merge_owned(&mut rs, frag);
        notes.extend(n);
    }
    rs.tables.values_mut().for_each(link_kinds);
    (rs, notes)
}

/// A `local` farm: a local process serves the virtual address, so there is no NAT to a
/// backend. Policies and limits apply in the filter stage, and connections that the
/// local process opens with a backend's mark (SO_MARK = farm mark | backend mark) leave
/// with that backend's `source-addr` (else the farm's).
fn render_local(state: &State, farm: &Farm, fam: TableFamily, t: &mut Table) {
    if !serves(state, farm, fam) {
        return;
    }
    let fchain = filter::farm(state, farm, fam, t);
    for a in state.farm_addresses(farm) {
        filter::address_entries(
            state,
            a,
            fam,
            fchain.as_deref(),
            t,
            &RenderConfig { masquerade_mark: 0 },
        );
    }
    let src_farm = farm.source_addr.filter(|s| fam_matches(fam, s));
    for b in &farm.backends {
        let user_mark = farm.mark.0 | b.mark.0;
        let src = b.source_addr.filter(|x| fam_matches(fam, x)).or(src_farm);
        if let (true, Some(src)) = (b.mark.0 != 0, src) {
            insert(t, "lsrc", mark(user_mark), src.to_string());
        }
    }
}

/// Whether a farm has an address served in this family.
fn serves(state: &State, farm: &Farm, fam: TableFamily) -> bool {
    state.farm_addresses(farm).any(|a| match a.ip_addr {
        Some(ip) => fam_matches(fam, &ip),
        None => match a.family {
            Family::Inet => true,
            Family::Ipv4 => fam == TableFamily::Ip,
            Family::Ipv6 => fam == TableFamily::Ip6,
        },
    })
}

/// The keys of a farm set to something this version does not turn into rules yet.
fn unserved_keys(f: &Farm) -> Vec<&'static str> {
    let mut out = Vec::new();
    let no_devices = f.flow_offload && f.oface.is_none();
    let checks: [(&'static str, bool); 2] = [
        ("log output", f.log.has("output")),
        ("flow-offload (it needs 'iface' and 'oface')", no_devices),
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

/// Adds an element to a shared map. A fragment's tables start empty: the entry it creates
/// here only carries elements and is merged into the skeleton's declaration.
pub(crate) fn insert(t: &mut Table, map: &str, key: String, value: String) {
    t.maps
        .entry(map.to_string())
        .or_insert_with(|| MapDef {
            kind: "map",
            spec: String::new(),
            elements: BTreeMap::new(),
            dynamic: false,
        })
        .elements
        .insert(key, value);
}

/// A conntrack-mark value as nft writes it.
fn mark(v: u32) -> String {
    format!("0x{v:08x}")
}

fn render_farm(
    state: &State,
    farm: &Farm,
    statuses: &[BackendStatus],
    slot: &Slot,
    fam: TableFamily,
    cfg: &RenderConfig,
    t: &mut Table,
) {
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
    let hashed = fixed_buckets(farm).map(|b| b.max(slot.buckets));
    // A plain farm has no chain of its own and no verdict element: its services are in
    // the `off*` maps, whose value is its block offset plus its kind, and the kind's chain
    // (shared by every plain farm with the same scheduler expression) finds the backend
    // through (block . bucket).
    let kind = slot.kind.as_ref().filter(|_| is_plain(farm));
    let plain = kind.is_some();
    let key_mark = slot.offset | kind.map_or(0, |k| k.id);
    for a in &addrs {
        for p in a.protocol.l4() {
            for r in a.ports.ranges() {
                let single = r.lo == r.hi;
                let (map, key) = match (a.ip_addr, single) {
                    (Some(vip), true) => ("svcx", format!("{p} . {vip} . {r}")),
                    (Some(vip), false) => ("svc", format!("{p} . {vip} . {r}")),
                    (None, true) => ("svcpx", format!("{p} . {r}")),
                    (None, false) => ("svcp", format!("{p} . {r}")),
                };
                let verdict = match kind {
                    // No usable backend: refuse new flows rather than let them reach a
                    // local socket on the virtual address.
                    Some(_) if total == 0 => "drop".to_string(),
                    Some(k) => {
                        let variant = &map[3..];
                        let shared = kind_chain(k);
                        t.chains.entry(shared).or_insert_with(|| {
                            kind_chain_def(&sched_expr(farm, fam, hashed.unwrap_or(total)))
                        });
                        insert(
                            t,
                            variant_lookup(variant, fam).1,
                            key.clone(),
                            mark(key_mark),
                        );
                        format!("goto {}", dispatch_chain(variant))
                    }
                    None => format!("goto {chain_name}"),
                };
                if !plain || total == 0 {
                    insert(t, map, key.clone(), verdict.clone());
                }
                if farm.intra_connect {
                    insert(t, &format!("o{map}"), key, verdict);
                }
            }
        }
    }
    let base = id_base(farm, slot, fam, cfg);
    let id_mark = |name: &str| slot.ids.get(name).map(|id| base + id);
    // Backends that can carry flows (new or pinned): up, available and off ones.
    let natable: Vec<(&Backend, IpAddr, u32)> = farm
        .backends
        .iter()
        .zip(statuses)
        .filter(|(_, st)| {
            matches!(
                st,
                BackendStatus::Up | BackendStatus::Available | BackendStatus::Off
            )
        })
        .filter_map(|(b, _)| {
            let ip = b.ip_addr.filter(|ip| fam_matches(fam, ip))?;
            Some((b, ip, id_mark(&b.name)?))
        })
        .collect();
    // The original's rule: backend ports are used only when every backend has one.
    let with_port = natable.iter().all(|(b, _, _)| b.port.is_some());
    let src_farm = farm.source_addr.filter(|s| fam_matches(fam, s));
    for (b, bip, m) in &natable {
        let (map, data) = match (with_port, b.port) {
            (true, Some(bp)) => ("bk", format!("{bip} . {bp}")),
            _ => ("bki", bip.to_string()),
        };
        insert(t, map, mark(*m), data);
        let user_mark = farm.mark.0 | b.mark.0;
        if user_mark != 0 {
            insert(t, "umarks", mark(*m), mark(user_mark));
        }
        if farm.mode == Mode::Snat {
            if let Some(src) = b.source_addr.filter(|x| fam_matches(fam, x)).or(src_farm) {
                insert(t, "srcaddr", mark(*m), src.to_string());
            }
        }
    }
    let mut bucket = |b: u32, m: u32| {
        if plain {
            insert(t, "fbuckets", format!("{} . {b}", mark(key_mark)), mark(m));
        } else {
            insert(t, "buckets", mark(slot.offset + b), mark(m));
        }
    };
    match hashed {
        Some(n) if !picks.is_empty() && farm.scheduler == Scheduler::Weight => {
            let mut b = 0;
            for (pk, count) in picks.iter().zip(proportional(&picks, n)) {
                if let Some(m) = id_mark(&pk.backend.name) {
                    for _ in 0..count {
                        bucket(b, m);
                        b += 1;
                    }
                }
            }
        }
        Some(n) if !picks.is_empty() => {
            for b in 0..n {
                let owner = rendezvous(&picks, b).and_then(|i| id_mark(&picks[i].backend.name));
                if let Some(m) = owner {
                    bucket(b, m);
                }
            }
        }
        _ => {
            for pk in &picks {
                if let Some(m) = id_mark(&pk.backend.name) {
                    for b in pk.lo..pk.lo + pk.n {
                        bucket(b, m);
                    }
                }
            }
        }
    }

    if !plain {
        farm_chain_rules(farm, fam, slot, cfg, &natable, total, hashed, chain_name, t);
    }
    let mut fwd_rules: Vec<String> = Vec::new();
    if farm.flow_offload {
        // Only reached where the kernel has flowtables (the engine refuses otherwise).
        let mut devices: Vec<String> = state
            .farm_addresses(farm)
            .filter_map(|a| a.iface.clone())
            .collect();
        devices.extend(farm.oface.clone());
        devices.sort();
        devices.dedup();
        if !devices.is_empty() {
            let ft = format!("ft-{}", farm.name);
            t.maps.insert(
                ft.clone(),
                MapDef {
                    kind: "flowtable",
                    spec: format!(
                        "hook ingress priority 0; devices = {{ {} }};",
                        devices.join(", ")
                    ),
                    elements: BTreeMap::new(),
                    dynamic: true,
                },
            );
            fwd_rules.push(format!("meta l4proto {{ tcp, udp }} flow add @{ft}"));
        }
    }
    if farm.log.has("forward") {
        let template = farm
            .log_prefix
            .clone()
            .unwrap_or_else(|| "TYPE-FNAME ".into());
        let p = filter::expand(
            &template,
            &filter::Tokens {
                kname: "log",
                ty: "FWD",
                fname: &farm.name,
                ..Default::default()
            },
        );
        let rate = if farm.log_rtlimit.count > 0 {
            format!("limit rate {} ", farm.log_rtlimit)
        } else {
            String::new()
        };
        fwd_rules.push(format!("ct state new {rate}log prefix \"{p}\""));
    }
    if !fwd_rules.is_empty() {
        // The forward hook finds the farm by its block of conntrack marks.
        let chain = format!("forward-{}", farm.name);
        for (_, _, m) in &natable {
            insert(t, "fwdmarks", mark(*m), format!("goto {chain}"));
        }
        t.chains.insert(
            chain,
            Chain {
                base: None,
                rules: fwd_rules,
            },
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::document::{apply_document, ApplyMode, ParseConfig};
    use crate::ruleset::plan;
    use serde_json::json;

    pub(crate) const CFG: RenderConfig = RenderConfig {
        masquerade_mark: 0x8000_0000,
    };

    /// A validated state built from one JSON document (also used by the netdev tests).
    pub(crate) fn state(v: serde_json::Value) -> State {
        let mut st = State::default();
        apply_document(
            &mut st,
            &v,
            &ApplyMode::Upsert,
            &ParseConfig {
                masquerade_mark: 0x8000_0000,
                stored: false,
            },
        )
        .unwrap();
        st.validate().unwrap();
        st
    }

    fn slots(st: &State) -> Slots {
        let mut s = Slots::default();
        s.sync(st, bucket_space(0x8000_0000)).unwrap();
        s
    }

    fn rendered(st: &State) -> (Ruleset, Vec<Note>) {
        render(st, &slots(st), &NetView::default(), &CFG)
    }

    fn text(st: &State) -> String {
        plan(&Ruleset::default(), &rendered(st).0).to_text()
    }

    #[test]
    fn kernel_names_fit_and_stay_distinct() {
        assert_eq!(kname("pc-a/b".into()), "pc-a/b");
        let a = kname(format!("pc-{}/{}", "p".repeat(128), "f".repeat(128)));
        let b = kname(format!("pc-{}/{}", "p".repeat(128), "g".repeat(128)));
        assert_eq!(a.len(), KNAME_MAX);
        assert!(a.contains("//") && a != b, "{a}");
        assert!(filter::helper_object("0", Helper::Ftp, "tcp").starts_with("cth-0/"));
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
    fn security_features() {
        let st = state(json!({
            "policies":[{"name":"bl","type":"blacklist","elements":[{"data":"198.18.9.0/24"},{"data":"198.18.8.8"}]},
                        {"name":"wl","type":"whitelist","elements":[{"data":"198.18.0.0/16"}]}],
            "addresses":[{"name":"fw","ip-addr":"198.18.0.200","ports":"22","policies":[{"name":"bl"}]}],
            "farms":[{"name":"web","virtual-addr":"198.18.0.100","virtual-ports":"21","mode":"snat",
                "policies":[{"name":"wl"},{"name":"bl"}],"tcp-strict":"on","new-rtlimit":"10/second",
                "new-rtlimit-burst":"5","rst-rtlimit":"2/minute","est-connlimit":"20","helper":"ftp",
                "log":"input forward","log-prefix":"[FNAME,TYPE] ","log-rtlimit":"1/second","verdict":"log drop",
                "intra-connect":"on","mark":"0x100","persistence":"srcip","sessions":[{"client":"198.18.0.2","backend":"a"}],
                "backends":[{"name":"a","ip-addr":"198.18.1.11","est-connlimit":"100"},
                            {"name":"b","ip-addr":"198.18.1.12"}]}]}));
        insta::assert_snapshot!(text(&st));
    }

    #[test]
    fn flow_offload_renders_a_flowtable_where_the_kernel_has_one() {
        let st = state(
            json!({"farms":[{"name":"f","virtual-addr":"198.18.0.1","iface":"eth0",
            "oface":"eth1","virtual-ports":"80","flow-offload":"on",
            "backends":[{"name":"a","ip-addr":"198.18.1.1"}]}]}),
        );
        let t = text(&st);
        assert!(
            t.contains("add flowtable ip nftlb ft-f { hook ingress priority 0; devices = { eth0, eth1 }; }"),
            "{t}"
        );
        assert!(
            t.contains("add rule ip nftlb forward-f meta l4proto { tcp, udp } flow add @ft-f"),
            "{t}"
        );
        assert!(
            t.contains("add element ip nftlb fwdmarks { 0x80000010 : goto forward-f }"),
            "{t}"
        );
    }

    #[test]
    fn consistent_hashing_moves_only_the_removed_backends_flows() {
        let backends: Vec<serde_json::Value> = (0..10)
            .map(|i| json!({"name": format!("b{i}"), "ip-addr": format!("198.18.1.{}", i + 1)}))
            .collect();
        let before = state(json!({"farms":[{"name":"h","virtual-addr":"198.18.0.1",
            "virtual-ports":"80","scheduler":"hash","backends":backends}]}));
        let mut after = before.clone();
        std::sync::Arc::make_mut(after.farms.get_mut("h").unwrap()).backends[3].state =
            BackendState::Down;
        let sl = slots(&before);
        let owners = |st: &State| -> BTreeMap<String, String> {
            render(st, &sl, &NetView::default(), &CFG).0.tables[&TableFamily::Ip].maps["fbuckets"]
                .elements
                .clone()
        };
        let (a, b) = (owners(&before), owners(&after));
        assert_eq!(a.len(), 128, "8 buckets per backend, a power of two");
        let moved = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count();
        let b3 = a.values().filter(|v| v.ends_with("13")).count();
        // Exactly the buckets of the backend that went down move; each backend has about
        // a tenth of them.
        assert_eq!(moved, b3, "{a:?}\n{b:?}");
        assert!((6..=22).contains(&b3), "b3 owns {b3} of 128 buckets");
        // And no rule changes: a plain farm has no chain of its own, only the shared one.
        let chains = |st: &State| {
            render(st, &sl, &NetView::default(), &CFG).0.tables[&TableFamily::Ip]
                .chains
                .clone()
        };
        assert_eq!(chains(&before), chains(&after));
        assert!(!chains(&before).contains_key("farm-h"));
        assert!(chains(&before)["lb-k3-h-srcip-128"].rules[0].contains("jhash ip saddr mod 128"));
    }

    #[test]
    fn bucket_counts_only_grow_while_a_farm_exists() {
        let doc = |n: usize| {
            let b: Vec<serde_json::Value> = (0..n)
                .map(|i| json!({"name": format!("b{i}"), "ip-addr": format!("198.18.1.{}", i + 1)}))
                .collect();
            state(json!({"farms":[{"name":"w","virtual-addr":"198.18.0.1",
                "virtual-ports":"80","scheduler":"weight","backends":b}]}))
        };
        let space = bucket_space(0x8000_0000);
        let mut sl = Slots::default();
        // A plain farm's service is an `offx` element (block offset + kind), never a
        // verdict: a change of bucket count changes mark elements only.
        let target = |st: &State, sl: &Slots| {
            let rs = render(st, sl, &NetView::default(), &CFG).0;
            let t = &rs.tables[&TableFamily::Ip];
            assert!(!t.maps["svcx"]
                .elements
                .contains_key("tcp . 198.18.0.1 . 80"));
            let off = &t.maps["offx"].elements["tcp . 198.18.0.1 . 80"];
            let v = u32::from_str_radix(off.trim_start_matches("0x"), 16).unwrap();
            let kind = t.maps["kinds"].elements[&mark(v & KIND_MASK)].clone();
            (v & !KIND_MASK, kind)
        };
        let eight = doc(8);
        sl.sync(&eight, space).unwrap();
        assert_eq!(sl.get("w").unwrap().buckets, 16);
        let (off16, kind) = target(&eight, &sl);
        assert_eq!(kind, "goto lb-k0-rnd-16");
        // A ninth backend needs 32 buckets (a bigger block, another kind); taking it out
        // again keeps 32, so nothing moves.
        let nine = doc(9);
        sl.sync(&nine, space).unwrap();
        assert_eq!(sl.get("w").unwrap().buckets, 32);
        let (off32, kind) = target(&nine, &sl);
        assert_eq!(kind, "goto lb-k1-rnd-32");
        assert_ne!(off16, off32);
        sl.sync(&eight, space).unwrap();
        assert_eq!(sl.get("w").unwrap().buckets, 32);
        assert_eq!(target(&eight, &sl), (off32, kind));
        let fb = render(&eight, &sl, &NetView::default(), &CFG).0.tables[&TableFamily::Ip].maps
            ["fbuckets"]
            .elements
            .len();
        assert_eq!(fb, 32);
        // The common weight kinds and the dispatch chains are in the skeleton: not
        // counted per farm.
        assert!(is_skeleton_chain("lb-k1-rnd-32") && is_skeleton_chain("lb-i"));
        assert!(!is_skeleton_chain("lb-k3-rnd-128") && !is_skeleton_chain("lb-k1-sym-64"));
        let sk = &skeleton(&CFG).tables[&TableFamily::Ip6];
        assert!(sk.chains.contains_key("lb-k2-rnd-64"));
        assert_eq!(sk.maps["kinds"].elements[&mark(2)], "goto lb-k2-rnd-64");
    }

    #[test]
    fn kinds_are_shared_reused_and_fall_back_to_farm_chains() {
        // 14 hash farms with different field sets: 13 kind numbers are free beyond the
        // skeleton's, so the last farm gets a chain of its own.
        let fields = [
            "srcip",
            "dstip",
            "srcport",
            "dstport",
            "srcmac",
            "dstmac",
            "srcip dstip",
            "srcip srcport",
            "srcip dstport",
            "dstip dstport",
            "srcip dstip srcport",
            "srcip dstip dstport",
            "srcport dstport",
            "srcip dstip srcport dstport",
        ];
        let farms: Vec<serde_json::Value> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                json!({"name": format!("h{i:02}"), "virtual-addr":"198.18.0.1",
                "virtual-ports": format!("{}", 1000 + i), "scheduler":"hash",
                "sched-param": f, "backends":[{"name":"a","ip-addr":"198.18.1.1"}]})
            })
            .collect();
        let mut farms2 = farms.clone();
        // A second farm of the first kind shares its number.
        farms2.push(json!({"name":"same","virtual-addr":"198.18.0.1","virtual-ports":"2000",
            "scheduler":"hash","sched-param":"srcip","backends":[{"name":"a","ip-addr":"198.18.1.1"}]}));
        let st = state(json!({ "farms": farms2 }));
        let space = bucket_space(0x8000_0000);
        let mut sl = Slots::default();
        sl.sync(&st, space).unwrap();
        let id = |n: &str| sl.get(n).unwrap().kind.as_ref().map(|k| k.id);
        assert_eq!(id("h00"), Some(3));
        assert_eq!(id("same"), Some(3));
        let ids: std::collections::BTreeSet<u32> =
            (0..13).filter_map(|i| id(&format!("h{i:02}"))).collect();
        assert_eq!(ids, (3..=15).collect());
        assert_eq!(id("h13"), None);
        let (rs, _) = render(&st, &sl, &NetView::default(), &CFG);
        let t = &rs.tables[&TableFamily::Ip];
        assert_eq!(t.maps["kinds"].elements.len(), 16);
        assert_eq!(
            t.maps["svcx"].elements["tcp . 198.18.0.1 . 1013"],
            "goto farm-h13"
        );
        assert!(t.chains["farm-h13"]
            .rules
            .iter()
            .any(|r| r.contains("jhash")));
        // Persisted and loaded again, the numbers in use are known.
        let loaded: Slots = serde_json::from_value(serde_json::to_value(&sl).unwrap()).unwrap();
        assert_eq!(loaded, sl);
        // When the farms of a kind are gone, its number is free for another signature.
        let mut fewer = farms.clone();
        fewer.remove(1);
        let st2 = state(json!({ "farms": fewer }));
        sl.sync(&st2, space).unwrap();
        let freed = sl.get("h13").unwrap().kind.as_ref().map(|k| k.id);
        assert!(freed.is_some(), "h13 takes the freed number");
        assert_eq!(
            sl.get("h13").unwrap().kind.as_ref().unwrap().sig,
            plain_sig(st2.farms.get("h13").unwrap(), 64)
        );
    }

    #[test]
    fn weight_farms_keep_their_rule_when_a_backend_changes() {
        let before = state(json!({"farms":[{"name":"w","virtual-addr":"198.18.0.1",
            "virtual-ports":"80","scheduler":"weight","backends":[
            {"name":"a","ip-addr":"198.18.1.1","weight":"1"},
            {"name":"b","ip-addr":"198.18.1.2","weight":"3"},
            {"name":"c","ip-addr":"198.18.1.3","weight":"4"}]}]}));
        let mut after = before.clone();
        std::sync::Arc::make_mut(after.farms.get_mut("w").unwrap()).backends[2].state =
            BackendState::Down;
        let sl = slots(&before);
        let r = |st: &State| render(st, &sl, &NetView::default(), &CFG).0;
        let (a, b) = (r(&before), r(&after));
        let ip = |rs: &Ruleset| rs.tables[&TableFamily::Ip].clone();
        assert_eq!(ip(&a).chains, ip(&b).chains);
        assert!(ip(&a).chains["lb-k0-rnd-16"].rules[0].contains("numgen random mod 16 "));
        let count = |rs: &Ruleset, m: &str| {
            ip(rs).maps["fbuckets"]
                .elements
                .values()
                .filter(|v| v.ends_with(m))
                .count()
        };
        // 16 buckets by weight 1:3:4, then 1:3 once c is down.
        assert_eq!(
            (count(&a, "10"), count(&a, "11"), count(&a, "12")),
            (2, 6, 8)
        );
        assert_eq!(
            (count(&b, "10"), count(&b, "11"), count(&b, "12")),
            (4, 12, 0)
        );
    }

    #[test]
    fn queue_renders_where_the_kernel_has_nfqueue() {
        // The engine refuses `queue` on kernels without nfqueue (a dry-run probe); the
        // rendering itself is the original's rule.
        let st = state(json!({"farms":[{"name":"q","virtual-addr":"198.18.0.1",
            "virtual-ports":"25","queue":"3","backends":[{"name":"a","ip-addr":"198.18.1.1"}]}]}));
        let t = text(&st);
        assert!(
            t.contains("add rule ip nftlb ffarm-q tcp flags syn queue num 3 bypass"),
            "{t}"
        );
        assert!(t.contains("tcp . 198.18.0.1 . 25 : goto ffarm-q"), "{t}");
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
        let old = render(&before, &sl, &NetView::default(), &CFG).0;
        sl.sync(&after, bucket_space(0x8000_0000)).unwrap();
        let tx = plan(&old, &render(&after, &sl, &NetView::default(), &CFG).0);
        let f7 = sl.get("f7").unwrap().offset;
        // Only farm f7's chain is rewritten (W 2 -> 1) and its buckets change.
        assert_eq!(
            tx.commands
                .iter()
                .map(|c| crate::ruleset::untagged(c).to_string())
                .collect::<Vec<_>>(),
            vec![
                "flush chain ip nftlb farm-f7".to_string(),
                format!("add rule ip nftlb farm-f7 ct mark set numgen inc mod 1 offset 0x{f7:08x}"),
                "add rule ip nftlb farm-f7 jump sched".to_string(),
                "add rule ip nftlb farm-f7 goto pick".to_string(),
                // b's identity leaves the NAT map, its bucket leaves the schedule.
                format!(
                    "delete element ip nftlb bki {{ 0x{:08x} }}",
                    0x8000_0000 | (f7 + 1)
                ),
                format!("delete element ip nftlb buckets {{ 0x{:08x} }}", f7 + 1),
            ]
        );
    }
}
