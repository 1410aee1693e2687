//! NAT modes, source addresses, families, protocols and port forms, with real traffic
//! from the client namespace through the daemon's rules to toy backends.

mod common;

use common::*;
use serde_json::json;

const VIP: &str = "198.18.0.100";
const VIP6: &str = "2001:2::100";

fn web<'a>(mode: &'a str, ports: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("family", "ipv4"),
        ("virtual-addr", VIP),
        ("virtual-ports", ports),
        ("protocol", "tcp"),
        ("mode", mode),
        ("scheduler", "rr"),
    ]
}

#[test]
fn dnat_preserves_client_address() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&farms_doc(farm("web", &web("dnat", "80"), v4_backends(2))));

    let r = lab.tcp_many(VIP, 80, 4);
    assert_eq!(
        seen(&r),
        vec![ip(CLI4); 4],
        "dnat must keep the client address"
    );
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 2), ("be2", 2)]));
}

#[test]
fn snat_masquerades_to_lb_back_address() {
    // Backends have no route back to the client: only SNAT'ed traffic can work.
    let lab = Lab::with_options(LabOptions {
        backends: 2,
        backend_default_route: false,
    });
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);

    d.apply(&farms_doc(farm("web", &web("dnat", "80"), v4_backends(2))));
    let r = lab.tcp(VIP, 80);
    assert!(
        r.is_err(),
        "dnat without backend routes must not work: {r:?}"
    );

    // Change the mode of the existing farm.
    d.apply(&json!({"farms": [{"name": "web", "mode": "snat"}]}));
    let r = lab.tcp_many(VIP, 80, 4);
    assert_eq!(seen(&r), vec![ip(LB_BACK4); 4], "masquerade source");
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 2), ("be2", 2)]));
}

#[test]
fn snat_farm_source_addr_and_backend_override() {
    let lab = Lab::with_options(LabOptions {
        backends: 2,
        backend_default_route: false,
    });
    lab.add_vip(VIP);
    lab.add_lb_back_addr("198.18.1.2");
    lab.add_lb_back_addr("198.18.1.3");
    lab.serve_tcp(80);
    lab.serve_tcp(81);
    let d = Daemon::start(&lab.lb);

    // Farm source-addr .2; be1 overrides with .3.
    let mut a = web("snat", "80");
    a.push(("source-addr", "198.18.1.2"));
    let backends = vec![
        with(bck("be1", &be4(1)), &[("source-addr", "198.18.1.3")]),
        bck("be2", &be4(2)),
    ];
    // Farm without source-addr (masquerade); be1 overrides with .3.
    let b = web("snat", "81");
    d.apply(&json!({"farms": [
        farm("src", &a, backends.clone()),
        farm("masq", &b, backends),
    ]}));

    for (port, be1_src, be2_src) in [
        (80, "198.18.1.3", "198.18.1.2"),
        (81, "198.18.1.3", LB_BACK4),
    ] {
        let r = lab.tcp_many(VIP, port, 4);
        let got: Vec<(String, std::net::IpAddr)> = r.into_iter().map(|x| x.unwrap()).collect();
        for (be, src) in &got {
            let want = if be == "be1" { be1_src } else { be2_src };
            assert_eq!(
                *src,
                ip(want),
                "port {port}: {be} saw {src}, expected {want} (all: {got:?})"
            );
        }
        assert_eq!(
            got.iter().filter(|(b, _)| b == "be1").count(),
            2,
            "port {port}: {got:?}"
        );
    }

    // Changing the farm's source-addr takes effect for new connections.
    d.apply(&json!({"farms": [{"name": "src", "source-addr": "198.18.1.1"}]}));
    let r = lab.tcp_many(VIP, 80, 4);
    for x in &r {
        let (be, src) = x.as_ref().unwrap();
        let want = if be == "be1" {
            "198.18.1.3"
        } else {
            "198.18.1.1"
        };
        assert_eq!(*src, ip(want), "{be} after source-addr change: {r:?}");
    }
}

