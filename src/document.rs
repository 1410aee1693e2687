//! nftlb JSON documents: parsing request bodies into changes of the [`State`], and
//! writing the GET documents. Values are accepted as JSON strings (the original's form)
//! or numbers; key order does not matter; every error names the object, key and value.

use std::collections::BTreeMap;
use std::net::IpAddr;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::model::*;

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    /// Malformed or invalid input (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// A referenced object does not exist (HTTP 404).
    #[error("{0}")]
    Unknown(String),
}

type DResult<T> = Result<T, DocError>;

fn invalid<T>(msg: impl Into<String>) -> DResult<T> {
    Err(DocError::Invalid(msg.into()))
}

/// Settings that parsing depends on.
#[derive(Debug, Clone, Copy)]
pub struct ParseConfig {
    /// The masquerade mark (`-m`); user marks must not overlap it.
    pub masquerade_mark: u32,
    /// The document is the daemon's own state file: limits that came after it was
    /// written and that the kernel does not need (lengths of stored-only text, the
    /// bucket count of `rr` farms) are not applied, so that a state saved by an older
    /// version still loads.
    pub stored: bool,
}

impl ParseConfig {
    /// The longest stored-only text accepted: `max`, or any for the state file.
    fn text(&self, max: usize) -> impl Fn(&str) -> ValueResult<String> {
        parse_text(if self.stored { usize::MAX } else { max })
    }
}

/// What a document does to the objects it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyMode {
    /// POST/PUT: create or change objects; policy elements are added.
    Upsert,
    /// DELETE with a body: remove the listed policy elements.
    RemoveElements,
    /// PATCH /policies/NAME: replace the elements of that policy.
    ReplacePolicyElements(String),
    /// PATCH /farms/NAME/policies: replace the policies attached to that farm.
    ReplaceFarmPolicies(String),
}

/// Reads a scalar value as text: strings as they are, numbers in decimal.
fn scalar(v: &Value, key: &str, ctx: &str) -> DResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => invalid(format!(
            "Invalid value {} of key '{}' in {}: expected a string or a number",
            short(&other.to_string()),
            key,
            ctx
        )),
    }
}

/// Shortens a value for an error message so that a 10 KB input does not make a 10 KB reply.
fn short(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(MAX).collect::<String>())
    }
}

fn bad(key: &str, val: &str, ctx: &str, why: impl std::fmt::Display) -> DocError {
    // The reason may quote parts of the value: it is cut too (a reply stays small).
    let why = why.to_string();
    let why = match why.char_indices().nth(512) {
        Some((i, _)) => format!("{}...", &why[..i]),
        None => why,
    };
    DocError::Invalid(format!(
        "Invalid value '{}' of key '{}' in {}: {}",
        short(val),
        key,
        ctx,
        why
    ))
}

/// Parses with `f`, turning its message into an error naming key, value and object.
fn field<T>(v: &Value, key: &str, ctx: &str, f: impl FnOnce(&str) -> ValueResult<T>) -> DResult<T> {
    let s = scalar(v, key, ctx)?;
    f(&s).map_err(|why| bad(key, &s, ctx, why))
}

fn uint(min: u32) -> impl Fn(&str) -> ValueResult<u32> {
    move |s: &str| {
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && t.parse::<u32>().is_err() {
            return Err(format!("must be at most {}", u32::MAX));
        }
        let n: u32 = t
            .parse()
            .map_err(|_| format!("must be an integer >= {min}"))?;
        if n < min {
            return Err(format!("must be >= {min}"));
        }
        Ok(n)
    }
}

/// An integer in `min..=max`; `max` is what the kernel (or nft) accepts where the value
/// reaches it, and the message says so.
fn uint_in(min: u32, max: u32, unit: &'static str) -> impl Fn(&str) -> ValueResult<u32> {
    move |s: &str| {
        let t = s.trim();
        let n: u64 = match t.parse() {
            Ok(n) => n,
            Err(_) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => u64::MAX,
            Err(_) => return Err(format!("must be an integer from {min} to {max}{unit}")),
        };
        if n < u64::from(min) {
            return Err(format!("must be >= {min}"));
        }
        if n > u64::from(max) {
            return Err(format!("must be at most {max}{unit}"));
        }
        Ok(n as u32)
    }
}

/// A timeout in seconds, as nft accepts it.
fn ttl(s: &str) -> ValueResult<u32> {
    uint_in(0, MAX_TTL, " (seconds)")(s)
}

fn opt_ip(s: &str) -> ValueResult<Option<IpAddr>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_ip(s).map(Some)
    }
}

fn opt_prefix(s: &str) -> ValueResult<Option<String>> {
    parse_log_prefix(s).map(Some)
}

fn as_object<'a>(v: &'a Value, what: &str) -> DResult<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| {
        DocError::Invalid(format!(
            "{what} must be a JSON object, got {}",
            short(&v.to_string())
        ))
    })
}

fn as_array<'a>(v: &'a Value, key: &str, ctx: &str) -> DResult<&'a Vec<Value>> {
    v.as_array().ok_or_else(|| {
        DocError::Invalid(format!(
            "Invalid value {} of key '{}' in {}: expected a list",
            short(&v.to_string()),
            key,
            ctx
        ))
    })
}

fn name_of(obj: &Map<String, Value>, key: &str, what: &str) -> DResult<String> {
    let v = obj.get(key).ok_or_else(|| {
        DocError::Invalid(format!("Key '{key}' is required in every {what} object"))
    })?;
    field(v, key, what, parse_name)
}

fn unknown_key(key: &str, ctx: &str) -> DocError {
    DocError::Invalid(format!("Unknown key '{}' in {}", short(key), ctx))
}

/// Applies a whole document `{"farms":[…],"policies":[…],"addresses":[…]}` to `state`.
/// Returns notes to append to the success message. On error `state` may be partly
/// changed: callers work on a copy.
pub fn apply_document(
    state: &mut State,
    doc: &Value,
    mode: &ApplyMode,
    cfg: &ParseConfig,
) -> DResult<Vec<String>> {
    let top = as_object(doc, "The document")?;
    let notes = Vec::new();
    for key in top.keys() {
        if !matches!(key.as_str(), "farms" | "policies" | "addresses") {
            return Err(unknown_key(key, "the document"));
        }
    }
    // Policies first so that farms and addresses in the same document can attach them.
    for kind in LISTS {
        if let Some(list) = top.get(kind) {
            for item in as_array(list, kind, "the document")? {
                apply_item(state, kind, item, mode, cfg)?;
            }
        }
    }
    finish(state, mode)?;
    Ok(notes)
}

/// The lists of a document, in the order they are applied.
const LISTS: [&str; 3] = ["policies", "addresses", "farms"];

/// Applies one object of a document's list `kind`.
fn apply_item(
    state: &mut State,
    kind: &str,
    item: &Value,
    mode: &ApplyMode,
    cfg: &ParseConfig,
) -> DResult<()> {
    match kind {
        "policies" => apply_policy(state, item, mode, cfg),
        "addresses" => {
            let obj = as_object(item, "An address")?;
            if *mode != ApplyMode::Upsert {
                return invalid("Only policies can be changed by this request");
            }
            apply_address(state, obj, true, cfg).map(|_| ())
        }
        _ => match mode {
            ApplyMode::Upsert => apply_farm(state, item, cfg),
            ApplyMode::ReplaceFarmPolicies(name) => replace_farm_policies(state, item, name),
            _ => invalid("Only policies can be changed by this request"),
        },
    }
}

/// Checks that end a document.
fn finish(state: &State, mode: &ApplyMode) -> DResult<()> {
    if let ApplyMode::ReplacePolicyElements(name) = mode {
        if !state.policies.contains_key(name) {
            return Err(DocError::Unknown(format!(
                "Unknown policy '{}'",
                short(name)
            )));
        }
    }
    Ok(())
}

