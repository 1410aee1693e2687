//! Ingress topologies with real traffic: `dsr` (direct server return) in a flat layer-2
//! lab and `stlsdnat` (stateless DNAT), with the daemon discovering interfaces, routes
//! and backend MACs itself and following changes of the network.

mod common;

use std::time::Duration;

use common::flat::*;
use common::*;
use serde_json::{json, Value};

const VIP: &str = "198.18.0.100";
const VIP6: &str = "2001:2::100";

fn dsr(name: &str, vip: &str, ports: &str, proto: &str, backends: Vec<Value>) -> Value {
    farms_doc(farm(
        name,
        &[
            ("virtual-addr", vip),
            ("virtual-ports", ports),
            ("protocol", proto),
            ("mode", "dsr"),
            ("scheduler", "rr"),
        ],
        backends,
    ))
}

fn flat_backends(lab: &FlatLab) -> Vec<Value> {
    lab.backends.iter().map(|b| bck(&b.name, &b.ip4)).collect()
}

fn response(body: &Value) -> String {
    body["response"].as_str().unwrap_or_default().to_string()
}

fn ruleset(ns: &NetNs) -> String {
    ns.nft_ruleset()
}

/// Waits (bounded) until the load balancer's ruleset satisfies `pred`.
fn wait_rules(ns: &NetNs, what: &str, pred: impl Fn(&str) -> bool) {
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        last = ruleset(ns);
        pred(&last)
    });
    assert!(ok, "timed out waiting for {what}; ruleset:\n{last}");
}

/// The daemon never had to fall back to a full resynchronisation.
fn assert_no_fallback(d: &Daemon) {
    let log = d.log();
    assert!(
        !log.contains("incremental transaction failed"),
        "the daemon fell back to a resync:\n{}",
        tail(&log, 4000)
    );
}

/// Connections that all succeed, reach both backends, and show the client's address.
fn assert_balanced(r: &[std::io::Result<(String, std::net::IpAddr)>], client: &str) {
    let n = names(r);
    let c = counts(&n);
    assert_eq!(c.len(), 2, "both backends must serve: {c:?}");
    assert!(
        seen(r).iter().all(|a| *a == ip(client)),
        "backends must see the client's address: {:?}",
        seen(r)
    );
}

/// A flat lab with two backends that own `VIP` (as dsr needs) and serve TCP port 80.
fn dsr_web_lab() -> FlatLab {
    let lab = FlatLab::new(2);
    lab.add_lb_vip(VIP);
    lab.backends_own(VIP);
    lab.serve_tcp(80);
    lab
}

#[test]
fn dsr_tcp_rr_replies_bypass_the_load_balancer() {
    let lab = dsr_web_lab();
    let probe = Probe::install(
        &lab.lb,
        "eth0",
        &[
            ("requests", &format!("ip daddr {VIP} tcp dport 80")),
            ("replies", &format!("ip saddr {VIP}")),
        ],
    );
    let d = Daemon::start(&lab.lb);
    let body = d.apply(&dsr("web", VIP, "80", "tcp", flat_backends(&lab)));
    assert_eq!(response(&body), "success", "{body}");
    let rs = ruleset(&lab.lb);
    assert!(
        rs.contains("jhash ip saddr . th sport mod 256"),
        "rr must be a flow hash in dsr:\n{rs}"
    );

    // Every connection completes (a SYN and its ACK on different backends would be
    // reset), both backends serve, and they see the client itself.
    let r = lab.tcp_many(VIP, 80, 24);
    assert_balanced(&r, FLAT_CLI4);
    assert!(
        probe.packets("requests") >= 24 * 3,
        "requests passed the LB"
    );
    assert_eq!(
        probe.packets("replies"),
        0,
        "no reply may pass through the load balancer"
    );
    // Nothing went through the load balancer's own stack.
    let ct = lab.lb.conntrack_list();
    assert!(!ct.contains(VIP), "conntrack saw DSR flows:\n{ct}");
    assert_no_fallback(&d);
}

