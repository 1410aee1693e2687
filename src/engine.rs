//! The single writer: owns the desired state, the ruleset the kernel holds, the kernel
//! handle and the store. Every request is validated in full, rendered, planned and
//! applied as one nftables transaction, then persisted; if any step fails the state,
//! the kernel and the file stay as they were.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::document::{self, ApplyMode, DocError, ParseConfig, TextError, View};
use crate::kernel::{netlink, verify};
use crate::kernel::{Capabilities, Kernel, KernelError};
use crate::model::*;
use crate::netinfo;
use crate::read::{self, Reads, Snapshot};
use crate::render::{
    bucket_space, filter, id_base, merge_owned, render_base, render_fragment, skeleton,
    RenderConfig, Slots, PLAIN_PREFIX,
};
use crate::ruleset::{
    into_batches, is_load, parse_listing, plan, resync, split, undo_additions, Ruleset,
    TableFamily, TABLE,
};
use crate::store::Store;

/// An API request as the engine sees it.
#[derive(Debug, Clone)]
pub struct Request {
    /// HTTP method, upper case.
    pub method: String,
    /// The path, e.g. `/farms/lb01/backends/b1`.
    pub path: String,
    /// The body (may be empty).
    pub body: Vec<u8>,
}

/// The answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// JSON text.
    pub body: String,
}

impl Reply {
    pub(crate) fn message(status: u16, msg: &str) -> Self {
        Reply {
            status,
            body: format!(
                "{{\"response\": {}}}",
                serde_json::to_string(msg).expect("strings serialise")
            ),
        }
    }
    fn ok(notes: &[String]) -> Self {
        let mut msg = "success".to_string();
        for n in notes {
            msg.push_str(". ");
            msg.push_str(n);
        }
        Self::message(200, &msg)
    }
}

/// Why a change was refused, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// HTTP status.
    pub status: u16,
    /// The `response` text.
    pub message: String,
}

impl Failure {
    fn new(status: u16, base: &str, detail: impl std::fmt::Display) -> Self {
        Failure {
            status,
            message: format!("{base}. {detail}"),
        }
    }
    fn reply(&self) -> Reply {
        Reply::message(self.status, &self.message)
    }
}

fn doc_failure(base: &str, e: DocError) -> Failure {
    match e {
        DocError::Invalid(m) => Failure::new(400, base, m),
        DocError::Unknown(m) => Failure::new(404, "the object to modify is unknown", m),
    }
}

/// Settings of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// The masquerade mark (`-m`).
    pub masquerade_mark: u32,
}

/// The single writer.
pub struct Engine {
    state: State,
    slots: Slots,
    kernel: Box<dyn Kernel>,
    store: Option<Store>,
    cfg: EngineConfig,
    fallbacks: u64,
    fragments: Fragments,
    caps: Option<Capabilities>,
    /// The network facts of the last render (for GET: unresolvable ingress backends).
    net: Arc<netinfo::NetView>,
    /// The notes of the last render, to log only what changes.
    last_notes: Vec<(String, String)>,
    /// Sequence number of the last saved change (snapshot or journal entry).
    seq: u64,
    /// Bytes in the journal since the last snapshot, and the snapshot's size.
    journal_bytes: usize,
    snapshot_bytes: usize,
    /// Each farm's part of `ruleset`, with the farm it was rendered from, so that a change
    /// re-renders and plans only the farms it touched.
    /// Whether `ruleset` was rendered (after start), so that changes can be incremental.
    rendered: bool,
    /// Indexes over `state`, so that a change is checked from the names it touched.
    ix: Indexes,
    /// Transactions applied over netlink.
    netlink_txs: u64,
    /// Changes committed as policy elements only.
    policy_element_commits: u64,
    /// Most element commands per kernel transaction when a large load is cut into
    /// several (see [`into_batches`]).
    element_batch_commands: usize,
    /// How many farms use each chain shared by plain farms.
    shared_refs: SharedRefs,
    /// Repairs of kernel drift (see [`Engine::repairs`]).
    repairs: u64,
    /// Where the committed state is published for GETs (see [`crate::read`]).
    reads: Reads,
}

/// Indexes over the committed state that let a change be validated and rendered from
/// the names it touched alone.
#[derive(Default)]
struct Indexes {
    /// Which farm claims each service.
    services: ServiceIndex,
    /// Address name → the farms that use it (persistent: published to readers).
    users: imbl::HashMap<String, imbl::OrdSet<String>>,
    /// Policy name → the farms it is attached to.
    policy_users: HashMap<String, BTreeSet<String>>,
    /// Farms whose rules depend on the live network.
    ingress: HashSet<String>,
}

impl Indexes {
    fn of(st: &State) -> Self {
        let mut ix = Indexes {
            services: ServiceIndex::of(st),
            ..Default::default()
        };
        for f in st.farms.values() {
            ix.add_refs(f);
        }
        ix
    }

    fn add_refs(&mut self, f: &Farm) {
        for a in &f.addresses {
            self.users
                .entry(a.clone())
                .or_default()
                .insert(f.name.clone());
        }
        for p in &f.policies {
            self.policy_users
                .entry(p.clone())
                .or_default()
                .insert(f.name.clone());
        }
        if netinfo::farm_needs(f) {
            self.ingress.insert(f.name.clone());
        }
    }

    fn remove_refs(&mut self, f: &Farm) {
        for a in &f.addresses {
            if let Some(u) = self.users.get_mut(a) {
                u.remove(&f.name);
                if u.is_empty() {
                    self.users.remove(a);
                }
            }
        }
        for p in &f.policies {
            if let Some(u) = self.policy_users.get_mut(p) {
                u.remove(&f.name);
                if u.is_empty() {
                    self.policy_users.remove(p);
                }
            }
        }
        self.ingress.remove(&f.name);
    }

    /// Moves the indexes from `old` to `next` for the farms named.
    fn update(&mut self, old: &State, next: &State, farms: &[String]) {
        for n in farms {
            self.services.remove_farm(old, n);
            if let Some(f) = old.farms.get(n) {
                self.remove_refs(f);
            }
        }
        for n in farms {
            if let Some(f) = next.farms.get(n) {
                self.services.add_farm(next, f);
                self.add_refs(f);
            }
        }
    }
}

/// What a request changed, read from the tables' change logs: the names whose object was
/// added, replaced by a different value, or removed.
#[derive(Debug, Default)]
struct Changes {
    farms: Vec<String>,
    policies: Vec<String>,
    addresses: Vec<String>,
    /// An object was renamed or moved (a journal entry cannot say that).
    reordered: bool,
}

impl Changes {
    /// Takes the change logs out of `next` and keeps the real changes against `old`.
    fn take(old: &State, next: &mut State) -> Changes {
        fn real<T: PartialEq>(old: &Table<T>, next: &Table<T>, log: Vec<String>) -> Vec<String> {
            log.into_iter()
                .filter(|n| match (old.get(n), next.get(n)) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                    (None, None) => false,
                    _ => true,
                })
                .collect()
        }
        let (f, rf) = next.farms.take_changes();
        let (p, rp) = next.policies.take_changes();
        let (a, ra) = next.addresses.take_changes();
        Changes {
            farms: real(&old.farms, &next.farms, f),
            policies: real(&old.policies, &next.policies, p),
            addresses: real(&old.addresses, &next.addresses, a),
            reordered: rf || rp || ra,
        }
    }

    fn is_empty(&self) -> bool {
        self.farms.is_empty()
            && self.policies.is_empty()
            && self.addresses.is_empty()
            && !self.reordered
    }
}

/// The element changes of one policy (see [`Engine::policy_element_deltas`]).
struct PolicyDelta {
    name: String,
    /// Elements gone (their data).
    removed: Vec<String>,
    /// Elements new (their data).
    added: Vec<String>,
    /// Elements new or changed (stored fields only), in the policy's order.
    set: Vec<Element>,
}

/// Element commands (of up to 512 elements each) per kernel transaction when a large
/// load is cut into several: about 16k elements. Measured at 100,000 farms of 8
/// backends (2.6 M elements): 7.4 s of kernel time in one transaction, 3.8 s in batches
/// of 4k to 64k elements (no clear difference inside that range).
const ELEMENT_BATCH_COMMANDS: usize = 32;

/// A farm's rendered part of the ruleset.
struct Fragment {
    /// The chains shared with other plain farms that the farm uses, with their rules.
    shared: Vec<((TableFamily, String), crate::ruleset::Chain)>,
}

impl Fragment {
    /// Notes a rendered fragment's shared chains and moves the rest into `into`.
    fn merge(rules: Ruleset, into: &mut Ruleset) -> Fragment {
        let shared = rules
            .tables
            .iter()
            .flat_map(|(fam, t)| {
                t.chains
                    .iter()
                    .filter(|(n, _)| {
                        n.starts_with(PLAIN_PREFIX) && !crate::render::is_skeleton_chain(n)
                    })
                    .map(move |(n, c)| ((*fam, n.clone()), c.clone()))
            })
            .collect();
        merge_owned(into, rules);
        Fragment { shared }
    }
}

/// Serialised state-file pieces of the current state, so that saving after a change
/// re-serialises only the objects that changed.
#[derive(Debug, Clone, Default)]
struct Fragments {
    farms: HashMap<String, Arc<str>>,
    addresses: HashMap<String, Arc<str>>,
    policies: HashMap<String, Arc<str>>,
}

impl Engine {
    /// An engine with an empty state; call [`Engine::start`] before serving.
    pub fn new(kernel: Box<dyn Kernel>, store: Option<Store>, cfg: EngineConfig) -> Self {
        let reads = Reads::new(
            Snapshot {
                state: State::default(),
                slots: Slots::default(),
                users: Default::default(),
                net: Default::default(),
                cfg: RenderConfig {
                    masquerade_mark: cfg.masquerade_mark,
                },
            },
            kernel.live(),
        );
        Engine {
            state: State::default(),
            slots: Slots::default(),
            kernel,
            store,
            cfg,
            fallbacks: 0,
            fragments: Fragments::default(),
            caps: None,
            net: Default::default(),
            last_notes: Vec::new(),
            seq: 0,
            journal_bytes: 0,
            snapshot_bytes: 0,
            rendered: false,
            ix: Indexes::default(),
            netlink_txs: 0,
            policy_element_commits: 0,
            element_batch_commands: ELEMENT_BATCH_COMMANDS,
            shared_refs: HashMap::new(),
            repairs: 0,
            reads,
        }
    }

    /// How many incremental transactions the kernel refused so that a full
    /// resynchronisation had to stand in (should stay 0; tests check it).
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    fn parse_cfg(&self) -> ParseConfig {
        ParseConfig {
            masquerade_mark: self.cfg.masquerade_mark,
            stored: false,
        }
    }

    fn render_cfg(&self) -> RenderConfig {
        RenderConfig {
            masquerade_mark: self.cfg.masquerade_mark,
        }
    }

    /// The current desired state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// What the state file holds for the current state (state document and slots).
    pub fn saved(&self) -> Value {
        saved_form(&self.state, &self.slots)
    }

