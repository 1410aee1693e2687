//! Farm deletion and daemon restart.

mod common;

use common::*;
use serde_json::json;

const VIP: &str = "198.18.0.100";

fn farm_on(name: &str, mode: &str, port: &str) -> serde_json::Value {
    farm(
        name,
        &[
            ("family", "ipv4"),
            ("virtual-addr", VIP),
            ("virtual-ports", port),
            ("protocol", "tcp"),
            ("mode", mode),
            ("scheduler", "rr"),
        ],
        v4_backends(2),
    )
}

#[test]
fn deleting_a_farm_removes_its_rules() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    lab.serve_tcp(81);
    let d = Daemon::start(&lab.lb);
    d.apply(
        &json!({"farms": [farm_on("gonefarm", "dnat", "80"), farm_on("keepfarm", "snat", "81")]}),
    );
    assert!(lab.tcp(VIP, 80).is_ok());
    assert!(lab.tcp(VIP, 81).is_ok());
    assert!(lab.lb.nft_ruleset().contains("gonefarm"));

    d.delete_ok("/farms/gonefarm");

    let r = lab.tcp(VIP, 80);
    assert!(r.is_err(), "traffic to a deleted farm must fail: {r:?}");
    let ruleset = lab.lb.nft_ruleset();
    assert!(
        !ruleset.contains("gonefarm"),
        "ruleset still mentions the farm:\n{ruleset}"
    );
    let (st, _) = d.get("/farms/gonefarm");
    assert_ne!(st, 200, "GET of a deleted farm");
    let (_, all) = d.get("/farms");
    let farm_names: Vec<&str> = all["farms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(farm_names, vec!["keepfarm"]);

    // The other farm is untouched.
    let r = lab.tcp_many(VIP, 81, 2);
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 1), ("be2", 1)]));

    // Deleting the last farm leaves no farm rules behind.
    d.delete_ok("/farms/keepfarm");
    assert!(lab.tcp(VIP, 81).is_err());
    let ruleset = lab.lb.nft_ruleset();
    assert!(!ruleset.contains("keepfarm"), "{ruleset}");
    assert!(
        !ruleset.contains(VIP),
        "VIP still in the ruleset:\n{ruleset}"
    );
}

#[test]
fn restart_keeps_config_and_established_connections() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp_keep_open(80);
    lab.serve_tcp_keep_open(81);
    let mut d = Daemon::start(&lab.lb);
    d.apply(&json!({"farms": [farm_on("dn", "dnat", "80"), farm_on("sn", "snat", "81")]}));
    // A state change too, so that the saved state is not just the initial POST.
    d.apply(&backend_patch("sn", "be2", "weight", "3"));

    let mut c_dnat = lab.long_conn(VIP, 80).unwrap();
    let mut c_snat = lab.long_conn(VIP, 81).unwrap();
    assert_eq!(c_dnat.client, ip(CLI4));
    assert_eq!(c_snat.client, ip(LB_BACK4));
    let (st, before) = d.get("/farms");
    assert_eq!(st, 200);

    d.restart();
    assert!(
        d.state_file().exists(),
        "state file {:?} missing",
        d.state_file()
    );

    let (st, after) = d.get("/farms");
    assert_eq!(st, 200);
    assert_eq!(before, after, "configuration changed across restart");

    for (c, who, seen) in [
        (&mut c_dnat, "dnat", ip(CLI4)),
        (&mut c_snat, "snat", ip(LB_BACK4)),
    ] {
        let want = c.backend.clone();
        for i in 0..3 {
            let r = c.ping();
            assert_eq!(
                r.as_ref().ok(),
                Some(&(want.clone(), seen)),
                "{who} ping {i}: {r:?}"
            );
        }
    }
    // New connections work too.
    let r = lab.tcp_many(VIP, 80, 2);
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 1), ("be2", 1)]));
    let r = lab.tcp_many(VIP, 81, 8);
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 2), ("be2", 6)]));

    // A second restart is just as good.
    d.restart();
    assert_eq!(d.get("/farms").1, before);
    assert_eq!(
        c_dnat.ping().ok().map(|x| x.0),
        Some(c_dnat.backend.clone())
    );
}
