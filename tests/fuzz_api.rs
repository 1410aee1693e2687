//! Fuzzing the REST API of a real daemon (in a namespace, libnftables backend) with
//! generated requests: documents of farms, backends, policies and addresses with random
//! keys and values (huge numbers, names starting with digits, unicode, long strings,
//! wrong types) on GET/POST/PUT/PATCH/DELETE paths.
//!
//! Asserted for every request: an HTTP answer that is not 5xx, the daemon still running,
//! no panic in its log, and after a 4xx the state (GET /farms, /policies, /addresses)
//! unchanged. After each sequence, a second daemon started on a copy of the state file in
//! a fresh namespace must show the same state and build the same ruleset (the kernel
//! holds what was accepted).
//!
//! By default 30 sequences (about 20 s here). `NFTLB_FUZZ_SECS=3600` runs for an
//! hour, collecting every failure (shrunk) instead of stopping at the first;
//! `NFTLB_FUZZ_CASES` sets the number of sequences per round, `NFTLB_FUZZ_LOG` a file
//! that gets each failure as it is found.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------
// values

/// Object names: mostly a small pool (so that requests meet existing objects), some
/// awkward ones (digits first, a clash-prone `-tcp-strict` suffix, nft keywords, the
/// longest valid name) and invalid ones.
fn name() -> BoxedStrategy<String> {
    prop_oneof![
        20 => prop::sample::select(vec![
            "a", "b", "web", "0", "0abc", "1", "a-tcp-strict", "a-WL", "x.y", "_u", "ip", "tcp",
            "counter", "a-BL-b", "fw", "bl", "wl",
        ])
        .prop_map(str::to_string),
        1 => prop::sample::select(vec![
            "n".repeat(128),
            "9".repeat(128),
            "n".repeat(129),
            String::new(),
            "é".into(),
            "a b".into(),
            "a/b".into(),
            "a\"b".into(),
            "-x".into(),
            "a;b".into(),
        ]),
    ]
    .boxed()
}

/// Numbers as text: bounds of every integer type that matters, and non-numbers.
fn int_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "0", "1", "2", "5", "60", "120", "1000", "10000", "10001", "30500", "30501",
            "65535", "65536", "99999999", "100000000", "2147483647", "2147483648",
            "4294967295", "4294967296", "18446744073709551615", "18446744073709551616",
            "-1", "-2147483649", "1.5", "1e3", "0x10", " 7 ", "", "abc", "007",
        ])
        .prop_map(str::to_string),
        1 => any::<u32>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
    ]
    .boxed()
}

/// A string of some awkward kind.
fn weird_string() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            " ",
            "é☃",
            "\u{0}",
            "a\"b",
            "a\\b",
            "; flush ruleset",
            "} ; {",
            "a\nb",
            "%s%n",
            "none",
            "null",
            "true",
            "[]",
            "{}",
            "0",
            "-0",
            "+1",
            "NaN",
            "inf",
        ])
        .prop_map(str::to_string),
        (1usize..3000).prop_map(|n| "x".repeat(n)),
        prop::sample::select(vec![127usize, 128, 253, 254, 255, 256, 65536, 300_000])
            .prop_map(|n| "y".repeat(n)),
        "[a-zA-Z0-9_.\\- ]{0,40}",
        any::<String>(),
    ]
    .boxed()
}

/// A JSON value of any type.
fn junk() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => weird_string().prop_map(Value::String),
        2 => int_text().prop_map(Value::String),
        1 => any::<u64>().prop_map(|n| json!(n)),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => prop::sample::select(vec![0.5f64, -1.0, 1e300, 4294967296.0, 1e10])
            .prop_map(|f| json!(f)),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
        1 => Just(json!([])),
        1 => Just(json!(["a", 1])),
        1 => Just(json!({"a": 1})),
    ]
    .boxed()
}

