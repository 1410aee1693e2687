//! Bad input is refused with a 4xx and changes nothing: neither the state (GET /farms,
//! state file) nor the kernel ruleset (`nft list ruleset`, byte for byte).

mod common;

use common::*;
use serde_json::json;

const VIP: &str = "198.18.0.100";

struct Case {
    what: String,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

fn post(what: &str, body: impl Into<Vec<u8>>) -> Case {
    Case {
        what: what.to_string(),
        method: "POST",
        path: "/farms".into(),
        headers: vec![],
        body: Some(body.into()),
    }
}

fn post_json(what: &str, v: serde_json::Value) -> Case {
    post(what, v.to_string())
}

/// A new farm named `name` that would be valid apart from the name.
fn named(name: &str) -> serde_json::Value {
    json!({"farms": [{"name": name, "family": "ipv4", "virtual-addr": "198.18.0.101",
        "virtual-ports": "80", "mode": "dnat", "backends": [bck("be1", &be4(1))]}]})
}

/// A new farm `x` with one farm key set to `value`.
fn new_farm_with(key: &str, value: serde_json::Value) -> serde_json::Value {
    let mut f = json!({"name": "x", "family": "ipv4", "virtual-addr": "198.18.0.101",
        "virtual-ports": "80", "mode": "dnat", "backends": [bck("be1", &be4(1))]});
    f[key] = value;
    json!({ "farms": [f] })
}

/// The existing farm `good` with one key changed.
fn good_with(key: &str, value: serde_json::Value) -> serde_json::Value {
    let mut f = json!({"name": "good"});
    f[key] = value;
    json!({ "farms": [f] })
}

/// The existing farm's backend be1 with one key changed.
fn be1_with(key: &str, value: &str) -> serde_json::Value {
    backend_patch("good", "be1", key, value)
}

/// A new backend be3 on the existing farm with one key set.
fn new_backend_with(key: &str, value: &str) -> serde_json::Value {
    let b = with(bck("be3", "198.18.1.13"), &[(key, value)]);
    json!({"farms": [{"name": "good", "backends": [b]}]})
}

fn cases() -> Vec<Case> {
    let mut c = Vec::new();

    // Injection attempts in names and in other fields that end up in nft text.
    for (what, name) in [
        ("name with ';'", "a; flush ruleset"),
        ("name with double quote", "a\" ; flush ruleset ; \""),
        ("name with single quote", "a'b"),
        ("name with newline", "a\nflush ruleset"),
        ("name with CR", "a\rb"),
        ("name with opening brace", "a{b"),
        ("name with closing brace", "a } ; flush ruleset"),
        ("name with '#'", "a#b"),
        ("name with space", "a b"),
        ("name with NUL", "a\u{0}b"),
        ("empty name", ""),
    ] {
        c.push(post_json(what, named(name)));
    }
    c.push(post_json("10 KB name", named(&"n".repeat(10 * 1024))));
    c.push(post_json(
        "backend name injection",
        json!({"farms": [{"name": "good", "backends": [bck("b; flush ruleset", "198.18.1.13")]}]}),
    ));
    c.push(post_json(
        "newname injection",
        good_with("newname", json!("a; flush ruleset")),
    ));
    c.push(post_json(
        "virtual-addr injection",
        good_with("virtual-addr", json!("198.18.0.100; flush ruleset")),
    ));
    c.push(post_json(
        "virtual-ports injection",
        good_with("virtual-ports", json!("80; flush ruleset")),
    ));
    c.push(post_json(
        "virtual-ports brace",
        good_with("virtual-ports", json!("80 }")),
    ));
    c.push(post_json(
        "source-addr injection",
        good_with("source-addr", json!("198.18.1.1\nflush ruleset")),
    ));
    c.push(post_json(
        "log-prefix injection",
        good_with("log-prefix", json!("x\" ; flush ruleset ; \"")),
    ));
    c.push(post_json(
        "iface injection",
        good_with("iface", json!("ethf\"; flush ruleset")),
    ));
    c.push(post_json(
        "mark injection",
        good_with("mark", json!("0x1; flush ruleset")),
    ));
    c.push(post_json(
        "backend ip-addr injection",
        be1_with("ip-addr", "198.18.1.11 }"),
    ));
    c.push(post_json(
        "backend source-addr injection",
        be1_with("source-addr", "1.2.3.4; flush ruleset"),
    ));
    c.push(Case {
        what: "policy name injection".into(),
        method: "POST",
        path: "/policies".into(),
        headers: vec![],
        body: Some(
            json!({"policies": [{"name": "p; flush ruleset", "type": "blacklist"}]})
                .to_string()
                .into(),
        ),
    });

    // Malformed JSON.
    for (what, body) in [
        ("truncated JSON", &b"{\"farms\":[{\"name\":\"x\""[..]),
        ("not JSON", b"not json"),
        ("empty body", b""),
        ("trailing comma", b"{\"farms\":[{\"name\":\"x\",}]}"),
        ("trailing garbage", b"{\"farms\":[{\"name\":\"x\"}]}garbage"),
        ("invalid UTF-8", b"{\"farms\":[{\"name\":\"\xff\xfe\"}]}"),
        ("nested too deep", &[b'['; 100_000][..]),
    ] {
        c.push(post(what, body.to_vec()));
    }

    // Wrong types.
    for (what, v) in [
        ("farms is an object", json!({"farms": {"name": "x"}})),
        ("farms is a string", json!({"farms": "x"})),
        ("top level is an array", json!([{"name": "x"}])),
        ("top level is a string", json!("farms")),
        ("farm is null", json!({"farms": [null]})),
        ("name is an array", json!({"farms": [{"name": ["x"]}]})),
        (
            "name is an object",
            json!({"farms": [{"name": {"a": "b"}}]}),
        ),
        ("name is null", json!({"farms": [{"name": null}]})),
        (
            "backends is a string",
            json!({"farms": [{"name": "good", "backends": "be1"}]}),
        ),
        (
            "backend is an array",
            json!({"farms": [{"name": "good", "backends": [["be1"]]}]}),
        ),
        (
            "virtual-ports is an object",
            good_with("virtual-ports", json!({"a": 1})),
        ),
        ("mode is null", good_with("mode", json!(null))),
        ("mode is a bool", good_with("mode", json!(true))),
        (
            "weight is an array",
            json!({"farms": [{"name": "good", "backends": [{"name": "be1", "weight": [2]}]}]}),
        ),
        ("farm without name", json!({"farms": [{"mode": "snat"}]})),
    ] {
        c.push(post_json(what, v));
    }

    // Unknown keys.
    c.push(post_json(
        "unknown farm key",
        good_with("bogus", json!("1")),
    ));
    c.push(post_json("unknown top-level key", json!({"bogus": []})));
    c.push(post_json("unknown backend key", be1_with("bogus", "1")));
    c.push(post_json(
        "unknown key on a new farm",
        new_farm_with("bogus", json!("1")),
    ));

    // Unknown or invalid values, on a new farm and on the existing one.
    for (k, v) in [
        ("mode", "bogus"),
        ("family", "ip4"),
        ("scheduler", "roundrobin"),
        ("protocol", "icmp"),
        ("state", "bogus"),
        ("virtual-addr", "198.18.0.300"),
        ("virtual-addr", "not-an-ip"),
        ("virtual-ports", "70000"),
        ("virtual-ports", "0-70000"),
        ("virtual-ports", "abc"),
        ("sched-param", "bogus"),
        ("persistence", "bogus"),
        ("persist-ttl", "-5"),
        ("helper", "bogus"),
        ("source-addr", "not-an-ip"),
        ("mark", "0xzz"),
    ] {
        c.push(post_json(
            &format!("new farm {k}={v:?}"),
            new_farm_with(k, json!(v)),
        ));
        c.push(post_json(
            &format!("existing farm {k}={v:?}"),
            good_with(k, json!(v)),
        ));
    }
    for (k, v) in [
        ("weight", "0"),
        ("weight", "-1"),
        ("weight", "abc"),
        ("weight", "1.5"),
        ("priority", "0"),
        ("state", "bogus"),
        ("ip-addr", "999.1.1.1"),
        ("ip-addr", "not-an-ip"),
        ("port", "70000"),
        ("source-addr", "x"),
    ] {
        c.push(post_json(&format!("backend {k}={v:?}"), be1_with(k, v)));
        c.push(post_json(
            &format!("new backend {k}={v:?}"),
            new_backend_with(k, v),
        ));
    }

    // Numbers beyond what nft or the kernel accepts (they used to reach nft and come
    // back as a 500 "value too large", after a full resynchronisation attempt).
    for (what, f) in [
        (
            "persist-ttl over nft's 8 digits",
            json!({"name": "good", "persistence": "srcip", "persist-ttl": "100000000"}),
        ),
        (
            "limits-ttl over nft's 8 digits",
            json!({"name": "good", "new-rtlimit": "10", "limits-ttl": "100000000"}),
        ),
        (
            "persist-ttl over u32",
            json!({"name": "good", "persistence": "srcip", "persist-ttl": 4294967296u64}),
        ),
        (
            "new-rtlimit-burst the token bucket cannot hold",
            json!({"name": "good", "new-rtlimit": "1/week", "new-rtlimit-burst": "30501"}),
        ),
        (
            "rst-rtlimit-burst the token bucket cannot hold",
            json!({"name": "good", "rst-rtlimit": "1/week", "rst-rtlimit-burst": "4294967295"}),
        ),
        (
            "new-rtlimit over u32",
            json!({"name": "good", "new-rtlimit": "4294967296/second"}),
        ),
        (
            "est-connlimit over u32",
            json!({"name": "good", "est-connlimit": "4294967296"}),
        ),
    ] {
        c.push(post_json(what, json!({ "farms": [f] })));
    }
    // An rr farm needs one bucket per unit of weight (after the common divisor): 8
    // co-prime weights near 10,000 would be 79,972 map elements.
    let heavy: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            with(
                bck(&format!("w{i}"), "198.18.1.13"),
                &[("weight", &(10_000 - i).to_string())],
            )
        })
        .collect();
    c.push(post_json(
        "rr farm of 79,972 buckets",
        json!({"farms": [{"name": "good", "backends": heavy}]}),
    ));
    // Free text longer than its limit.
    for (what, v) in [
        (
            "farm fqdn of 254 bytes",
            good_with("fqdn", json!("a".repeat(254))),
        ),
        (
            "farm fqdn of 1 MB",
            good_with("fqdn", json!("a".repeat(1 << 20))),
        ),
        (
            "log-prefix of 128 characters",
            good_with("log-prefix", json!("x".repeat(128))),
        ),
        (
            "new-rtlimit-log-prefix of 128 characters",
            good_with("new-rtlimit-log-prefix", json!("x".repeat(128))),
        ),
        (
            "backend fqdn of 254 bytes",
            be1_with("fqdn", &"b".repeat(254)),
        ),
        (
            "address fqdn of 254 bytes",
            json!({"addresses": [{"name": "good-addr", "fqdn": "c".repeat(254)}]}),
        ),
        (
            "element time of 256 bytes",
            json!({"policies": [{"name": "p1", "elements": [{"data": "198.18.9.9", "time": "t".repeat(256)}]}]}),
        ),
        (
            "policy log-prefix of 128 characters",
            json!({"policies": [{"name": "p1", "log-prefix": "x".repeat(128)}]}),
        ),
        (
            "newname of 129 characters",
            good_with("newname", json!("n".repeat(129))),
        ),
    ] {
        c.push(post_json(what, v));
    }

    // A request is all or nothing.
    c.push(post_json(
        "valid new farm followed by an invalid one",
        json!({"farms": [named("ok2")["farms"][0].clone(), named("a; flush ruleset")["farms"][0].clone()]}),
    ));
    c.push(post_json(
        "valid change followed by an unknown key",
        json!({"farms": [{"name": "good", "mode": "snat"}, {"name": "good", "bogus": "1"}]}),
    ));
    c.push(post_json(
        "valid change then invalid backend",
        json!({"farms": [{"name": "good", "scheduler": "weight",
            "backends": [bck("be3", "198.18.1.13"), with(bck("be4", "198.18.1.14"), &[("weight", "0")])]}]}),
    ));

    // Authentication.
    let doc = good_with("mode", json!("snat")).to_string().into_bytes();
    c.push(Case {
        what: "no key".into(),
        method: "POST",
        path: "/farms".into(),
        headers: vec![("Key", String::new())],
        body: Some(doc.clone()),
    });
    c.push(Case {
        what: "wrong key".into(),
        method: "POST",
        path: "/farms".into(),
        headers: vec![("Key", "wrong".into())],
        body: Some(doc.clone()),
    });
    c.push(Case {
        what: "wrong key on DELETE".into(),
        method: "DELETE",
        path: "/farms/good".into(),
        headers: vec![("Key", format!("{API_KEY}x"))],
        body: None,
    });

    // Wrong paths / unknown objects.
    for (method, path) in [
        ("POST", "/farms/good"),
        ("DELETE", "/farms/nope"),
        ("DELETE", "/farms/good/backends/nope"),
        ("DELETE", "/farms/a%3B%20flush%20ruleset"),
        ("DELETE", "/bogus"),
    ] {
        c.push(Case {
            what: format!("{method} {path}"),
            method,
            path: path.into(),
            headers: vec![],
            body: if method == "POST" {
                Some(doc.clone())
            } else {
                None
            },
        });
    }
    c
}

