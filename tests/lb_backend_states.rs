//! Backend priority groups, state down / off (drain), backend deletion.

mod common;

use common::*;
use serde_json::Value;

const VIP: &str = "198.18.0.100";

fn web(backends: Vec<Value>) -> Value {
    web_farm_doc(VIP, &[], backends)
}

fn only(lab: &Lab, n: usize, who: &str, when: &str) {
    let got = names(&lab.tcp_many(VIP, 80, n));
    assert!(
        got.iter().all(|b| b == who),
        "{when}: expected only {who}, got {got:?}"
    );
}

#[test]
fn priority_groups_fail_over_and_back() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(vec![
        bck("be1", &be4(1)),
        with(bck("be2", &be4(2)), &[("priority", "2")]),
    ]));
    only(&lab, 6, "be1", "prio-1 backend up");

    d.apply(&backend_patch("web", "be1", "state", "down"));
    only(&lab, 6, "be2", "prio-1 backend down");

    d.apply(&backend_patch("web", "be1", "state", "up"));
    only(&lab, 6, "be1", "prio-1 backend up again");
}

#[test]
fn state_down_stops_new_traffic() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(v4_backends(2)));
    assert_eq!(
        counts(&names(&lab.tcp_many(VIP, 80, 4))),
        expect_counts(&[("be1", 2), ("be2", 2)])
    );

    d.apply(&backend_patch("web", "be1", "state", "down"));
    only(&lab, 8, "be2", "be1 down");
    let f = d.farm("web");
    let be1 = f["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "be1")
        .cloned();
    assert_eq!(
        be1.as_ref().map(|b| b["state"].clone()),
        Some("down".into()),
        "GET: {f}"
    );

    d.apply(&backend_patch("web", "be1", "state", "up"));
    assert_eq!(
        counts(&names(&lab.tcp_many(VIP, 80, 4))),
        expect_counts(&[("be1", 2), ("be2", 2)])
    );
}

#[test]
fn state_off_drains_established_connections() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp_keep_open(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(v4_backends(2)));

    let mut conn = lab.long_conn(VIP, 80).expect("long-lived connection");
    let drained = conn.backend.clone();
    let other = if drained == "be1" { "be2" } else { "be1" };
    assert_eq!(conn.client, ip(CLI4));

    d.apply(&backend_patch("web", &drained, "state", "off"));

    // New connections avoid the drained backend...
    only(&lab, 8, other, "after state off");
    // ...while the established one keeps working, repeatedly.
    for i in 0..5 {
        let r = conn.ping();
        assert_eq!(
            r.as_ref().ok(),
            Some(&(drained.clone(), ip(CLI4))),
            "ping {i} on the drained connection: {r:?}"
        );
        only(&lab, 1, other, "interleaved new connection");
    }
}

#[test]
fn deleting_a_backend_stops_its_traffic() {
    let lab = Lab::new(3);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(v4_backends(3)));
    assert_eq!(counts(&names(&lab.tcp_many(VIP, 80, 6))).len(), 3);

    d.delete_ok("/farms/web/backends/be2");
    let c = counts(&names(&lab.tcp_many(VIP, 80, 6)));
    assert_eq!(c, expect_counts(&[("be1", 3), ("be3", 3)]));
    let f = d.farm("web");
    let left: Vec<&str> = f["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(left, vec!["be1", "be3"], "GET after delete: {f}");

    let (st, body) = d.delete("/farms/web/backends/be2");
    assert!((400..500).contains(&st), "deleting it again: {st} {body}");
}

#[test]
fn off_keeps_persistent_clients_down_does_not() {
    // nftlb semantics: an `off` backend takes no new clients, but clients pinned to it by
    // persistence keep going there; `down` also drops the pinned sessions.
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.add_client_addr("198.18.0.3");
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    let mut doc = web(v4_backends(2));
    doc["farms"][0]["persistence"] = "srcip".into();
    doc["farms"][0]["persist-ttl"] = "60".into();
    d.apply(&doc);

    let first = names(&lab.tcp_many(VIP, 80, 4));
    let pinned = first[0].clone();
    assert!(
        first.iter().all(|b| *b == pinned),
        "persistence srcip: {first:?}"
    );
    let other = if pinned == "be1" { "be2" } else { "be1" };

    d.apply(&backend_patch("web", &pinned, "state", "off"));
    let again = names(&lab.tcp_many(VIP, 80, 4));
    assert!(
        again.iter().all(|b| *b == pinned),
        "a client pinned to an `off` backend keeps it: {again:?}"
    );
    let newcomer = names(&lab.tcp_many_from("198.18.0.3", VIP, 80, 4));
    assert!(
        newcomer.iter().all(|b| b == other),
        "a new client must not be sent to the `off` backend {pinned}: {newcomer:?}"
    );

    d.apply(&backend_patch("web", &pinned, "state", "down"));
    only(&lab, 4, other, "pinned backend down");
}