fn sel(v: &[&'static str]) -> BoxedStrategy<Value> {
    prop::sample::select(v.to_vec())
        .prop_map(|s| Value::String(s.to_string()))
        .boxed()
}

/// Mostly a plausible value for the key, sometimes anything.
fn value_for(key: &'static str) -> BoxedStrategy<Value> {
    let good: BoxedStrategy<Value> = match key {
        "family" => sel(&["ipv4", "ipv6", "inet"]),
        "virtual-addr" | "ip-addr" | "source-addr" => sel(&[
            "198.18.0.1",
            "198.18.0.2",
            "198.18.1.11",
            "198.18.1.12",
            "2001:2::1",
            "2001:2:0:1::11",
            "",
            "198.18.0.300",
        ]),
        // (No list covers 5555, the API's port, or the client ports: see
        // keep_api_reachable.)
        "virtual-ports" | "ports" => sel(&[
            "80",
            "443",
            "80,443",
            "1000-2000",
            "0",
            "65535",
            "65536",
            "1-5000",
            "21",
            "5060",
            "69",
            "161",
            "1723",
            "80,80",
            "6000-7000",
            "0-100",
        ]),
        "protocol" => sel(&["tcp", "udp", "sctp", "all"]),
        "mode" => sel(&["snat", "dnat", "local", "dsr", "stlsdnat"]),
        "scheduler" => sel(&["rr", "weight", "hash", "symhash"]),
        "sched-param" | "persistence" => sel(&[
            "none",
            "srcip",
            "srcip dstport",
            "srcip srcport",
            "dstip",
            "srcmac",
            "srcip dstip srcport",
            "srcip dstip srcport dstport srcmac dstmac",
        ]),
        "helper" => sel(&["none", "ftp", "sip", "tftp", "snmp", "pptp"]),
        "log" => sel(&["none", "input", "forward", "input forward", "output"]),
        "state" => sel(&["up", "down", "off", "config_error", "available"]),
        "tcp-strict" | "intra-connect" | "flow-offload" => sel(&["on", "off"]),
        "verdict" => sel(&["log drop accept", "drop", "log", "accept", "log drop"]),
        "mark" => sel(&[
            "0x0",
            "0x1",
            "0x10",
            "0x7fffffff",
            "0x80000000",
            "0xffffffff",
            "zz",
        ]),
        "type" => sel(&["blacklist", "whitelist"]),
        "route" => sel(&["in", "out"]),
        "iface" | "oface" => sel(&["lo", "eth0", "abcdefghijklmnop", "a b"]),
        "ether-addr" | "iether-addr" | "oether-addr" => sel(&[
            "02:00:00:00:00:01",
            "02:00:00:00:00:02",
            "02:00:00:00:00",
            "zz:00:00:00:00:01",
        ]),
        "new-rtlimit" | "rst-rtlimit" | "log-rtlimit" => (
            int_text(),
            prop::sample::select(vec![
                "", "/second", "/minute", "/hour", "/day", "/week", "/x",
            ]),
        )
            .prop_map(|(n, u)| Value::String(format!("{n}{u}")))
            .boxed(),
        k if k.ends_with("log-prefix") => prop_oneof![
            sel(&[
                "",
                "KNAME-FNAME ",
                "[TYPE,FNAME,BNAME,ANAME,PNAME] ",
                "x\"y"
            ]),
            prop::sample::select(vec![60usize, 127, 128, 200])
                .prop_map(|n| Value::String("FNAME".repeat(n / 5))),
        ]
        .boxed(),
        "fqdn" | "time" => weird_string().prop_map(Value::String).boxed(),
        "newname" | "name" | "backend" => name().prop_map(Value::String).boxed(),
        _ => int_text().prop_map(Value::String).boxed(),
    };
    prop_oneof![14 => good, 1 => junk()].boxed()
}

/// An object with a name and some of `keys`, plus, rarely, an unknown key.
/// A name, mostly one of `existing` (the objects of the seed).
fn name_among(existing: &'static [&'static str]) -> BoxedStrategy<Value> {
    prop_oneof![
        3 => prop::sample::select(existing.to_vec()).prop_map(|s| json!(s)),
        2 => value_for("name"),
    ]
    .boxed()
}