    /// Loads the saved state (unless `use_store` is false) and `config` on top, then
    /// brings the kernel to it in one transaction without deleting our tables, so that
    /// established connections and dynamic maps survive a restart.
    pub fn start(&mut self, config: Option<&[u8]>, use_store: bool) -> Result<(), String> {
        let started = Instant::now();

        let mut st = State::default();
        let mut slots = Slots::default();
        let pcfg = self.parse_cfg();
        // The state file was validated when it was written (see ParseConfig::stored).
        let stored_cfg = ParseConfig {
            stored: true,
            ..pcfg
        };
        if use_store {
            if let Some(store) = &self.store {
                for done in store.recover()? {
                    tracing::warn!("{done}");
                }
                if let Some(text) = store.load_text()? {
                    let at = |e: String| format!("state file {}: {e}", store.path().display());
                    let (doc, saved_slots, seq) = split_saved(&text).map_err(at)?;
                    document::apply_document_text(&mut st, doc, &ApplyMode::Upsert, &stored_cfg)
                        .map_err(|e| at(text_error(e)))?;
                    slots = saved_slots;
                    self.seq = seq;
                    self.snapshot_bytes = std::fs::metadata(store.path())
                        .map(|m| m.len() as usize)
                        .unwrap_or(0);
                }
                let journal = store.load_journal()?;
                for entry in journal {
                    let seq = entry.get("seq").and_then(Value::as_u64).unwrap_or(0);
                    if seq <= self.seq {
                        continue;
                    }
                    replay(&mut st, &mut slots, &entry, &stored_cfg).map_err(|e| {
                        format!(
                            "journal {} entry {seq}: {e}",
                            store.journal_path().display()
                        )
                    })?;
                    self.seq = seq;
                    self.journal_bytes += entry.to_string().len();
                }
            }
        }
        let t_load = started.elapsed();
        if let Some(text) = config {
            document::apply_document_text(&mut st, text, &ApplyMode::Upsert, &pcfg)
                .map_err(|e| format!("configuration: {}", text_error(e)))?;
        }
        let t_doc = started.elapsed();
        st.validate().map_err(|e| format!("configuration: {e}"))?;
        self.check_capabilities(&st.farms.values().collect::<Vec<_>>())
            .map_err(|e| format!("configuration: {e}"))?;
        slots
            .sync(&st, bucket_space(self.cfg.masquerade_mark))
            .map_err(|e| format!("configuration: {e}"))?;
        let net = netinfo::gather(&st);
        let t_validate = started.elapsed();
        let (rs, notes, refs) = self.render_full(&st, &slots, &net);
        let t_render = started.elapsed();
        self.shared_refs = refs;
        self.rendered = true;
        for (_, n) in &notes {
            tracing::warn!("{n}");
        }
        self.net = Arc::new(net);
        self.last_notes = notes;
        let mut rs = rs;
        let will_save = use_store && config.is_some() && self.store.is_some();
        let seq = if will_save { self.seq + 1 } else { self.seq };
        stamp(&mut rs, seq);
        // Before anything is written: our tables are ours alone.
        crate::kernel::owner::claim(self.kernel.as_mut()).map_err(|e| e.to_string())?;
        // The kernel already implements this saved state (its generation matches, and no
        // farm depends on the live network): nothing to rewrite.
        let current = self.store.is_some()
            && use_store
            && !will_save
            && self.seq > 0
            && !netinfo::needed(&st)
            && self.kernel_mark("gen") == Some(self.seq as u32)
            && self.kernel_mark("layout") == Some(crate::render::LAYOUT)
            && self.kernel_mark("busy").is_none();
        if current {
            // The markers say nothing is to do; the kernel says whether that is true.
            self.check_and_repair(&rs, "start")?;
        } else {
            self.resync_kernel(&rs)?;
            // The rewrite was cut into several transactions when large: read it back.
            self.check_and_repair(&rs, "start, after rewriting")?;
        }
        let t_kernel = started.elapsed();
        if will_save {
            if let Some(store) = &self.store {
                self.seq = seq;
                let mut form = saved_form(&st, &slots);
                form["seq"] = Value::from(self.seq);
                store.save(&form)?;
                self.journal_bytes = 0;
            }
        }
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            farms = st.farms.len(),
            load_ms = ms(t_load),
            document_ms = ms(t_doc - t_load),
            validate_ms = ms(t_validate - t_doc),
            render_ms = ms(t_render - t_validate),
            kernel_ms = ms(t_kernel - t_render),
            save_ms = ms(started.elapsed() - t_kernel),
            elapsed_ms = ms(started.elapsed()),
            "kernel in sync with the desired state"
        );
        let _ = st.farms.take_changes();
        let _ = st.policies.take_changes();
        let _ = st.addresses.take_changes();
        self.ix = Indexes::of(&st);
        self.state = st;
        self.slots = slots;
        self.publish();
        Ok(())
    }

    /// Renders everything, keeping each farm's fragment for later incremental changes.
    fn render_full(
        &self,
        st: &State,
        slots: &Slots,
        net: &netinfo::NetView,
    ) -> (Ruleset, Vec<(String, String)>, SharedRefs) {
        let cfg = self.render_cfg();
        let (mut rs, mut notes) = render_base(st, slots, net, &cfg);
        let mut refs = SharedRefs::new();
        for farm in st.farms.values() {
            let (rules, n) = render_fragment(st, farm, slots, &cfg);
            count_shared(&mut refs, &Fragment::merge(rules, &mut rs), true);
            notes.extend(n);
        }
        rs.tables.values_mut().for_each(crate::render::link_kinds);
        (rs, notes, refs)
    }

    /// The shared chains the fragments of `dirty` farms use before or after a change, each
    /// with whether any farm uses it before and after (`shared_refs` counts every farm).
    fn shared_chain_changes(
        &self,
        dirty: &[String],
        old_frags: &HashMap<String, Fragment>,
        new_frags: &HashMap<String, Fragment>,
    ) -> BTreeMap<(TableFamily, String), (bool, bool)> {
        let mut delta: BTreeMap<(TableFamily, String), i64> = BTreeMap::new();
        for name in dirty {
            if let Some(f) = old_frags.get(name) {
                for (key, _) in &f.shared {
                    *delta.entry(key.clone()).or_default() -= 1;
                }
            }
            if let Some(f) = new_frags.get(name) {
                for (key, _) in &f.shared {
                    *delta.entry(key.clone()).or_default() += 1;
                }
            }
        }
        delta
            .into_iter()
            .map(|(key, d)| {
                let n = self.shared_refs.get(&key).copied().unwrap_or(0) as i64;
                (key, (n > 0, n + d > 0))
            })
            .collect()
    }

    /// A shared chain's rules, from the fragments of the touched farms (a chain that
    /// appears or goes is in one of them; one that stays needs no command).
    fn shared_chain(
        key: &(TableFamily, String),
        frags: [&HashMap<String, Fragment>; 2],
    ) -> Option<crate::ruleset::Chain> {
        frags
            .iter()
            .flat_map(|m| m.values())
            .flat_map(|f| f.shared.iter())
            .find(|(k, _)| k == key)
            .map(|(_, c)| c.clone())
    }

    /// The ruleset the kernel holds now, rendered again from the committed state (only
    /// failures and whole-state changes need it).
    fn current_ruleset(&self) -> Ruleset {
        let mut rs = self.render_full(&self.state, &self.slots, &self.net).0;
        stamp(&mut rs, self.seq);
        rs
    }

    /// The one element of our set `name` in the kernel, if any.
    fn kernel_mark(&mut self, name: &str) -> Option<u32> {
        let v = self
            .kernel
            .list_json(&format!("list set ip {TABLE} {name}"))
            .ok()?;
        v.get("nftables")?
            .as_array()?
            .iter()
            .find_map(|i| i.pointer("/set/elem/0"))
            .and_then(Value::as_u64)
            .map(|g| g as u32)
    }

    /// Reads our tables back from the kernel and compares them with `rs`; repairs what
    /// differs in one transaction (then reads again: what still differs is rewritten
    /// whole). `why` names the occasion in the log. Backends without netlink (the test
    /// double) cannot be read back: nothing is checked.
    fn check_and_repair(&mut self, rs: &Ruleset, why: &str) -> Result<(), String> {
        self.check_and_repair_with(rs, why, &Suspects::default())
    }

    /// [`Engine::check_and_repair`], with the sets another process changed (seen by the
    /// monitor): those too large to read back (see [`verify::READBACK_LIMIT`]) are
    /// rewritten.
    fn check_and_repair_with(
        &mut self,
        rs: &Ruleset,
        why: &str,
        suspects: &Suspects,
    ) -> Result<(), String> {
        if !self.kernel.has_netlink() {
            return Ok(());
        }
        let t = Instant::now();
        let mut drift = match verify::check(rs) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("cannot read our tables back from the kernel ({e}); rewriting them");
                return self.resync_kernel(rs);
            }
        };
        for (fam, t) in &rs.tables {
            for (name, m) in &t.maps {
                let unread = matches!(m.kind, "set" | "map") && !m.dynamic && !verify::readable(m);
                let key = (*fam, name.clone());
                if unread && suspects.touches(*fam, name) && !drift.sets.contains(&key) {
                    drift.sets.push(key);
                }
            }
        }
        if drift.is_empty() {
            tracing::info!(
                occasion = why,
                seq = self.seq,
                elapsed_ms = t.elapsed().as_millis() as u64,
                "kernel rules verified: they match the desired state"
            );
            return Ok(());
        }
        self.repairs += 1;
        tracing::warn!(
            occasion = why,
            objects = drift.count(),
            "kernel rules differ from the desired state, repairing: {drift}"
        );
        let tx = crate::ruleset::repair(rs, &drift);
        tracing::debug!("repair transaction:\n{}", tx.to_text());
        let repaired = self.kernel.apply(&tx.to_text());
        if repaired.is_ok() && drift.tables_missing.contains(&TableFamily::Ip) {
            // The owner marker went with the table.
            if let Err(e) = crate::kernel::owner::claim(self.kernel.as_mut()) {
                tracing::error!("{e}");
            }
        }
        let left = match repaired {
            Ok(()) => verify::check(rs).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match left {
            Ok(d) if d.is_empty() => {
                tracing::warn!(
                    occasion = why,
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "kernel rules repaired"
                );
                Ok(())
            }
            Ok(d) => {
                tracing::error!(
                    "kernel rules still differ after the repair ({d}); rewriting our tables"
                );
                self.resync_kernel(rs)
            }
            Err(e) => {
                tracing::error!("the repair failed ({e}); rewriting our tables");
                self.resync_kernel(rs)
            }
        }
    }

    /// Checks the kernel against the committed state (after a change the daemon did not
    /// make was seen, see `kernel::monitor`) and repairs it.
    fn verify_committed(&mut self, why: &str, suspects: &Suspects) -> Result<Vec<String>, Failure> {
        let rs = self.current_ruleset();
        self.check_and_repair_with(&rs, why, suspects)
            .map(|()| Vec::new())
            .map_err(|e| Failure::new(500, "cannot repair the kernel rules", e))
    }

    /// How many times the kernel was found to differ from the desired state and was
    /// repaired.
    pub fn repairs(&self) -> u64 {
        self.repairs
    }

    /// Sets or clears the in-progress marker (`set busy` of the ip table) around a change
    /// that takes several kernel transactions: a crash in between leaves it set, and the
    /// next start then rewrites the rules instead of trusting the generation marker.
    fn mark_busy(&mut self, busy: bool) -> Result<(), KernelError> {
        let verb = if busy { "add" } else { "delete" };
        let cmd = vec![format!(
            "{verb} element {} {TABLE} busy {{ 0x1 }}",
            TableFamily::Ip.as_str()
        )];
        if let Some(batch) = netlink::encode(&cmd, |_, _| Some("type mark;".to_string())) {
            if let Some(r) = self.kernel.apply_elements(&batch) {
                return r;
            }
        }
        self.kernel.apply(&format!("{}\n", cmd[0]))
    }

    /// Makes the kernel hold exactly `rs`, whatever our tables contain now.
    fn resync_kernel(&mut self, rs: &Ruleset) -> Result<(), String> {
        let mut present = BTreeMap::new();
        for fam in [TableFamily::Ip, TableFamily::Ip6, TableFamily::Netdev] {
            if let Ok(text) = self
                .kernel
                .list(&format!("list table {} {TABLE}", fam.as_str()))
            {
                present.insert(fam, parse_listing(&text));
            }
        }
        // None of our tables, or only what claiming them created (the owner marker):
        // create everything, then fill the maps over netlink.
        let bare = present.values().all(|(chains, maps)| {
            chains.is_empty() && maps.iter().all(|(_, n)| n == crate::ruleset::OWNER_SET)
        });
        if bare {
            let tx = plan(&Ruleset::default(), rs);
            return self
                .apply_tx(&tx, &[rs], true)
                .map_err(|e| format!("cannot bring the kernel to the desired state: {e}"));
        }
        let tx = resync(rs, &present);
        tracing::debug!("resync transaction:\n{}", tx.to_text());
        match self.kernel.apply(&tx.to_text()) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Typically a map or chain declared differently by another version. Replace
                // our tables in one transaction: no window without rules, but dynamic
                // state in them (none yet besides conntrack, which is kept) starts afresh.
                tracing::warn!("in-place resynchronisation failed ({e}); replacing our tables");
                let mut text = String::new();
                for fam in rs.tables.keys() {
                    text.push_str(&format!(
                        "add table {f} {TABLE}\ndelete table {f} {TABLE}\n",
                        f = fam.as_str()
                    ));
                }
                text.push_str(&plan(&Ruleset::default(), rs).to_text());
                self.kernel.apply(&text).map_err(|e2| {
                    format!("cannot bring the kernel to the desired state: {e}; replacing the tables also failed: {e2}")
                })
            }
        }
    }

    /// Applies one transaction. Element-only transactions (backend changes, most farm
    /// changes) go straight to the kernel over netlink: libnftables would first dump
    /// every chain of the ruleset and parse every element, which costs far more than the
    /// change itself once there are many farms. A transaction that creates objects, sets
    /// elements and removes objects goes as three batches in that order (see
    /// [`split`]); if the elements are refused, the created objects are removed and the
    /// whole transaction is handed to libnftables, for nft's own error message. `specs`
    /// are the rulesets whose declarations the elements' maps are found in; `fresh` says
    /// none of our tables exist yet.
    fn apply_tx(
        &mut self,
        tx: &crate::ruleset::Transaction,
        specs: &[&Ruleset],
        fresh: bool,
    ) -> Result<(), KernelError> {
        let spec_of = |fam: TableFamily, name: &str| {
            specs
                .iter()
                .find_map(|rs| rs.tables.get(&fam)?.maps.get(name))
                .map(|m| m.spec.clone())
        };
        // Element-only: one batch, unless a large load to cut (below).
        let load = is_load(&tx.commands, self.element_batch_commands);
        if let Some(batch) = (!load)
            .then(|| netlink::encode(&tx.commands, spec_of))
            .flatten()
        {
            match self.kernel.apply_elements(&batch) {
                Some(Ok(())) => {
                    self.netlink_txs += 1;
                    return Ok(());
                }
                Some(Err(e)) => {
                    tracing::info!("netlink batch not applied ({e}); using libnftables")
                }
                None => {}
            }
            return self.kernel.apply(&tx.to_text());
        }
        // The elements in one batch, or (a large load) in several, each its own kernel
        // transaction (see `into_batches`), encoded one at a time. The first is encoded
        // before anything is created: a command the encoder does not know sends the
        // whole transaction to libnftables.
        let parts = split(tx, fresh).and_then(|mut p| {
            let chunks = into_batches(std::mem::take(&mut p.elements), self.element_batch_commands);
            let first = netlink::encode(&chunks[0], spec_of)?;
            Some((p, chunks, first))
        });
        let Some((parts, chunks, first)) = parts.filter(|_| self.kernel.has_netlink()) else {
            return self.kernel.apply(&tx.to_text());
        };
        // Several kernel transactions: marked as in progress until the last one is in
        // (a fresh start has no generation marker until its last batch anyway).
        if !fresh {
            self.mark_busy(true)?;
        }
        let r = self.apply_parts(tx, parts, chunks, first, &spec_of);
        if !fresh {
            if let Err(e) = self.mark_busy(false) {
                tracing::warn!("cannot clear the in-progress marker: {e}");
            }
        }
        r
    }

    /// The several transactions of [`Engine::apply_tx`]: created objects, element
    /// batches, removals.
    fn apply_parts(
        &mut self,
        tx: &crate::ruleset::Transaction,
        parts: crate::ruleset::Split,
        chunks: Vec<Vec<String>>,
        first: netlink::ElementBatch,
        spec_of: &impl Fn(TableFamily, &str) -> Option<String>,
    ) -> Result<(), KernelError> {
        let lines = |c: &[String]| c.iter().map(|l| format!("{l}\n")).collect::<String>();
        if !parts.create.is_empty() {
            self.kernel.apply(&lines(&parts.create))?;
        }
        let mut first = Some(first);
        for (i, chunk) in chunks.iter().enumerate() {
            let applied = match first.take().or_else(|| netlink::encode(chunk, spec_of)) {
                Some(batch) => self.kernel.apply_elements(&batch),
                None => None,
            };
            match applied {
                Some(Ok(())) => {}
                other => {
                    if let Some(Err(e)) = other {
                        tracing::info!("netlink batch not applied ({e}); using libnftables");
                    }
                    // Take back the batches already applied, then what was created, and
                    // let libnftables apply (or explain) the whole transaction.
                    if i > 0 {
                        let undo = undo_additions(&chunks[..i].concat());
                        let undone = match netlink::encode(&undo, spec_of) {
                            Some(b) => self.kernel.apply_elements(&b).unwrap_or(Ok(())),
                            None => self.kernel.apply(&lines(&undo)),
                        };
                        if let Err(e) = undone {
                            tracing::warn!("cannot remove the elements just added: {e}");
                        }
                    }
                    if !parts.undo_create.is_empty() {
                        if let Err(e) = self.kernel.apply(&lines(&parts.undo_create)) {
                            tracing::warn!("cannot remove the objects just created: {e}");
                        }
                    }
                    return self.kernel.apply(&tx.to_text());
                }
            }
        }
        self.netlink_txs += 1;
        if !parts.remove.is_empty() {
            // Only unreferenced objects are left to remove; if that fails the caller
            // resynchronises the kernel.
            self.kernel.apply(&lines(&parts.remove))?;
        }
        Ok(())
    }

    /// Sets the most element commands per kernel transaction of a large load (tests).
    #[doc(hidden)]
    pub fn set_element_batch_commands(&mut self, n: usize) {
        self.element_batch_commands = n;
    }

    /// How many changes were policy elements only (see `policy_element_deltas`).
    #[doc(hidden)]
    pub fn policy_element_commits(&self) -> u64 {
        self.policy_element_commits
    }

    /// How many transactions went over the netlink element path.
    pub fn netlink_transactions(&self) -> u64 {
        self.netlink_txs
    }

    /// [`State::validate`] for a change, from the committed state's indexes: only the
    /// farms in `dirty` and the addresses in `addresses` are checked.
    fn validate_changes(
        &self,
        next: &State,
        dirty: &[String],
        dirty_set: &HashSet<&str>,
        addresses: &[String],
    ) -> Result<(), String> {
        let mut local = ServiceIndex::default();
        for name in dirty {
            let Some(farm) = next.farms.get(name) else {
                continue;
            };
            for (key, r, addr) in next.farm_services(farm) {
                self.ix
                    .services
                    .check(key, r, name, addr, |f| !dirty_set.contains(f))?;
                local.check(key, r, name, addr, |_| true)?;
                local.add(key, r, name, addr);
            }
            next.validate_farm(farm)?;
        }
        for a in addresses.iter().filter_map(|a| next.addresses.get(a)) {
            State::validate_address(a)?;
        }
        Ok(())
    }

    /// Refuses settings this kernel cannot provide, naming the key and the value.
    fn check_capabilities(&mut self, farms: &[&Arc<Farm>]) -> Result<(), String> {
        let needs_queue = farms.iter().find(|f| f.queue >= 0);
        let needs_flow = farms.iter().find(|f| f.flow_offload);
        if needs_queue.is_none() && needs_flow.is_none() {
            return Ok(());
        }
        let caps = *self
            .caps
            .get_or_insert_with(|| Capabilities::probe(self.kernel.as_mut()));
        if let (Some(f), false) = (needs_queue, caps.queue) {
            return Err(format!(
                "Invalid value '{}' of key 'queue' in farm '{}': this kernel has no nfqueue support (NFT_QUEUE); use -1",
                f.queue, f.name
            ));
        }
        if let (Some(f), false) = (needs_flow, caps.flowtable) {
            return Err(format!(
                "Invalid value 'on' of key 'flow-offload' in farm '{}': this kernel has no flowtable support (NF_FLOW_TABLE); use off",
                f.name
            ));
        }
        Ok(())
    }

    /// Validates, renders, applies and persists `next`. On failure nothing changes.
    fn commit(&mut self, mut next: State, mut notes: Vec<String>) -> Result<Vec<String>, Failure> {
        let t0 = Instant::now();
        let changes = Changes::take(&self.state, &mut next);
        if let Some(deltas) = self.policy_element_deltas(&next, &changes) {
            match self.commit_policy_elements(next, &deltas) {
                Ok(()) => return Ok(notes),
                // Refused by the kernel: the general path below resynchronises or
                // explains.
                Err(back) => next = *back,
            }
        }
        // Farms this change touches: changed, added or removed, and every user of a
        // changed address or policy.
        let mut dirty: Vec<String> = changes.farms.clone();
        {
            let mut seen: HashSet<&str> = dirty.iter().map(String::as_str).collect();
            let mut extra = Vec::new();
            // A farm renders the policy chains of the addresses it uses: a changed policy
            // touches the users of the addresses that carry it (found by fuzz_api: a
            // policy's new log prefix never reached such a farm's rules).
            let carriers: Vec<&String> = if changes.policies.is_empty() {
                Vec::new()
            } else {
                [&self.state, &next]
                    .into_iter()
                    .flat_map(|st| st.addresses.values())
                    .filter(|a| a.policies.iter().any(|p| changes.policies.contains(p)))
                    .map(|a| &a.name)
                    .collect()
            };
            let users = changes
                .addresses
                .iter()
                .chain(carriers)
                .filter_map(|a| self.ix.users.get(a))
                .flatten()
                .chain(
                    changes
                        .policies
                        .iter()
                        .filter_map(|p| self.ix.policy_users.get(p))
                        .flatten(),
                );
            for u in users {
                if seen.insert(u) {
                    extra.push(u.clone());
                }
            }
            dirty.extend(extra);
        }
        // Farms that depend on the live network are rendered with the whole state;
        // everything else farm by farm, plus the base (policies, standalone addresses)
        // when a policy or an address carrying policies changed.
        let dirty_set: HashSet<&str> = dirty.iter().map(String::as_str).collect();
        let ingress_next = self
            .ix
            .ingress
            .iter()
            .any(|f| !dirty_set.contains(f.as_str()))
            || dirty
                .iter()
                .filter_map(|n| next.farms.get(n))
                .any(|f| netinfo::farm_needs(f));
        let policy_addr = changes.addresses.iter().any(|a| {
            [self.state.addresses.get(a), next.addresses.get(a)]
                .into_iter()
                .flatten()
                .any(|x| !x.policies.is_empty())
        });
        // (A standalone address with policies is filtered in the base while no farm uses
        // it, so a farm taking or leaving one changes the base too.)
        let farm_policy_addr = dirty.iter().any(|n| {
            [self.state.farms.get(n), next.farms.get(n)]
                .into_iter()
                .flatten()
                .flat_map(|f| f.addresses.iter())
                .any(|a| {
                    [self.state.addresses.get(a), next.addresses.get(a)]
                        .into_iter()
                        .flatten()
                        .any(|x| !x.policies.is_empty())
                })
        });
        let base_changed = !changes.policies.is_empty() || policy_addr || farm_policy_addr;
        let incremental =
            self.rendered && !changes.reordered && self.ix.ingress.is_empty() && !ingress_next;
        if incremental {
            self.validate_changes(&next, &dirty, &dirty_set, &changes.addresses)
        } else {
            next.validate()
        }
        .map_err(|e| Failure::new(400, "error parsing buffer", e))?;
        self.check_capabilities(
            &dirty
                .iter()
                .filter_map(|n| next.farms.get(n))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Failure::new(400, "error parsing buffer", e))?;
        // The touched farms' current fragments, rendered again from the current state
        // (cheaper in memory than keeping every farm's fragment).
        let mut old_part = if incremental && base_changed {
            render_base(&self.state, &self.slots, &self.net, &self.render_cfg()).0
        } else {
            skeleton(&self.render_cfg())
        };
        let old_frags: HashMap<String, Fragment> = if incremental {
            let cfg = self.render_cfg();
            dirty
                .iter()
                .filter_map(|n| {
                    let farm = self.state.farms.get(n)?;
                    let (rules, _) = render_fragment(&self.state, farm, &self.slots, &cfg);
                    Some((n.clone(), Fragment::merge(rules, &mut old_part)))
                })
                .collect()
        } else {
            HashMap::new()
        };
        // The allocation is changed in place (taken out of `self` for the duration), with
        // an undo record of the touched farms; the full path works on a copy.
        let space = bucket_space(self.cfg.masquerade_mark);
        let slots_undo = self.slots.checkpoint(dirty.iter());
        let mut slots = if incremental {
            std::mem::take(&mut self.slots)
        } else {
            self.slots.clone()
        };
        let synced = if incremental {
            slots.sync_farms(&next, dirty.iter(), space)
        } else {
            slots.sync(&next, space)
        };
        if let Err(e) = synced {
            if incremental {
                slots_undo.restore(&mut slots);
                self.slots = slots;
            }
            return Err(Failure::new(400, "error parsing buffer", e));
        }
        let unchanged = changes.is_empty()
            && if incremental {
                !slots_undo.changed(&slots)
            } else {
                slots == self.slots
            };
        let next_seq = if self.store.is_some() && !unchanged {
            self.seq + 1
        } else {
            self.seq
        };
        let cfg = self.render_cfg();
        let net = if incremental {
            self.net.clone()
        } else {
            Arc::new(netinfo::gather(&next))
        };
        // (old part, new part) of the ruleset; the new fragments to keep.
        let mut full_refs = None;
        let (mut old_part, mut new_part, new_frags, render_notes) = if incremental {
            let mut new_part = if base_changed {
                render_base(&next, &slots, &net, &cfg).0
            } else {
                skeleton(&cfg)
            };
            let mut new_frags = HashMap::new();
            let mut render_notes = Vec::new();
            for name in &dirty {
                if let Some(farm) = next.farms.get(name) {
                    let (rules, n) = render_fragment(&next, farm, &slots, &cfg);
                    render_notes.extend(n);
                    new_frags.insert(name.clone(), Fragment::merge(rules, &mut new_part));
                }
            }
            let shared = self.shared_chain_changes(&dirty, &old_frags, &new_frags);
            for (key, (before, after)) in &shared {
                // Kept by other farms: no command. Otherwise it appears or goes with the
                // touched farms.
                let chain = (before != after)
                    .then(|| Self::shared_chain(key, [&old_frags, &new_frags]))
                    .flatten();
                set_chain(&mut old_part, key, before.then(|| chain.clone()).flatten());
                set_chain(&mut new_part, key, after.then_some(chain).flatten());
            }
            (old_part, new_part, new_frags, render_notes)
        } else {
            let (rs, render_notes, refs) = self.render_full(&next, &slots, &net);
            full_refs = Some(refs);
            (self.current_ruleset(), rs, HashMap::new(), render_notes)
        };
        stamp(&mut old_part, self.seq);
        stamp(&mut new_part, next_seq);
        // Log what is new (the network can change what can be served), and report to the
        // client only on farms this request changed. (Looked up in sets: a whole-state
        // render has the notes of every farm, several per ingress farm.)
        let last: HashSet<&(String, String)> = self.last_notes.iter().collect();
        for (_, n) in render_notes.iter().filter(|n| !last.contains(n)) {
            tracing::warn!("{n}");
        }
        drop(last);
        notes.extend(
            render_notes
                .iter()
                .filter(|(farm, _)| dirty_set.contains(farm.as_str()))
                .map(|(_, n)| n.clone()),
        );
        let t1 = Instant::now();
        let mut tx = plan(&old_part, &new_part);
        // Persistence entries that point at backends which can no longer carry flows
        // (down, deleted, invalid) go in the same transaction.
        let old_slots = if incremental {
            slots_undo.old_slots()
        } else {
            self.slots.clone()
        };
        tx.commands
            .extend(self.stale_session_deletes(&next, &new_part, &dirty, &old_slots));
        let t2 = Instant::now();
        // The whole new ruleset, built only when needed (a failure, or the full path).
        let whole = |me: &Self| -> Ruleset {
            if !incremental {
                return new_part.clone();
            }
            let mut rs = me.render_full(&next, &slots, &net).0;
            stamp(&mut rs, next_seq);
            rs
        };
        // A large change is saved as a new snapshot; it is serialised and written (not yet
        // installed) on another thread while the kernel applies the change.
        let seq = next_seq;
        let small = self.snapshot_bytes > 0 && dirty.len() <= 1000.max(next.farms.len() / 10);
        let mut prepared = None;
        if !tx.is_empty() {
            tracing::debug!("transaction:\n{}", tx.to_text());
            let early = (!small && !unchanged)
                .then(|| self.store.clone())
                .flatten()
                .map(|store| {
                    (
                        store,
                        self.state.clone(),
                        std::mem::take(&mut self.fragments),
                    )
                });
            let (applied, pre) = std::thread::scope(|sc| {
                let (next, slots) = (&next, &slots);
                let writer = early.map(|(store, old, frags)| {
                    sc.spawn(move || {
                        let written =
                            store.prepare_with(|w| write_saved(w, &old, &frags, next, slots, seq));
                        let (len, new_frags) = match written {
                            Ok((len, f)) => (len, Ok(f)),
                            Err(e) => (0, Err(e)),
                        };
                        (len, frags, new_frags)
                    })
                });
                let applied = self.apply_tx(&tx, &[&new_part, &old_part], false);
                (applied, writer.map(|w| w.join().expect("snapshot writer")))
            });
            if let Some((len, frags, written)) = pre {
                self.fragments = frags;
                prepared = Some((len, written));
            }
            if let Err(e) = applied {
                // The kernel says why: if our tables still hold the committed state, the
                // change itself was refused (nothing to rebuild; at 20,000 farms a rebuild
                // takes seconds); otherwise they were changed behind our back (for example
                // deleted by hand): bring them to the new state, in one transaction.
                if self.kernel.has_netlink() {
                    let mut committed = if incremental {
                        slots.clone()
                    } else {
                        self.slots.clone()
                    };
                    if incremental {
                        slots_undo.restore(&mut committed);
                    }
                    let mut old_rs = self.render_full(&self.state, &committed, &self.net).0;
                    stamp(&mut old_rs, self.seq);
                    if verify::check(&old_rs).is_ok_and(|d| d.is_empty()) {
                        if incremental {
                            slots_undo.restore(&mut slots);
                            self.slots = slots;
                        }
                        if let (Some(store), Some(_)) = (&self.store, &prepared) {
                            store.discard();
                        }
                        tracing::warn!("change refused by the kernel ({e}); our tables are intact");
                        // Input that passed validation and that the kernel refuses is
                        // a defect of ours (500), but nothing changed.
                        return Err(Failure::new(
                            500,
                            "error generating rules",
                            format!("the kernel refused the change, nothing was changed: {e}"),
                        ));
                    }
                }
                tracing::warn!("incremental transaction failed ({e}); resynchronising");
                self.fallbacks += 1;
                let rs = whole(self);
                if let Err(e2) = self.resync_kernel(&rs) {
                    // The committed allocation goes back first: the previous ruleset is
                    // rendered from it.
                    if incremental {
                        slots_undo.restore(&mut slots);
                        self.slots = slots;
                    }
                    let back = self.current_ruleset();
                    if let Err(e3) = self.resync_kernel(&back) {
                        tracing::error!("cannot restore the previous ruleset: {e3}");
                    }
                    if let (Some(store), Some(_)) = (&self.store, &prepared) {
                        store.discard();
                    }
                    return Err(kernel_failure(&e, &e2));
                }
            }
        }
        let t3 = Instant::now();
        if self.store.is_some() && !unchanged {
            // A journal entry with just the changed objects, unless the journal has grown
            // past the snapshot (then a new snapshot) or the change reorders objects.
            // Small changes go to the journal; a change of many farms (or the first save)
            // writes a snapshot directly, without building a journal entry first.
            let entry = small
                .then(|| journal_entry(&self.state, &next, &changes, &dirty, &slots, seq))
                .flatten();
            let touched = [&changes.farms[..], &changes.policies, &changes.addresses];
            let saved = self.save_change(entry, prepared, &next, &slots, seq, touched);
            if let Err(e) = saved {
                // Undo the kernel change so that memory, kernel and file agree.
                let undo = plan(&new_part, &old_part);
                if incremental {
                    slots_undo.restore(&mut slots);
                    self.slots = slots;
                }
                if let Err(ke) = self.kernel.apply(&undo.to_text()) {
                    tracing::error!("cannot undo after a store failure: {ke}");
                    let back = self.current_ruleset();
                    let _ = self.resync_kernel(&back);
                }
                return Err(Failure::new(500, "error saving state", e));
            }
        }
        // Slow commits are worth a line in the log, with where the time went.
        macro_rules! committed {
            ($lvl:ident) => {
                tracing::$lvl!(
                    validate_render_us = (t1 - t0).as_micros() as u64,
                    plan_us = (t2 - t1).as_micros() as u64,
                    kernel_us = (t3 - t2).as_micros() as u64,
                    store_us = t3.elapsed().as_micros() as u64,
                    commands = tx.commands.len(),
                    farms = dirty.len(),
                    "committed"
                )
            };
        }
        if t0.elapsed().as_millis() >= 500 {
            committed!(info);
        } else {
            committed!(debug);
        }
        if incremental {
            for f in old_frags.values() {
                count_shared(&mut self.shared_refs, f, false);
            }
            for f in new_frags.values() {
                count_shared(&mut self.shared_refs, f, true);
            }
            self.last_notes
                .retain(|(farm, _)| !dirty_set.contains(farm.as_str()));
            self.last_notes.extend(render_notes);
            self.ix.update(&self.state, &next, &dirty);
        } else {
            self.shared_refs = full_refs.unwrap_or_default();
            self.rendered = true;
            self.last_notes = render_notes;
            self.ix = Indexes::of(&next);
        }
        self.state = next;
        self.slots = slots;
        self.net = net;
        Ok(notes)
    }

    /// The element changes of a change that only adds, removes or re-times elements of
    /// existing policies (nothing else, no prefix length appearing or going, the
    /// elements' order kept): the sets' elements are the whole of it, so neither the
    /// policies nor the farms using them need rendering, and the journal records the
    /// elements (a 1,000,000-element blacklist is 30 MB of JSON). `None` otherwise.
    fn policy_element_deltas(&self, next: &State, changes: &Changes) -> Option<Vec<PolicyDelta>> {
        if !self.rendered
            || changes.policies.is_empty()
            || !changes.farms.is_empty()
            || !changes.addresses.is_empty()
            || changes.reordered
            || !self.ix.ingress.is_empty()
        {
            return None;
        }
        changes
            .policies
            .iter()
            .map(|name| {
                let old = self.state.policies.get(name)?;
                let new = next.policies.get(name)?;
                let same_but_elements = old.name == new.name
                    && old.ptype == new.ptype
                    && old.family == new.family
                    && old.timeout == new.timeout
                    && old.route == new.route
                    && old.log_prefix == new.log_prefix;
                if !same_but_elements {
                    return None;
                }
                // Walk both in order: kept elements keep their order and come before the
                // added ones (what replaying the delta on the old policy gives); a key is
                // looked up only where the two differ.
                let (mut removed, mut added, mut set) = (Vec::new(), Vec::new(), Vec::new());
                let mut olds = old.elements.iter().peekable();
                for (d, e) in &new.elements {
                    loop {
                        match olds.peek() {
                            Some((od, oe)) if *od == d => {
                                if !added.is_empty() {
                                    return None;
                                }
                                if *oe != e {
                                    set.push(e.clone());
                                }
                                olds.next();
                                break;
                            }
                            Some((od, _)) if !new.elements.contains_key(*od) => {
                                removed.push((*od).clone());
                                olds.next();
                            }
                            _ => {
                                if old.elements.contains_key(d) {
                                    return None;
                                }
                                added.push(d.clone());
                                set.push(e.clone());
                                break;
                            }
                        }
                    }
                }
                for (od, _) in olds {
                    if new.elements.contains_key(od) {
                        return None;
                    }
                    removed.push(od.clone());
                }
                let lens = |p: &Policy| -> BTreeSet<u8> {
                    p.elements.keys().map(|d| filter::prefix_len(d)).collect()
                };
                if !(removed.is_empty() && added.is_empty()) && lens(old) != lens(new) {
                    return None;
                }
                Some(PolicyDelta {
                    name: name.clone(),
                    removed,
                    added,
                    set,
                })
            })
            .collect()
    }

    /// Commits a change of policy elements only (see [`Engine::policy_element_deltas`]).
    /// A refusal by the kernel gives `next` back, untouched in the kernel.
    fn commit_policy_elements(
        &mut self,
        next: State,
        deltas: &[PolicyDelta],
    ) -> Result<(), Box<State>> {
        let next_seq = if self.store.is_some() {
            self.seq + 1
        } else {
            self.seq
        };
        // The sets' elements that go and come (both sides name every set touched, so that
        // none looks created or deleted), and the stamp.
        let (mut old_part, mut new_part) = (Ruleset::default(), Ruleset::default());
        for d in deltas {
            let p = &next.policies[&d.name];
            let fam = filter::policy_family(p);
            for (is_new, data) in d
                .removed
                .iter()
                .map(|x| (false, x))
                .chain(d.added.iter().map(|x| (true, x)))
            {
                let (len, net) = filter::element_prefix(data);
                let set = filter::policy_set(&p.name, len);
                let (to, other) = if is_new {
                    (&mut new_part, &mut old_part)
                } else {
                    (&mut old_part, &mut new_part)
                };
                for (part, elem) in [(other, None), (to, Some(net))] {
                    let m = part
                        .tables
                        .entry(fam)
                        .or_default()
                        .maps
                        .entry(set.clone())
                        .or_insert_with(|| filter::policy_set_def(p));
                    if let Some(e) = elem {
                        m.elements.insert(e, String::new());
                    }
                }
            }
        }
        for (part, seq) in [(&mut old_part, self.seq), (&mut new_part, next_seq)] {
            part.tables.entry(TableFamily::Ip).or_default().maps.insert(
                "gen".into(),
                crate::ruleset::MapDef {
                    kind: "set",
                    spec: "type mark;".into(),
                    elements: BTreeMap::new(),
                    dynamic: false,
                },
            );
            stamp(part, seq);
        }
        let tx = plan(&old_part, &new_part);
        if !tx.is_empty() {
            if let Err(e) = self.apply_tx(&tx, &[&new_part, &old_part], false) {
                tracing::info!("policy elements not applied ({e}); rendering the change");
                return Err(Box::new(next));
            }
        }
        if self.store.is_some() {
            let entry = policy_delta_entry(&next, deltas, next_seq);
            let names: Vec<String> = deltas.iter().map(|d| d.name.clone()).collect();
            let slots = std::mem::take(&mut self.slots);
            let saved = self.save_change(
                Some(entry),
                None,
                &next,
                &slots,
                next_seq,
                [&[], &names, &[]],
            );
            self.slots = slots;
            if let Err(e) = saved {
                // Undo the kernel change so that memory, kernel and file agree; the
                // general path then reports the failure to save.
                tracing::warn!("{e}");
                if let Err(ke) = self.kernel.apply(&plan(&new_part, &old_part).to_text()) {
                    tracing::error!("cannot undo after a store failure: {ke}");
                }
                return Err(Box::new(next));
            }
        }
        self.state = next;
        self.policy_element_commits += 1;
        Ok(())
    }

    /// Saves a committed change: `entry` appended to the journal when there is a snapshot
    /// and the journal stays smaller than it, else a new snapshot of `next` (the one
    /// `prepared` while the kernel applied the change, or written now). Then the file's
    /// bookkeeping follows: the sequence number, the sizes, and the cached snapshot pieces
    /// of the objects `touched` (farms, policies, addresses), which a journal entry makes
    /// stale.
    fn save_change(
        &mut self,
        entry: Option<String>,
        prepared: Option<(usize, Result<Fragments, String>)>,
        next: &State,
        slots: &Slots,
        seq: u64,
        touched: [&[String]; 3],
    ) -> Result<(), String> {
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let fits = |e: &String| {
            self.snapshot_bytes > 0
                && self.journal_bytes + e.len() <= self.snapshot_bytes.max(1 << 20)
        };
        match entry.filter(fits) {
            Some(e) => {
                store.append(e.as_bytes())?;
                self.journal_bytes += e.len();
                let [farms, policies, addresses] = touched;
                for (cache, names) in [
                    (&mut self.fragments.farms, farms),
                    (&mut self.fragments.policies, policies),
                    (&mut self.fragments.addresses, addresses),
                ] {
                    for n in names {
                        cache.remove(n);
                    }
                }
            }
            None => {
                let (len, fragments) = match prepared {
                    Some((len, written)) => (len, written?),
                    None => store.prepare_with(|w| {
                        write_saved(w, &self.state, &self.fragments, next, slots, seq)
                    })?,
                };
                store.install()?;
                self.fragments = fragments;
                self.snapshot_bytes = len;
                self.journal_bytes = 0;
            }
        }
        self.seq = seq;
        Ok(())
    }

    /// `delete element` commands for persistence entries of backends that could carry
    /// flows before this change and cannot after it.
    fn stale_session_deletes(
        &mut self,
        next: &State,
        rs: &Ruleset,
        dirty: &[String],
        old_slots: &Slots,
    ) -> Vec<String> {
        let natable = |st: &State, f: &Farm| -> Vec<String> {
            f.backends
                .iter()
                .zip(st.backend_statuses(f))
                .filter(|(_, s)| {
                    matches!(
                        s,
                        BackendStatus::Up | BackendStatus::Available | BackendStatus::Off
                    )
                })
                .map(|(b, _)| b.name.clone())
                .collect()
        };
        let mut out = Vec::new();
        // Only the touched farms with persistence matter: copy just those (and their
        // addresses), not the whole state.
        let mut old_state = State::default();
        for name in dirty {
            if let Some(f) = self
                .state
                .farms
                .get(name)
                .filter(|f| !f.persistence.is_empty())
            {
                old_state.farms.insert(name.clone(), f.clone());
                for a in &f.addresses {
                    if let Some(addr) = self.state.addresses.get(a) {
                        old_state.addresses.insert(a.clone(), addr.clone());
                    }
                }
            }
        }
        if old_state.farms.is_empty() {
            return out;
        }
        for name in dirty {
            let Some(old_farm) = old_state.farms.get(name) else {
                continue;
            };
            if old_farm.persistence.is_empty() {
                continue;
            }
            let before = natable(&old_state, old_farm);
            let after = next
                .farms
                .get(name)
                .map(|f| natable(next, f))
                .unwrap_or_default();
            let gone: Vec<&String> = before.iter().filter(|b| !after.contains(b)).collect();
            if gone.is_empty() {
                continue;
            }
            let Some(slot) = old_slots.get(name) else {
                continue;
            };
            let gone_marks: Vec<u32> = gone
                .iter()
                .filter_map(|b| slot.ids.get(*b))
                .flat_map(|id| {
                    TableFamily::ALL
                        .iter()
                        .map(|fam| id_base(old_farm, slot, *fam, &self.render_cfg()) + id)
                        .collect::<Vec<_>>()
                })
                .collect();
            let cfg = self.render_cfg();
            let sessions = read::dynamic_sessions(
                self.reads.live(),
                &old_state,
                old_slots,
                &self.net,
                name,
                &cfg,
            );
            for s in sessions {
                // Only maps that survive the change; a replaced map goes away whole.
                let kept = rs
                    .tables
                    .get(&s.fam)
                    .is_some_and(|t| t.maps.contains_key(&s.map));
                if kept && gone_marks.contains(&s.mark) {
                    out.push(s.delete_command());
                }
            }
        }
        out
    }

    /// Handles one API request.
    pub fn handle(&mut self, req: &Request) -> Reply {
        let started = Instant::now();
        let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
        let result = match req.method.as_str() {
            // Internal: the network changed (netinfo::watch); render again.
            "REFRESH" => {
                let next = self.state.clone();
                self.commit(next, Vec::new())
            }
            // Internal: a change to our tables that the daemon did not make was seen
            // (kernel::monitor); check the kernel and repair it.
            "VERIFY" => {
                let suspects = parse_suspects(&req.body);
                self.verify_committed("change seen", &suspects)
            }
            "POST" | "PUT" => self.post(&segs, &req.body),
            "PATCH" => self.patch(&segs, &req.body),
            "DELETE" => self.delete(&segs, &req.body),
            // GETs are answered from the published snapshot (`read`), not here.
            _ => Err(Failure::new(400, "invalid request", "unsupported method")),
        };
        // Before the reply goes out: a client's next GET sees what this request did.
        self.publish();
        let reply = match result {
            Ok(notes) => Reply::ok(&notes),
            Err(f) => f.reply(),
        };
        tracing::info!(
            method = %req.method,
            path = %req.path,
            status = reply.status,
            elapsed_us = started.elapsed().as_micros() as u64,
            "request"
        );
        reply
    }

    /// The kernel-learnt sessions of a farm of the committed state.
    fn dynamic_sessions(&self, farm: &str) -> Vec<read::DynSession> {
        let cfg = self.render_cfg();
        read::dynamic_sessions(
            self.reads.live(),
            &self.state,
            &self.slots,
            &self.net,
            farm,
            &cfg,
        )
    }

    /// The GETs' handle on the published state.
    pub fn reads(&self) -> Reads {
        self.reads.clone()
    }

    /// Publishes the committed state for GETs: O(1) copies of persistent maps.
    fn publish(&self) {
        self.reads.publish(Snapshot {
            state: self.state.clone(),
            slots: self.slots.clone(),
            users: self.ix.users.clone(),
            net: self.net.clone(),
            cfg: self.render_cfg(),
        });
    }

    fn apply_doc(
        &mut self,
        body: &[u8],
        mode: ApplyMode,
        base: &str,
    ) -> Result<Vec<String>, Failure> {
        let t = Instant::now();
        let mut next = self.state.clone();
        let notes = document::apply_document_text(&mut next, body, &mode, &self.parse_cfg())
            .map_err(|e| match e {
                TextError::Syntax(e) => Failure::new(400, "the structure is invalid", e),
                TextError::Doc(e) => doc_failure(base, e),
            })?;
        if t.elapsed().as_millis() >= 500 {
            tracing::info!(
                parse_us = t.elapsed().as_micros() as u64,
                bytes = body.len(),
                "request parsed"
            );
        }
        self.commit(next, notes)
    }

    fn post(&mut self, segs: &[&str], body: &[u8]) -> Result<Vec<String>, Failure> {
        match segs {
            ["farms"] | ["policies"] | ["addresses"] => {
                self.apply_doc(body, ApplyMode::Upsert, "error parsing buffer")
            }
            _ => Err(Failure::new(
                404,
                "invalid request",
                "POST and PUT take /farms, /policies or /addresses",
            )),
        }
    }

    fn patch(&mut self, segs: &[&str], body: &[u8]) -> Result<Vec<String>, Failure> {
        match segs {
            ["policies", name, ..] => self.apply_doc(
                body,
                ApplyMode::ReplacePolicyElements(name.to_string()),
                "error parsing buffer",
            ),
            ["farms", name, "policies"] => self.apply_doc(
                body,
                ApplyMode::ReplaceFarmPolicies(name.to_string()),
                "error parsing buffer",
            ),
            _ => Err(Failure::new(
                404,
                "invalid request",
                "PATCH takes /policies/NAME or /farms/NAME/policies",
            )),
        }
    }

    fn delete(&mut self, segs: &[&str], body: &[u8]) -> Result<Vec<String>, Failure> {
        if !matches!(
            segs.first(),
            Some(&"farms") | Some(&"policies") | Some(&"addresses")
        ) {
            return Err(Failure::new(404, "invalid request", "unknown path"));
        }
        if !body.iter().all(u8::is_ascii_whitespace) {
            return self.apply_doc(
                body,
                ApplyMode::RemoveElements,
                "error deleting policy element",
            );
        }
        let mut next = self.state.clone();
        let mut dynamic_deletes: Vec<String> = Vec::new();
        let nf = |base: &str, what: String| Failure::new(404, base, what);
        match segs {
            ["farms"] => {
                let names: Vec<String> = next.farms.keys().cloned().collect();
                for n in names {
                    remove_farm(&mut next, &n);
                }
            }
            ["farms", name] => {
                if !next.farms.contains_key(name) {
                    return Err(nf("error deleting farm", format!("Unknown farm '{name}'")));
                }
                remove_farm(&mut next, name);
            }
            ["farms", name, rest @ ..] => {
                let farm = Arc::make_mut(
                    next.farms
                        .get_mut(name)
                        .ok_or_else(|| nf("invalid request", format!("Unknown farm '{name}'")))?,
                );
                match rest {
                    ["backends"] => {
                        farm.backends.clear();
                        farm.sessions.clear();
                    }
                    ["backends", b] => {
                        let i = farm.backend_index(b).ok_or_else(|| {
                            nf(
                                "error deleting backend",
                                format!("Unknown backend '{b}' in farm '{name}'"),
                            )
                        })?;
                        farm.backends.remove(i);
                        farm.sessions.retain(|s| s.backend != *b);
                    }
                    ["backends", b, "sessions"] => {
                        if farm.backend_index(b).is_none() {
                            return Err(nf(
                                "error deleting sessions from backend",
                                format!("Unknown backend '{b}' in farm '{name}'"),
                            ));
                        }
                        if farm.persistence.is_empty() {
                            return Err(Failure::new(
                                400,
                                "error deleting sessions from backend",
                                format!("Farm '{name}' without session persistence"),
                            ));
                        }
                        farm.sessions.retain(|s| s.backend != *b);
                        dynamic_deletes = self
                            .dynamic_sessions(name)
                            .into_iter()
                            .filter(|d| d.backend.as_deref() == Some(*b))
                            .map(|d| d.delete_command())
                            .collect();
                    }
                    ["sessions"] => farm.sessions.clear(),
                    ["sessions", client] => {
                        let client = client.replace('_', " ");
                        let canon =
                            document::parse_session_client(farm, &client).unwrap_or(client.clone());
                        let before = farm.sessions.len();
                        farm.sessions.retain(|s| s.client != canon);
                        if farm.sessions.len() == before {
                            // Not static: a session the kernel learnt.
                            dynamic_deletes = self
                                .dynamic_sessions(name)
                                .into_iter()
                                .filter(|d| d.client == canon || d.client == client)
                                .map(|d| d.delete_command())
                                .collect();
                            if dynamic_deletes.is_empty() {
                                return Err(nf(
                                    "error deleting session",
                                    format!("Unknown session '{client}' in farm '{name}'"),
                                ));
                            }
                        }
                    }
                    ["addresses", a] => {
                        let before = farm.addresses.len();
                        farm.addresses.retain(|x| x != a);
                        if farm.addresses.len() == before {
                            return Err(nf(
                                "error deleting farm address",
                                format!("Unknown farm address '{a}' in farm '{name}'"),
                            ));
                        }
                        drop_unused_address(&mut next, a);
                    }
                    ["policies", p] => {
                        let before = farm.policies.len();
                        farm.policies.retain(|x| x != p);
                        if farm.policies.len() == before {
                            return Err(nf(
                                "error deleting farm policy",
                                format!("Unknown farm policy '{p}' in farm '{name}'"),
                            ));
                        }
                    }
                    _ => return Err(Failure::new(400, "invalid request", "unknown path")),
                }
            }
            ["policies"] => {
                next.policies.retain(|_, _| false);
                detach_policies(&mut next, None);
            }
            ["policies", name, rest @ ..] => {
                if !next.policies.contains_key(name) {
                    return Err(nf(
                        "error deleting policy",
                        format!("Unknown policy '{name}'"),
                    ));
                }
                match rest {
                    [] => {
                        next.policies.shift_remove(name);
                        detach_policies(&mut next, Some(name));
                    }
                    ["elements"] => {
                        if let Some(p) = next.policies.get_mut(name) {
                            Arc::make_mut(p).elements.clear()
                        }
                    }
                    ["elements", data] | ["elements", data, ""] => {
                        remove_element(&mut next, name, data)?
                    }
                    ["elements", addr, prefix] => {
                        remove_element(&mut next, name, &format!("{addr}/{prefix}"))?
                    }
                    _ => return Err(Failure::new(400, "invalid request", "unknown path")),
                }
            }
            ["addresses"] => {
                let names: Vec<String> = next.addresses.keys().cloned().collect();
                for n in names {
                    if next.address_used(&n) == 0 {
                        next.addresses.shift_remove(&n);
                    }
                }
            }
            ["addresses", name] => {
                if !next.addresses.contains_key(name) {
                    return Err(nf(
                        "error deleting address",
                        format!("Unknown address '{name}'"),
                    ));
                }
                let users: Vec<&String> = next
                    .farms
                    .values()
                    .filter(|f| f.addresses.iter().any(|a| a == name))
                    .map(|f| &f.name)
                    .collect();
                if let Some(f) = users.first() {
                    return Err(Failure::new(
                        400,
                        "error deleting address",
                        format!("Address '{name}' is used by farm '{f}'"),
                    ));
                }
                next.addresses.shift_remove(name);
            }
            _ => return Err(Failure::new(400, "invalid request", "unknown path")),
        }
        let notes = self.commit(next, Vec::new())?;
        if !dynamic_deletes.is_empty() {
            self.kernel
                .apply(&(dynamic_deletes.join("\n") + "\n"))
                .map_err(|e| Failure::new(500, "error deleting session", e))?;
        }
        Ok(notes)
    }
}

