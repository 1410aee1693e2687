//! Answering GETs from a snapshot: reads never wait for writes.
//!
//! After every request it handles (and at start) the writer publishes an immutable
//! [`Snapshot`] of what GETs need: the committed state (persistent tables: an O(1)
//! copy), the mark blocks, the address users and the network facts. A GET takes the
//! latest snapshot when it arrives (so a client sees its own changes once their 200 is
//! in), and is answered on the API's blocking threads, never through the writer's queue;
//! kernel data (counters, learnt sessions) is read over netlink ([`Live`]).
//!
//! Listings are streamed: a chunk of about [`CHUNK`] bytes is rendered at a time, each
//! when the connection can take it, so a listing of 20,000 farms neither builds its whole
//! reply in memory nor holds a thread while the client reads slowly. At most
//! [`Reads::parallel`] chunks or objects are rendered at once, which leaves CPU time to
//! the writer however many clients read.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use crate::document::{self, View};
use crate::engine::Reply;
use crate::kernel::live::{Live, LiveElement};
use crate::model::{Family, Farm, Mode, Policy, State};
use crate::netinfo::{self, NetView};
use crate::render::{id_base, session_maps, RenderConfig, Slots};
use crate::ruleset::{TableFamily, TABLE};

/// Bytes a listing renders before handing a chunk to the connection.
pub const CHUNK: usize = 64 * 1024;

/// What GETs read: the state as of one committed change.
#[derive(Clone)]
pub struct Snapshot {
    /// The desired state.
    pub state: State,
    /// The farms' mark blocks (backend identities of learnt sessions).
    pub slots: Slots,
    /// Address name → the farms that use it.
    pub users: imbl::HashMap<String, imbl::OrdSet<String>>,
    /// The network facts of the last render (unreachable ingress backends).
    pub net: Arc<NetView>,
    /// The render settings (mark bases).
    pub cfg: RenderConfig,
}

impl Snapshot {
    /// How many farms use an address.
    fn used(&self, address: &str) -> usize {
        self.users.get(address).map_or(0, imbl::OrdSet::len)
    }
}

/// The published snapshot and what answering from it needs; cheap to clone (shared).
#[derive(Clone)]
pub struct Reads {
    latest: Arc<RwLock<Arc<Snapshot>>>,
    live: Arc<dyn Live>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Reads {
    /// Starts with `first` published.
    pub fn new(first: Snapshot, live: Arc<dyn Live>) -> Reads {
        Reads {
            latest: Arc::new(RwLock::new(Arc::new(first))),
            live,
            permits: Arc::new(tokio::sync::Semaphore::new(Self::parallel())),
        }
    }

    /// How many reads render at once: one per CPU.
    pub fn parallel() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }

