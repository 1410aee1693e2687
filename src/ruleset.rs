//! A typed nftables ruleset (our tables only) and the plan that turns one ruleset into
//! another as a single transaction of the fewest operations.
//!
//! Containers (tables, chains, maps, elements) are typed; a rule body is text built by
//! the renderer from validated values only (the knftables approach).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Name of every table this daemon owns.
pub const TABLE: &str = "nftlb";

/// The set of `table ip nftlb` that names the daemon managing our tables (see
/// `kernel::owner`), and its declaration.
pub const OWNER_SET: &str = "owner";
/// See [`OWNER_SET`].
pub const OWNER_SPEC: &str = "type mark . mark; size 1;";

/// Family of one of our tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableFamily {
    /// `table ip nftlb`.
    Ip,
    /// `table ip6 nftlb`.
    Ip6,
    /// `table netdev nftlb` (DSR and stateless DNAT, at ingress).
    Netdev,
}

impl TableFamily {
    /// The two families of the conntrack/NAT tables, in rendering order.
    pub const ALL: [TableFamily; 2] = [TableFamily::Ip, TableFamily::Ip6];
    /// nft's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Ip6 => "ip6",
            Self::Netdev => "netdev",
        }
    }
}

/// A named map or set with its elements (key text -> value text; empty value for sets).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapDef {
    /// `map` or `set`.
    pub kind: &'static str,
    /// The declaration body, e.g. `type ipv4_addr : verdict; flags interval;`.
    pub spec: String,
    /// Elements.
    pub elements: BTreeMap<String, String>,
    /// The kernel owns the elements (a dynamic map filled by `update` statements, such as
    /// persistence): they are never flushed or diffed, so they survive changes and
    /// restarts.
    pub dynamic: bool,
}

/// A chain: base chains carry their hook declaration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    /// e.g. `type nat hook prerouting priority dstnat; policy accept;`.
    pub base: Option<String>,
    /// Rules in order.
    pub rules: Vec<String>,
}

/// One of our tables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    /// Maps and sets by name.
    pub maps: BTreeMap<String, MapDef>,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
}

/// Everything we own in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Tables by family.
    pub tables: BTreeMap<TableFamily, Table>,
}

/// Commands for one nftables transaction, in the order they must run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transaction {
    /// One nft command per entry.
    pub commands: Vec<String>,
}

impl Transaction {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
    /// The text given to libnftables / `nft -f -`.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for c in &self.commands {
            s.push_str(c);
            s.push('\n');
        }
        s
    }
}

/// Most elements per `add element` / `delete element` command (keeps commands readable
/// in logs and error messages; they all stay in one transaction).
const ELEMENTS_PER_COMMAND: usize = 512;

fn element_commands(
    out: &mut Vec<String>,
    verb: &str,
    fam: TableFamily,
    map: &str,
    items: &[(&String, &String)],
    with_values: bool,
) {
    for chunk in items.chunks(ELEMENTS_PER_COMMAND) {
        let mut c = format!("{verb} element {} {TABLE} {map} {{ ", fam.as_str());
        for (i, (k, v)) in chunk.iter().enumerate() {
            if i > 0 {
                c.push_str(", ");
            }
            c.push_str(k);
            if with_values && !v.is_empty() {
                let _ = write!(c, " : {v}");
            }
        }
        c.push_str(" }");
        out.push(c);
    }
}

/// `add map|set|counter|ct helper …` for a declared object.
fn declare(fam: TableFamily, name: &str, m: &MapDef) -> String {
    if m.spec.is_empty() {
        format!("add {} {} {TABLE} {name}", m.kind, fam.as_str())
    } else {
        format!(
            "add {} {} {TABLE} {name} {{ {} }}",
            m.kind,
            fam.as_str(),
            m.spec
        )
    }
}

/// The tag a rule carries in the kernel (its comment): a hash of the rule's text as we
/// render it. nft prints rules in its own normal form, so the text cannot be compared
/// with a listing; the tag can, and lets start-up and drift checks tell, per chain,
/// whether the kernel holds exactly the rules we wrote, in order (see
/// `crate::kernel::verify`).
pub fn rule_tag(rule: &str) -> String {
    // FNV-1a, 64 bits: stable across builds and Rust versions (the tags outlive us).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rule.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("nftlb:{h:016x}")
}