/// A document given as JSON text that could not be applied.
#[derive(Debug)]
pub enum TextError {
    /// Not JSON.
    Syntax(serde_json::Error),
    /// JSON, but not a valid document (as from [`apply_document`]).
    Doc(DocError),
}

/// [`apply_document`] from JSON text, without a tree of the whole document: the text is
/// scanned into slices of itself, then each policy, address and farm is parsed and
/// applied in turn, so that memory follows the largest object, not the document (a
/// 100,000-farm document is 75 MB of text and over 1 GB as one tree). Same results and
/// errors as parsing the text and calling [`apply_document`] (a document of another shape
/// goes that way, for the same error).
pub fn apply_document_text(
    state: &mut State,
    text: &[u8],
    mode: &ApplyMode,
    cfg: &ParseConfig,
) -> Result<Vec<String>, TextError> {
    use serde_json::value::RawValue;
    let whole = |state: &mut State| {
        let doc: Value = serde_json::from_slice(text).map_err(TextError::Syntax)?;
        apply_document(state, &doc, mode, cfg).map_err(TextError::Doc)
    };
    let Ok(top) = serde_json::from_slice::<BTreeMap<String, &RawValue>>(text) else {
        return whole(state);
    };
    if top.keys().any(|k| !LISTS.contains(&k.as_str())) {
        return whole(state);
    }
    let mut lists: Vec<(&str, Vec<&RawValue>)> = Vec::new();
    for kind in LISTS {
        if let Some(raw) = top.get(kind) {
            match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
                Ok(items) => lists.push((kind, items)),
                Err(_) => return whole(state),
            }
        }
    }
    for (kind, items) in lists {
        for raw in items {
            let item: Value = serde_json::from_str(raw.get()).map_err(TextError::Syntax)?;
            apply_item(state, kind, &item, mode, cfg).map_err(TextError::Doc)?;
        }
    }
    finish(state, mode).map_err(TextError::Doc)?;
    Ok(Vec::new())
}

fn replace_farm_policies(state: &mut State, f: &Value, target: &str) -> DResult<()> {
    let obj = as_object(f, "A farm")?;
    let name = name_of(obj, "name", "farm")?;
    if name != target {
        return invalid(format!(
            "The body names farm '{name}' but the path names farm '{}'",
            short(target)
        ));
    }
    for key in obj.keys() {
        if !matches!(key.as_str(), "name" | "policies") {
            return Err(unknown_key(key, &format!("farm '{name}' of this PATCH")));
        }
    }
    let list = match obj.get("policies") {
        Some(l) => as_array(l, "policies", &format!("farm '{name}'"))?.clone(),
        None => Vec::new(),
    };
    let names = policy_refs(state, &list, &format!("farm '{name}'"))?;
    let farm = state
        .farms
        .get_mut(&name)
        .ok_or_else(|| DocError::Unknown(format!("Unknown farm '{name}'")))?;
    Arc::make_mut(farm).policies = names;
    Ok(())
}

fn policy_refs(state: &State, list: &[Value], ctx: &str) -> DResult<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for p in list {
        let obj = as_object(p, "A policy reference")?;
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "name" | "type" | "family" | "used" | "log-prefix"
            ) {
                return Err(unknown_key(key, &format!("the policies of {ctx}")));
            }
        }
        let pname = name_of(obj, "name", "policy reference")?;
        if !state.policies.contains_key(&pname) {
            return Err(DocError::Unknown(format!(
                "Unknown policy '{pname}' in {ctx}"
            )));
        }
        if !out.contains(&pname) {
            out.push(pname);
        }
    }
    Ok(out)
}

fn apply_policy(state: &mut State, v: &Value, mode: &ApplyMode, cfg: &ParseConfig) -> DResult<()> {
    let obj = as_object(v, "A policy")?;
    let name = name_of(obj, "name", "policy")?;
    let ctx = format!("policy '{name}'");
    let exists = state.policies.contains_key(&name);
    match mode {
        ApplyMode::RemoveElements if !exists => {
            return Err(DocError::Unknown(format!("Unknown policy '{name}'")))
        }
        ApplyMode::ReplacePolicyElements(target) => {
            if *target != name {
                return invalid(format!(
                    "The body names policy '{name}' but the path names policy '{}'",
                    short(target)
                ));
            }
            if !exists {
                return Err(DocError::Unknown(format!("Unknown policy '{name}'")));
            }
        }
        _ => {}
    }
    let existing = state.policies.get(&name).cloned();
    let mut p = existing
        .as_deref()
        .cloned()
        .unwrap_or_else(|| Policy::new(name.clone()));
    let mut newname = None;
    let family_given = obj.contains_key("family");
    for (key, val) in obj {
        match key.as_str() {
            "name" | "used" | "priority" => {}
            "newname" => newname = Some(field(val, key, &ctx, parse_name)?),
            "type" => {
                p.ptype = field(val, key, &ctx, |s| match s {
                    "blacklist" => Ok(PolicyType::Blacklist),
                    "whitelist" => Ok(PolicyType::Whitelist),
                    _ => Err("expected blacklist or whitelist".to_string()),
                })?
            }
            "family" => {
                p.family = field(val, key, &ctx, |s| match Family::parse(s)? {
                    Family::Inet => Err("policies are ipv4 or ipv6".to_string()),
                    f => Ok(f),
                })?;
                if exists && !p.elements.is_empty() && state.policies[&name].family != p.family {
                    return Err(bad(
                        key,
                        p.family.as_str(),
                        &ctx,
                        "the family of a policy with elements cannot change",
                    ));
                }
            }
            "timeout" => p.timeout = field(val, key, &ctx, uint(0))?,
            "route" => {
                p.route = field(val, key, &ctx, |s| match s {
                    "in" | "out" => Ok(s.to_string()),
                    _ => Err("expected in or out".to_string()),
                })?
            }
            "log-prefix" => p.log_prefix = field(val, key, &ctx, opt_prefix)?,
            "elements" => {}
            _ => return Err(unknown_key(key, &ctx)),
        }
    }
    let _ = family_given;
    if let Some(list) = obj.get("elements") {
        let list = as_array(list, "elements", &ctx)?;
        if let ApplyMode::ReplacePolicyElements(_) = mode {
            p.elements.clear();
        }
        for e in list {
            let eobj = as_object(e, "An element")?;
            let mut data = None;
            let mut time = String::new();
            for (key, val) in eobj {
                match key.as_str() {
                    "data" => data = Some(field(val, key, &ctx, |s| parse_element(s, p.family))?),
                    "time" => time = field(val, key, &ctx, cfg.text(MAX_TEXT_LEN))?,
                    "counter-packets" | "counter-bytes" => {}
                    _ => return Err(unknown_key(key, &format!("an element of {ctx}"))),
                }
            }
            let data = data.ok_or_else(|| {
                DocError::Invalid(format!("Key 'data' is required in every element of {ctx}"))
            })?;
            if mode == &ApplyMode::RemoveElements {
                if p.elements.shift_remove(&data).is_none() {
                    return Err(DocError::Unknown(format!(
                        "Unknown element '{data}' in policy '{name}'"
                    )));
                }
            } else {
                p.elements.insert(data.clone(), Element { data, time });
            }
        }
    } else if let ApplyMode::ReplacePolicyElements(_) = mode {
        p.elements.clear();
    }
    // Unchanged policies keep their allocation (cheap comparisons in the engine).
    if existing.as_deref() != Some(&p) {
        state.policies.insert(name.clone(), Arc::new(p));
    }
    if let Some(new) = newname {
        rename_policy(state, &name, &new)?;
    }
    Ok(())
}