#[test]
fn dsr_backend_states() {
    let lab = dsr_web_lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&dsr("web", VIP, "80", "tcp", flat_backends(&lab)));
    assert_balanced(&lab.tcp_many(VIP, 80, 16), FLAT_CLI4);

    d.apply(&backend_patch("web", "be2", "state", "down"));
    let n = names(&lab.tcp_many(VIP, 80, 12));
    assert_eq!(
        counts(&n),
        expect_counts(&[("be1", 12)]),
        "down gets nothing"
    );

    // off cannot drain without connection tracking: no traffic, and the answer says so.
    d.apply(&backend_patch("web", "be2", "state", "up"));
    assert_balanced(&lab.tcp_many(VIP, 80, 16), FLAT_CLI4);
    let body = d.apply(&backend_patch("web", "be2", "state", "off"));
    assert!(response(&body).contains("'be2' is off"), "{body}");
    let n = names(&lab.tcp_many(VIP, 80, 12));
    assert_eq!(
        counts(&n),
        expect_counts(&[("be1", 12)]),
        "off gets nothing"
    );

    // A failed backend of priority 1 brings in the priority-2 one.
    d.apply(&json!({"farms":[{"name":"web","backends":[
        {"name":"be2","state":"up","priority":"2"},{"name":"be1","state":"down"}]}]}));
    let n = names(&lab.tcp_many(VIP, 80, 8));
    assert_eq!(counts(&n), expect_counts(&[("be2", 8)]));

    // Farm down: rules gone, the VIP is the load balancer's own again (refused).
    d.apply(&json!({"farms":[{"name":"web","state":"down"}]}));
    assert!(!ruleset(&lab.lb).contains("table netdev nftlb"));
    assert!(lab.tcp_many(VIP, 80, 1)[0].is_err());
    d.delete_ok("/farms/web");
    assert_no_fallback(&d);
}

#[test]
fn dsr_udp_and_ipv6() {
    let lab = FlatLab::new(2);
    lab.add_lb_vip(VIP);
    lab.add_lb_vip(VIP6);
    lab.backends_own(VIP);
    lab.backends_own(VIP6);
    // A DSR backend must answer from the VIP: bind the servers to it.
    lab.serve_udp_on(VIP, 53);
    lab.serve_udp_on(VIP6, 53);
    let d = Daemon::start(&lab.lb);
    let body = d.apply(&dsr("dns", VIP, "53", "udp", flat_backends(&lab)));
    assert_eq!(response(&body), "success", "{body}");
    assert_balanced(&lab.udp_many(VIP, 53, 24), FLAT_CLI4);

    // IPv6: neighbour discovery instead of ARP.
    let v6: Vec<Value> = lab.backends.iter().map(|b| bck(&b.name, &b.ip6)).collect();
    let mut doc = dsr("dns6", VIP6, "53", "udp", v6);
    doc["farms"][0]["family"] = json!("ipv6");
    let body = d.apply(&doc);
    assert_eq!(response(&body), "success", "{body}");
    assert_balanced(&lab.udp_many(VIP6, 53, 24), FLAT_CLI6);

    // Deleting one farm leaves the other on the same interface alone.
    d.delete_ok("/farms/dns");
    assert!(lab.udp_many(VIP, 53, 1)[0].is_err());
    assert_balanced(&lab.udp_many(VIP6, 53, 16), FLAT_CLI6);
    assert_no_fallback(&d);
}