/// A command without the rule tag [`add_rule`] appends (tests compare rule text).
#[doc(hidden)]
pub fn untagged(cmd: &str) -> &str {
    match cmd.rfind(" comment \"nftlb:") {
        Some(i) if cmd.ends_with('"') => &cmd[..i],
        _ => cmd,
    }
}

/// `add rule …` with the rule's tag as its comment.
fn add_rule(fam: TableFamily, chain: &str, rule: &str) -> String {
    format!(
        "add rule {} {TABLE} {chain} {rule} comment \"{}\"",
        fam.as_str(),
        rule_tag(rule)
    )
}

fn chain_decl(fam: TableFamily, name: &str, chain: &Chain) -> String {
    match &chain.base {
        Some(b) => format!("add chain {} {TABLE} {name} {{ {b} }}", fam.as_str()),
        None => format!("add chain {} {TABLE} {name}", fam.as_str()),
    }
}

/// The transaction that turns `old` into `new`: only what differs is touched.
/// Phases: tables, maps, new chains, changed chain bodies, element deletes, element adds,
/// then removal of chains, maps and tables that are gone (after nothing refers to them).
pub fn plan(old: &Ruleset, new: &Ruleset) -> Transaction {
    let empty = Table::default();
    let mut tx = Transaction::default();
    let c = &mut tx.commands;
    for (fam, nt) in &new.tables {
        let ot = old.tables.get(fam);
        if ot.is_none() {
            c.push(format!("add table {} {TABLE}", fam.as_str()));
        }
        let ot = ot.unwrap_or(&empty);
        for (name, m) in &nt.maps {
            if !ot.maps.contains_key(name) {
                c.push(declare(*fam, name, m));
            }
        }
        for (name, ch) in &nt.chains {
            if !ot.chains.contains_key(name) {
                c.push(chain_decl(*fam, name, ch));
            }
        }
    }
    for (fam, nt) in &new.tables {
        let ot = old.tables.get(fam).unwrap_or(&empty);
        for (name, ch) in &nt.chains {
            let prev = ot.chains.get(name);
            if prev.map(|p| &p.rules) == Some(&ch.rules) {
                continue;
            }
            if prev.is_some_and(|p| !p.rules.is_empty()) {
                c.push(format!("flush chain {} {TABLE} {name}", fam.as_str()));
            }
            for r in &ch.rules {
                c.push(add_rule(*fam, name, r));
            }
        }
    }
    // Element deletes (removed keys and keys whose value changes), then adds.
    for (fam, ot) in &old.tables {
        let nt = new.tables.get(fam).unwrap_or(&empty);
        for (name, om) in &ot.maps {
            let Some(nm) = nt.maps.get(name) else {
                continue;
            };
            let dels: Vec<(&String, &String)> = om
                .elements
                .iter()
                .filter(|(k, v)| nm.elements.get(*k) != Some(*v))
                .collect();
            element_commands(c, "delete", *fam, name, &dels, false);
        }
    }
    for (fam, nt) in &new.tables {
        let ot = old.tables.get(fam).unwrap_or(&empty);
        for (name, nm) in &nt.maps {
            let om = ot.maps.get(name);
            let adds: Vec<(&String, &String)> = nm
                .elements
                .iter()
                .filter(|(k, v)| om.and_then(|m| m.elements.get(*k)) != Some(*v))
                .collect();
            element_commands(c, "add", *fam, name, &adds, true);
        }
    }
    for (fam, ot) in &old.tables {
        let nt = new.tables.get(fam);
        if nt.is_none() {
            c.push(format!("delete table {} {TABLE}", fam.as_str()));
            continue;
        }
        let nt = nt.unwrap_or(&empty);
        // Removed objects: first empty the removed chains (dropping their references to
        // maps and other chains), then delete removed maps (a verdict map may point at a
        // removed chain), then the chains themselves.
        let gone: Vec<(&String, &Chain)> = ot
            .chains
            .iter()
            .filter(|(name, _)| !nt.chains.contains_key(*name))
            .collect();
        for (name, ch) in &gone {
            if !ch.rules.is_empty() {
                c.push(format!("flush chain {} {TABLE} {name}", fam.as_str()));
            }
        }
        for (name, m) in &ot.maps {
            if !nt.maps.contains_key(name) {
                c.push(format!("delete {} {} {TABLE} {name}", m.kind, fam.as_str()));
            }
        }
        for (name, _) in &gone {
            c.push(format!("delete chain {} {TABLE} {name}", fam.as_str()));
        }
    }
    tx
}