fn rename_policy(state: &mut State, old: &str, new: &str) -> DResult<()> {
    if old == new {
        return Ok(());
    }
    if state.policies.contains_key(new) {
        return invalid(format!(
            "Invalid value '{new}' of key 'newname' in policy '{old}': policy '{new}' already exists"
        ));
    }
    state
        .policies
        .rename(old, new, |p| Arc::make_mut(p).name = new.to_string());
    // Only objects that refer to the policy are copied (the others stay shared).
    state.farms.for_each_mut(|f| {
        if f.policies.iter().any(|p| p == old) {
            for p in Arc::make_mut(f).policies.iter_mut().filter(|p| *p == old) {
                *p = new.to_string();
            }
        }
    });
    state.addresses.for_each_mut(|a| {
        if a.policies.iter().any(|p| p == old) {
            for p in Arc::make_mut(a).policies.iter_mut().filter(|p| *p == old) {
                *p = new.to_string();
            }
        }
    });
    Ok(())
}

/// Applies one address object. `top_level` addresses may carry policies; addresses inside
/// a farm may not carry `log-rtlimit` (as in the original). Returns the address name.
fn apply_address(
    state: &mut State,
    obj: &Map<String, Value>,
    top_level: bool,
    cfg: &ParseConfig,
) -> DResult<String> {
    // Older versions named a 128-character farm's address `FARM-addr` (133 characters):
    // such names are read from the state file.
    let name = match cfg.stored {
        false => name_of(obj, "name", "address")?,
        true => {
            let v = obj.get("name").ok_or_else(|| {
                DocError::Invalid("Key 'name' is required in every address object".into())
            })?;
            field(v, "name", "address", |s| {
                parse_name_max(s, MAX_STORED_NAME_LEN)
            })?
        }
    };
    let ctx = format!("address '{name}'");
    let exists = state.addresses.contains_key(&name);
    let mut a = state
        .addresses
        .get(&name)
        .map(|a| Address::clone(a))
        .unwrap_or_else(|| Address {
            name: name.clone(),
            ..Default::default()
        });
    let mut newname = None;
    for (key, val) in obj {
        match key.as_str() {
            "name" | "used" | "action" => {}
            "newname" => newname = Some(field(val, key, &ctx, parse_name)?),
            "family" => a.family = field(val, key, &ctx, Family::parse)?,
            "ip-addr" => a.ip_addr = field(val, key, &ctx, opt_ip)?,
            "ports" => a.ports = field(val, key, &ctx, Ports::parse)?,
            "protocol" => a.protocol = field(val, key, &ctx, Protocol::parse)?,
            "iface" => a.iface = Some(field(val, key, &ctx, parse_ifname)?),
            "iether-addr" => a.iether_addr = Some(field(val, key, &ctx, Mac::parse)?),
            "verdict" => {
                a.verdict = Some(field(val, key, &ctx, |s| VerdictFlags::parse(s, false))?)
            }
            "log-prefix" => a.log_prefix = field(val, key, &ctx, opt_prefix)?,
            "log-rtlimit" if top_level => a.log_rtlimit = field(val, key, &ctx, Rate::parse)?,
            "policies" if top_level => {
                let list = as_array(val, key, &ctx)?.clone();
                for p in policy_refs(state, &list, &ctx)? {
                    if !a.policies.contains(&p) {
                        a.policies.push(p);
                    }
                }
            }
            "fqdn" => a.fqdn = field(val, key, &ctx, cfg.text(MAX_FQDN_LEN))?,
            _ => return Err(unknown_key(key, &ctx)),
        }
    }
    // A new address given only an IPv6 ip-addr is an IPv6 address.
    if !exists && !obj.contains_key("family") {
        if let Some(IpAddr::V6(_)) = a.ip_addr {
            a.family = Family::Ipv6;
        }
    }
    state.addresses.insert(name.clone(), Arc::new(a));
    if let Some(new) = newname {
        if new != name {
            if state.addresses.contains_key(&new) {
                return invalid(format!(
                    "Invalid value '{new}' of key 'newname' in address '{name}': address '{new}' already exists"
                ));
            }
            state
                .addresses
                .rename(&name, &new, |a| Arc::make_mut(a).name = new.clone());
            state.farms.for_each_mut(|f| {
                if f.addresses.contains(&name) {
                    for x in Arc::make_mut(f)
                        .addresses
                        .iter_mut()
                        .filter(|x| **x == name)
                    {
                        *x = new.clone();
                    }
                }
            });
            return Ok(new);
        }
    }
    Ok(name)
}

const LEGACY_ADDRESS_KEYS: [&str; 7] = [
    "family",
    "virtual-addr",
    "virtual-ports",
    "protocol",
    "iface",
    "ether-addr",
    "iether-addr",
];