    /// Makes `s` the snapshot that GETs from now on read.
    pub fn publish(&self, s: Snapshot) {
        let s = Arc::new(s);
        // The old snapshot is dropped outside the lock (a last reference frees memory).
        let _old = std::mem::replace(
            &mut *self.latest.write().unwrap_or_else(|e| e.into_inner()),
            s,
        );
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The kernel's live data.
    pub fn live(&self) -> &dyn Live {
        &*self.live
    }

    /// Answers `GET path` whole, from the latest snapshot, on the calling thread.
    pub fn get(&self, path: &str) -> Reply {
        match answer(self.latest(), self.live(), path) {
            Answer::Whole(r) => r,
            Answer::Listing(mut l) => {
                let mut body = Vec::new();
                while let Some(c) = l.next_chunk(self.live()) {
                    body.extend_from_slice(&c);
                }
                Reply {
                    status: 200,
                    body: String::from_utf8(body).expect("serde_json writes UTF-8"),
                }
            }
        }
    }

    /// Answers `GET path` over HTTP: single objects whole, listings streamed. Rendering
    /// runs on the blocking threads, one chunk per permit.
    pub async fn respond(&self, path: &str) -> axum::response::Response {
        use axum::body::Body;
        use axum::http::{header, StatusCode};
        use axum::response::IntoResponse;

        let snap = self.latest();
        let (status, first, rest) = {
            let live = self.live.clone();
            let path = path.to_string();
            let run = move || match answer(snap, &*live, &path) {
                Answer::Whole(r) => (r.status, r.body.into_bytes(), None),
                Answer::Listing(mut l) => {
                    let first = l.next_chunk(&*live).unwrap_or_default();
                    let rest = (!l.done).then_some(l);
                    (200, first, rest)
                }
            };
            match self.blocking(run).await {
                Some(r) => r,
                None => (500, br#"{"response": "the read failed"}"#.to_vec(), None),
            }
        };
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let json = [(header::CONTENT_TYPE, "application/json")];
        let Some(listing) = rest else {
            return (code, json, first).into_response();
        };
        let reads = self.clone();
        let more = futures_util::stream::unfold(Some(listing), move |l| {
            let reads = reads.clone();
            async move {
                let mut l = l?;
                let live = reads.live.clone();
                let (l, chunk) = reads
                    .blocking(move || {
                        let c = l.next_chunk(&*live);
                        (l, c)
                    })
                    .await?;
                chunk.map(|c| (Ok::<_, Infallible>(c), Some(l)))
            }
        });
        let body =
            futures_util::stream::once(async move { Ok::<_, Infallible>(first) }).chain(more);
        (code, json, Body::from_stream(body)).into_response()
    }

    /// Runs `f` on a blocking thread once a permit is free.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let _permit = self.permits.acquire().await.ok()?;
        tokio::task::spawn_blocking(move || {
            lower_priority();
            f()
        })
        .await
        .ok()
    }
}

use futures_util::StreamExt as _;

/// Nice value of the threads that render reads: when reads and the writer want the
/// same CPU, the writer gets most of it (a change is not held up by a flood of reads).
const READ_NICE: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`READ_NICE`], once per thread
/// (the API's blocking threads only ever run reads).
fn lower_priority() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    DONE.with(|done| {
        if !done.replace(true) {
            // SAFETY: plain syscalls; on Linux a thread id names just that thread.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, READ_NICE);
            }
        }
    });
}

/// A GET's answer: a whole reply, or a listing still to render.
pub enum Answer {
    /// The status and body.
    Whole(Reply),
    /// A collection, rendered chunk by chunk.
    Listing(Listing),
}

/// The collections a listing walks.
#[derive(Debug, Clone, Copy)]
enum Collection {
    Farms,
    Policies,
    Addresses,
}

/// `{"<key>": [items]}` rendered a chunk at a time, byte for byte as
/// [`document::list_pretty`] writes it whole.
pub struct Listing {
    snap: Arc<Snapshot>,
    what: Collection,
    /// The table position of the next item.
    next: u64,
    items: usize,
    started: bool,
    done: bool,
}

impl Listing {
    fn new(snap: Arc<Snapshot>, what: Collection) -> Listing {
        Listing {
            snap,
            what,
            next: 0,
            items: 0,
            started: false,
            done: false,
        }
    }

    /// The next part of the text; `None` once it is all out.
    pub fn next_chunk(&mut self, live: &dyn Live) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 4);
        if !self.started {
            let key = match self.what {
                Collection::Farms => "farms",
                Collection::Policies => "policies",
                Collection::Addresses => "addresses",
            };
            out.extend_from_slice(format!("{{\n        \"{key}\": [").as_bytes());
            self.started = true;
        }
        let snap = self.snap.clone();
        let st = &snap.state;
        let used = |n: &str| snap.used(n);
        let mut items: Box<dyn Iterator<Item = (u64, Value)>> = match self.what {
            Collection::Farms => Box::new(
                st.farms
                    .values_from(self.next)
                    .map(|(p, f)| (p, farm_with_counters(&snap, live, f))),
            ),
            Collection::Policies => Box::new(
                st.policies
                    .values_from(self.next)
                    .map(|(p, x)| (p, policy_with_counters(st, live, x))),
            ),
            Collection::Addresses => Box::new(st.addresses.values_from(self.next).map(|(p, a)| {
                (
                    p,
                    document::address_top_json_used(st, a, View::Client, &used),
                )
            })),
        };
        for (pos, v) in items.by_ref() {
            out.extend_from_slice(if self.items == 0 { b"\n" } else { b",\n" });
            // Items sit two levels deep: indent every line of the item's own text.
            let text = document::to_pretty(&v);
            for (i, line) in text.split('\n').enumerate() {
                if i > 0 {
                    out.push(b'\n');
                }
                out.extend_from_slice(b"                ");
                out.extend_from_slice(line.as_bytes());
            }
            self.items += 1;
            self.next = pos + 1;
            if out.len() >= CHUNK {
                return Some(out);
            }
        }
        if self.items == 0 {
            out.extend_from_slice(b"]\n}");
        } else {
            out.extend_from_slice(b"\n        ]\n}");
        }
        self.done = true;
        Some(out)
    }
}