struct Snapshot {
    farms: Vec<u8>,
    ruleset: String,
    state_file: Option<Vec<u8>>,
}

fn snapshot(lab: &Lab, d: &Daemon) -> Snapshot {
    let (st, farms) = d.get_raw("/farms");
    assert_eq!(st, 200, "GET /farms");
    Snapshot {
        farms,
        ruleset: lab.lb.nft_ruleset(),
        state_file: std::fs::read(d.state_file()).ok(),
    }
}

fn diff(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let mut d = Vec::new();
    if a.farms != b.farms {
        d.push(format!(
            "GET /farms changed:\n{}\n--- became ---\n{}",
            String::from_utf8_lossy(&a.farms),
            String::from_utf8_lossy(&b.farms)
        ));
    }
    if a.ruleset != b.ruleset {
        d.push(format!(
            "ruleset changed:\n{}\n--- became ---\n{}",
            a.ruleset, b.ruleset
        ));
    }
    if a.state_file != b.state_file {
        d.push("state file changed".into());
    }
    d
}

fn setup(lab: &Lab) -> Daemon<'_> {
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&farms_doc(farm(
        "good",
        &[
            ("family", "ipv4"),
            ("virtual-addr", VIP),
            ("virtual-ports", "80"),
            ("protocol", "tcp"),
            ("mode", "dnat"),
            ("scheduler", "rr"),
        ],
        v4_backends(2),
    )));
    assert!(lab.tcp(VIP, 80).is_ok());
    d
}