/// What a kernel listing of one table holds: chain names and (kind, name) of maps/sets.
pub type Listing = (Vec<String>, Vec<(String, String)>);

/// Names of chains and maps found in a kernel listing of one of our tables
/// (`nft -t list table …` text), used at start-up to find leftovers.
pub fn parse_listing(text: &str) -> Listing {
    let mut chains = Vec::new();
    let mut maps = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        let mut words = t.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("chain"), Some(name), Some("{"), _) => chains.push(name.to_string()),
            (Some(kind @ ("map" | "set" | "counter")), Some(name), Some("{"), _) => {
                maps.push((kind.to_string(), name.to_string()))
            }
            (Some("ct"), Some("helper"), Some(name), Some("{")) => {
                maps.push(("ct helper".to_string(), name.to_string()))
            }
            _ => {}
        }
    }
    (chains, maps)
}

/// A transaction that makes the kernel hold exactly `desired`, whatever state our
/// tables are in (start-up and recovery). It never deletes a table: existing objects
/// are re-declared (a no-op when they match), chains and maps are flushed and refilled in
/// the same transaction, and leftovers listed in `present` are removed.
pub fn resync(desired: &Ruleset, present: &BTreeMap<TableFamily, Listing>) -> Transaction {
    let mut tx = Transaction::default();
    let c = &mut tx.commands;
    // Our tables that are no longer wanted at all.
    for fam in present.keys() {
        if !desired.tables.contains_key(fam) {
            c.push(format!("delete table {} {TABLE}", fam.as_str()));
        }
    }
    for (fam, t) in &desired.tables {
        let f = fam.as_str();
        c.push(format!("add table {f} {TABLE}"));
        for (name, m) in &t.maps {
            c.push(declare(*fam, name, m));
            if !m.dynamic {
                c.push(format!("flush {} {f} {TABLE} {name}", m.kind));
            }
        }
        for (name, ch) in &t.chains {
            c.push(chain_decl(*fam, name, ch));
            c.push(format!("flush chain {f} {TABLE} {name}"));
        }
        if let Some((chains, _)) = present.get(fam) {
            for name in chains {
                if !t.chains.contains_key(name) {
                    c.push(format!("flush chain {f} {TABLE} {name}"));
                }
            }
        }
        for (name, ch) in &t.chains {
            for r in &ch.rules {
                c.push(add_rule(*fam, name, r));
            }
        }
        for (name, m) in &t.maps {
            let items: Vec<(&String, &String)> = m.elements.iter().collect();
            element_commands(c, "add", *fam, name, &items, true);
        }
        if let Some((chains, maps)) = present.get(fam) {
            for name in chains {
                if !t.chains.contains_key(name) {
                    c.push(format!("delete chain {f} {TABLE} {name}"));
                }
            }
            for (kind, name) in maps {
                if !t.maps.contains_key(name) {
                    c.push(format!("delete {kind} {f} {TABLE} {name}"));
                }
            }
        }
    }
    tx
}

/// What differs between the ruleset we want and what the kernel holds, object by object
/// (see [`crate::kernel::verify`]); [`repair`] turns it into one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Our tables that are missing.
    pub tables_missing: Vec<TableFamily>,
    /// Our tables that are there though not wanted.
    pub tables_extra: Vec<TableFamily>,
    /// Chains missing, or whose rules are not ours in our order: rewritten.
    pub chains: Vec<(TableFamily, String)>,
    /// Chains not wanted: emptied, then removed.
    pub extra_chains: Vec<(TableFamily, String)>,
    /// Sets, maps and objects missing, or sets and maps whose elements differ: declared
    /// and refilled.
    pub sets: Vec<(TableFamily, String)>,
    /// Sets, maps and objects not wanted: (family, kind, name), removed.
    pub extra_objects: Vec<(TableFamily, String, String)>,
}