fn apply_farm(state: &mut State, v: &Value, cfg: &ParseConfig) -> DResult<()> {
    let obj = as_object(v, "A farm")?;
    let name = name_of(obj, "name", "farm")?;
    let ctx = format!("farm '{name}'");
    let existing = state.farms.get(&name).cloned();
    let mut farm = existing
        .as_deref()
        .cloned()
        .unwrap_or_else(|| Farm::new(name.clone()));
    // Insert early so that addresses created below count this farm as a user.
    if existing.is_none() {
        state.farms.insert(name.clone(), Arc::new(farm.clone()));
    }

    // 1. Addresses listed explicitly.
    if let Some(list) = obj.get("addresses") {
        for a in as_array(list, "addresses", &ctx)? {
            let aobj = as_object(a, "An address")?;
            if aobj.contains_key("log-rtlimit") {
                return invalid(format!(
                    "Key 'log-rtlimit' is not allowed in the addresses of {ctx}; set it on the top-level address"
                ));
            }
            if aobj.contains_key("policies") {
                return invalid(format!(
                    "Key 'policies' is not allowed in the addresses of {ctx}; attach policies to the farm or to a top-level address"
                ));
            }
            let given = aobj.get("name").map(|v| scalar(v, "name", "address"));
            let aname = apply_address(state, aobj, false, cfg)?;
            // Renamed with `newname`: this farm's copy of its list follows too (the
            // other farms were changed in the state; this one is written back below).
            if let Some(Ok(old)) = given.filter(|_| aobj.contains_key("newname")) {
                for x in farm.addresses.iter_mut().filter(|x| **x == old) {
                    x.clone_from(&aname);
                }
            }
            if !farm.addresses.contains(&aname) {
                farm.addresses.push(aname);
            }
        }
    }

    // 2. Legacy keys that operate on the first address.
    if LEGACY_ADDRESS_KEYS.iter().any(|k| obj.contains_key(*k)) {
        let aname = match farm.addresses.first() {
            Some(a) => a.clone(),
            None => {
                let mut candidate = auto_address(&name, "");
                let mut n = 1;
                while state.addresses.contains_key(&candidate) {
                    candidate = auto_address(&name, &format!("-{n}"));
                    n += 1;
                }
                state.addresses.insert(
                    candidate.clone(),
                    Arc::new(Address {
                        name: candidate.clone(),
                        ..Default::default()
                    }),
                );
                farm.addresses.push(candidate.clone());
                candidate
            }
        };
        let old = state.addresses.get(&aname).cloned();
        let mut a = old.as_deref().cloned().unwrap_or_else(|| Address {
            name: aname.clone(),
            ..Default::default()
        });
        for key in LEGACY_ADDRESS_KEYS {
            let Some(val) = obj.get(key) else { continue };
            match key {
                "family" => a.family = field(val, key, &ctx, Family::parse)?,
                "virtual-addr" => a.ip_addr = field(val, key, &ctx, opt_ip)?,
                "virtual-ports" => a.ports = field(val, key, &ctx, Ports::parse)?,
                "protocol" => a.protocol = field(val, key, &ctx, Protocol::parse)?,
                "iface" => a.iface = Some(field(val, key, &ctx, parse_ifname)?),
                "ether-addr" => {
                    let m = field(val, key, &ctx, Mac::parse)?;
                    a.iether_addr = Some(m);
                    farm.oether_addr = Some(m);
                }
                "iether-addr" => a.iether_addr = Some(field(val, key, &ctx, Mac::parse)?),
                _ => {}
            }
        }
        if !obj.contains_key("family") {
            if let Some(IpAddr::V6(_)) = a.ip_addr {
                if a.family == Family::Ipv4 {
                    a.family = Family::Ipv6;
                }
            }
        }
        // Unchanged addresses stay shared (and out of the change log's real changes).
        if old.as_deref() != Some(&a) {
            state.addresses.insert(aname, Arc::new(a));
        }
    }

    // 3. Plain farm keys.
    let mut newname = None;
    for (key, val) in obj {
        let k = key.as_str();
        if LEGACY_ADDRESS_KEYS.contains(&k) {
            continue;
        }
        match k {
            "name" | "addresses" | "backends" | "sessions" | "policies" | "priority" | "action" => {
            }
            "newname" => newname = Some(field(val, key, &ctx, parse_name)?),
            "oface" => farm.oface = Some(field(val, key, &ctx, parse_ifname)?),
            "oether-addr" => farm.oether_addr = Some(field(val, key, &ctx, Mac::parse)?),
            "source-addr" => farm.source_addr = field(val, key, &ctx, opt_ip)?,
            "mode" => farm.mode = field(val, key, &ctx, Mode::parse)?,
            "responsettl" => farm.responsettl = field(val, key, &ctx, uint(0))?,
            "scheduler" => farm.scheduler = field(val, key, &ctx, Scheduler::parse)?,
            "sched-param" => {
                farm.sched_param = field(val, key, &ctx, |s| HashFields::parse(s, true))?
            }
            "persistence" => {
                let p = field(val, key, &ctx, |s| HashFields::parse(s, true))?;
                if p != farm.persistence {
                    // As in the original, changing the key deletes static sessions.
                    farm.sessions.clear();
                }
                farm.persistence = p;
            }
            "persist-ttl" => farm.persist_ttl = field(val, key, &ctx, ttl)?,
            "helper" => farm.helper = field(val, key, &ctx, Helper::parse)?,
            "log" => farm.log = field(val, key, &ctx, |s| LogFlags::parse(s, true))?,
            "log-prefix" => farm.log_prefix = field(val, key, &ctx, opt_prefix)?,
            "log-rtlimit" => farm.log_rtlimit = field(val, key, &ctx, Rate::parse)?,
            "mark" => farm.mark = field(val, key, &ctx, |s| user_mark(s, cfg))?,
            "state" => {
                let s = scalar(val, key, &ctx)?;
                farm.state = match s.as_str() {
                    "up" | "available" => FarmState::Up,
                    "down" => FarmState::Down,
                    "off" => FarmState::Off,
                    // Derived, not settable: keep the requested state.
                    "config_error" => farm.state,
                    _ => {
                        return Err(bad(
                            key,
                            &s,
                            &ctx,
                            "expected one of up, down, off, config_error",
                        ))
                    }
                }
            }
            "limits-ttl" => farm.limits_ttl = field(val, key, &ctx, ttl)?,
            "new-rtlimit" => farm.new_rtlimit = field(val, key, &ctx, Rate::parse)?,
            "new-rtlimit-burst" => farm.new_rtlimit_burst = field(val, key, &ctx, uint(0))?,
            "new-rtlimit-log-prefix" => {
                farm.new_rtlimit_log_prefix = field(val, key, &ctx, opt_prefix)?
            }
            "rst-rtlimit" => farm.rst_rtlimit = field(val, key, &ctx, Rate::parse)?,
            "rst-rtlimit-burst" => farm.rst_rtlimit_burst = field(val, key, &ctx, uint(0))?,
            "rst-rtlimit-log-prefix" => {
                farm.rst_rtlimit_log_prefix = field(val, key, &ctx, opt_prefix)?
            }
            "est-connlimit" => farm.est_connlimit = field(val, key, &ctx, uint(0))?,
            "est-connlimit-log-prefix" => {
                farm.est_connlimit_log_prefix = field(val, key, &ctx, opt_prefix)?
            }
            "tcp-strict" => farm.tcp_strict = field(val, key, &ctx, parse_switch)?,
            "tcp-strict-log-prefix" => {
                farm.tcp_strict_log_prefix = field(val, key, &ctx, opt_prefix)?
            }
            "queue" => {
                farm.queue = field(val, key, &ctx, |s| {
                    let n: i32 = s
                        .trim()
                        .parse()
                        .map_err(|_| "must be an integer >= -1".to_string())?;
                    if !(-1..=65535).contains(&n) {
                        return Err("must be between -1 and 65535".to_string());
                    }
                    Ok(n)
                })?
            }
            "verdict" => farm.verdict = field(val, key, &ctx, |s| VerdictFlags::parse(s, false))?,
            "flow-offload" => farm.flow_offload = field(val, key, &ctx, parse_switch)?,
            "intra-connect" => farm.intra_connect = field(val, key, &ctx, parse_switch)?,
            "fqdn" => farm.fqdn = field(val, key, &ctx, cfg.text(MAX_FQDN_LEN))?,
            _ => return Err(unknown_key(key, &ctx)),
        }
    }
    // The original's coupling of scheduler and sched-param.
    match farm.scheduler {
        Scheduler::Hash if farm.sched_param.is_empty() => {
            farm.sched_param = HashFields::parse("srcip", false).expect("constant");
        }
        Scheduler::Hash => {}
        _ => farm.sched_param = HashFields::default(),
    }

    // 4. Backends.
    if let Some(list) = obj.get("backends") {
        for b in as_array(list, "backends", &ctx)? {
            apply_backend(&mut farm, b, &ctx, cfg)?;
        }
    }
    if !cfg.stored && (obj.contains_key("backends") || obj.contains_key("scheduler")) {
        farm.check_rr_buckets().map_err(DocError::Invalid)?;
    }
    // 5. Static sessions.
    if let Some(list) = obj.get("sessions") {
        for s in as_array(list, "sessions", &ctx)? {
            apply_session(&mut farm, s, &ctx)?;
        }
    }
    // 6. Policies.
    if let Some(list) = obj.get("policies") {
        let list = as_array(list, "policies", &ctx)?.clone();
        for p in policy_refs(state, &list, &ctx)? {
            if !farm.policies.contains(&p) {
                farm.policies.push(p);
            }
        }
    }
    // Keep the shared object when nothing changed, so that unchanged farms stay the same
    // allocation (the engine finds what a request changed by pointer).
    let unchanged = existing.as_deref() == Some(&farm);
    if !unchanged {
        state.farms.insert(name.clone(), Arc::new(farm));
    }
    if let Some(new) = newname {
        rename_farm(state, &name, &new)?;
    }
    Ok(())
}

/// The name of the address a farm's legacy keys create: `FARM-addr` and `suffix`, the
/// farm's name cut so that it is a valid name (at most 128 characters: a 128-character
/// farm's `-addr` made a state file that could not be loaded).
fn auto_address(farm: &str, suffix: &str) -> String {
    let tail = format!("-addr{suffix}");
    // Names are ASCII (validated).
    let keep = farm.len().min(MAX_NAME_LEN.saturating_sub(tail.len()));
    format!("{}{tail}", &farm[..keep])
}

fn user_mark(s: &str, cfg: &ParseConfig) -> ValueResult<Mark> {
    let m = Mark::parse(s)?;
    if m.0 & cfg.masquerade_mark != 0 {
        return Err(format!(
            "overlaps the masquerade mark 0x{:x}",
            cfg.masquerade_mark
        ));
    }
    Ok(m)
}