#[test]
fn bad_requests_get_4xx_and_change_nothing() {
    let lab = Lab::new(2);
    let d = setup(&lab);
    let mut base = snapshot(&lab, &d);
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let headers: Vec<(&str, &str)> =
            case.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match d.try_request(case.method, &case.path, &headers, case.body.as_deref()) {
            Ok(r) if (400..500).contains(&r.status) => {}
            Ok(r) => failures.push(format!(
                "{}: status {} (want 4xx), body {}",
                case.what,
                r.status,
                tail(&r.text(), 300)
            )),
            Err(e) => failures.push(format!("{}: no HTTP response: {e}", case.what)),
        }
        let now = snapshot(&lab, &d);
        let changes = diff(&base, &now);
        if !changes.is_empty() {
            failures.push(format!("{}: {}", case.what, changes.join("\n")));
            base = now; // report each offender once, not every later case
        }
    }
    // The service still works.
    let r = lab.tcp_many(VIP, 80, 2);
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 1), ("be2", 1)]));
    assert!(
        failures.is_empty(),
        "{} of {} bad requests misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// The documents the bad cases are derived from are valid: each bad case differs from an
/// accepted request only in its bad part, so its rejection is not an accident.
#[test]
fn control_documents_are_accepted() {
    let lab = Lab::new(2);
    let d = setup(&lab);
    let two = json!({"farms": [named("ok2")["farms"][0].clone(), {
        "name": "ok3", "virtual-addr": "198.18.0.102", "virtual-ports": "80", "mode": "dnat",
        "backends": [bck("be1", &be4(1))]}]});
    for (what, doc, cleanup) in [
        ("named", named("ctl"), Some("/farms/ctl")),
        (
            "new farm",
            new_farm_with("mode", json!("snat")),
            Some("/farms/x"),
        ),
        (
            "existing farm",
            good_with("scheduler", json!("weight")),
            None,
        ),
        ("existing backend", be1_with("weight", "2"), None),
        (
            "new backend",
            new_backend_with("weight", "2"),
            Some("/farms/good/backends/be3"),
        ),
        ("two farms", two, Some("/farms/ok2")),
    ] {
        let (st, body) = d.post("/farms", &doc);
        assert_eq!(st, 200, "{what}: {doc} -> {body}");
        if let Some(path) = cleanup {
            d.delete_ok(path);
        }
    }
    let (st, body) = d.post(
        "/policies",
        &json!({"policies": [{"name": "p1", "type": "blacklist"}]}),
    );
    assert_eq!(st, 200, "policy: {body}");
}

#[test]
fn huge_body_is_refused() {
    let lab = Lab::new(2);
    let d = setup(&lab);
    let base = snapshot(&lab, &d);
    let body = format!("{{\"farms\":[{{\"name\":\"{}\"}}]}}", "a".repeat(8 << 20));
    let r = d.try_request("POST", "/farms", &[], Some(body.as_bytes()));
    match &r {
        Ok(r) => assert!(
            (400..500).contains(&r.status),
            "8 MiB body: status {}",
            r.status
        ),
        Err(e) => panic!("8 MiB body: no HTTP response: {e}"),
    }
    let now = snapshot(&lab, &d);
    let changes = diff(&base, &now);
    assert!(changes.is_empty(), "{}", changes.join("\n"));
    // Still serving the API and traffic.
    assert_eq!(d.get("/farms").0, 200);
    assert!(lab.tcp(VIP, 80).is_ok());
}

/// Refusals name the key and the value, and say what is accepted; a huge value does not
/// make a huge reply.
#[test]
fn out_of_range_values_are_named_in_the_reply() {
    let lab = Lab::new(1);
    let d = setup(&lab);
    for (doc, want) in [
        (
            json!({"farms": [{"name": "good", "persistence": "srcip", "persist-ttl": "100000000"}]}),
            "Invalid value '100000000' of key 'persist-ttl' in farm 'good': must be at most 99999999 (seconds)",
        ),
        (
            json!({"farms": [{"name": "good", "limits-ttl": 100000000}]}),
            "Invalid value '100000000' of key 'limits-ttl' in farm 'good': must be at most 99999999 (seconds)",
        ),
        (
            json!({"farms": [{"name": "good", "new-rtlimit": "1/week", "new-rtlimit-burst": "30501"}]}),
            "Invalid value '30501' of key 'new-rtlimit-burst' in farm 'good': must be at most 30500 with new-rtlimit 1/week",
        ),
        (
            json!({"farms": [{"name": "good", "fqdn": "a".repeat(254)}]}),
            "of key 'fqdn' in farm 'good': is 254 bytes long; at most 253 are accepted",
        ),
        (
            json!({"farms": [{"name": "good", "log-prefix": "x".repeat(128)}]}),
            "of key 'log-prefix' in farm 'good': is 128 bytes long; log prefixes are at most 127 characters",
        ),
        (
            json!({"farms": [{"name": "n".repeat(200)}]}),
            "of key 'name' in farm: is 200 bytes long; names are at most 128 characters",
        ),
    ] {
        let (st, body) = d.post("/farms", &doc);
        assert_eq!(st, 400, "{body}");
        let msg = body["response"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{msg}\nwants: {want}");
    }
    // The largest accepted values are accepted, and reach the kernel.
    d.apply(
        &json!({"farms": [{"name": "good", "persistence": "srcip", "persist-ttl": "99999999",
        "new-rtlimit": "1/week", "new-rtlimit-burst": "30500", "limits-ttl": "99999999",
        "fqdn": "a".repeat(253), "log-prefix": "x".repeat(127)}]}),
    );
    let rs = lab.lb.nft_ruleset();
    assert!(rs.contains("timeout 1157d9h46m39s"), "{rs}");
    assert!(rs.contains("burst 30500 packets"), "{rs}");
    // A 64 KB value in a list of ports: the reply quotes only its start.
    let r = d.request(
        "POST",
        "/farms",
        &[],
        Some(
            json!({"farms": [{"name": "good", "virtual-ports": "y".repeat(65536)}]})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(r.status, 400, "{}", tail(&r.text(), 300));
    assert!(r.body.len() < 1024, "a {}-byte reply", r.body.len());
    // A list of 65,535 ports is refused at once (its pairwise overlap check held the
    // writer for 26 s).
    let ports: Vec<String> = (1..=65535).map(|p| p.to_string()).collect();
    let t = std::time::Instant::now();
    let (st, body) = d.post(
        "/farms",
        &json!({"farms": [{"name": "good", "virtual-ports": ports.join(",")}]}),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
}

/// Kernel object names are valid and unique whatever the names: a farm name starting
/// with a digit with a helper (its helper object was named after the farm alone), a
/// rename to "0", a farm whose name is another's sub-chain (`a` + `-tcp-strict`), a farm
/// and an address of the same name with policies, and two 128-character names joined.
#[test]
fn kernel_object_names_are_valid_and_unique() {
    let lab = Lab::new(1);
    let d = setup(&lab);
    let long_policy = "p".repeat(128);
    let long_farm = "f".repeat(128);
    d.apply(&json!({
        "policies": [{"name": "bl", "elements": [{"data": "198.18.9.9"}]},
                     {"name": long_policy, "elements": [{"data": "198.18.9.8"}]}],
        "addresses": [{"name": "x", "ip-addr": "198.18.0.104", "ports": "22", "policies": [{"name": "bl"}]}],
        "farms": [
            {"name": "0abc", "virtual-addr": "198.18.0.101", "virtual-ports": "21", "helper": "ftp",
             "backends": [bck("be1", &be4(1))]},
            {"name": "a", "virtual-addr": "198.18.0.102", "virtual-ports": "80", "tcp-strict": "on",
             "log-rtlimit": "1/second", "backends": [bck("be1", &be4(1))]},
            {"name": "a-tcp-strict", "virtual-addr": "198.18.0.103", "virtual-ports": "80",
             "tcp-strict": "on", "backends": [bck("be1", &be4(1))]},
            {"name": "x", "virtual-addr": "198.18.0.105", "virtual-ports": "80",
             "policies": [{"name": "bl"}], "backends": [bck("be1", &be4(1))]},
            {"name": long_farm, "virtual-addr": "198.18.0.106", "virtual-ports": "80",
             "policies": [{"name": long_policy}], "log-rtlimit": "1/second",
             "backends": [bck("be1", &be4(1))]}]
    }));
    d.apply(&json!({"farms": [{"name": "0abc", "newname": "0"}]}));
    assert_eq!(d.farm("0")["helper"], "ftp");
    let rs = lab.lb.nft_ruleset();
    assert!(rs.contains("ct helper cth-0/ftp-tcp {"), "{rs}");
    // Farm a's sub-chain and farm a-tcp-strict's chain are two chains.
    let chain = |name: &str| -> String {
        let head = format!("chain {name} {{");
        let start = rs
            .find(&head)
            .unwrap_or_else(|| panic!("no {head} in\n{rs}"));
        let end = rs[start..].find("\n\t}").unwrap() + start;
        rs[start..end].to_string()
    };
    assert!(
        chain("ffarm-a/tcp-strict").contains("limit rate 1/second log prefix \"tcp-strict-a \"")
    );
    let other = chain("ffarm-a-tcp-strict");
    assert!(
        other.contains("log prefix \"tcp-strict-a-tcp-strict \" drop"),
        "{other}"
    );
    assert!(!other.contains("limit rate"), "{other}");
    // The farm x and the address x each have their policy chain and counter.
    assert!(chain("fpol-x").contains("counter name \"pc-bl/x\""), "{rs}");
    assert!(
        chain("apol-x").contains("counter name \"pca-bl/x\""),
        "{rs}"
    );
    // Every name fits nft's 255 bytes.
    for line in rs.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["chain" | "set" | "map" | "counter", name, "{"] = w.as_slice() {
            assert!(name.len() <= 255, "{name}");
        }
    }
    let f = d.farm(&"f".repeat(128));
    assert_eq!(f["policies"][0]["name"], "p".repeat(128), "{f}");
}

/// A farm with the longest name and legacy address keys leaves a state file that loads:
/// its automatic address was named `FARM-addr`, 133 characters, which the daemon then
/// refused at its next start.
#[test]
fn longest_farm_name_survives_a_restart() {
    let lab = Lab::new(1);
    let mut d = setup(&lab);
    let long = "f".repeat(128);
    d.apply(
        &json!({"farms": [{"name": long, "virtual-addr": "198.18.0.101", "virtual-ports": "80",
        "backends": [bck("be1", &be4(1))]}]}),
    );
    d.restart();
    let f = d.farm(&long);
    assert_eq!(f["virtual-addr"], "198.18.0.101", "{f}");
}

/// Renaming a farm's address through the farm's own list (found by tests/fuzz_api.rs):
/// the farm kept the old name, and with a legacy key in the same object the writer
/// thread panicked on the missing address; every later request got a 500.
#[test]
fn address_renamed_through_its_farm() {
    let lab = Lab::new(2);
    let d = setup(&lab);
    let (st, body) = d.post(
        "/farms",
        &json!({"farms": [{"name": "good", "virtual-ports": "80",
            "addresses": [{"name": "good-addr", "newname": "front"}]}]}),
    );
    assert_eq!(st, 200, "{body}");
    let f = d.farm("good");
    assert_eq!(f["virtual-addr"], VIP, "{f}");
    let (st, body) = d.get("/addresses");
    assert_eq!(st, 200, "{body}");
    let names: Vec<&str> = body["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["front"], "{body}");
    let r = lab.tcp_many(VIP, 80, 2);
    assert_eq!(
        counts(&common::names(&r)),
        expect_counts(&[("be1", 1), ("be2", 1)])
    );
}

/// A change of a policy attached to an address that a farm uses reaches the kernel
/// (found by tests/fuzz_api.rs: the farm renders that address's policy chain, and was
/// not rendered again, so the new log prefix stayed out of the kernel).
#[test]
fn policy_change_reaches_farms_through_their_addresses() {
    let lab = Lab::new(1);
    let d = setup(&lab);
    d.apply(&json!({
        "policies": [{"name": "bl", "elements": [{"data": "198.18.9.0/24"}]}],
        "addresses": [{"name": "fw", "ip-addr": "198.18.0.200", "ports": "22", "policies": [{"name": "bl"}]}],
        "farms": [{"name": "a", "addresses": [{"name": "fw", "ports": "1286"}]}]}));
    for (body, want) in [
        (
            json!({"policies": [{"name": "bl", "log-prefix": "LP-PNAME "}]}),
            "log prefix \"LP-bl \"",
        ),
        (
            json!({"policies": [{"name": "bl", "type": "whitelist"}]}),
            "counter name \"pca-bl/fw\" return",
        ),
    ] {
        let (st, reply) = d.post("/policies", &body);
        assert_eq!(st, 200, "{reply}");
        let rs = lab.lb.nft_ruleset();
        assert!(rs.contains(want), "no {want} in\n{rs}");
    }
}