/// Answers `GET path` from `snap`.
pub fn answer(snap: Arc<Snapshot>, live: &dyn Live, path: &str) -> Answer {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let unknown = |what: &str, name: &str| {
        Answer::Whole(Reply::message(
            404,
            &format!("invalid request. Unknown {what} '{name}'"),
        ))
    };
    let one = |key: &str, v: Value| {
        Answer::Whole(Reply {
            status: 200,
            body: document::list_pretty(key, std::iter::once(v)),
        })
    };
    let st = &snap.state;
    match segs.as_slice() {
        ["farms"] => Answer::Listing(Listing::new(snap.clone(), Collection::Farms)),
        ["policies"] => Answer::Listing(Listing::new(snap.clone(), Collection::Policies)),
        ["addresses"] => Answer::Listing(Listing::new(snap.clone(), Collection::Addresses)),
        ["farms", name] => match st.farms.get(name) {
            Some(f) => one("farms", farm_with_counters(&snap, live, f)),
            None => unknown("farm", name),
        },
        ["farms", name, "sessions"] => match st.farms.get(name) {
            Some(f) => {
                let mut list = match document::sessions_json(f) {
                    Value::Array(a) => a,
                    _ => Vec::new(),
                };
                for d in dynamic_sessions(live, st, &snap.slots, &snap.net, name, &snap.cfg) {
                    let mut m = Map::new();
                    m.insert("client".into(), Value::String(d.client));
                    m.insert(
                        "backend".into(),
                        Value::String(d.backend.unwrap_or_else(|| "UNDEFINED".into())),
                    );
                    if let Some(e) = d.expires {
                        m.insert("expiration".into(), Value::String(format!("{e}s")));
                    }
                    list.push(Value::Object(m));
                }
                let mut m = Map::new();
                m.insert("sessions".into(), Value::Array(list));
                Answer::Whole(Reply {
                    status: 200,
                    body: document::to_pretty(&Value::Object(m)),
                })
            }
            None => unknown("farm", name),
        },
        ["policies", name] => match st.policies.get(name) {
            Some(p) => one("policies", policy_with_counters(st, live, p)),
            None => unknown("policy", name),
        },
        ["addresses", name] => match st.addresses.get(name) {
            Some(a) => one(
                "addresses",
                document::address_top_json_used(st, a, View::Client, &|n| snap.used(n)),
            ),
            None => unknown("address", name),
        },
        _ => Answer::Whole(Reply::message(400, "invalid request. unknown path")),
    }
}