fn rename_farm(state: &mut State, old: &str, new: &str) -> DResult<()> {
    if old == new {
        return Ok(());
    }
    if state.farms.contains_key(new) {
        return invalid(format!(
            "Invalid value '{new}' of key 'newname' in farm '{old}': farm '{new}' already exists"
        ));
    }
    state
        .farms
        .rename(old, new, |f| Arc::make_mut(f).name = new.to_string());
    // The automatic address follows the farm's name.
    let (old_auto, new_auto) = (auto_address(old, ""), auto_address(new, ""));
    if state.addresses.contains_key(&old_auto)
        && !state.addresses.contains_key(&new_auto)
        && state.address_used(&old_auto) == 1
    {
        state.addresses.rename(&old_auto, &new_auto, |a| {
            Arc::make_mut(a).name = new_auto.clone()
        });
        if let Some(f) = state.farms.get_mut(new) {
            for a in Arc::make_mut(f)
                .addresses
                .iter_mut()
                .filter(|a| **a == old_auto)
            {
                *a = new_auto.clone();
            }
        }
    }
    Ok(())
}

fn apply_backend(farm: &mut Farm, v: &Value, fctx: &str, cfg: &ParseConfig) -> DResult<()> {
    let obj = as_object(v, "A backend")?;
    let name = name_of(obj, "name", "backend")?;
    let ctx = format!("backend '{name}' of {fctx}");
    let idx = match farm.backend_index(&name) {
        Some(i) => i,
        None => {
            farm.backends.push(Backend::new(name.clone()));
            farm.backends.len() - 1
        }
    };
    let mut b = farm.backends[idx].clone();
    let mut newname = None;
    for (key, val) in obj {
        match key.as_str() {
            "name" | "action" => {}
            "newname" => newname = Some(field(val, key, &ctx, parse_name)?),
            "ip-addr" => b.ip_addr = field(val, key, &ctx, opt_ip)?,
            "ether-addr" => b.ether_addr = Some(field(val, key, &ctx, Mac::parse)?),
            "port" => {
                b.port = field(val, key, &ctx, |s| {
                    if s.is_empty() {
                        return Ok(None);
                    }
                    let p: u32 = s
                        .trim()
                        .parse()
                        .map_err(|_| "expected a port number or \"\"".to_string())?;
                    if p == 0 || p > 65535 {
                        return Err("port is out of range 1-65535".to_string());
                    }
                    Ok(Some(p as u16))
                })?
            }
            "source-addr" => b.source_addr = field(val, key, &ctx, opt_ip)?,
            "weight" => b.weight = field(val, key, &ctx, uint(1))?,
            "priority" => b.priority = field(val, key, &ctx, uint(1))?,
            "mark" => b.mark = field(val, key, &ctx, |s| user_mark(s, cfg))?,
            "est-connlimit" => b.est_connlimit = field(val, key, &ctx, uint(0))?,
            "est-connlimit-log-prefix" => {
                b.est_connlimit_log_prefix = field(val, key, &ctx, opt_prefix)?
            }
            "state" => {
                let s = scalar(val, key, &ctx)?;
                b.state = match s.as_str() {
                    // `config_error` on input means "validate again".
                    "up" | "available" | "config_error" => BackendState::Up,
                    "down" => BackendState::Down,
                    "off" => BackendState::Off,
                    _ => {
                        return Err(bad(
                            key,
                            &s,
                            &ctx,
                            "expected one of up, down, off, config_error",
                        ))
                    }
                }
            }
            "fqdn" => b.fqdn = field(val, key, &ctx, cfg.text(MAX_FQDN_LEN))?,
            // Read-only (GET shows why an ingress backend cannot be used).
            "config-error" => {}
            _ => return Err(unknown_key(key, &ctx)),
        }
    }
    if b.weight > 10_000 {
        return Err(bad(
            "weight",
            &b.weight.to_string(),
            &ctx,
            "must be at most 10000",
        ));
    }
    farm.backends[idx] = b;
    if let Some(new) = newname {
        if new != name {
            if farm.backend_index(&new).is_some() {
                return invalid(format!(
                    "Invalid value '{new}' of key 'newname' in {ctx}: backend '{new}' already exists"
                ));
            }
            farm.backends[idx].name = new.clone();
            for s in farm.sessions.iter_mut().filter(|s| s.backend == name) {
                s.backend = new.clone();
            }
        }
    }
    Ok(())
}

/// Validates a static session's client key against the farm's persistence fields and
/// returns it in canonical form (`a . b`).
pub fn parse_session_client(farm: &Farm, s: &str) -> ValueResult<String> {
    let fields = farm.persistence.set_names();
    if fields.is_empty() {
        return Err(format!("farm '{}' has no session persistence", farm.name));
    }
    let parts: Vec<&str> = s.split('.').map(str::trim).collect();
    // IPv4 addresses contain dots too: split on " . " first, then fall back.
    let parts: Vec<String> = if s.contains(" . ") {
        s.split(" . ").map(|p| p.trim().to_string()).collect()
    } else if fields.len() == 1 {
        vec![s.trim().to_string()]
    } else {
        parts.iter().map(|p| p.to_string()).collect()
    };
    if parts.len() != fields.len() {
        return Err(format!(
            "expected {} part(s) separated by ' . ' for persistence '{}'",
            fields.len(),
            fields.join(" ")
        ));
    }
    let mut out = Vec::new();
    for (f, p) in fields.iter().zip(parts.iter()) {
        let canon = match *f {
            "srcip" | "dstip" => parse_ip(p)?.to_string(),
            "srcport" | "dstport" => {
                let n: u16 = p
                    .parse()
                    .map_err(|_| format!("'{}' is not a port number", clip(p)))?;
                n.to_string()
            }
            _ => Mac::parse(p)?.to_string(),
        };
        out.push(canon);
    }
    Ok(out.join(" . "))
}

fn apply_session(farm: &mut Farm, v: &Value, fctx: &str) -> DResult<()> {
    let obj = as_object(v, "A session")?;
    let ctx = format!("a session of {fctx}");
    let mut client = None;
    let mut backend = None;
    for (key, val) in obj {
        match key.as_str() {
            "client" => client = Some(scalar(val, key, &ctx)?),
            "backend" => backend = Some(field(val, key, &ctx, parse_name)?),
            "expiration" => {}
            _ => return Err(unknown_key(key, &ctx)),
        }
    }
    let client =
        client.ok_or_else(|| DocError::Invalid(format!("Key 'client' is required in {ctx}")))?;
    let client =
        parse_session_client(farm, &client).map_err(|why| bad("client", &client, &ctx, why))?;
    let backend =
        backend.ok_or_else(|| DocError::Invalid(format!("Key 'backend' is required in {ctx}")))?;
    if farm.backend_index(&backend).is_none() {
        return Err(DocError::Unknown(format!(
            "Unknown backend '{backend}' in {fctx}"
        )));
    }
    match farm.sessions.iter_mut().find(|s| s.client == client) {
        Some(s) => s.backend = backend,
        None => farm.sessions.push(Session { client, backend }),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Output

fn s(v: impl ToString) -> Value {
    Value::String(v.to_string())
}

fn opt_ip_str(ip: Option<IpAddr>) -> String {
    ip.map(|i| i.to_string()).unwrap_or_default()
}

/// Whether output is for a client (derived values) or for the state file (requested values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// GET documents: derived states and counts.
    Client,
    /// The state file: what was requested, loadable with [`apply_document`].
    Store,
}

/// How many farms use an address, for GET (`used`).
pub type UsedBy<'a> = &'a dyn Fn(&str) -> usize;

fn address_json(state: &State, a: &Address, in_farm: bool, view: View, used: UsedBy) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), s(&a.name));
    m.insert("family".into(), s(a.family.as_str()));
    m.insert("ip-addr".into(), s(opt_ip_str(a.ip_addr)));
    m.insert("ports".into(), s(&a.ports));
    m.insert("protocol".into(), s(a.protocol.as_str()));
    if view == View::Store {
        if let Some(i) = &a.iface {
            m.insert("iface".into(), s(i));
        }
        if let Some(i) = &a.iether_addr {
            m.insert("iether-addr".into(), s(i));
        }
        if !a.fqdn.is_empty() {
            m.insert("fqdn".into(), s(&a.fqdn));
        }
    }
    if !in_farm && (view == View::Client || a.verdict.is_some()) {
        m.insert("verdict".into(), s(a.verdict().to_spaced()));
    }
    if !in_farm {
        if let Some(p) = &a.log_prefix {
            m.insert("log-prefix".into(), s(p));
        }
        m.insert("log-rtlimit".into(), s(a.log_rtlimit));
    }
    if view == View::Client {
        m.insert("used".into(), s(used(&a.name)));
    }
    if !in_farm {
        m.insert(
            "policies".into(),
            Value::Array(
                a.policies
                    .iter()
                    .map(|p| policy_ref_json(state, p))
                    .collect(),
            ),
        );
    }
    Value::Object(m)
}