#[test]
fn backend_port_translates_destination_port() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(8080); // backends listen on 8080 only
    let d = Daemon::start(&lab.lb);
    let backends = vec![
        with(bck("be1", &be4(1)), &[("port", "8080")]),
        with(bck("be2", &be4(2)), &[("port", "8080")]),
    ];
    d.apply(&farms_doc(farm("web", &web("dnat", "80"), backends)));
    let r = lab.tcp_many(VIP, 80, 4);
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 2), ("be2", 2)]));
    assert_eq!(seen(&r), vec![ip(CLI4); 4]);
}

#[test]
fn ipv6_farm_dnat_and_snat() {
    let lab = Lab::new(2);
    lab.add_vip(VIP6);
    lab.serve_tcp(80);
    lab.serve_tcp(81);
    let d = Daemon::start(&lab.lb);
    let f = |name: &str, mode: &str, port: &str| {
        farm(
            name,
            &[
                ("family", "ipv6"),
                ("virtual-addr", VIP6),
                ("virtual-ports", port),
                ("protocol", "tcp"),
                ("mode", mode),
                ("scheduler", "rr"),
            ],
            v6_backends(2),
        )
    };
    d.apply(&json!({"farms": [f("web6", "dnat", "80"), f("web6s", "snat", "81")]}));

    let r = lab.tcp_many(VIP6, 80, 4);
    assert_eq!(seen(&r), vec![ip(CLI6); 4]);
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 2), ("be2", 2)]));

    let r = lab.tcp_many(VIP6, 81, 4);
    assert_eq!(seen(&r), vec![ip(LB_BACK6); 4]);
    assert_eq!(counts(&names(&r)), expect_counts(&[("be1", 2), ("be2", 2)]));

    let ruleset = lab.lb.nft_ruleset();
    assert!(ruleset.contains("ip6"), "no ip6 rules: {ruleset}");
}

#[test]
fn inet_port_only_farm_serves_both_families() {
    let lab = Lab::new(2);
    lab.serve_tcp(8000);
    let d = Daemon::start(&lab.lb);
    let backends = vec![
        bck("be1v4", &be4(1)),
        bck("be2v4", &be4(2)),
        bck("be1v6", &be6(1)),
        bck("be2v6", &be6(2)),
    ];
    d.apply(&farms_doc(farm(
        "dual",
        &[
            ("family", "inet"),
            ("virtual-addr", ""),
            ("virtual-ports", "8000"),
            ("protocol", "tcp"),
            ("mode", "dnat"),
            ("scheduler", "rr"),
        ],
        backends,
    )));

    let r4 = lab.tcp_many(LB_FRONT4, 8000, 4);
    assert_eq!(seen(&r4), vec![ip(CLI4); 4], "IPv4 clients: {r4:?}");
    assert_eq!(
        counts(&names(&r4)),
        expect_counts(&[("be1", 2), ("be2", 2)])
    );
    let r6 = lab.tcp_many(LB_FRONT6, 8000, 4);
    assert_eq!(seen(&r6), vec![ip(CLI6); 4], "IPv6 clients: {r6:?}");
    assert_eq!(
        counts(&names(&r6)),
        expect_counts(&[("be1", 2), ("be2", 2)])
    );
}

#[test]
fn inet_farm_with_v4_and_v6_addresses() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.add_vip(VIP6);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    let mut f = farm(
        "dual",
        &[("mode", "dnat"), ("scheduler", "rr")],
        vec![
            bck("be1v4", &be4(1)),
            bck("be2v4", &be4(2)),
            bck("be1v6", &be6(1)),
            bck("be2v6", &be6(2)),
        ],
    );
    f["addresses"] = json!([
        {"name": "dual-v4", "family": "ipv4", "ip-addr": VIP, "ports": "80", "protocol": "tcp"},
        {"name": "dual-v6", "family": "ipv6", "ip-addr": VIP6, "ports": "80", "protocol": "tcp"}
    ]);
    d.apply(&farms_doc(f));

    let r4 = lab.tcp_many(VIP, 80, 4);
    assert_eq!(seen(&r4), vec![ip(CLI4); 4]);
    assert_eq!(
        counts(&names(&r4)),
        expect_counts(&[("be1", 2), ("be2", 2)])
    );
    let r6 = lab.tcp_many(VIP6, 80, 4);
    assert_eq!(seen(&r6), vec![ip(CLI6); 4]);
    assert_eq!(
        counts(&names(&r6)),
        expect_counts(&[("be1", 2), ("be2", 2)])
    );
}