/// A farm's GET object with each attached policy's per-farm counter, and ingress
/// backends that cannot be reached shown as `config_error` with the reason.
fn farm_with_counters(snap: &Snapshot, live: &dyn Live, f: &Farm) -> Value {
    let st = &snap.state;
    let mut v = document::farm_json_used(st, f, View::Client, &|n| snap.used(n));
    let errors = crate::render::netdev::backend_errors(st, f, &snap.net);
    if !errors.is_empty() {
        if let Some(list) = v.get_mut("backends").and_then(Value::as_array_mut) {
            for b in list {
                let name = b.get("name").and_then(Value::as_str).unwrap_or("");
                if let Some((_, why)) = errors.iter().find(|(n, _)| n == name) {
                    if let Some(o) = b.as_object_mut() {
                        o.insert("state".into(), Value::String("config_error".into()));
                        o.insert("config-error".into(), Value::String(why.clone()));
                    }
                }
            }
        }
    }
    if f.policies.is_empty() {
        return v;
    }
    if let Some(refs) = v.get_mut("policies").and_then(Value::as_array_mut) {
        for r in refs {
            let Some(pname) = r.get("name").and_then(Value::as_str).map(str::to_string) else {
                continue;
            };
            let fam = match (f.mode, st.policies.get(&pname).map(|p| p.family)) {
                (Mode::Dsr | Mode::Stlsdnat, _) => TableFamily::Netdev,
                (_, Some(Family::Ipv6)) => TableFamily::Ip6,
                _ => TableFamily::Ip,
            };
            let counter = crate::render::filter::policy_counter(&pname, &f.name);
            let Ok(Some((packets, bytes))) = live.counter(fam, &counter) else {
                continue;
            };
            if let Some(o) = r.as_object_mut() {
                o.insert("counter-packets".into(), Value::String(packets.to_string()));
                o.insert("counter-bytes".into(), Value::String(bytes.to_string()));
            }
        }
    }
    v
}

/// A policy's GET object with the kernel's per-element counters.
fn policy_with_counters(st: &State, live: &dyn Live, p: &Policy) -> Value {
    let mut v = document::policy_json(st, p, View::Client);
    let fam = match p.family {
        Family::Ipv6 => TableFamily::Ip6,
        _ => TableFamily::Ip,
    };
    // One set per prefix length; their keys are the masked networks.
    let mut counters: HashMap<String, (u64, u64)> = HashMap::new();
    let full = if fam == TableFamily::Ip6 { 128 } else { 32 };
    // NAT farms match in the family's table, ingress farms in the netdev table.
    for table in [fam, TableFamily::Netdev] {
        for (len, set) in crate::render::filter::policy_sets(p) {
            let Ok(elements) = live.elements(table, &set) else {
                continue;
            };
            for e in elements {
                let Some(addr) = address_text(&e.key) else {
                    continue;
                };
                let data = if len == full {
                    addr
                } else {
                    format!("{addr}/{len}")
                };
                let (pk, by) = e.counter.unwrap_or((0, 0));
                let c = counters.entry(data).or_insert((0, 0));
                c.0 += pk;
                c.1 += by;
            }
        }
    }
    if let Some(elems) = v.get_mut("elements").and_then(Value::as_array_mut) {
        for e in elems {
            let data = e.get("data").and_then(Value::as_str).unwrap_or("");
            let (packets, bytes) = counters.get(data).copied().unwrap_or((0, 0));
            if let Some(o) = e.as_object_mut() {
                o.insert("counter-packets".into(), Value::String(packets.to_string()));
                o.insert("counter-bytes".into(), Value::String(bytes.to_string()));
            }
        }
    }
    v
}

/// A persistence entry learnt by the kernel.
pub(crate) struct DynSession {
    pub(crate) fam: TableFamily,
    pub(crate) map: String,
    /// The key in nft syntax (`198.18.0.1 . 80`).
    pub(crate) client: String,
    pub(crate) mark: u32,
    pub(crate) backend: Option<String>,
    /// Seconds left.
    pub(crate) expires: Option<u64>,
}

impl DynSession {
    /// The nft command that forgets the entry.
    pub(crate) fn delete_command(&self) -> String {
        format!(
            "delete element {} {TABLE} {} {{ {} }}",
            self.fam.as_str(),
            self.map,
            self.client
        )
    }
}