fn policy_ref_json(state: &State, name: &str) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), s(name));
    if let Some(p) = state.policies.get(name) {
        m.insert("type".into(), s(p.ptype.as_str()));
        m.insert("family".into(), s(p.family.as_str()));
    }
    Value::Object(m)
}

fn backend_json(b: &Backend, status: BackendStatus, view: View) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), s(&b.name));
    m.insert("ip-addr".into(), s(opt_ip_str(b.ip_addr)));
    if view == View::Store {
        if let Some(e) = b.ether_addr {
            m.insert("ether-addr".into(), s(e));
        }
    }
    m.insert(
        "port".into(),
        s(b.port.map(|p| p.to_string()).unwrap_or_default()),
    );
    if let Some(src) = b.source_addr {
        m.insert("source-addr".into(), s(src));
    }
    m.insert("weight".into(), s(b.weight));
    m.insert("priority".into(), s(b.priority));
    m.insert("mark".into(), s(b.mark));
    m.insert("est-connlimit".into(), s(b.est_connlimit));
    if let Some(p) = &b.est_connlimit_log_prefix {
        m.insert("est-connlimit-log-prefix".into(), s(p));
    }
    let st = match view {
        View::Client => status.as_str(),
        View::Store => b.state.as_str(),
    };
    m.insert("state".into(), s(st));
    if view == View::Store && !b.fqdn.is_empty() {
        m.insert("fqdn".into(), s(&b.fqdn));
    }
    Value::Object(m)
}

/// The JSON object of a farm, keys in the original's order.
pub fn farm_json(state: &State, f: &Farm, view: View) -> Value {
    farm_json_used(state, f, view, &|n| state.address_used(n))
}

/// [`farm_json`] with the address usage counts given (a listing of every farm would
/// otherwise count each address's users over all farms: quadratic).
pub fn farm_json_used(state: &State, f: &Farm, view: View, used: UsedBy) -> Value {
    let first = state.farm_addresses(f).next();
    let mut m = Map::new();
    m.insert("name".into(), s(&f.name));
    if view == View::Client {
        m.insert(
            "family".into(),
            s(first.map(|a| a.family).unwrap_or_default().as_str()),
        );
        m.insert(
            "virtual-addr".into(),
            s(opt_ip_str(first.and_then(|a| a.ip_addr))),
        );
        m.insert(
            "virtual-ports".into(),
            s(first.map(|a| a.ports.to_string()).unwrap_or_default()),
        );
    }
    m.insert("source-addr".into(), s(opt_ip_str(f.source_addr)));
    m.insert("mode".into(), s(f.mode.as_str()));
    if f.mode == Mode::Stlsdnat || (view == View::Store && f.responsettl != 60) {
        m.insert("responsettl".into(), s(f.responsettl));
    }
    if view == View::Client {
        m.insert(
            "protocol".into(),
            s(first.map(|a| a.protocol).unwrap_or_default().as_str()),
        );
    }
    m.insert("scheduler".into(), s(f.scheduler.as_str()));
    m.insert("sched-param".into(), s(f.sched_param.to_trailing()));
    m.insert("persistence".into(), s(f.persistence.to_trailing()));
    m.insert("persist-ttl".into(), s(f.persist_ttl));
    m.insert("helper".into(), s(f.helper.as_str()));
    m.insert("log".into(), s(f.log.to_trailing()));
    if let Some(p) = &f.log_prefix {
        m.insert("log-prefix".into(), s(p));
    }
    m.insert("log-rtlimit".into(), s(f.log_rtlimit));
    m.insert("mark".into(), s(f.mark));
    if view == View::Client {
        m.insert("priority".into(), s(state.farm_priority(f)));
    }
    m.insert("state".into(), s(f.state.as_str()));
    m.insert("limits-ttl".into(), s(f.limits_ttl));
    m.insert("new-rtlimit".into(), s(f.new_rtlimit));
    m.insert("new-rtlimit-burst".into(), s(f.new_rtlimit_burst));
    if let Some(p) = &f.new_rtlimit_log_prefix {
        m.insert("new-rtlimit-log-prefix".into(), s(p));
    }
    m.insert("rst-rtlimit".into(), s(f.rst_rtlimit));
    m.insert("rst-rtlimit-burst".into(), s(f.rst_rtlimit_burst));
    if let Some(p) = &f.rst_rtlimit_log_prefix {
        m.insert("rst-rtlimit-log-prefix".into(), s(p));
    }
    m.insert("est-connlimit".into(), s(f.est_connlimit));
    if let Some(p) = &f.est_connlimit_log_prefix {
        m.insert("est-connlimit-log-prefix".into(), s(p));
    }
    m.insert(
        "tcp-strict".into(),
        s(if f.tcp_strict { "on" } else { "off" }),
    );
    if let Some(p) = &f.tcp_strict_log_prefix {
        m.insert("tcp-strict-log-prefix".into(), s(p));
    }
    m.insert("queue".into(), s(f.queue));
    m.insert("verdict".into(), s(f.verdict.to_spaced()));
    if f.flow_offload {
        m.insert("flow-offload".into(), s("on"));
    }
    if f.intra_connect {
        m.insert("intra-connect".into(), s("on"));
    }
    if view == View::Store {
        if let Some(o) = &f.oface {
            m.insert("oface".into(), s(o));
        }
        if let Some(o) = f.oether_addr {
            m.insert("oether-addr".into(), s(o));
        }
        if !f.fqdn.is_empty() {
            m.insert("fqdn".into(), s(&f.fqdn));
        }
    }
    let addrs: Vec<Value> = match view {
        View::Client => state
            .farm_addresses(f)
            .map(|a| address_json(state, a, true, view, used))
            .collect(),
        // The state file lists full address objects at top level; farms refer by name.
        View::Store => f
            .addresses
            .iter()
            .map(|n| {
                let mut m = Map::new();
                m.insert("name".into(), s(n));
                Value::Object(m)
            })
            .collect(),
    };
    m.insert("addresses".into(), Value::Array(addrs));
    let statuses = state.backend_statuses(f);
    m.insert(
        "backends".into(),
        Value::Array(
            f.backends
                .iter()
                .zip(statuses)
                .map(|(b, st)| backend_json(b, st, view))
                .collect(),
        ),
    );
    m.insert(
        "policies".into(),
        Value::Array(
            f.policies
                .iter()
                .map(|p| match view {
                    View::Client => policy_ref_json(state, p),
                    View::Store => {
                        let mut m = Map::new();
                        m.insert("name".into(), s(p));
                        Value::Object(m)
                    }
                })
                .collect(),
        ),
    );
    if !f.sessions.is_empty() {
        m.insert("sessions".into(), sessions_json(f));
    }
    Value::Object(m)
}