/// Writes the saved state's sequence number into the ruleset (`set gen` of the ip
/// table), so that the kernel records which saved state its rules implement.
fn stamp(rs: &mut Ruleset, seq: u64) {
    if let Some(m) = rs
        .tables
        .get_mut(&TableFamily::Ip)
        .and_then(|t| t.maps.get_mut("gen"))
    {
        m.elements.clear();
        m.elements
            .insert(format!("0x{:08x}", seq as u32), String::new());
        m.kind = "set";
    }
}

/// What the state file holds: the state document and the bucket allocation.
fn saved_form(state: &State, slots: &Slots) -> Value {
    let mut m = Map::new();
    m.insert("state".into(), document::state_document(state));
    m.insert(
        "slots".into(),
        serde_json::to_value(slots).expect("slots serialise"),
    );
    Value::Object(m)
}

/// The state file's text for `next`, reusing the serialised form of every object that
/// is unchanged since `old`. Same content as [`saved_form`].
#[cfg(test)]
fn saved_text(
    old: &State,
    frags: &Fragments,
    next: &State,
    slots: &Slots,
    seq: u64,
) -> (String, Fragments) {
    let mut out = Vec::new();
    let (_, f) = write_saved(&mut out, old, frags, next, slots, seq).expect("in memory");
    (String::from_utf8(out).expect("JSON is UTF-8"), f)
}