/// The dynamic (kernel-learnt) sessions of a farm in every family.
pub(crate) fn dynamic_sessions(
    live: &dyn Live,
    state: &State,
    slots: &Slots,
    net: &NetView,
    farm: &str,
    cfg: &RenderConfig,
) -> Vec<DynSession> {
    let (Some(farm), Some(slot)) = (state.farms.get(farm), slots.get(farm)) else {
        return Vec::new();
    };
    if farm.persistence.is_empty() {
        return Vec::new();
    }
    let key_types = |addr: &str| -> Vec<String> {
        let (_, ty) = crate::render::persist_key_with(&farm.persistence, "", addr);
        ty.split(" . ").map(str::to_string).collect()
    };
    let mut out = Vec::new();
    if matches!(farm.mode, Mode::Dsr | Mode::Stlsdnat) {
        // Ingress farms learn the backend's MAC (dsr) or address (stlsdnat).
        for v6 in [false, true] {
            let (ps, _) = crate::render::netdev::session_maps(farm, v6);
            let Ok(elements) = live.elements(TableFamily::Netdev, &ps) else {
                continue;
            };
            let types = key_types(if v6 { "ipv6_addr" } else { "ipv4_addr" });
            for e in elements {
                let Some(client) = key_text(&types, &e.key) else {
                    continue;
                };
                let text = match &e.data {
                    Some(d) if farm.mode == Mode::Dsr => field_text("ether_addr", d),
                    Some(d) => address_text(d),
                    None => None,
                }
                .unwrap_or_default();
                let backend = farm
                    .backends
                    .iter()
                    .find(|b| {
                        let by_ip = b.ip_addr.is_some_and(|ip| ip.to_string() == text);
                        let by_mac = b.ether_addr.is_some_and(|m| m.to_string() == text)
                            || net.neighbours.iter().any(|((_, ip), n)| {
                                Some(*ip) == b.ip_addr
                                    && matches!(n, netinfo::Neigh::Known(m) if m.to_string() == text)
                            });
                        by_ip || by_mac
                    })
                    .map(|b| b.name.clone());
                out.push(DynSession {
                    fam: TableFamily::Netdev,
                    map: ps.clone(),
                    client,
                    mark: 0,
                    backend,
                    expires: seconds(&e),
                });
            }
        }
        return out;
    }
    for fam in TableFamily::ALL {
        let (ps, _) = session_maps(farm, slot, fam, cfg);
        let base = id_base(farm, slot, fam, cfg);
        let Ok(elements) = live.elements(fam, &ps) else {
            continue;
        };
        let types = key_types(if fam == TableFamily::Ip6 {
            "ipv6_addr"
        } else {
            "ipv4_addr"
        });
        for e in elements {
            let Some(client) = key_text(&types, &e.key) else {
                continue;
            };
            // nft keeps marks in host byte order.
            let Some(mark) = e
                .data
                .as_deref()
                .and_then(|d| d.get(..4))
                .map(|d| u32::from_ne_bytes(d.try_into().expect("4 bytes")))
            else {
                continue;
            };
            let backend = slot
                .ids
                .iter()
                .find(|(_, id)| mark.checked_sub(base) == Some(**id))
                .map(|(n, _)| n.clone());
            out.push(DynSession {
                fam,
                map: ps.clone(),
                client,
                mark,
                backend,
                expires: seconds(&e),
            });
        }
    }
    out
}

/// Whole seconds left, as nft lists them.
fn seconds(e: &LiveElement) -> Option<u64> {
    e.expires_ms.map(|ms| ms / 1000)
}

/// An IPv4 or IPv6 address from its 4 or 16 bytes.
fn address_text(b: &[u8]) -> Option<String> {
    match b.len() {
        4 => field_text("ipv4_addr", b),
        16 => field_text("ipv6_addr", b),
        _ => None,
    }
}

/// One value of an nft type from its bytes, in nft syntax.
fn field_text(ty: &str, b: &[u8]) -> Option<String> {
    Some(match ty {
        "ipv4_addr" => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b.get(..4)?).ok()?).to_string(),
        "ipv6_addr" => {
            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b.get(..16)?).ok()?).to_string()
        }
        "inet_service" => u16::from_be_bytes([*b.first()?, *b.get(1)?]).to_string(),
        "ether_addr" => b
            .get(..6)?
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        _ => return None,
    })
}

/// The bytes of a field of type `ty`.
fn field_len(ty: &str) -> Option<usize> {
    Some(match ty {
        "ipv4_addr" => 4,
        "ipv6_addr" => 16,
        "inet_service" => 2,
        "ether_addr" => 6,
        _ => return None,
    })
}