/// The static sessions of a farm.
pub fn sessions_json(f: &Farm) -> Value {
    Value::Array(
        f.sessions
            .iter()
            .map(|x| {
                let mut m = Map::new();
                m.insert("client".into(), s(&x.client));
                m.insert("backend".into(), s(&x.backend));
                Value::Object(m)
            })
            .collect(),
    )
}

/// The JSON object of a policy.
pub fn policy_json(state: &State, p: &Policy, view: View) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), s(&p.name));
    m.insert("type".into(), s(p.ptype.as_str()));
    m.insert("family".into(), s(p.family.as_str()));
    m.insert("timeout".into(), s(p.timeout));
    m.insert("route".into(), s(&p.route));
    if let Some(lp) = &p.log_prefix {
        m.insert("log-prefix".into(), s(lp));
    }
    if view == View::Client {
        m.insert("used".into(), s(state.policy_used(&p.name)));
    }
    m.insert(
        "elements".into(),
        Value::Array(
            p.elements
                .values()
                .map(|e| {
                    let mut m = Map::new();
                    m.insert("data".into(), s(&e.data));
                    if !e.time.is_empty() {
                        m.insert("time".into(), s(&e.time));
                    }
                    Value::Object(m)
                })
                .collect(),
        ),
    );
    Value::Object(m)
}

/// The JSON object of a top-level address.
pub fn address_top_json(state: &State, a: &Address, view: View) -> Value {
    address_json(state, a, false, view, &|n| state.address_used(n))
}

/// [`address_top_json`] with the address usage counts given.
pub fn address_top_json_used(state: &State, a: &Address, view: View, used: UsedBy) -> Value {
    address_json(state, a, false, view, used)
}

/// The whole state as one loadable document (the state file).
pub fn state_document(state: &State) -> Value {
    let mut m = Map::new();
    m.insert(
        "policies".into(),
        Value::Array(
            state
                .policies
                .values()
                .map(|p| policy_json(state, p, View::Store))
                .collect(),
        ),
    );
    m.insert(
        "addresses".into(),
        Value::Array(
            state
                .addresses
                .values()
                .map(|a| address_json(state, a, false, View::Store, &|_| 0))
                .collect(),
        ),
    );
    m.insert(
        "farms".into(),
        Value::Array(
            state
                .farms
                .values()
                .map(|f| farm_json(state, f, View::Store))
                .collect(),
        ),
    );
    Value::Object(m)
}

