//! Other farm features with real traffic: the FTP conntrack helper (with a real
//! vsftpd server), helper validation, input logging with a log-prefix template,
//! intra-connect (connections from the load balancer itself), and farm / backend
//! marks for policy routing.

mod common;

use common::sec::*;
use common::*;
use serde_json::{json, Value};
use std::thread;
use std::time::Duration;

const VIP: &str = "198.18.0.100";

fn farm_doc(name: &str, kv: &[(&str, &str)], backends: Vec<Value>) -> Value {
    let mut all = vec![
        ("family", "ipv4"),
        ("virtual-addr", VIP),
        ("virtual-ports", "80"),
        ("protocol", "tcp"),
        ("mode", "snat"),
        ("scheduler", "rr"),
    ];
    all.extend_from_slice(kv);
    farms_doc(farm(name, &all, backends))
}

#[test]
fn ftp_helper_lets_passive_transfers_through_snat() {
    // Backends without a route back to the clients: only SNAT'ed flows work.
    let lab = Lab::with_options(LabOptions {
        backends: 1,
        backend_default_route: false,
    });
    lab.add_vip(VIP);
    let ftp = Vsftpd::start(&lab.be(1).ns, 30000, 30009);
    let d = Daemon::start(&lab.lb);
    d.apply(&farm_doc(
        "ftp",
        &[("virtual-ports", "21")],
        vec![bck("be1", &be4(1))],
    ));

    // Without the helper the PASV reply names the backend's own address, which the
    // client cannot reach through the SNAT farm: the data connection fails.
    match ftp_get(&lab.cli, VIP, "file.txt") {
        Ok(FtpResult::DataFailed(pasv, _)) => assert!(
            pasv.contains("198,18,1,11"),
            "without the helper the PASV reply is not rewritten: {pasv}"
        ),
        other => panic!("without the ftp helper the passive transfer must fail: {other:?}"),
    }

    d.apply(&farms_doc(json!({"name": "ftp", "helper": "ftp"})));
    assert_eq!(d.farm("ftp")["helper"], "ftp");
    match ftp_get(&lab.cli, VIP, "file.txt") {
        Ok(FtpResult::Data(content)) => {
            assert_eq!(content, ftp.content, "downloaded file content")
        }
        other => panic!("with the ftp helper the passive transfer must work: {other:?}"),
    }
    // Twice, to be sure it was not a leftover expectation.
    assert!(matches!(
        ftp_get(&lab.cli, VIP, "file.txt"),
        Ok(FtpResult::Data(_))
    ));
}

#[test]
fn helpers_are_validated_against_the_protocol() {
    let lab = Lab::new(1);
    let d = Daemon::start(&lab.lb);
    // ftp on udp
    let (st, body) = d.post(
        "/farms",
        &farm_doc(
            "u",
            &[
                ("protocol", "udp"),
                ("virtual-ports", "21"),
                ("helper", "ftp"),
            ],
            v4_backends(1),
        ),
    );
    assert_eq!(st, 400, "ftp helper on a udp farm: {body}");
    assert!(
        body.to_string().contains("helper"),
        "must name 'helper': {body}"
    );
    let (st, _) = d.get("/farms/u");
    assert_eq!(st, 404, "the refused farm must not exist");

    // tftp on tcp
    let (st, body) = d.post(
        "/farms",
        &farm_doc("t", &[("helper", "tftp")], v4_backends(1)),
    );
    assert_eq!(st, 400, "tftp helper on a tcp farm: {body}");
    assert!(body.to_string().contains("helper"), "{body}");

    // An existing tcp farm with the ftp helper cannot become udp.
    d.apply(&farm_doc(
        "f",
        &[("virtual-ports", "21"), ("helper", "ftp")],
        v4_backends(1),
    ));
    let (st, body) = d.post("/farms", &farms_doc(json!({"name":"f","protocol":"udp"})));
    assert_eq!(st, 400, "switching an ftp farm to udp: {body}");
    assert!(body.to_string().contains("helper"), "{body}");
    assert_eq!(d.farm("f")["protocol"], "tcp");
}

#[test]
fn input_log_writes_the_prefix_to_the_kernel_log() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&farm_doc(
        "lb01",
        &[("log", "input"), ("log-prefix", "[FNAME,IN] ")],
        v4_backends(2),
    ));
    let f = d.farm("lb01");
    assert_eq!(f["log"].as_str().map(str::trim), Some("input"), "{f}");
    assert_eq!(f["log-prefix"], "[FNAME,IN] ", "{f}");

    // Logging from a network namespace needs the host's nf_log_all_netns.
    let _guard = HostSysctl::set("net/netfilter/nf_log_all_netns", "1");
    let mut kmsg = Kmsg::open();
    assert_eq!(names(&lab.tcp_many(VIP, 80, 3)).len(), 3);

    let mut seen = Vec::new();
    let found = wait_until(Duration::from_secs(3), || {
        seen.extend(kmsg.read_new());
        seen.iter()
            .any(|l| l.contains("[lb01,IN]") && l.contains(&format!("DST={VIP} ")))
    });
    let ours: Vec<&String> = seen.iter().filter(|l| l.contains("lb01")).collect();
    assert!(
        found,
        "kernel log must show the prefix '[lb01,IN]' for traffic to {VIP}; \
         lines with 'lb01': {ours:?}"
    );
    // The template's tokens are replaced: no raw FNAME in the log.
    assert!(
        !seen.iter().any(|l| l.contains("[FNAME,IN]")),
        "the FNAME token must be replaced"
    );
}