#[test]
fn udp_farm() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_udp(5300);
    lab.serve_tcp(5300); // a TCP listener on the same port must not be reachable via the farm
    let d = Daemon::start(&lab.lb);
    let mut a = web("dnat", "5300");
    a.retain(|(k, _)| *k != "protocol");
    a.push(("protocol", "udp"));
    d.apply(&farms_doc(farm("dns", &a, v4_backends(2))));

    let r = lab.udp_many(VIP, 5300, 6);
    let n = names(&r);
    assert!(
        n.windows(2).all(|w| w[0] != w[1]),
        "rr over UDP flows must alternate: {n:?}"
    );
    assert_eq!(seen(&r), vec![ip(CLI4); 6]);
    let t = lab.tcp(VIP, 5300);
    assert!(t.is_err(), "TCP must not be forwarded by a UDP farm: {t:?}");
}

#[test]
fn port_list() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    for p in [80, 81, 8080] {
        lab.serve_tcp(p);
    }
    let d = Daemon::start(&lab.lb);
    d.apply(&farms_doc(farm(
        "web",
        &web("dnat", "80,8080"),
        v4_backends(2),
    )));
    for p in [80, 8080] {
        let r = lab.tcp_many(VIP, p, 2);
        assert_eq!(
            counts(&names(&r)),
            expect_counts(&[("be1", 1), ("be2", 1)]),
            "port {p}"
        );
    }
    let r = lab.tcp(VIP, 81);
    assert!(r.is_err(), "port 81 is not in the list: {r:?}");
}

#[test]
fn port_range() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    for p in [999, 1000, 1005, 1010, 1011] {
        lab.serve_tcp(p);
    }
    let d = Daemon::start(&lab.lb);
    d.apply(&farms_doc(farm(
        "range",
        &web("dnat", "1000-1010"),
        v4_backends(2),
    )));
    for p in [1000, 1005, 1010] {
        let r = lab.tcp_many(VIP, p, 2);
        assert_eq!(
            counts(&names(&r)),
            expect_counts(&[("be1", 1), ("be2", 1)]),
            "port {p}"
        );
        assert_eq!(seen(&r), vec![ip(CLI4); 2]);
    }
    for p in [999, 1011] {
        let r = lab.tcp(VIP, p);
        assert!(r.is_err(), "port {p} is outside the range: {r:?}");
    }
}

#[test]
fn port_only_service_matches_any_destination() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(9000);
    lab.serve_tcp(9001);
    let d = Daemon::start(&lab.lb);
    d.apply(&farms_doc(farm(
        "any",
        &[
            ("family", "ipv4"),
            ("virtual-addr", ""),
            ("virtual-ports", "9000"),
            ("protocol", "tcp"),
            ("mode", "snat"),
            ("scheduler", "rr"),
        ],
        v4_backends(2),
    )));
    for dst in [VIP, LB_FRONT4] {
        let r = lab.tcp_many(dst, 9000, 2);
        assert_eq!(
            counts(&names(&r)),
            expect_counts(&[("be1", 1), ("be2", 1)]),
            "to {dst}"
        );
        assert_eq!(seen(&r), vec![ip(LB_BACK4); 2], "snat source, to {dst}");
    }
    let r = lab.tcp(VIP, 9001);
    assert!(r.is_err(), "port 9001 is not served: {r:?}");
}