/// Writes the state file's text for `next` to `out` (the file itself: the text of 100,000
/// farms is 100 MB, not worth a copy in memory), reusing the serialised form of every
/// object that is unchanged since `old`. Same content as [`saved_form`]. Returns the
/// bytes written and the serialised objects (for the next snapshot).
fn write_saved(
    out: &mut impl std::io::Write,
    old: &State,
    frags: &Fragments,
    next: &State,
    slots: &Slots,
    seq: u64,
) -> std::io::Result<(usize, Fragments)> {
    struct Counted<'a, W>(&'a mut W, usize);
    impl<W: std::io::Write> Counted<'_, W> {
        fn put(&mut self, s: &str) -> std::io::Result<()> {
            self.1 += s.len();
            self.0.write_all(s.as_bytes())
        }
    }
    fn section<T: PartialEq, W: std::io::Write>(
        out: &mut Counted<'_, W>,
        key: &str,
        old: &Table<T>,
        next: &Table<T>,
        prev: &HashMap<String, Arc<str>>,
        fresh: &mut HashMap<String, Arc<str>>,
        json: impl Fn(&T) -> Value,
    ) -> std::io::Result<()> {
        out.put(&format!("\"{key}\":["))?;
        for (i, (name, obj)) in next.iter().enumerate() {
            let text = match (old.get(name), prev.get(name)) {
                (Some(o), Some(t)) if Arc::ptr_eq(o, obj) || o == obj => t.clone(),
                _ => Arc::from(json(obj).to_string()),
            };
            if i > 0 {
                out.put(",")?;
            }
            out.put(&text)?;
            fresh.insert(name.clone(), text);
        }
        out.put("]")
    }
    let mut f = Fragments::default();
    let mut out = Counted(out, 0);
    out.put("{\"state\":{")?;
    section(
        &mut out,
        "policies",
        &old.policies,
        &next.policies,
        &frags.policies,
        &mut f.policies,
        |p| document::policy_json(next, p, View::Store),
    )?;
    out.put(",")?;
    section(
        &mut out,
        "addresses",
        &old.addresses,
        &next.addresses,
        &frags.addresses,
        &mut f.addresses,
        |a| document::address_top_json(next, a, View::Store),
    )?;
    out.put(",")?;
    section(
        &mut out,
        "farms",
        &old.farms,
        &next.farms,
        &frags.farms,
        &mut f.farms,
        |x| document::farm_json(next, x, View::Store),
    )?;
    out.put("},\"slots\":")?;
    let mut counted = CountWrite(&mut *out.0, 0);
    serde_json::to_writer(&mut counted, slots).map_err(std::io::Error::other)?;
    out.1 += counted.1;
    out.put(&format!(",\"seq\":{seq}}}\n"))?;
    Ok((out.1, f))
}