/// A key of the given field types, as nft writes it (`a . b`): each field of a
/// concatenation is padded to 4 bytes.
fn key_text(types: &[String], key: &[u8]) -> Option<String> {
    let mut parts = Vec::with_capacity(types.len());
    let mut off = 0;
    for ty in types {
        let len = field_len(ty)?;
        parts.push(field_text(ty, key.get(off..off + len)?)?);
        off += len.div_ceil(4) * 4;
    }
    Some(parts.join(" . "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::live::NoLive;

    fn snapshot(farms: usize) -> Arc<Snapshot> {
        let mut state = State::default();
        let list: Vec<String> = (0..farms)
            .map(|i| {
                format!(
                    r#"{{"name":"f{i}","virtual-addr":"198.18.0.1","virtual-ports":"{}",
                    "backends":[{{"name":"b1","ip-addr":"198.18.1.1"}}]}}"#,
                    1000 + i
                )
            })
            .collect();
        let doc = format!(
            r#"{{"farms":[{}],"addresses":[{{"name":"a","ip-addr":"198.18.9.9"}}]}}"#,
            list.join(",")
        );
        let cfg = document::ParseConfig {
            masquerade_mark: 0x8000_0000,
            stored: false,
        };
        document::apply_document_text(
            &mut state,
            doc.as_bytes(),
            &document::ApplyMode::Upsert,
            &cfg,
        )
        .expect("a valid document");
        Arc::new(Snapshot {
            state,
            slots: Slots::default(),
            users: Default::default(),
            net: Default::default(),
            cfg: RenderConfig {
                masquerade_mark: 0x8000_0000,
            },
        })
    }

    /// A streamed listing is the text `list_pretty` writes whole, cut in chunks.
    #[test]
    fn listings_stream_the_same_text_in_chunks() {
        for n in [0, 1, 3, 400] {
            let snap = snapshot(n);
            let whole = document::list_pretty(
                "farms",
                snap.state
                    .farms
                    .values()
                    .map(|f| farm_with_counters(&snap, &NoLive, f)),
            );
            let Answer::Listing(mut l) = answer(snap.clone(), &NoLive, "/farms") else {
                panic!("a listing");
            };
            let mut chunks = Vec::new();
            while let Some(c) = l.next_chunk(&NoLive) {
                chunks.push(c);
            }
            assert_eq!(
                String::from_utf8(chunks.concat()).unwrap(),
                whole,
                "{n} farms"
            );
            assert_eq!(
                chunks.len() > 1,
                n == 400,
                "{n} farms in {} chunks",
                chunks.len()
            );
            assert!(chunks.iter().all(|c| c.len() < 2 * CHUNK));
        }
        // The other collections, empty and not.
        let snap = snapshot(2);
        let reads = Reads::new((*snap).clone(), Arc::new(NoLive));
        let body = reads.get("/addresses").body;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body, document::to_pretty(&v));
        assert_eq!(v["addresses"].as_array().map(Vec::len), Some(3));
        assert_eq!(
            reads.get("/policies").body,
            "{\n        \"policies\": []\n}"
        );
        assert_eq!(reads.get("/farms/f1/nothing").status, 400);
        assert_eq!(reads.get("/farms/f9").status, 404);
    }

    #[test]
    fn keys_read_like_nft_writes_them() {
        let t = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            key_text(&t(&["ipv4_addr"]), &[198, 18, 0, 1]).as_deref(),
            Some("198.18.0.1")
        );
        assert_eq!(
            key_text(
                &t(&["ipv4_addr", "inet_service"]),
                &[198, 18, 0, 1, 0x1f, 0x90, 0, 0]
            )
            .as_deref(),
            Some("198.18.0.1 . 8080")
        );
        let mut v6 = vec![0x20, 0x01, 0, 2];
        v6.extend_from_slice(&[0; 11]);
        v6.push(1);
        v6.extend_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0, 0]);
        assert_eq!(
            key_text(&t(&["ipv6_addr", "ether_addr"]), &v6).as_deref(),
            Some("2001:2::1 . aa:bb:cc:dd:ee:ff")
        );
        assert_eq!(key_text(&t(&["ipv4_addr"]), &[1, 2]), None, "too short");
        assert_eq!(address_text(&[10, 0, 0, 1]).as_deref(), Some("10.0.0.1"));
    }
}