#[test]
fn dsr_unresolvable_backend_is_reported_and_skipped() {
    let lab = dsr_web_lab();
    let d = Daemon::start(&lab.lb);
    let mut backends = flat_backends(&lab);
    backends.push(bck("ghost", "198.18.0.99"));
    let body = d.apply(&dsr("web", VIP, "80", "tcp", backends));
    let msg = response(&body);
    assert!(msg.starts_with("success"), "{body}");
    assert!(
        msg.contains("backend 'ghost' gets no traffic") && msg.contains("MAC address is unknown"),
        "{body}"
    );
    assert!(!msg.contains("'be1'") && !msg.contains("'be2'"), "{body}");
    let r = lab.tcp_many(VIP, 80, 24);
    assert_balanced(&r, FLAT_CLI4);
    // GET shows the unusable backend as config_error, with the reason.
    let f = d.farm("web");
    let ghost = f["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "ghost")
        .cloned()
        .unwrap();
    assert_eq!(ghost["state"], "config_error", "{f}");
    assert!(
        ghost["config-error"]
            .as_str()
            .is_some_and(|r| r.contains("MAC")),
        "{f}"
    );
    let be1 = f["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "be1")
        .cloned()
        .unwrap();
    assert_eq!(be1["state"], "up", "{f}");
    // The GET document can be posted back unchanged.
    let back = d.apply(&json!({"farms":[f]}));
    assert!(response(&back).starts_with("success"), "{back}");

    // Input logging (every packet: there is no connection state), rate-limited.
    let body =
        d.apply(&json!({"farms":[{"name":"web","log":"input output","log-rtlimit":"10/second"}]}));
    assert!(response(&body).starts_with("success"), "{body}");
    assert!(!response(&body).contains("not enforced"), "{body}");
    assert!(ruleset(&lab.lb).contains("limit rate 10/second log prefix \"IN-web \""));
    assert!(ruleset(&lab.lb).contains("limit rate 10/second log prefix \"OUT-web \""));
    assert_balanced(&lab.tcp_many(VIP, 80, 16), FLAT_CLI4);
    assert_no_fallback(&d);
}

#[test]
fn dsr_follows_a_backend_mac_change() {
    let lab = dsr_web_lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&dsr("web", VIP, "80", "tcp", flat_backends(&lab)));
    assert_balanced(&lab.tcp_many(VIP, 80, 16), FLAT_CLI4);

    // The NIC of be2 is replaced: it announces itself (arp_notify), the daemon's
    // watcher sees the neighbour change and the farm follows.
    let new_mac = flat_mac(0x99);
    lab.be(2)
        .ns
        .ip(&["link", "set", "eth0", "address", &new_mac]);
    wait_rules(&lab.lb, "the new MAC in the farm's rule", |rs| {
        rs.contains(&new_mac) && !rs.contains(&lab.be(2).mac)
    });
    assert_balanced(&lab.tcp_many(VIP, 80, 16), FLAT_CLI4);
    assert_no_fallback(&d);
}

#[test]
fn dsr_missing_input_interface_is_a_note_until_it_appears() {
    let lab = FlatLab::new(2);
    lab.add_lb_vip(VIP);
    lab.backends_own(VIP);
    let d = Daemon::start(&lab.lb);
    // The request is valid; what is missing is on the host, not in the request.
    let mut doc = dsr("web", VIP, "80", "tcp", flat_backends(&lab));
    doc["farms"][0]["iface"] = json!("nonexistent0");
    let body = d.apply(&doc);
    let msg = response(&body);
    assert!(
        msg.starts_with("success") && msg.contains("input interface 'nonexistent0' does not exist"),
        "{body}"
    );
    assert!(!ruleset(&lab.lb).contains("lb-web"));
    let (st, got) = d.get("/farms/web");
    assert_eq!(st, 200);
    assert_eq!(got["farms"][0]["mode"], "dsr");

    // A virtual address this host does not hold.
    let body = d.apply(&dsr(
        "other",
        "198.18.0.200",
        "80",
        "tcp",
        flat_backends(&lab),
    ));
    assert!(
        response(&body).contains("198.18.0.200 is not an address of this host"),
        "{body}"
    );

    // The address comes to this host (say a VRRP failover): the farm is served.
    lab.add_lb_vip("198.18.0.200");
    wait_rules(&lab.lb, "the farm of the new address", |rs| {
        rs.contains("lb-other") && rs.contains("198.18.0.200")
    });

    // The interface appears: the watcher re-renders and the farm is served.
    lab.lb.ip(&[
        "link",
        "add",
        "nonexistent0",
        "type",
        "veth",
        "peer",
        "name",
        "nonexistent1",
    ]);
    lab.lb.ip(&["link", "set", "nonexistent0", "up"]);
    wait_rules(&lab.lb, "the farm on the new interface", |rs| {
        rs.contains("lb-web") && rs.contains("device \"nonexistent0\"")
    });
    // And goes away again.
    lab.lb.ip(&["link", "del", "nonexistent0"]);
    wait_rules(&lab.lb, "the farm's rules to go", |rs| {
        !rs.contains("lb-web")
    });
    let (st, _) = d.get("/farms");
    assert_eq!(st, 200);
    assert_no_fallback(&d);
}

#[test]
fn stlsdnat_two_arms_with_port_translation() {
    // Client -> ethf (VIP) -> LB -> ethb -> backends; backends route replies back
    // through the LB, whose ingress on ethb rewrites them back to the VIP.
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    // Real checksums end to end, so that a rewrite that forgets one shows.
    disable_tx_checksum(&lab.cli, "eth0");
    for b in &lab.backends {
        disable_tx_checksum(&b.ns, "eth0");
    }
    lab.serve_tcp(8080);
    lab.serve_udp(8053);
    let d = Daemon::start(&lab.lb);
    let backends = |port: &str| -> Vec<Value> {
        v4_backends(2)
            .into_iter()
            .map(|b| with(b, &[("port", port)]))
            .collect()
    };
    let mk = |name: &str, port: &str, proto: &str, bport: &str| {
        farms_doc(farm(
            name,
            &[
                ("virtual-addr", VIP),
                ("virtual-ports", port),
                ("protocol", proto),
                ("mode", "stlsdnat"),
                ("scheduler", "weight"),
            ],
            backends(bport),
        ))
    };
    let body = d.apply(&mk("web", "80", "tcp", "8080"));
    assert_eq!(response(&body), "success", "{body}");
    let body = d.apply(&mk("dns", "53", "udp", "8053"));
    assert_eq!(response(&body), "success", "{body}");

    // TCP both ways: the client talks to the VIP only, backends see the client.
    assert_balanced(&lab.tcp_many(VIP, 80, 24), CLI4);
    assert_balanced(&lab.udp_many(VIP, 53, 24), CLI4);
    let ct = lab.lb.conntrack_list();
    assert!(!ct.contains(VIP), "stateless: no conntrack entries:\n{ct}");
    for ns in [&lab.cli, &lab.be(1).ns, &lab.be(2).ns] {
        let out = ns.exec(&["cat", "/proc/net/snmp"]);
        let tcp: Vec<&str> = out.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let (h, v) = (tcp[0], tcp[1]);
        let idx = h
            .split_whitespace()
            .position(|w| w == "InCsumErrors")
            .unwrap();
        assert_eq!(
            v.split_whitespace().nth(idx),
            Some("0"),
            "checksum errors in {}",
            ns.name()
        );
    }

    // A backend down: its share goes to the other.
    d.apply(&backend_patch("web", "be1", "state", "down"));
    let n = names(&lab.tcp_many(VIP, 80, 8));
    assert_eq!(counts(&n), expect_counts(&[("be2", 8)]));

    // IPv6, no port translation.
    lab.add_vip(VIP6);
    let mut doc = farms_doc(farm(
        "web6",
        &[
            ("family", "ipv6"),
            ("virtual-addr", VIP6),
            ("virtual-ports", "8080"),
            ("protocol", "tcp"),
            ("mode", "stlsdnat"),
        ],
        v6_backends(2),
    ));
    doc["farms"][0]["scheduler"] = json!("symhash");
    let body = d.apply(&doc);
    assert_eq!(response(&body), "success", "{body}");
    assert_balanced(&lab.tcp_many(VIP6, 8080, 24), CLI6);
    assert_no_fallback(&d);
}

#[test]
fn stlsdnat_one_arm() {
    // Everything on one link: the return path is matched on the same interface.
    let lab = FlatLab::new(2);
    lab.add_lb_vip(VIP);
    lab.backends_route_via_lb(FLAT_CLI4);
    disable_tx_checksum(&lab.cli, "eth0");
    for b in &lab.backends {
        disable_tx_checksum(&b.ns, "eth0");
    }
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    let mut doc = dsr("web", VIP, "80", "tcp", flat_backends(&lab));
    doc["farms"][0]["mode"] = json!("stlsdnat");
    let body = d.apply(&doc);
    assert_eq!(response(&body), "success", "{body}");
    let rs = ruleset(&lab.lb);
    assert!(rs.contains("chain ingress/dnat-eth0"), "{rs}");
    assert_balanced(&lab.tcp_many(VIP, 80, 16), FLAT_CLI4);

    // Persistence: the client sticks to one backend.
    let body = d.apply(&json!({"farms":[{"name":"web","persistence":"srcip"}]}));
    assert_eq!(response(&body), "success", "{body}");
    let n = names(&lab.tcp_many(VIP, 80, 12));
    assert_eq!(counts(&n).len(), 1, "{n:?}");
    assert_no_fallback(&d);
}

#[test]
fn dsr_persistence_and_static_sessions() {
    let lab = dsr_web_lab();
    let mut d = Daemon::start(&lab.lb);
    let mut doc = dsr("web", VIP, "80", "tcp", flat_backends(&lab));
    doc["farms"][0]["persistence"] = json!("srcip");
    doc["farms"][0]["persist-ttl"] = json!("120");
    let body = d.apply(&doc);
    assert_eq!(response(&body), "success", "{body}");
    // Without persistence connections spread (flow hash); with it the client sticks.
    let n = names(&lab.tcp_many(VIP, 80, 16));
    assert_eq!(counts(&n).len(), 1, "persistence: one backend: {n:?}");
    let first = n[0].clone();
    // The learnt session is listed with its backend and expiry, and can be deleted.
    let (st, sessions) = d.get("/farms/web/sessions");
    assert_eq!(st, 200);
    let dynamic: Vec<&Value> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x.get("expiration").is_some())
        .collect();
    assert_eq!(dynamic.len(), 1, "{sessions}");
    assert_eq!(dynamic[0]["client"], FLAT_CLI4, "{sessions}");
    assert_eq!(dynamic[0]["backend"], first.as_str(), "{sessions}");
    d.delete_ok(&format!("/farms/web/sessions/{FLAT_CLI4}"));
    let (_, sessions) = d.get("/farms/web/sessions");
    assert_eq!(sessions["sessions"], json!([]), "{sessions}");
    let n = names(&lab.tcp_many(VIP, 80, 4));
    assert_eq!(counts(&n).len(), 1, "persistence learns again: {n:?}");
    let first = n[0].clone();
    let other = if first == "be1" { "be2" } else { "be1" };

    // A static session pins the client to the other backend.
    let body = d.apply(&json!({"farms":[{"name":"web",
        "sessions":[{"client": FLAT_CLI4, "backend": other}]}]}));
    assert_eq!(response(&body), "success", "{body}");
    let n = names(&lab.tcp_many(VIP, 80, 8));
    assert_eq!(counts(&n), expect_counts(&[(other, 8)]));

    // A restart keeps the rules in place and the learnt entries with them.
    d.apply(&json!({"farms":[{"name":"web","sessions":[]}]}));
    let before = names(&lab.tcp_many(VIP, 80, 1))[0].clone();
    d.restart();
    let n = names(&lab.tcp_many(VIP, 80, 8));
    assert_eq!(counts(&n), expect_counts(&[(before.as_str(), 8)]));
    assert!(
        !d.log().contains("resynchronisation failed"),
        "{}",
        tail(&d.log(), 3000)
    );
    let body = d.apply(&json!({"farms":[{"name":"web",
        "sessions":[{"client": FLAT_CLI4, "backend": other}]}]}));
    assert_eq!(response(&body), "success", "{body}");

    // The pinned backend fails: the session does not apply, the learnt entry is
    // forgotten, and the client sticks to the backend that is left.
    d.apply(&backend_patch("web", other, "state", "down"));
    let n = names(&lab.tcp_many(VIP, 80, 8));
    assert_eq!(counts(&n), expect_counts(&[(first.as_str(), 8)]));
    assert_no_fallback(&d);
}