/// A writer that counts the bytes it passes on.
struct CountWrite<W>(W, usize);

impl<W: std::io::Write> std::io::Write for CountWrite<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1 += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A journal entry for a change of policy elements only: per policy, the elements that
/// went and those that are new or changed.
fn policy_delta_entry(next: &State, deltas: &[PolicyDelta], seq: u64) -> String {
    let mut elements = Map::new();
    for d in deltas {
        let p = &next.policies[&d.name];
        let set: Vec<Value> = d
            .set
            .iter()
            .map(|e| {
                let mut m = Map::new();
                m.insert("data".into(), Value::from(e.data.clone()));
                if !e.time.is_empty() {
                    m.insert("time".into(), Value::from(e.time.clone()));
                }
                Value::Object(m)
            })
            .collect();
        elements.insert(
            p.name.clone(),
            serde_json::json!({"del": d.removed, "set": set}),
        );
    }
    serde_json::json!({"seq": seq, "elements": elements}).to_string()
}

/// A journal entry for the change from `old` to `next`: the objects that changed (whole)
/// and the names that went, with their mark blocks. `None` when the change is not a
/// sequence of in-place replacements, removals and appends (a rename): that needs a
/// snapshot.
fn journal_entry(
    old: &State,
    next: &State,
    changes: &Changes,
    dirty: &[String],
    slots: &Slots,
    seq: u64,
) -> Option<String> {
    if changes.reordered {
        return None;
    }
    // Objects added or replaced, in their order in `next` (added ones come after every
    // kept one), and the names removed.
    fn section<T>(
        old: &Table<T>,
        next: &Table<T>,
        names: &[String],
        json: impl Fn(&T) -> Value,
    ) -> (Vec<Value>, Vec<String>, Vec<String>) {
        let mut kept: Vec<(u64, &String)> = names
            .iter()
            .filter_map(|n| next.position(n).map(|p| (p, n)))
            .collect();
        kept.sort();
        let set = kept.iter().map(|(_, n)| json(&next[*n])).collect();
        let set_names = kept.into_iter().map(|(_, n)| n.clone()).collect();
        let del = names
            .iter()
            .filter(|n| !next.contains_key(n) && old.contains_key(n))
            .cloned()
            .collect();
        (set, del, set_names)
    }
    let (pset, pdel, _) = section(&old.policies, &next.policies, &changes.policies, |p| {
        document::policy_json(next, p, View::Store)
    });
    let (aset, adel, _) = section(&old.addresses, &next.addresses, &changes.addresses, |a| {
        document::address_top_json(next, a, View::Store)
    });
    let (fset, fdel, fnames) = section(&old.farms, &next.farms, &changes.farms, |f| {
        document::farm_json(next, f, View::Store)
    });
    let mut slot_entries = Map::new();
    for n in fnames.iter().chain(fdel.iter()).chain(dirty) {
        slot_entries.insert(
            n.clone(),
            serde_json::to_value(slots.get(n)).expect("slots serialise"),
        );
    }
    let (free, next_off) = slots.allocator();
    let entry = serde_json::json!({
        "seq": seq,
        "set": {"policies": pset, "addresses": aset, "farms": fset},
        "del": {"policies": pdel, "addresses": adel, "farms": fdel},
        "slots": slot_entries,
        "free": free,
        "next": next_off,
    });
    Some(entry.to_string())
}