fn object(
    names: &'static [&'static str],
    keys: &'static [&'static str],
    extra: Vec<(&'static str, BoxedStrategy<Value>)>,
) -> BoxedStrategy<Value> {
    let plain = prop::collection::vec(
        prop::sample::select(keys.to_vec()).prop_flat_map(|k| (Just(k), value_for(k))),
        0..5,
    );
    let extra = extra
        .into_iter()
        .map(|(k, s)| prop::option::weighted(0.3, s).prop_map(move |v| (k, v)))
        .collect::<Vec<_>>();
    (
        prop::option::weighted(0.97, name_among(names)),
        plain,
        extra,
        prop::option::weighted(0.02, junk()),
    )
        .prop_map(|(n, kv, extra, unknown)| {
            let mut m = Map::new();
            if let Some(n) = n {
                m.insert("name".into(), n);
            }
            for (k, v) in kv {
                m.insert(k.into(), v);
            }
            for (k, v) in extra {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            if let Some(v) = unknown {
                m.insert("bogus".into(), v);
            }
            Value::Object(m)
        })
        .boxed()
}

const BACKEND_KEYS: &[&str] = &[
    "ip-addr",
    "ip-addr",
    "port",
    "weight",
    "priority",
    "mark",
    "est-connlimit",
    "est-connlimit-log-prefix",
    "state",
    "source-addr",
    "ether-addr",
    "fqdn",
    "newname",
];

const FARM_KEYS: &[&str] = &[
    "family",
    "virtual-addr",
    "virtual-addr",
    "virtual-ports",
    "virtual-ports",
    "protocol",
    "mode",
    "scheduler",
    "sched-param",
    "persistence",
    "persist-ttl",
    "helper",
    "log",
    "log-prefix",
    "log-rtlimit",
    "mark",
    "state",
    "limits-ttl",
    "new-rtlimit",
    "new-rtlimit-burst",
    "new-rtlimit-log-prefix",
    "rst-rtlimit",
    "rst-rtlimit-burst",
    "rst-rtlimit-log-prefix",
    "est-connlimit",
    "est-connlimit-log-prefix",
    "tcp-strict",
    "tcp-strict-log-prefix",
    "verdict",
    "intra-connect",
    "source-addr",
    "responsettl",
    "fqdn",
    "newname",
    "iface",
    "oface",
    "ether-addr",
    "oether-addr",
    "queue",
    "flow-offload",
];

const ADDRESS_KEYS: &[&str] = &[
    "family",
    "ip-addr",
    "ports",
    "protocol",
    "iface",
    "verdict",
    "log-prefix",
    "log-rtlimit",
    "fqdn",
    "newname",
];

const POLICY_KEYS: &[&str] = &[
    "type",
    "family",
    "timeout",
    "route",
    "log-prefix",
    "newname",
];

fn refs() -> BoxedStrategy<Value> {
    prop::collection::vec(
        name_among(&["bl", "wl"]).prop_map(|n| json!({ "name": n })),
        0..3,
    )
    .prop_map(Value::Array)
    .boxed()
}

fn element() -> BoxedStrategy<Value> {
    let data = prop_oneof![
        4 => sel(&[
            "198.18.9.0/24", "198.18.8.8", "198.18.0.2", "198.18.0.0/16", "0.0.0.0/0",
            "2001:2::/48", "2001:2::2", "198.18.9.7/24", "198.18.9.0/33",
        ]),
        1 => junk(),
    ];
    (data, prop::option::weighted(0.2, value_for("time")))
        .prop_map(|(d, t)| {
            let mut m = Map::new();
            m.insert("data".into(), d);
            if let Some(t) = t {
                m.insert("time".into(), t);
            }
            Value::Object(m)
        })
        .boxed()
}

fn backend() -> BoxedStrategy<Value> {
    object(&["a", "b"], BACKEND_KEYS, vec![])
}

fn address(top: bool) -> BoxedStrategy<Value> {
    let extra = if top {
        vec![("policies", refs())]
    } else {
        vec![]
    };
    object(&["fw", "web-addr"], ADDRESS_KEYS, extra)
}

fn policy() -> BoxedStrategy<Value> {
    object(
        &["bl", "wl"],
        POLICY_KEYS,
        vec![(
            "elements",
            prop::collection::vec(element(), 0..4)
                .prop_map(Value::Array)
                .boxed(),
        )],
    )
}

fn farm() -> BoxedStrategy<Value> {
    let session = (value_for("ip-addr"), value_for("backend"))
        .prop_map(|(c, b)| json!({"client": c, "backend": b}));
    object(
        &["web", "0abc"],
        FARM_KEYS,
        vec![
            (
                "backends",
                prop::collection::vec(backend(), 0..4)
                    .prop_map(Value::Array)
                    .boxed(),
            ),
            ("policies", refs()),
            (
                "addresses",
                prop::collection::vec(address(false), 0..2)
                    .prop_map(Value::Array)
                    .boxed(),
            ),
            (
                "sessions",
                prop::collection::vec(session, 0..2)
                    .prop_map(Value::Array)
                    .boxed(),
            ),
        ],
    )
}

fn list_of(item: BoxedStrategy<Value>, max: usize) -> BoxedStrategy<Value> {
    prop_oneof![
        20 => prop::collection::vec(item, 1..=max).prop_map(Value::Array),
        1 => junk(),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// requests

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
}

fn req(method: &'static str, path: String, body: Option<Value>) -> Req {
    Req {
        method,
        path,
        body: body.map(|mut b| {
            keep_api_reachable(&mut b);
            b.to_string().into_bytes()
        }),
    }
}

/// The API is reached over `lo` in the daemon's namespace, through the daemon's own
/// rules: a TCP service with no address and every port (a farm or address given no ports)
/// takes its connections (a whitelist on such an address dropped them, and the daemon
/// could no longer be asked anything). Such services are valid, not bugs: objects that
/// set up a service get ports that leave the API's port (and the client's, see fuzz_ns)
/// out.
fn keep_api_reachable(v: &mut Value) {
    fn port_for(obj: &Map<String, Value>) -> Value {
        let name = obj.get("name").map(|n| n.to_string()).unwrap_or_default();
        let h = name
            .bytes()
            .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        json!((1000 + h % 1000).to_string())
    }
    fn fix(obj: &mut Map<String, Value>, ports_key: &str, keys: &[&str]) {
        let blank = |v: &Value| v.as_str().is_some_and(|s| s.trim().is_empty());
        let touches = keys.iter().any(|k| obj.contains_key(*k));
        if touches && obj.get(ports_key).map_or(true, blank) {
            let p = port_for(obj);
            obj.insert(ports_key.into(), p);
        }
    }
    const LEGACY: &[&str] = &[
        "family",
        "virtual-addr",
        "virtual-ports",
        "protocol",
        "iface",
        "ether-addr",
        "iether-addr",
    ];
    const ADDRESS: &[&str] = &["name", "family", "ip-addr", "ports", "protocol", "iface"];
    let Some(top) = v.as_object_mut() else {
        return;
    };
    if let Some(Value::Array(farms)) = top.get_mut("farms") {
        for f in farms.iter_mut().filter_map(Value::as_object_mut) {
            fix(f, "virtual-ports", LEGACY);
            if let Some(Value::Array(addrs)) = f.get_mut("addresses") {
                for a in addrs.iter_mut().filter_map(Value::as_object_mut) {
                    fix(a, "ports", ADDRESS);
                }
            }
        }
    }
    if let Some(Value::Array(addrs)) = top.get_mut("addresses") {
        for a in addrs.iter_mut().filter_map(Value::as_object_mut) {
            fix(a, "ports", ADDRESS);
        }
    }
}

/// A document with some of the three lists.
fn document() -> BoxedStrategy<Value> {
    (
        prop::option::weighted(0.8, list_of(farm(), 3)),
        prop::option::weighted(0.3, list_of(policy(), 2)),
        prop::option::weighted(0.3, list_of(address(true), 2)),
    )
        .prop_map(|(f, p, a)| {
            let mut m = Map::new();
            if let Some(f) = f {
                m.insert("farms".into(), f);
            }
            if let Some(p) = p {
                m.insert("policies".into(), p);
            }
            if let Some(a) = a {
                m.insert("addresses".into(), a);
            }
            Value::Object(m)
        })
        .boxed()
}

fn request() -> BoxedStrategy<Req> {
    let post = (
        prop::sample::select(vec!["POST", "PUT"]),
        prop_oneof![
            12 => Just("/farms"),
            2 => Just("/policies"),
            2 => Just("/addresses"),
            1 => Just("/farms/web"),
        ],
        document(),
    )
        .prop_map(|(m, p, d)| req(m, p.into(), Some(d)));
    let policies = (
        prop::sample::select(vec!["POST", "PATCH", "DELETE"]),
        name(),
        list_of(policy(), 2),
    )
        .prop_map(|(m, n, mut l)| {
            let path = if m == "POST" {
                "/policies".to_string()
            } else {
                // The body names the policy of the path (mostly).
                if let Some(first) = l.as_array_mut().and_then(|a| a.first_mut()) {
                    if first.get("name").is_some() && first["name"] != "bl" {
                        first["name"] = json!(n);
                    }
                }
                format!("/policies/{n}")
            };
            req(m, path, Some(json!({ "policies": l })))
        });
    let farm_policies = (name(), refs()).prop_map(|(f, r)| {
        req(
            "PATCH",
            format!("/farms/{f}/policies"),
            Some(json!({"farms": [{"name": f, "policies": r}]})),
        )
    });
    let delete = (name(), name(), 0usize..12).prop_map(|(a, b, k)| {
        let path = match k {
            0 => format!("/farms/{a}"),
            1 => format!("/farms/{a}/backends/{b}"),
            2 => format!("/farms/{a}/backends"),
            3 => format!("/farms/{a}/sessions"),
            4 => format!("/farms/{a}/sessions/198.18.0.2"),
            5 => format!("/farms/{a}/backends/{b}/sessions"),
            6 => format!("/farms/{a}/policies/{b}"),
            7 => format!("/farms/{a}/addresses/{b}"),
            8 => format!("/policies/{a}"),
            9 => format!("/policies/{a}/elements/198.18.9.0/24"),
            10 => format!("/addresses/{a}"),
            _ => "/farms".to_string(),
        };
        req("DELETE", path, None)
    });
    let get = (name(), 0usize..6).prop_map(|(a, k)| {
        let path = match k {
            0 => format!("/farms/{a}"),
            1 => format!("/farms/{a}/sessions"),
            2 => format!("/policies/{a}"),
            3 => format!("/addresses/{a}"),
            4 => "/bogus".to_string(),
            _ => "/farms".to_string(),
        };
        req("GET", path, None)
    });
    let raw = prop_oneof![
        Just(b"{\"farms\":[{\"name\":\"a\"".to_vec()),
        Just(b"not json".to_vec()),
        Just(b"{\"farms\":[{\"name\":\"\xff\"}]}".to_vec()),
        Just(b"[".repeat(5000)),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
    .prop_map(|b| Req {
        method: "POST",
        path: "/farms".into(),
        body: Some(b),
    });
    prop_oneof![
        16 => post,
        2 => policies,
        1 => farm_policies,
        3 => delete,
        1 => get,
        1 => raw,
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// the daemon under test

static SENT: AtomicU64 = AtomicU64::new(0);
static OK: AtomicU64 = AtomicU64::new(0);
static CLIENT_ERR: AtomicU64 = AtomicU64::new(0);
static SERVER_ERR: AtomicU64 = AtomicU64::new(0);
static SEQUENCES: AtomicU64 = AtomicU64::new(0);

/// What GET shows: the state a refused request must leave as it was.
fn state_of(d: &Daemon) -> Result<[Vec<u8>; 3], String> {
    let mut out: [Vec<u8>; 3] = Default::default();
    for (i, p) in ["/farms", "/policies", "/addresses"].iter().enumerate() {
        let r = d
            .try_request("GET", p, &[], None)
            .map_err(|e| format!("GET {p}: {e}"))?;
        if r.status != 200 {
            return Err(format!(
                "GET {p}: status {} {}",
                r.status,
                tail(&r.text(), 300)
            ));
        }
        out[i] = without_live_notes(&r.body);
    }
    Ok(out)
}

/// A GET document without `config-error` texts: they tell how neighbour resolution is
/// going on the live network ("unknown yet", then "does not answer"), which changes
/// without any request.
fn without_live_notes(body: &[u8]) -> Vec<u8> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("config-error");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(mut v) => {
            strip(&mut v);
            serde_json::to_vec_pretty(&v).unwrap_or_default()
        }
        Err(_) => body.to_vec(),
    }
}

/// The ruleset as a sorted list of objects (handles dropped, set elements sorted, the
/// owner marker left out: it names the daemon's process) and each chain's rules in order.
fn kernel_view(ns: &NetNs) -> Vec<String> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("handle");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let text = ns.nft(&["-j", "list", "ruleset"]);
    let mut v: Value = serde_json::from_str(&text).expect("nft -j output");
    strip(&mut v);
    let mut objects = Vec::new();
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in v["nftables"].as_array().cloned().unwrap_or_default() {
        let Value::Object(m) = item else { continue };
        for (kind, mut body) in m {
            match kind.as_str() {
                "metainfo" => {}
                "rule" => {
                    let chain = format!("{} {} {}", body["family"], body["table"], body["chain"]);
                    rules.entry(chain).or_default().push(body.to_string());
                }
                _ => {
                    if body["name"] == "owner" {
                        body.as_object_mut().map(|o| o.remove("elem"));
                    }
                    if let Some(Value::Array(e)) = body.get_mut("elem") {
                        e.sort_by_key(|x| x.to_string());
                    }
                    objects.push(format!("{kind} {body}"));
                }
            }
        }
    }
    objects.sort();
    for (chain, r) in rules {
        objects.push(format!("rules of {chain}: {}", r.join("\n")));
    }
    objects
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

/// Brings the daemon back to an empty state.
fn reset(d: &Daemon) -> Result<(), TestCaseError> {
    for p in ["/farms", "/addresses", "/policies"] {
        let r = d
            .try_request("DELETE", p, &[], None)
            .map_err(|e| TestCaseError::fail(format!("reset DELETE {p}: {e}")))?;
        check(r.status == 200, || {
            format!("reset DELETE {p}: {} {}", r.status, tail(&r.text(), 500))
        })?;
    }
    Ok(())
}

fn show(r: &Req) -> String {
    let body = r
        .body
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    format!("{} {} {}", r.method, r.path, tail_start(&body, 2000))
}

fn tail_start(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_string()
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes)", &s[..end], s.len())
    }
}

/// What each sequence starts from, so that requests meet existing objects: policies,
/// a standalone address with a policy, and farms (one named with a leading digit and a
/// helper).
fn seed() -> Value {
    json!({
        "policies": [
            {"name": "bl", "type": "blacklist", "elements": [{"data": "198.18.9.0/24"}]},
            {"name": "wl", "type": "whitelist", "elements": [{"data": "198.18.0.0/16"}]}],
        "addresses": [
            {"name": "fw", "ip-addr": "198.18.0.200", "ports": "22", "policies": [{"name": "bl"}]}],
        "farms": [
            {"name": "web", "virtual-addr": "198.18.0.1", "virtual-ports": "80",
             "scheduler": "weight", "policies": [{"name": "bl"}], "new-rtlimit": "100",
             "backends": [{"name": "a", "ip-addr": "198.18.1.11"}, {"name": "b", "ip-addr": "198.18.1.12"}]},
            {"name": "0abc", "virtual-addr": "198.18.0.2", "virtual-ports": "21", "helper": "ftp",
             "persistence": "srcip", "backends": [{"name": "a", "ip-addr": "198.18.1.11"}]}]
    })
}

/// Runs one sequence of requests and checks every answer, then the kernel.
fn run_sequence(ns: &NetNs, d: &Daemon, reqs: &[Req]) -> Result<(), TestCaseError> {
    check(d.alive(), || "the daemon is not running".into())?;
    reset(d)?;
    let r = d
        .try_request("POST", "/farms", &[], Some(seed().to_string().as_bytes()))
        .map_err(|e| TestCaseError::fail(format!("seed: {e}")))?;
    check(r.status == 200, || {
        format!("seed: {} {}", r.status, tail(&r.text(), 500))
    })?;
    let n = SEQUENCES.fetch_add(1, Ordering::Relaxed) + 1;
    if n % 25 == 0 && std::env::var_os("NFTLB_FUZZ_SECS").is_some() {
        // Progress of a long run (rounds end only after their shrinking).
        eprintln!(
            "[{}] {n} sequences, {} requests, {} 5xx",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            SENT.load(Ordering::Relaxed),
            SERVER_ERR.load(Ordering::Relaxed)
        );
    }
    let mut before = state_of(d).map_err(TestCaseError::fail)?;
    for r in reqs {
        SENT.fetch_add(1, Ordering::Relaxed);
        let resp = d.try_request(r.method, &r.path, &[], r.body.as_deref());
        let resp = match resp {
            Ok(x) => x,
            Err(e) => {
                SERVER_ERR.fetch_add(1, Ordering::Relaxed);
                // Shrinking may not reproduce this (the daemon may be gone): say it now.
                let rs = ns.nft_ruleset();
                let why = format!(
                    "no answer ({e}) to {}; daemon alive: {}; log:\n{}\nruleset:\n{}",
                    show(r),
                    d.alive(),
                    tail(&d.log(), 3000),
                    tail(&rs, 6000)
                );
                report(&why);
                return Err(TestCaseError::fail(why));
            }
        };
        check(d.alive(), || {
            format!(
                "the daemon died after {}; log:\n{}",
                show(r),
                tail(&d.log(), 3000)
            )
        })?;
        if std::env::var_os("NFTLB_FUZZ_VERBOSE").is_some() {
            eprintln!(
                "{} {} -> {} {}",
                r.method,
                r.path,
                resp.status,
                tail_start(&resp.text(), 200)
            );
        }
        match resp.status {
            200..=299 => {
                OK.fetch_add(1, Ordering::Relaxed);
                if r.method != "GET" {
                    before = state_of(d).map_err(TestCaseError::fail)?;
                }
            }
            400..=499 => {
                CLIENT_ERR.fetch_add(1, Ordering::Relaxed);
                let text = resp.text();
                check(text.len() < 4096, || {
                    format!("a {}-byte error for {}", text.len(), show(r))
                })?;
                let now = state_of(d).map_err(TestCaseError::fail)?;
                check(now == before, || {
                    format!(
                        "{} answered {} {} but changed the state",
                        show(r),
                        resp.status,
                        tail(&text, 500)
                    )
                })?;
            }
            s => {
                SERVER_ERR.fetch_add(1, Ordering::Relaxed);
                let why = format!("status {s} for {}: {}", show(r), tail(&resp.text(), 1500));
                // Shrinking may not reproduce it (a dead writer answers 500 to anything):
                // the whole sequence and the daemon's log, now.
                let all: Vec<String> = reqs.iter().map(show).collect();
                report(&format!(
                    "FIRST SEEN: {why}\nsequence:\n{}\ndaemon log:\n{}",
                    all.join("\n"),
                    tail(&d.log(), 6000)
                ));
                return Err(TestCaseError::fail(why));
            }
        }
    }
    let log = d.log();
    check(!log.contains("panicked"), || {
        format!("a panic in the daemon log:\n{}", tail(&log, 3000))
    })?;
    // A daemon started on the saved state in a fresh namespace shows the same state and
    // builds the same rules: what was accepted (the seed at least) is in the kernel and
    // in the file.
    let ns2 = fuzz_ns("fuzzb");
    let d2 = Daemon::start_from_state(&ns2, d);
    let (s1, s2) = (
        state_of(d).map_err(TestCaseError::fail)?,
        state_of(&d2).map_err(TestCaseError::fail)?,
    );
    if let Some(i) = (0..3).find(|i| s1[*i] != s2[*i]) {
        return Err(TestCaseError::fail(format!(
            "a daemon started on the saved state shows another state:\n{}\n--- vs ---\n{}",
            String::from_utf8_lossy(&s1[i]),
            String::from_utf8_lossy(&s2[i])
        )));
    }
    let (k1, k2) = (kernel_view(ns), kernel_view(&ns2));
    if k1 != k2 {
        let only1: Vec<&String> = k1.iter().filter(|x| !k2.contains(x)).collect();
        let only2: Vec<&String> = k2.iter().filter(|x| !k1.contains(x)).collect();
        return Err(TestCaseError::fail(format!(
            "the kernel differs from what the saved state builds:\nonly here: {only1:#?}\nonly there: {only2:#?}"
        )));
    }
    Ok(())
}

/// A namespace with an interface `eth0` (a veth with a fixed MAC, whose peer stays in the
/// namespace) holding the seed's virtual addresses and the backends' network, so that
/// ingress farms (`dsr`, `stlsdnat`) with a backend `ether-addr` are rendered too.
fn fuzz_ns(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    // The API client's ports, out of the generated services' ports: the filter stage
    // matches every packet's destination port, the API's replies too (a service on
    // ports 6000-65535 with a whitelist dropped them).
    ns.sysctl("net/ipv4/ip_local_port_range", "61000 65000");
    let link = "link add eth0 address 02:00:00:00:00:f1 type veth peer name peer0 address 02:00:00:00:00:f2";
    ns.ip(&link.split(' ').collect::<Vec<_>>());
    ns.ip(&["link", "set", "peer0", "up"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    for a in [
        "198.18.0.1/24",
        "198.18.0.2/32",
        "198.18.0.200/32",
        "198.18.1.1/24",
        "2001:2::1/64",
        "2001:2:0:1::1/64",
    ] {
        ns.ip(&["addr", "add", a, "dev", "eth0"]);
    }
    ns
}

/// Writes a finding to stderr and to `NFTLB_FUZZ_LOG`.
fn report(text: &str) {
    eprintln!("{text}\n");
    if let Ok(p) = std::env::var("NFTLB_FUZZ_LOG") {
        use std::io::Write;
        if let Ok(mut fh) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(fh, "{text}\n");
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn api_survives_generated_requests() {
    let secs = env_u64("NFTLB_FUZZ_SECS");
    let cases = env_u64("NFTLB_FUZZ_CASES").unwrap_or(if secs.is_some() { 50 } else { 30 }) as u32;
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
    let log_file = std::env::var("NFTLB_FUZZ_LOG").ok();
    let started = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let strategy = prop::collection::vec(request(), 1..16);
    loop {
        // A fresh namespace and daemon for each round (after a failure it may be dead).
        let ns = fuzz_ns("fuzz");
        let d = Daemon::start(&ns);
        let config = Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 200,
            // A failure that leaves the daemon unreachable makes every shrink step wait
            // for its timeout.
            max_shrink_time: 180_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&strategy, |reqs| run_sequence(&ns, &d, &reqs));
        drop(d);
        match result {
            Ok(()) => {}
            Err(TestError::Fail(why, reqs)) => {
                let shown: Vec<String> = reqs.iter().map(show).collect();
                let f = format!("{why}\nminimal sequence:\n{}", shown.join("\n"));
                eprintln!("FAILURE:\n{f}\n");
                if let Some(p) = &log_file {
                    use std::io::Write;
                    if let Ok(mut fh) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                    {
                        let _ = writeln!(fh, "FAILURE after {:?}:\n{f}\n", started.elapsed());
                    }
                }
                failures.push(f);
            }
            Err(e) => failures.push(format!("{e}")),
        }
        let done = match deadline {
            None => true,
            Some(t) => Instant::now() >= t,
        };
        let counts = format!(
            "{:?}: {} sequences, {} requests: {} 2xx, {} 4xx, {} 5xx or no answer; {} failures",
            started.elapsed(),
            SEQUENCES.load(Ordering::Relaxed),
            SENT.load(Ordering::Relaxed),
            OK.load(Ordering::Relaxed),
            CLIENT_ERR.load(Ordering::Relaxed),
            SERVER_ERR.load(Ordering::Relaxed),
            failures.len()
        );
        eprintln!("{counts}");
        if let Some(p) = &log_file {
            use std::io::Write;
            if let Ok(mut fh) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
            {
                let _ = writeln!(fh, "{counts}");
            }
        }
        if done || (deadline.is_none() && !failures.is_empty()) {
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