impl Drift {
    /// Whether the kernel holds exactly what we want.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// How many objects differ.
    pub fn count(&self) -> usize {
        self.tables_missing.len()
            + self.tables_extra.len()
            + self.chains.len()
            + self.extra_chains.len()
            + self.sets.len()
            + self.extra_objects.len()
    }
}

impl std::fmt::Display for Drift {
    /// A one-line summary for the log (the first few objects of each kind).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn list<T>(
            f: &mut std::fmt::Formatter<'_>,
            what: &str,
            items: &[T],
            show: impl Fn(&T) -> String,
        ) -> std::fmt::Result {
            if items.is_empty() {
                return Ok(());
            }
            let mut names: Vec<String> = items.iter().take(5).map(show).collect();
            if items.len() > 5 {
                names.push(format!("and {} more", items.len() - 5));
            }
            write!(f, "{what}: {}; ", names.join(", "))
        }
        let fam = |t: &TableFamily| format!("table {} {TABLE}", t.as_str());
        let named = |(t, n): &(TableFamily, String)| format!("{} {n}", t.as_str());
        list(f, "tables missing", &self.tables_missing, fam)?;
        list(f, "tables not ours to keep", &self.tables_extra, fam)?;
        list(f, "chains missing or changed", &self.chains, named)?;
        list(f, "chains not wanted", &self.extra_chains, named)?;
        list(
            f,
            "sets, maps or objects missing or changed",
            &self.sets,
            named,
        )?;
        list(f, "objects not wanted", &self.extra_objects, |(t, k, n)| {
            format!("{k} {} {n}", t.as_str())
        })
    }
}

/// One transaction that brings the objects named in `drift` to what `desired` holds and
/// leaves every other object alone (dynamic sets keep their elements unless they are
/// missing).
pub fn repair(desired: &Ruleset, drift: &Drift) -> Transaction {
    let mut tx = Transaction::default();
    let c = &mut tx.commands;
    let empty = Table::default();
    let table = |fam: &TableFamily| desired.tables.get(fam).unwrap_or(&empty);
    for fam in &drift.tables_extra {
        c.push(format!("delete table {} {TABLE}", fam.as_str()));
    }
    for fam in &drift.tables_missing {
        c.push(format!("add table {} {TABLE}", fam.as_str()));
    }
    for (fam, name) in &drift.sets {
        if let Some(m) = table(fam).maps.get(name) {
            c.push(declare(*fam, name, m));
        }
    }
    for (fam, name) in &drift.chains {
        if let Some(ch) = table(fam).chains.get(name) {
            c.push(chain_decl(*fam, name, ch));
        }
    }
    for (fam, name) in &drift.chains {
        if let Some(ch) = table(fam).chains.get(name) {
            c.push(format!("flush chain {} {TABLE} {name}", fam.as_str()));
            for r in &ch.rules {
                c.push(add_rule(*fam, name, r));
            }
        }
    }
    for (fam, name) in &drift.extra_chains {
        c.push(format!("flush chain {} {TABLE} {name}", fam.as_str()));
    }
    for (fam, name) in &drift.sets {
        let Some(m) = table(fam).maps.get(name) else {
            continue;
        };
        if matches!(m.kind, "map" | "set") && !m.dynamic {
            c.push(format!("flush {} {} {TABLE} {name}", m.kind, fam.as_str()));
            let items: Vec<(&String, &String)> = m.elements.iter().collect();
            element_commands(c, "add", *fam, name, &items, true);
        }
    }
    for (fam, kind, name) in &drift.extra_objects {
        c.push(format!("delete {kind} {} {TABLE} {name}", fam.as_str()));
    }
    for (fam, name) in &drift.extra_chains {
        c.push(format!("delete chain {} {TABLE} {name}", fam.as_str()));
    }
    tx
}

/// A transaction cut in three (see [`split`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    /// Commands that only create objects (tables, maps, sets, chains with their rules,
    /// counters, ct helpers).
    pub create: Vec<String>,
    /// The element commands.
    pub elements: Vec<String>,
    /// Commands that only empty or remove objects.
    pub remove: Vec<String>,
    /// Removes what `create` made (to run if the elements are refused).
    pub undo_create: Vec<String>,
}