/// Applies one journal entry to a state being loaded.
fn replay(
    st: &mut State,
    slots: &mut Slots,
    entry: &Value,
    pcfg: &ParseConfig,
) -> Result<(), String> {
    // Policy elements only (see `policy_delta_entry`): the removals, then the elements
    // new or changed, as the API applies them.
    if let Some(m) = entry.get("elements").and_then(Value::as_object) {
        for (name, d) in m {
            let elems = |key: &str, data_only: bool| -> Vec<Value> {
                d.get(key)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|v| {
                                if data_only {
                                    serde_json::json!({ "data": v })
                                } else {
                                    v.clone()
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            for (mode, list) in [
                (ApplyMode::RemoveElements, elems("del", true)),
                (ApplyMode::Upsert, elems("set", false)),
            ] {
                if list.is_empty() {
                    continue;
                }
                let doc = serde_json::json!({"policies": [{"name": name, "elements": list}]});
                document::apply_document(st, &doc, &mode, pcfg).map_err(|e| e.to_string())?;
            }
        }
        return Ok(());
    }
    let del = |kind: &str| -> Vec<String> {
        entry
            .pointer(&format!("/del/{kind}"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    for n in del("farms") {
        st.farms.shift_remove(&n);
    }
    for n in del("addresses") {
        st.addresses.shift_remove(&n);
    }
    for n in del("policies") {
        st.policies.shift_remove(&n);
    }
    // Whole objects replace the old ones in place (or append).
    for kind in ["policies", "addresses", "farms"] {
        let Some(list) = entry
            .pointer(&format!("/set/{kind}"))
            .and_then(Value::as_array)
        else {
            continue;
        };
        for obj in list {
            let name = obj
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let pos = match kind {
                "policies" => st.policies.position(&name),
                "addresses" => st.addresses.position(&name),
                _ => st.farms.position(&name),
            };
            match kind {
                "policies" => {
                    st.policies.shift_remove(&name);
                }
                "addresses" => {
                    st.addresses.shift_remove(&name);
                }
                _ => {
                    st.farms.shift_remove(&name);
                }
            }
            let mut doc = Map::new();
            doc.insert(kind.into(), Value::Array(vec![obj.clone()]));
            document::apply_document(st, &Value::Object(doc), &ApplyMode::Upsert, pcfg)
                .map_err(|e| e.to_string())?;
            if let Some(p) = pos {
                match kind {
                    "policies" => st.policies.place_at(&name, p),
                    "addresses" => st.addresses.place_at(&name, p),
                    _ => st.farms.place_at(&name, p),
                }
            }
        }
    }
    if let Some(m) = entry.get("slots").and_then(Value::as_object) {
        for (name, v) in m {
            let slot = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
            slots.set_entry(name, slot);
        }
    }
    let free = entry
        .get("free")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let next = entry.get("next").and_then(Value::as_u64).unwrap_or(0);
    slots.set_allocator(free, next);
    Ok(())
}

/// Reads the state file: the current form (the state document's text, the slots and the
/// sequence number), or a plain document (then slots start afresh).
fn split_saved(text: &[u8]) -> Result<(&[u8], Slots, u64), String> {
    use serde_json::value::RawValue;
    let not_json = |e: serde_json::Error| format!("not valid JSON: {e}");
    let top = match serde_json::from_slice::<BTreeMap<String, &RawValue>>(text) {
        Ok(top) => top,
        // Not an object: a document, whose error the document path reports.
        Err(_) => {
            serde_json::from_slice::<serde::de::IgnoredAny>(text).map_err(not_json)?;
            return Ok((text, Slots::default(), 0));
        }
    };
    let Some(state) = top.get("state") else {
        return Ok((text, Slots::default(), 0));
    };
    let slots = top
        .get("slots")
        .and_then(|v| serde_json::from_str(v.get()).ok())
        .unwrap_or_default();
    let seq = top
        .get("seq")
        .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
        .unwrap_or(0);
    Ok((state.get().as_bytes(), slots, seq))
}

/// The message of a document given as text that could not be applied.
fn text_error(e: TextError) -> String {
    match e {
        TextError::Syntax(e) => format!("the structure is invalid: {e}"),
        TextError::Doc(e) => e.to_string(),
    }
}

/// The sets another process changed, as the monitor reported them.
#[derive(Debug, Default)]
struct Suspects {
    /// Every set is suspect (the monitor lost announcements or listed too many).
    all: bool,
    /// (family, set name).
    sets: Vec<(TableFamily, String)>,
}

impl Suspects {
    fn touches(&self, fam: TableFamily, name: &str) -> bool {
        self.all || self.sets.iter().any(|(f, n)| *f == fam && n == name)
    }
}

/// Reads a VERIFY request's body: `NFPROTO name` a line, or `*`.
fn parse_suspects(body: &[u8]) -> Suspects {
    let mut s = Suspects::default();
    for line in String::from_utf8_lossy(body).lines() {
        if line.trim() == "*" {
            s.all = true;
            continue;
        }
        let Some((fam, name)) = line.split_once(' ') else {
            continue;
        };
        let fam = match fam.parse::<i32>() {
            Ok(libc::NFPROTO_IPV4) => TableFamily::Ip,
            Ok(libc::NFPROTO_IPV6) => TableFamily::Ip6,
            Ok(libc::NFPROTO_NETDEV) => TableFamily::Netdev,
            _ => continue,
        };
        s.sets.push((fam, name.to_string()));
    }
    s
}

fn kernel_failure(first: &KernelError, resync: &str) -> Failure {
    let status = 500;
    Failure::new(
        status,
        "error generating rules",
        format!("{first}; a full resynchronisation also failed: {resync}"),
    )
}

fn remove_element(st: &mut State, policy: &str, data: &str) -> Result<(), Failure> {
    let p = Arc::make_mut(st.policies.get_mut(policy).expect("checked by caller"));
    let canon = parse_element(data, p.family).unwrap_or_else(|_| data.to_string());
    if p.elements.shift_remove(&canon).is_none() {
        return Err(Failure::new(
            404,
            "error deleting policy element",
            format!("Unknown element '{data}' in policy '{policy}'"),
        ));
    }
    Ok(())
}

fn detach_policies(st: &mut State, name: Option<&str>) {
    let keep = |p: &String| name.is_some_and(|n| p != n);
    st.farms.for_each_mut(|f| {
        if !f.policies.iter().all(keep) {
            Arc::make_mut(f).policies.retain(keep);
        }
    });
    st.addresses.for_each_mut(|a| {
        if !a.policies.iter().all(keep) {
            Arc::make_mut(a).policies.retain(keep);
        }
    });
}

/// How many farms use each chain shared by plain farms.
type SharedRefs = HashMap<(TableFamily, String), usize>;

/// Counts (or uncounts) a fragment's uses of shared chains.
fn count_shared(refs: &mut SharedRefs, frag: &Fragment, add: bool) {
    for (key, _) in &frag.shared {
        let n = refs.entry(key.clone()).or_default();
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                refs.remove(key);
            }
        }
    }
}

/// Puts a chain in a ruleset, or takes it out.
fn set_chain(rs: &mut Ruleset, key: &(TableFamily, String), chain: Option<crate::ruleset::Chain>) {
    crate::render::set_shared_chain(rs.tables.entry(key.0).or_default(), &key.1, chain);
}

/// Deletes a farm and the addresses only it used (unless they carry policies).
fn remove_farm(st: &mut State, name: &str) {
    if let Some(f) = st.farms.shift_remove(name) {
        for a in &f.addresses {
            drop_unused_address(st, a);
        }
    }
}

fn drop_unused_address(st: &mut State, name: &str) {
    let has_policies = st
        .addresses
        .get(name)
        .is_some_and(|a| !a.policies.is_empty());
    if st.address_used(name) == 0 && !has_policies {
        st.addresses.shift_remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::FakeKernel;

    fn engine() -> Engine {
        let mut e = Engine::new(
            Box::new(FakeKernel::default()),
            None,
            EngineConfig {
                masquerade_mark: 0x8000_0000,
            },
        );
        e.start(None, false).unwrap();
        e
    }

    /// A request as the API routes it: GETs to the read side, the rest to the writer.
    fn req(e: &mut Engine, method: &str, path: &str, body: &str) -> Reply {
        if method == "GET" {
            return e.reads().get(path);
        }
        e.handle(&Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        })
    }

    const FARM: &str = r#"{"farms":[{"name":"lb","virtual-addr":"198.18.0.1","virtual-ports":"80",
        "backends":[{"name":"b1","ip-addr":"198.18.1.1"},{"name":"b2","ip-addr":"198.18.1.2"}]}]}"#;

    #[test]
    fn statuses_and_messages() {
        let mut e = engine();
        assert_eq!(
            req(&mut e, "POST", "/farms", FARM).body,
            r#"{"response": "success"}"#
        );
        assert_eq!(req(&mut e, "GET", "/farms/lb", "").status, 200);
        assert_eq!(req(&mut e, "GET", "/farms/nope", "").status, 404);
        assert_eq!(req(&mut e, "GET", "/farms/lb/backends", "").status, 400);
        assert_eq!(
            req(&mut e, "DELETE", "/farms/lb/backends/zz", "").status,
            404
        );
        assert_eq!(req(&mut e, "POST", "/farms", "{").status, 400);
        assert_eq!(req(&mut e, "POST", "/farms/lb", FARM).status, 404);
        assert_eq!(
            req(&mut e, "DELETE", "/farms/lb/backends/b1", "").status,
            200
        );
        assert_eq!(e.state().farms["lb"].backends.len(), 1);
        assert_eq!(req(&mut e, "DELETE", "/farms/lb", "").status, 200);
        assert!(e.state().farms.is_empty());
        assert!(e.state().addresses.is_empty());
    }

    #[test]
    fn kernel_rejection_changes_nothing_and_says_why() {
        // Fail the incremental transaction, the resync of the new state and the
        // restoring resync: the request must fail and the state stay as it was.
        let mut e = Engine::new(
            Box::new(FakeKernel::default()),
            None,
            EngineConfig {
                masquerade_mark: 0x8000_0000,
            },
        );
        e.start(None, false).unwrap();
        req(&mut e, "POST", "/farms", FARM);
        let before = e.state().clone();
        let before_rs = e.current_ruleset();
        let before_slots = e.slots.clone();
        e.kernel = Box::new(FakeKernel {
            failures: 3,
            ..Default::default()
        });
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"lb","backends":[{"name":"b1","state":"down"}]}]}"#,
        );
        assert_eq!(r.status, 500);
        assert!(r.body.contains("Operation not supported"), "{}", r.body);
        assert_eq!(e.state(), &before);
        assert_eq!(e.current_ruleset(), before_rs);
        assert_eq!(e.slots, before_slots);
        // One failure only (say our table was deleted by hand): the resync heals it.
        e.kernel = Box::new(FakeKernel {
            failures: 1,
            ..Default::default()
        });
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"lb","backends":[{"name":"b1","state":"down"}]}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(e.state().farms["lb"].backends[0].state, BackendState::Down);
    }

    #[test]
    fn unenforced_settings_are_reported_for_the_changed_farm_only() {
        let mut e = engine();
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"a","log":"output","virtual-ports":"80"}]}"#,
        );
        assert_eq!(
            r.body,
            r#"{"response": "success. Farm 'a': log output stored but not enforced by this version"}"#
        );
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"b","virtual-ports":"81"}]}"#,
        );
        assert_eq!(r.body, r#"{"response": "success"}"#);
    }

    /// The same with ingress farms, which take the whole-state path: every farm's notes
    /// are rendered, those of the farms the request changed are reported.
    #[test]
    fn ingress_notes_are_reported_for_the_changed_farm_only() {
        let mut e = engine();
        // Interfaces that do not exist: each farm gets a note, and no neighbour is asked.
        let farm = |name: &str, vip: &str| {
            format!(
                r#"{{"farms":[{{"name":"{name}","mode":"dsr","virtual-addr":"{vip}","virtual-ports":"80",
                "iface":"nftlbtest-in","oface":"nftlbtest-out","backends":[{{"name":"b1","ip-addr":"198.18.1.1"}}]}}]}}"#
            )
        };
        let r = req(&mut e, "POST", "/farms", &farm("a", "198.18.0.1"));
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("Farm 'a'"), "{}", r.body);
        let r = req(&mut e, "POST", "/farms", &farm("b", "198.18.0.2"));
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("Farm 'b'"), "{}", r.body);
        assert!(!r.body.contains("Farm 'a'"), "{}", r.body);
        // The notes of both farms are remembered (logged once, not at every change).
        assert_eq!(
            e.last_notes.iter().filter(|(f, _)| f == "a").count(),
            e.last_notes.iter().filter(|(f, _)| f == "b").count()
        );
        assert!(e.last_notes.iter().any(|(f, _)| f == "a"));
        let r = req(&mut e, "DELETE", "/farms/b", "");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(e.last_notes.iter().all(|(f, _)| f == "a"));
    }

    #[test]
    fn policies_patch_delete_with_body_and_element_paths() {
        let mut e = engine();
        let body = r#"{"policies":[{"name":"bl","type":"blacklist","elements":[
            {"data":"198.18.5.1"},{"data":"198.18.6.0/24"},{"data":"198.18.7.7"}]}]}"#;
        assert_eq!(req(&mut e, "POST", "/policies", body).status, 200);
        let elems = |e: &Engine| -> Vec<String> {
            e.state().policies["bl"].elements.keys().cloned().collect()
        };
        assert_eq!(elems(&e), ["198.18.5.1", "198.18.6.0/24", "198.18.7.7"]);
        // DELETE with a body removes the listed elements.
        let r = req(
            &mut e,
            "DELETE",
            "/policies",
            r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.5.1"}]}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(elems(&e), ["198.18.6.0/24", "198.18.7.7"]);
        // A CIDR in the path is re-joined from its last two segments.
        assert_eq!(
            req(&mut e, "DELETE", "/policies/bl/elements/198.18.6.0/24", "").status,
            200
        );
        assert_eq!(elems(&e), ["198.18.7.7"]);
        assert_eq!(
            req(&mut e, "DELETE", "/policies/bl/elements/198.18.9.9", "").status,
            404
        );
        // PATCH replaces the elements exactly.
        let r = req(
            &mut e,
            "PATCH",
            "/policies/bl/elements",
            r#"{"policies":[{"name":"bl","elements":[{"data":"2001:2::1"}]}]}"#,
        );
        assert_eq!(r.status, 400, "wrong family: {}", r.body);
        let r = req(
            &mut e,
            "PATCH",
            "/policies/bl/elements",
            r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.8.0/24"},{"data":"198.18.9.9"}]}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(elems(&e), ["198.18.8.0/24", "198.18.9.9"]);
        assert_eq!(
            req(
                &mut e,
                "PATCH",
                "/policies/nope",
                r#"{"policies":[{"name":"nope"}]}"#
            )
            .status,
            404
        );
        // PATCH /farms/NAME/policies replaces the attached list.
        req(
            &mut e,
            "POST",
            "/policies",
            r#"{"policies":[{"name":"wl","type":"whitelist"}]}"#,
        );
        req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"f","virtual-ports":"80","policies":[{"name":"bl"}]}]}"#,
        );
        let r = req(
            &mut e,
            "PATCH",
            "/farms/f/policies",
            r#"{"farms":[{"name":"f","policies":[{"name":"wl"}]}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(e.state().farms["f"].policies, ["wl"]);
        assert_eq!(
            req(&mut e, "DELETE", "/farms/f/policies/wl", "").status,
            200
        );
        assert!(e.state().farms["f"].policies.is_empty());
        // Deleting a policy detaches it everywhere.
        req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"f","policies":[{"name":"bl"}]}]}"#,
        );
        assert_eq!(req(&mut e, "DELETE", "/policies/bl", "").status, 200);
        assert!(e.state().farms["f"].policies.is_empty());
        assert_eq!(req(&mut e, "GET", "/policies/bl", "").status, 404);
    }

    #[test]
    fn sessions_and_addresses_paths() {
        let mut e = engine();
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"f","virtual-addr":"198.18.0.1","virtual-ports":"80",
               "persistence":"srcip srcport",
               "backends":[{"name":"b","ip-addr":"198.18.1.1"}],
               "sessions":[{"client":"198.18.0.9 . 1234","backend":"b"}]}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let r = req(&mut e, "GET", "/farms/f/sessions", "");
        assert!(r.body.contains("198.18.0.9 . 1234"), "{}", r.body);
        // '_' in the path stands for a space, as in nftlb.
        assert_eq!(
            req(&mut e, "DELETE", "/farms/f/sessions/198.18.0.9_._1234", "").status,
            200
        );
        assert!(e.state().farms["f"].sessions.is_empty());
        // A session naming an unknown backend is a 404.
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"f","sessions":[{"client":"198.18.0.9 . 1","backend":"zz"}]}]}"#,
        );
        assert_eq!(r.status, 404, "{}", r.body);
        // The automatic address is listed and goes away with its farm.
        let r = req(&mut e, "GET", "/addresses/f-addr", "");
        assert_eq!(r.status, 200);
        assert!(r.body.contains("\"used\": \"1\""), "{}", r.body);
        assert_eq!(req(&mut e, "DELETE", "/addresses/f-addr", "").status, 400);
        assert_eq!(
            req(&mut e, "DELETE", "/farms/f/addresses/f-addr", "").status,
            200
        );
        assert_eq!(req(&mut e, "GET", "/addresses/f-addr", "").status, 404);
    }

    #[test]
    fn invalid_input_leaves_state_alone() {
        let mut e = engine();
        req(&mut e, "POST", "/farms", FARM);
        let before = e.state().clone();
        for body in [
            r#"{"farms":[{"name":"a; flush ruleset"}]}"#,
            r#"{"farms":[{"name":"lb","backends":[{"name":"b1","weight":"0"}]}]}"#,
            r#"{"farms":[{"name":"lb","mode":"bogus"}]}"#,
            r#"{"farms":[{"name":"other","virtual-addr":"198.18.0.1","virtual-ports":"80"}]}"#,
            r#"{"farms":[{"name":"lb","helper":"ftp","protocol":"udp"}]}"#,
            r#"{"farms":[{"name":"v6","virtual-addr":"2001:2::1","persistence":"srcip srcport"}]}"#,
            r#"{"farms":[{"name":"lb","queue":"3"}]}"#,
            r#"[1,2]"#,
        ] {
            let r = req(&mut e, "POST", "/farms", body);
            assert_eq!(r.status, 400, "{body}: {}", r.body);
            assert_eq!(e.state(), &before, "{body}");
        }
    }
    #[test]
    fn overlapping_services_are_refused_against_kept_and_new_farms() {
        let mut e = engine();
        req(&mut e, "POST", "/farms", FARM);
        let before = e.state().clone();
        // Two new farms of one request that overlap each other.
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"x","virtual-addr":"198.18.0.2","virtual-ports":"1000-2000"},
            {"name":"y","virtual-addr":"198.18.0.2","virtual-ports":"1500"}]}"#,
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(
            r.body.contains("farm 'y'") && r.body.contains("farm 'x'"),
            "{}",
            r.body
        );
        assert_eq!(e.state(), &before);
        // A range over a kept farm's port.
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"z","virtual-addr":"198.18.0.1","virtual-ports":"70-90"}]}"#,
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(
            r.body.contains("overlaps address 'lb-addr' of farm 'lb'"),
            "{}",
            r.body
        );
        // Once lb moves to another port, its old port is free (the index follows changes),
        // and lb's new port is taken.
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"lb","virtual-ports":"81"}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"z","virtual-addr":"198.18.0.1","virtual-ports":"80"}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"w","virtual-addr":"198.18.0.1","virtual-ports":"81"}]}"#,
        );
        assert_eq!(r.status, 400, "{}", r.body);
        // A deleted farm frees its service.
        assert_eq!(req(&mut e, "DELETE", "/farms/lb", "").status, 200);
        let r = req(
            &mut e,
            "POST",
            "/farms",
            r#"{"farms":[{"name":"w","virtual-addr":"198.18.0.1","virtual-ports":"81"}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        // The indexes equal ones built from scratch.
        let fresh = ServiceIndex::of(e.state());
        assert_eq!(e.ix.services.entries(), fresh.entries());
        assert!(!fresh.entries().is_empty());
        // The usage index (GET's `used`) agrees with counting over every farm.
        for a in e.state().addresses.keys() {
            let n = e.ix.users.get(a).map_or(0, imbl::OrdSet::len);
            assert_eq!(n, e.state().address_used(a), "{a}");
        }
        assert_eq!(e.ix.users.get("z-addr").map(imbl::OrdSet::len), Some(1));
    }
}