#[test]
fn dsr_weights_and_source_hash() {
    let lab = dsr_web_lab();
    let d = Daemon::start(&lab.lb);
    let backends = vec![
        with(bck("be1", &lab.be(1).ip4), &[("weight", "1")]),
        with(bck("be2", &lab.be(2).ip4), &[("weight", "3")]),
    ];
    let mut doc = dsr("web", VIP, "80", "tcp", backends);
    doc["farms"][0]["scheduler"] = json!("weight");
    d.apply(&doc);
    let c = counts(&names(&lab.tcp_many(VIP, 80, 64)));
    let (b1, b2) = (
        c.get("be1").copied().unwrap_or(0),
        c.get("be2").copied().unwrap_or(0),
    );
    assert!(b1 > 0 && b2 > 2 * b1, "weights 1:3 -> {c:?}");

    // hash on the source address: one client, one backend.
    d.apply(&json!({"farms":[{"name":"web","scheduler":"hash","sched-param":"srcip"}]}));
    let c = counts(&names(&lab.tcp_many(VIP, 80, 16)));
    assert_eq!(c.len(), 1, "{c:?}");
    assert_no_fallback(&d);
}

#[test]
fn dsr_blacklist_drops_at_ingress_and_counts() {
    let lab = dsr_web_lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&json!({"policies":[{"name":"bl","type":"blacklist",
        "elements":[{"data":"198.18.0.0/30"},{"data":"198.18.7.7"}]}]}));
    let mut doc = dsr("web", VIP, "80", "tcp", flat_backends(&lab));
    doc["farms"][0]["policies"] = json!([{"name":"bl"}]);
    let body = d.apply(&doc);
    assert!(
        !response(&body).contains("policies"),
        "enforced, no note: {body}"
    );
    // The client (198.18.0.2) is inside the blacklisted network.
    let r = lab.tcp_many(VIP, 80, 3);
    assert!(
        r.iter().all(|x| x.is_err()),
        "blacklisted client served: {r:?}"
    );
    let (_, p) = d.get("/policies/bl");
    let el = p["policies"][0]["elements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"] == "198.18.0.0/30")
        .cloned()
        .unwrap();
    let pk: u64 = el["counter-packets"].as_str().unwrap().parse().unwrap();
    assert!(pk >= 3, "element counter: {p}");
    let f = d.farm("web");
    let fp: u64 = f["policies"][0]["counter-packets"]
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap();
    assert!(fp >= 3, "farm counter: {f}");
    // Remove the network: served again.
    d.delete_ok("/policies/bl/elements/198.18.0.0/30");
    assert_balanced(&lab.tcp_many(VIP, 80, 8), FLAT_CLI4);
    assert_no_fallback(&d);
}