/// Cuts a transaction into objects created, then elements, then objects removed, so that
/// the elements (nearly all of a large transaction) can go to the kernel in their own
/// batch. Applied in that order it is safe for packets: created objects are not reachable
/// until elements point at them, and removed ones no longer are. `None` when the
/// transaction has another shape: a change to an existing chain, or (unless
/// `allow_base`, for a start with none of our tables present) a new base chain, which
/// would see packets before its maps are filled.
pub fn split(tx: &Transaction, allow_base: bool) -> Option<Split> {
    let is_elem = |c: &str| c.starts_with("add element ") || c.starts_with("delete element ");
    let first = tx.commands.iter().position(|c| is_elem(c))?;
    let last = tx.commands.iter().rposition(|c| is_elem(c))?;
    let (create, rest) = tx.commands.split_at(first);
    let (elements, remove) = rest.split_at(last - first + 1);
    if !elements.iter().all(|c| is_elem(c)) {
        return None;
    }
    let removal = [
        "flush chain ",
        "delete chain ",
        "delete map ",
        "delete set ",
        "delete counter ",
        "delete ct helper ",
        "delete table ",
    ];
    if !remove
        .iter()
        .all(|c| removal.iter().any(|p| c.starts_with(p)))
    {
        return None;
    }
    // What `create` makes, by family: tables, chains, other objects (kind, name).
    let mut tables: Vec<&str> = Vec::new();
    let mut chains: Vec<(&str, &str)> = Vec::new();
    let mut objects: Vec<(&str, &str, &str)> = Vec::new();
    for c in create {
        let w: Vec<&str> = c.split_whitespace().collect();
        match w.as_slice() {
            ["add", "table", fam, t] if *t == TABLE => tables.push(fam),
            ["add", "chain", fam, t, name, rest @ ..] if *t == TABLE => {
                if !rest.is_empty() && !allow_base {
                    return None;
                }
                chains.push((fam, name));
            }
            ["add", "rule", fam, t, name, ..] if *t == TABLE => {
                if !chains.contains(&(fam, name)) {
                    return None;
                }
            }
            ["add", kind @ ("map" | "set" | "counter"), fam, t, name, ..] if *t == TABLE => {
                objects.push((kind, fam, name))
            }
            ["add", "ct", "helper", fam, t, name, ..] if *t == TABLE => {
                objects.push(("ct helper", fam, name))
            }
            _ => return None,
        }
    }
    let mut undo = Vec::new();
    let outside = |fam: &str| !tables.contains(&fam);
    for (fam, name) in chains.iter().filter(|(f, _)| outside(f)) {
        undo.push(format!("flush chain {fam} {TABLE} {name}"));
    }
    for (kind, fam, name) in objects.iter().filter(|(_, f, _)| outside(f)) {
        undo.push(format!("delete {kind} {fam} {TABLE} {name}"));
    }
    for (fam, name) in chains.iter().filter(|(f, _)| outside(f)) {
        undo.push(format!("delete chain {fam} {TABLE} {name}"));
    }
    for fam in &tables {
        undo.push(format!("delete table {fam} {TABLE}"));
    }
    Some(Split {
        create: create.to_vec(),
        elements: elements.to_vec(),
        remove: remove.to_vec(),
        undo_create: undo,
    })
}

/// Maps whose elements make a flow reach a farm (services and their intra-connect
/// copies; plain farms' block offsets): filled last when additions are cut into batches.
const ENTRY_MAPS: [&str; 3] = ["svc", "osvc", "off"];

/// Cuts element additions (a large load) into batches of at most `per_batch` commands,
/// each to be its own kernel transaction: a set that grows by millions of elements in one
/// transaction cannot be rehashed until the transaction ends (the kernel's rehash worker
/// waits), and every insert takes the slow path. The batches are ordered so that a flow
/// can reach a farm only once everything the farm uses is in place: other maps first,
/// then the entry maps (`ENTRY_MAPS`), then the generation stamp (`gen`), so that a load
/// cut short never claims to be complete. Other element commands (not a load, see
/// [`is_load`]) stay one batch.
pub fn into_batches(elements: Vec<String>, per_batch: usize) -> Vec<Vec<String>> {
    if !is_load(&elements, per_batch) {
        return vec![elements];
    }
    let rank = |c: &String| {
        let map = element_map(c);
        if map == "gen" {
            2
        } else if ENTRY_MAPS.iter().any(|p| map.starts_with(p)) {
            1
        } else {
            0
        }
    };
    let mut ordered = elements;
    ordered.sort_by_key(|c| rank(c));
    let mut out = Vec::with_capacity(ordered.len().div_ceil(per_batch));
    let mut it = ordered.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(per_batch).collect());
    }
    out
}