#[test]
fn intra_connect_balances_connections_from_the_load_balancer_itself() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    // A local service on the VIP in the load balancer namespace.
    lab.keep(tcp_server(&lab.lb, "lbsrv", 80, TcpMode::Close));
    let d = Daemon::start(&lab.lb);
    d.apply(&farm_doc("web", &[], v4_backends(2)));
    let local = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                try_tcp(&lab.lb, None, VIP, 80, Duration::from_millis(1500))
                    .unwrap_or_else(|e| panic!("local connection {i} to the VIP: {e}"))
                    .0
            })
            .collect()
    };

    // Clients are balanced; without intra-connect the LB's own connections are not.
    assert_eq!(counts(&names(&lab.tcp_many(VIP, 80, 4))).len(), 2);
    assert_eq!(
        local(4),
        vec!["lbsrv"; 4],
        "without intra-connect, local connections reach the local service"
    );

    d.apply(&farms_doc(json!({"name":"web","intra-connect":"on"})));
    assert_eq!(d.farm("web")["intra-connect"], "on");
    let got = local(4);
    assert_eq!(
        counts(&got),
        expect_counts(&[("be1", 2), ("be2", 2)]),
        "with intra-connect, local connections are balanced: {got:?}"
    );
    // Clients still balanced.
    assert_eq!(counts(&names(&lab.tcp_many(VIP, 80, 4))).len(), 2);

    d.apply(&farms_doc(json!({"name":"web","intra-connect":"off"})));
    assert_eq!(local(2), vec!["lbsrv"; 2], "intra-connect off again");

    // A weight farm has no chain of its own: its local connections go through the output
    // hook's dispatch chain (block offset and kind) to the shared weight chain.
    d.apply(&farms_doc(
        json!({"name":"web","scheduler":"weight","intra-connect":"on"}),
    ));
    let got = local(20);
    let c = counts(&got);
    assert_eq!(c.len(), 2, "both backends, no local service: {got:?}");
    assert!(!c.contains_key("lbsrv"), "{got:?}");
    let out = lab.lb.nft(&["list", "map", "ip", "nftlb", "osvcx"]);
    assert!(out.contains("goto lb-x"), "{out}");
}

#[test]
fn farm_and_backend_marks_reach_policy_routing() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&farm_doc(
        "web",
        &[("mode", "dnat"), ("mark", "0x1000")],
        vec![
            with(bck("be1", &be4(1)), &[("mark", "0x1")]),
            with(bck("be2", &be4(2)), &[("mark", "0x2")]),
        ],
    ));
    let f = d.farm("web");
    assert_eq!(f["mark"], "0x1000", "{f}");

    // Observation table (ours): forwarded packets towards the backends, by mark.
    nft_load(
        &lab.lb,
        "table ip nlbtobs {\n\
           counter c_all {}\n\
           counter c_farm {}\n\
           counter c_be1 {}\n\
           counter c_be2 {}\n\
           chain obsfwd {\n\
             type filter hook forward priority 100;\n\
             ip daddr 198.18.1.0/24 tcp dport 80 counter name \"c_all\"\n\
             ip daddr 198.18.1.0/24 tcp dport 80 meta mark & 0x1000 == 0x1000 counter name \"c_farm\"\n\
             ip daddr 198.18.1.11 tcp dport 80 meta mark & 0xfff == 0x1 counter name \"c_be1\"\n\
             ip daddr 198.18.1.12 tcp dport 80 meta mark & 0xfff == 0x2 counter name \"c_be2\"\n\
           }\n\
         }\n",
    );
    let c = |n: &str| nft_counter(&lab.lb, "ip", "nlbtobs", &format!("c_{n}"));
    assert_eq!(
        counts(&names(&lab.tcp_many(VIP, 80, 6))),
        expect_counts(&[("be1", 3), ("be2", 3)])
    );
    let (all, farm_c, b1, b2) = (c("all"), c("farm"), c("be1"), c("be2"));
    assert!(all >= 6, "forwarded packets to the backends: {all}");
    assert_eq!(
        farm_c, all,
        "every packet of the farm's flows carries the farm mark 0x1000"
    );
    assert_eq!(
        b1 + b2,
        all,
        "every packet carries its backend's mark (be1 {b1}, be2 {b2}, all {all})"
    );
    assert!(b1 > 0 && b2 > 0, "be1 {b1}, be2 {b2}");

    // Policy routing on the backend mark: be2's flows are prohibited, be1's are not.
    lab.lb.ip(&[
        "rule",
        "add",
        "fwmark",
        "0x2/0xfff",
        "lookup",
        "100",
        "pref",
        "100",
    ]);
    lab.lb
        .ip(&["route", "add", "prohibit", "198.18.1.0/24", "table", "100"]);
    let mut ok = Vec::new();
    let mut failed = 0;
    for _ in 0..6 {
        match try_tcp(&lab.cli, None, VIP, 80, Duration::from_millis(800)) {
            Ok((n, _)) => ok.push(n),
            Err(_) => failed += 1,
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        ok.iter().all(|n| n == "be1") && ok.len() == 3 && failed == 3,
        "with 'fwmark 0x2/0xfff' routed to prohibit, only be1 is reachable: \
         served {ok:?}, failed {failed}"
    );
}