#[cfg(test)]
mod journal_tests {
    use super::*;
    use crate::kernel::FakeKernel;

    fn engine(dir: &std::path::Path) -> Engine {
        let mut e = Engine::new(
            Box::new(FakeKernel::default()),
            Some(Store::new(dir.join("state.json"))),
            EngineConfig {
                masquerade_mark: 0x8000_0000,
            },
        );
        e.start(None, true).unwrap();
        e
    }

    fn req(e: &mut Engine, method: &str, path: &str, body: &str) -> u16 {
        e.handle(&Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        })
        .status
    }

    #[test]
    fn changes_are_journalled_and_replayed_exactly() {
        let dir = std::env::temp_dir().join(format!("nftlb-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut e = engine(&dir);
        let steps = [
            (
                "POST",
                "/farms",
                r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.9.0/24"}]}],
              "farms":[{"name":"a","virtual-addr":"198.18.0.1","virtual-ports":"80","log-prefix":"x ",
              "backends":[{"name":"b1","ip-addr":"198.18.1.1"},{"name":"b2","ip-addr":"198.18.1.2"}]},
              {"name":"b","virtual-ports":"53","protocol":"udp","policies":[{"name":"bl"}]},
              {"name":"c","virtual-addr":"198.18.0.3","virtual-ports":"80"}]}"#,
            ),
            (
                "POST",
                "/farms",
                r#"{"farms":[{"name":"a","backends":[{"name":"b2","state":"down"},
              {"name":"b3","ip-addr":"198.18.1.3","weight":"3"}]}]}"#,
            ),
            ("DELETE", "/farms/a/backends/b1", ""),
            ("DELETE", "/farms/b", ""),
            (
                "POST",
                "/policies",
                r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.8.8"}]}]}"#,
            ),
            (
                "PATCH",
                "/policies/bl/elements",
                r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.7.7"}]}]}"#,
            ),
            // Elements only (journalled as elements): added and re-timed, removed; then
            // a reordering replacement (journalled as the whole policy).
            (
                "POST",
                "/policies",
                r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.6.6"},
                {"data":"198.18.7.7","time":"t1"}]}]}"#,
            ),
            ("DELETE", "/policies/bl/elements/198.18.7.7", ""),
            (
                "PATCH",
                "/policies/bl/elements",
                r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.5.5"},{"data":"198.18.6.6"}]}]}"#,
            ),
            (
                "POST",
                "/farms",
                r#"{"farms":[{"name":"d","virtual-addr":"198.18.0.4","virtual-ports":"80"}]}"#,
            ),
        ];
        for (i, (m, p, b)) in steps.iter().enumerate() {
            let r = e.handle(&Request {
                method: m.to_string(),
                path: p.to_string(),
                body: b.as_bytes().to_vec(),
            });
            assert_eq!(r.status, 200, "step {i}: {}", r.body);
            let fresh = engine(&dir);
            assert_eq!(fresh.state(), e.state(), "after step {i}");
            assert_eq!(fresh.slots, e.slots, "after step {i}");
        }
        // The first change wrote the snapshot; the others went to the journal, the two
        // element changes as elements.
        let journal = Store::new(dir.join("state.json")).load_journal().unwrap();
        assert_eq!(journal.len(), steps.len() - 1);
        assert_eq!(e.policy_element_commits(), 2);
        assert_eq!(
            journal
                .iter()
                .filter(|j| j.get("elements").is_some())
                .count(),
            2
        );
        let order: Vec<&str> = e.state().policies["bl"]
            .elements
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(order, ["198.18.5.5", "198.18.6.6"]);
        // A rename cannot be journalled in place: a snapshot replaces the journal.
        assert_eq!(
            req(
                &mut e,
                "POST",
                "/farms",
                r#"{"farms":[{"name":"a","newname":"z"}]}"#
            ),
            200
        );
        assert!(Store::new(dir.join("state.json"))
            .load_journal()
            .unwrap()
            .is_empty());
        let fresh = engine(&dir);
        assert_eq!(fresh.state(), e.state());
        assert_eq!(
            fresh.state().farms.keys().next().map(String::as_str),
            Some("z")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::kernel::FakeKernel;

    fn req(e: &mut Engine, method: &str, path: &str, body: &str) -> Reply {
        e.handle(&Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        })
    }

    /// A change of many farms is saved as a snapshot written while the kernel applies it:
    /// installed when the kernel takes the change, dropped when it refuses it.
    #[test]
    fn a_snapshot_written_beside_a_refused_change_is_dropped() {
        let dir = std::env::temp_dir().join(format!("nftlb-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state.json");
        let started = || {
            let mut e = Engine::new(
                Box::new(FakeKernel::default()),
                Some(Store::new(&path)),
                EngineConfig {
                    masquerade_mark: 0x8000_0000,
                },
            );
            e.start(None, true).unwrap();
            e
        };
        let mut e = started();
        let farms = |from: usize, n: usize| {
            let f: Vec<String> = (from..from + n)
                .map(|i| {
                    format!(
                        r#"{{"name":"f{i}","virtual-addr":"198.18.0.1","virtual-ports":"{}",
                        "backends":[{{"name":"a","ip-addr":"198.18.1.1"}}]}}"#,
                        1000 + i
                    )
                })
                .collect();
            format!(r#"{{"farms":[{}]}}"#, f.join(","))
        };
        // The first save is a snapshot.
        assert_eq!(req(&mut e, "POST", "/farms", &farms(0, 50)).status, 200);
        let saved = std::fs::read(&path).unwrap();
        assert!(Store::new(&path).load_journal().unwrap().is_empty());
        // 1,001 more farms: too many for a journal entry, so a snapshot. The kernel
        // refuses the change and the resync, and takes the ruleset back.
        e.kernel = Box::new(FakeKernel {
            failures: 2,
            ..Default::default()
        });
        let r = req(&mut e, "POST", "/farms", &farms(50, 1001));
        assert_eq!(r.status, 500, "{}", r.body);
        assert_eq!(std::fs::read(&path).unwrap(), saved, "state file unchanged");
        assert!(!path.with_extension("json.tmp").exists());
        assert_eq!(e.state().farms.len(), 50);
        // A small change goes to the journal; then the large one, accepted, installs its
        // snapshot, which replaces the journal.
        assert_eq!(req(&mut e, "POST", "/farms", &farms(2000, 1)).status, 200);
        assert_eq!(Store::new(&path).load_journal().unwrap().len(), 1);
        assert_eq!(req(&mut e, "POST", "/farms", &farms(50, 1001)).status, 200);
        assert!(!path.with_extension("json.tmp").exists());
        assert!(Store::new(&path).load_journal().unwrap().is_empty());
        assert_ne!(std::fs::read(&path).unwrap(), saved);
        let fresh = started();
        assert_eq!(fresh.state(), e.state());
        assert_eq!(fresh.state().farms.len(), 1052);
        assert_eq!(fresh.slots, e.slots);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod saved_tests {
    use super::*;
    use crate::document::{apply_document, ParseConfig};

    #[test]
    fn incremental_state_text_equals_full_serialisation() {
        let cfg = ParseConfig {
            masquerade_mark: 0x8000_0000,
            stored: false,
        };
        let mut a = State::default();
        let doc: Value = serde_json::from_str(r#"{"policies":[{"name":"p","elements":[{"data":"198.18.9.0/24"}]}],
            "farms":[{"name":"x","virtual-addr":"198.18.0.1","backends":[{"name":"b","ip-addr":"198.18.1.1"}]},
                     {"name":"y","virtual-ports":"53","protocol":"udp"}]}"#).unwrap();
        apply_document(&mut a, &doc, &ApplyMode::Upsert, &cfg).unwrap();
        let mut slots = Slots::default();
        slots.sync(&a, bucket_space(0x8000_0000)).unwrap();
        let (t1, frags) = saved_text(&State::default(), &Fragments::default(), &a, &slots, 1);
        let mut want = saved_form(&a, &slots);
        want["seq"] = Value::from(1);
        assert_eq!(serde_json::from_str::<Value>(&t1).unwrap(), want);
        let mut b = a.clone();
        let change: Value = serde_json::from_str(
            r#"{"farms":[{"name":"y","backends":[{"name":"c","ip-addr":"198.18.1.3"}]}]}"#,
        )
        .unwrap();
        apply_document(&mut b, &change, &ApplyMode::Upsert, &cfg).unwrap();
        b.farms.shift_remove("x");
        let (t2, frags2) = saved_text(&a, &frags, &b, &slots, 2);
        let mut want = saved_form(&b, &slots);
        want["seq"] = Value::from(2);
        assert_eq!(serde_json::from_str::<Value>(&t2).unwrap(), want);
        // x's fragment is gone, y's was re-serialised, the policy's reused.
        assert!(!frags2.farms.contains_key("x"));
        assert!(Arc::ptr_eq(&frags.policies["p"], &frags2.policies["p"]));
        assert!(!Arc::ptr_eq(&frags.farms["y"], &frags2.farms["y"]));
    }
}