/// Whether element commands are a load to cut into batches (see [`into_batches`]):
/// more than one batch, and additions only (but for the stamp, which is replaced).
pub fn is_load(elements: &[String], per_batch: usize) -> bool {
    elements.len() > per_batch.max(1)
        && elements.iter().all(|c| {
            c.starts_with("add element ")
                || (c.starts_with("delete element ") && element_map(c) == "gen")
        })
}

/// The map (or set) an element command is about.
fn element_map(c: &str) -> &str {
    c.split_whitespace().nth(4).unwrap_or_default()
}

/// The deletions that take back element additions (keys only, as nft sends them).
pub fn undo_additions(adds: &[String]) -> Vec<String> {
    adds.iter()
        .filter(|c| c.starts_with("add element "))
        .filter_map(|c| {
            let open = c.find('{')?;
            let head = c[..open].strip_prefix("add ")?;
            let body = c[open + 1..].trim_end().strip_suffix('}')?;
            let keys: Vec<&str> = body
                .split(',')
                .map(|e| e.split(" : ").next().unwrap_or_default().trim())
                .collect();
            Some(format!("delete {head}{{ {} }}", keys.join(", ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(elems: &[(&str, &str)], rules: &[&str]) -> Ruleset {
        let mut t = Table::default();
        t.maps.insert(
            "m".into(),
            MapDef {
                kind: "map",
                spec: "type ipv4_addr : ipv4_addr;".into(),
                dynamic: false,
                elements: elems
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        );
        t.chains.insert(
            "c".into(),
            Chain {
                base: None,
                rules: rules.iter().map(|r| r.to_string()).collect(),
            },
        );
        let mut r = Ruleset::default();
        r.tables.insert(TableFamily::Ip, t);
        r
    }

    #[test]
    fn plan_touches_only_what_changed() {
        let a = rs(&[("1.1.1.1", "2.2.2.2"), ("3.3.3.3", "4.4.4.4")], &["drop"]);
        let b = rs(&[("1.1.1.1", "2.2.2.9"), ("3.3.3.3", "4.4.4.4")], &["drop"]);
        assert_eq!(
            plan(&a, &b).commands,
            vec![
                "delete element ip nftlb m { 1.1.1.1 }",
                "add element ip nftlb m { 1.1.1.1 : 2.2.2.9 }"
            ]
        );
        assert!(plan(&a, &a).is_empty());
    }

    #[test]
    fn plan_from_empty_creates_in_dependency_order() {
        let b = rs(&[("1.1.1.1", "2.2.2.2")], &["drop"]);
        assert_eq!(
            plan(&Ruleset::default(), &b)
                .commands
                .iter()
                .map(|c| untagged(c))
                .collect::<Vec<_>>(),
            vec![
                "add table ip nftlb",
                "add map ip nftlb m { type ipv4_addr : ipv4_addr; }",
                "add chain ip nftlb c",
                "add rule ip nftlb c drop",
                "add element ip nftlb m { 1.1.1.1 : 2.2.2.2 }",
            ]
        );
        assert_eq!(
            plan(&b, &Ruleset::default()).commands,
            vec!["delete table ip nftlb"]
        );
    }

    #[test]
    fn additions_are_batched_with_entries_and_the_stamp_last() {
        let cmds: Vec<String> = [
            "add element ip nftlb svcx { tcp . 198.18.0.1 . 80 : goto farm-a }",
            "add element ip nftlb gen { 0x00000002 }",
            "add element ip nftlb fbuckets { 0x00000010 . 0 : 0x00000010, 0x00000010 . 1 : 0x00000011 }",
            "add element ip6 nftlb offx { tcp . 2001:2::1 . 80 : 0x00000020 }",
            "add element ip nftlb bk { 0x00000010 : 198.18.1.1 . 80 }",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            into_batches(cmds.clone(), 5),
            vec![cmds.clone()],
            "fits in one batch"
        );
        let mut with_delete = cmds.clone();
        with_delete.push("delete element ip nftlb bk { 0x00000011 }".into());
        assert_eq!(
            into_batches(with_delete.clone(), 2),
            vec![with_delete],
            "not only additions"
        );
        // The stamp is replaced (deleted, then added) in the last batch.
        let mut cmds = cmds;
        cmds.insert(0, "delete element ip nftlb gen { 0x00000001 }".into());
        let b = into_batches(cmds.clone(), 2);
        assert_eq!(b.last().unwrap(), &vec![cmds[0].clone(), cmds[2].clone()]);
        cmds.remove(0);
        let b = into_batches(cmds.clone(), 2);
        assert_eq!(
            b,
            vec![
                vec![cmds[2].clone(), cmds[4].clone()],
                vec![cmds[0].clone(), cmds[3].clone()],
                vec![cmds[1].clone()],
            ]
        );
        assert_eq!(
            undo_additions(&b[0]),
            vec![
                "delete element ip nftlb fbuckets { 0x00000010 . 0, 0x00000010 . 1 }",
                "delete element ip nftlb bk { 0x00000010 }",
            ]
        );
        assert_eq!(
            undo_additions(&b[1])[1],
            "delete element ip6 nftlb offx { tcp . 2001:2::1 . 80 }"
        );
    }

    #[test]
    fn split_cuts_creation_elements_and_removal() {
        let tx = |c: &[&str]| Transaction {
            commands: c.iter().map(|s| s.to_string()).collect(),
        };
        let t = tx(&[
            "add map ip nftlb ps-a { type ipv4_addr : mark; }",
            "add chain ip nftlb lb-x-rnd-16",
            "add rule ip nftlb lb-x-rnd-16 goto pick",
            "add element ip nftlb svcx { tcp . 198.18.0.1 . 80 : goto lb-x-rnd-16 }",
            "delete element ip nftlb bk { 0x10 }",
            "flush chain ip nftlb farm-old",
            "delete chain ip nftlb farm-old",
        ]);
        let s = split(&t, false).unwrap();
        assert_eq!(s.create.len(), 3);
        assert_eq!(s.elements.len(), 2);
        assert_eq!(s.remove.len(), 2);
        assert_eq!(
            s.undo_create,
            vec![
                "flush chain ip nftlb lb-x-rnd-16",
                "delete map ip nftlb ps-a",
                "delete chain ip nftlb lb-x-rnd-16"
            ]
        );
        // A change to an existing chain is not cut (packets would see it early).
        assert!(split(
            &tx(&[
                "flush chain ip nftlb farm-a",
                "add rule ip nftlb farm-a drop",
                "add element ip nftlb bk { 0x10 : 198.18.1.1 . 80 }"
            ]),
            false
        )
        .is_none());
        assert!(split(
            &tx(&[
                "add rule ip nftlb farm-a drop",
                "add element ip nftlb bk { 0x10 : 198.18.1.1 . 80 }"
            ]),
            false
        )
        .is_none());
        // A new base chain only on a fresh start; its table goes on undo.
        let fresh = tx(&[
            "add table ip nftlb",
            "add chain ip nftlb prerouting { type nat hook prerouting priority dstnat; policy accept; }",
            "add element ip nftlb gen { 0x1 }",
        ]);
        assert!(split(&fresh, false).is_none());
        assert_eq!(
            split(&fresh, true).unwrap().undo_create,
            vec!["delete table ip nftlb"]
        );
        // Elements must be one run; removals only after them.
        assert!(split(
            &tx(&[
                "add element ip nftlb gen { 0x1 }",
                "add chain ip nftlb c",
                "delete element ip nftlb gen { 0x2 }"
            ]),
            false
        )
        .is_none());
        assert!(split(&tx(&["add chain ip nftlb c"]), false).is_none());
    }

    #[test]
    fn listing_names_are_found() {
        let text =
            "table ip nftlb {\n\tmap svc {\n\t\ttype x\n\t}\n\tchain farm-a {\n\t\tdrop\n\t}\n}\n";
        let (c, m) = parse_listing(text);
        assert_eq!(c, vec!["farm-a"]);
        assert_eq!(m, vec![("map".to_string(), "svc".to_string())]);
    }
}