/// Serialises like the original: 8-space indentation, no trailing newline.
pub fn to_pretty(v: &Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"        ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)
        .expect("serialising a Value cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// `{"<key>": [items]}` serialised as [`to_pretty`] would, building one item at a time:
/// a listing of 100,000 farms never exists as one tree of values (that tree took 3 GB).
pub fn list_pretty(key: &str, items: impl Iterator<Item = Value>) -> String {
    use serde::ser::{SerializeMap, Serializer};
    use serde::Serialize;
    use std::cell::RefCell;
    struct Items<I>(RefCell<Option<I>>);
    impl<I: Iterator<Item = Value>> Serialize for Items<I> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let items = self.0.borrow_mut().take().into_iter().flatten();
            s.collect_seq(items)
        }
    }
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"        ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    let write = |ser: &mut serde_json::Serializer<&mut Vec<u8>, _>| -> serde_json::Result<()> {
        let mut m = ser.serialize_map(Some(1))?;
        m.serialize_entry(key, &Items(RefCell::new(Some(items))))?;
        m.end()
    };
    write(&mut ser).expect("serialising values cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_serialise_like_their_tree() {
        for n in [0, 1, 3] {
            let items: Vec<Value> = (0..n)
                .map(|i| json!({"name": format!("f{i}"), "backends": [{"name": "a"}], "x": {}}))
                .collect();
            let mut m = Map::new();
            m.insert("farms".into(), Value::Array(items.clone()));
            assert_eq!(
                list_pretty("farms", items.into_iter()),
                to_pretty(&Value::Object(m))
            );
        }
    }

    const CFG: ParseConfig = ParseConfig {
        masquerade_mark: 0x8000_0000,
        stored: false,
    };

    /// Applying JSON text object by object gives what applying its tree gives: the same
    /// state, or the same error.
    #[test]
    fn text_documents_apply_like_trees() {
        let docs = [
            r#"{"farms":[{"name":"a","virtual-addr":"198.18.0.1","virtual-ports":"80","policies":[{"name":"bl"}],
               "backends":[{"name":"b","ip-addr":"198.18.1.1"}]}],
               "policies":[{"name":"bl","elements":[{"data":"198.18.9.0/24"}]}],
               "addresses":[{"name":"x","family":"ipv4","ip-addr":"198.18.0.9","ports":"81","protocol":"tcp"}]}"#,
            r#"{"farms":[{"name":"a","virtual-ports":"80"}],"farms":[{"name":"b","virtual-ports":"81"}]}"#,
            r#"{"farms":[{"name":"a\u0062","virtual-ports":"80"}]}"#,
            r#"{"farms":[]}"#,
            r#"{}"#,
            // Errors, in every place the text path could differ.
            r#"[]"#,
            r#"{"farms":{"name":"a"}}"#,
            r#"{"farms":[{"name":"a"}],"other":[]}"#,
            r#"{"farms":[{"name":"a","virtual-ports":"x"}]}"#,
            r#"{"farms":[{"name":"a","policies":[{"name":"missing"}]}]}"#,
            r#"{"farms":[1]}"#,
            r#"{"farms":[{"name":"a"}]"#,
            r#"{"farms":[{"name":"a"}]} x"#,
            r#""#,
        ];
        for text in docs {
            let mut a = State::default();
            let by_tree = serde_json::from_str::<Value>(text)
                .map_err(|e| e.to_string())
                .and_then(|v| {
                    apply_document(&mut a, &v, &ApplyMode::Upsert, &CFG).map_err(|e| e.to_string())
                });
            let mut b = State::default();
            let by_text = apply_document_text(&mut b, text.as_bytes(), &ApplyMode::Upsert, &CFG)
                .map_err(|e| match e {
                    TextError::Syntax(e) => e.to_string(),
                    TextError::Doc(e) => e.to_string(),
                });
            assert_eq!(by_tree, by_text, "{text}");
            assert_eq!(a, b, "{text}");
        }
        // A policy-elements request in the text path still checks its policy.
        let r = apply_document_text(
            &mut State::default(),
            br#"{"policies":[]}"#,
            &ApplyMode::ReplacePolicyElements("p".into()),
            &CFG,
        );
        assert!(
            matches!(r, Err(TextError::Doc(DocError::Unknown(_)))),
            "{r:?}"
        );
    }

    fn post(state: &mut State, v: Value) -> DResult<Vec<String>> {
        apply_document(state, &v, &ApplyMode::Upsert, &CFG)
    }

    #[test]
    fn strings_and_numbers_any_order_last_duplicate_wins() {
        let mut st = State::default();
        post(
            &mut st,
            json!({"farms":[{"backends":[{"weight":5,"name":"b1","ip-addr":"198.18.1.1"}],
                  "virtual-ports":"80","name":"lb","virtual-addr":"198.18.0.1"}]}),
        )
        .unwrap();
        let f = &st.farms["lb"];
        assert_eq!(f.backends[0].weight, 5);
        assert_eq!(f.addresses, vec!["lb-addr".to_string()]);
        // serde_json keeps the last of repeated keys.
        let v: Value = serde_json::from_str(
            r#"{"farms":[{"name":"lb","persist-ttl":"5","persist-ttl":"7"}]}"#,
        )
        .unwrap();
        post(&mut st, v).unwrap();
        assert_eq!(st.farms["lb"].persist_ttl, 7);
    }

    #[test]
    fn errors_name_key_value_and_object() {
        let mut st = State::default();
        let e = post(
            &mut st,
            json!({"farms":[{"name":"lb","backends":[{"name":"b1","weight":"0"}]}]}),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid value '0' of key 'weight' in backend 'b1' of farm 'lb': must be >= 1"
        );
        let e = post(&mut st, json!({"farms":[{"name":"lb","bogus":"1"}]})).unwrap_err();
        assert_eq!(e.to_string(), "Unknown key 'bogus' in farm 'lb'");
        let e = post(&mut st, json!({"farms":[{"name":"a; flush ruleset"}]})).unwrap_err();
        assert!(e.to_string().contains("key 'name'"), "{e}");
        let e = post(&mut st, json!({"farms":[{"name":"lb","weight":true}]})).unwrap_err();
        assert!(matches!(e, DocError::Invalid(_)));
        let e = post(
            &mut st,
            json!({"farms":[{"name":"lb","policies":[{"name":"nope"}]}]}),
        )
        .unwrap_err();
        assert!(matches!(e, DocError::Unknown(_)), "{e:?}");
    }

    /// Limits the kernel does not need apply to requests, not to the daemon's own state
    /// file (an older version saved what it accepted).
    #[test]
    fn newer_limits_spare_the_state_file() {
        let weights: Vec<Value> = (0..8)
            .map(
                |i| json!({"name": format!("b{i}"), "ip-addr": "198.18.1.1", "weight": 10_000 - i}),
            )
            .collect();
        let doc = json!({
            "farms": [{"name": "f", "fqdn": "a".repeat(300), "scheduler": "rr", "backends": weights,
                       "addresses": [{"name": "x", "fqdn": "b".repeat(300)}]}],
            "policies": [{"name": "p", "elements": [{"data": "198.18.9.9", "time": "t".repeat(300)}]}]});
        let e = post(&mut State::default(), doc.clone()).unwrap_err();
        assert!(e.to_string().contains("is 300 bytes long"), "{e}");
        let stored = ParseConfig {
            stored: true,
            ..CFG
        };
        let mut st = State::default();
        apply_document(&mut st, &doc, &ApplyMode::Upsert, &stored).unwrap();
        assert_eq!(st.farms["f"].fqdn.len(), 300);
        // The rr farm's 79,972 buckets are refused in a request.
        let mut f = doc["farms"][0].clone();
        f.as_object_mut().unwrap().remove("fqdn");
        f.as_object_mut().unwrap().remove("addresses");
        let e = post(&mut State::default(), json!({"farms": [f]})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid value '10000' of key 'weight' in backend 'b0' of farm 'f': the rr scheduler needs one bucket per unit of weight (weights divided by their greatest common divisor): 79972 buckets, at most 65536; use smaller weights or the weight scheduler"
        );
    }

    /// A farm's automatic address gets a valid name whatever the farm's name, and a state
    /// of an older version (a 133-character `FARM-addr`) still loads.
    #[test]
    fn automatic_address_names_are_valid() {
        let long = "f".repeat(128);
        let mut st = State::default();
        post(
            &mut st,
            json!({"addresses": [{"name": format!("{}-addr", "f".repeat(123))}],
                   "farms": [{"name": long, "virtual-addr": "198.18.0.1"}]}),
        )
        .unwrap();
        let a = &st.farms[&long].addresses[0];
        assert_eq!(a, &format!("{}-addr-1", "f".repeat(121)));
        let mut again = State::default();
        post(&mut again, state_document(&st)).unwrap();
        assert_eq!(st, again);
        // Renamed, the address follows within the limit.
        post(
            &mut st,
            json!({"farms": [{"name": long, "newname": "g".repeat(128)}]}),
        )
        .unwrap();
        assert!(st.addresses.keys().all(|n| n.len() <= MAX_NAME_LEN));
        // As an older version saved it.
        let old = json!({"addresses": [{"name": format!("{long}-addr"), "ip-addr": "198.18.0.1"}],
                         "farms": [{"name": long, "addresses": [{"name": format!("{long}-addr")}]}]});
        assert!(post(&mut State::default(), old.clone()).is_err());
        let stored = ParseConfig {
            stored: true,
            ..CFG
        };
        apply_document(&mut State::default(), &old, &ApplyMode::Upsert, &stored).unwrap();
    }

    /// An address renamed through the list of a farm that uses it: the farm follows.
    /// (Its stale copy kept the old name; legacy keys then looked that name up and the
    /// writer panicked.)
    #[test]
    fn address_renamed_in_a_farm_list() {
        let mut st = State::default();
        post(
            &mut st,
            json!({"farms": [{"name": "web", "virtual-addr": "198.18.0.1"}]}),
        )
        .unwrap();
        post(
            &mut st,
            json!({"farms": [{"name": "web", "virtual-ports": "80",
                   "addresses": [{"name": "web-addr", "newname": "x"}]}]}),
        )
        .unwrap();
        assert_eq!(st.farms["web"].addresses, vec!["x".to_string()]);
        assert_eq!(st.addresses["x"].ports.to_string(), "80");
        assert!(st.addresses.get("web-addr").is_none());
    }

    #[test]
    fn hash_scheduler_defaults_to_srcip() {
        let mut st = State::default();
        post(&mut st, json!({"farms":[{"name":"lb","scheduler":"hash"}]})).unwrap();
        assert_eq!(st.farms["lb"].sched_param.to_trailing(), "srcip ");
        post(&mut st, json!({"farms":[{"name":"lb","scheduler":"rr"}]})).unwrap();
        assert_eq!(st.farms["lb"].sched_param.to_trailing(), "none");
    }

    #[test]
    fn rename_keeps_order_and_auto_address() {
        let mut st = State::default();
        post(
            &mut st,
            json!({"farms":[{"name":"a","virtual-addr":"198.18.0.1"},{"name":"b"}]}),
        )
        .unwrap();
        post(&mut st, json!({"farms":[{"name":"a","newname":"c"}]})).unwrap();
        assert_eq!(st.farms.keys().collect::<Vec<_>>(), vec!["c", "b"]);
        assert_eq!(st.farms["c"].addresses, vec!["c-addr".to_string()]);
        assert!(post(&mut st, json!({"farms":[{"name":"c","newname":"b"}]})).is_err());
    }

    #[test]
    fn state_document_round_trips() {
        let mut st = State::default();
        post(
            &mut st,
            json!({"policies":[{"name":"bl","elements":[{"data":"198.18.5.0/24"}]}],
                   "farms":[{"name":"lb","family":"inet","virtual-ports":"80,1000-2000","mode":"dnat",
                   "scheduler":"hash","sched-param":"srcip srcport","persistence":"srcip",
                   "policies":[{"name":"bl"}],
                   "backends":[{"name":"b1","ip-addr":"2001:2::1","port":"8080","state":"off"}],
                   "sessions":[{"client":"198.18.0.2","backend":"b1"}]}]}),
        )
        .unwrap();
        let doc = state_document(&st);
        let mut st2 = State::default();
        post(&mut st2, doc).unwrap();
        assert_eq!(st, st2);
    }

    #[test]
    fn get_output_matches_the_original_shape() {
        let mut st = State::default();
        post(
            &mut st,
            json!({"farms":[{"name":"lb01","virtual-addr":"198.18.0.100","virtual-ports":"80",
                   "backends":[{"name":"b1","ip-addr":"198.18.1.11"}]}]}),
        )
        .unwrap();
        let v = farm_json(&st, &st.farms["lb01"], View::Client);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys[..8],
            [
                "name",
                "family",
                "virtual-addr",
                "virtual-ports",
                "source-addr",
                "mode",
                "protocol",
                "scheduler"
            ]
        );
        let text = to_pretty(&json!({"farms":[v]}));
        assert!(text.starts_with("{\n        \"farms\": [\n                {"));
        assert!(!text.ends_with('\n'));
    }
}
