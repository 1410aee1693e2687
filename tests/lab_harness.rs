//! Self-tests of the integration harness: plain routed traffic through the lab
//! topology (no load-balancer rules, no daemon), and the nftlb-lab helper binary.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn routed_traffic_reaches_backends_directly() {
    let lab = Lab::new(2);
    lab.serve_tcp(7000);
    lab.serve_udp(7001);
    lab.serve_tcp_keep_open(7002);

    for i in 1..=2 {
        let name = format!("be{i}");
        // IPv4 and IPv6, TCP and UDP: the backend answers with its name and sees the
        // client's own address (routed by the LB namespace, no NAT).
        assert_eq!(
            lab.tcp(&be4(i), 7000).unwrap(),
            (name.clone(), ip(CLI4)),
            "tcp v4 to {name}"
        );
        assert_eq!(lab.tcp(&be6(i), 7000).unwrap(), (name.clone(), ip(CLI6)));
        assert_eq!(lab.udp(&be4(i), 7001).unwrap(), (name.clone(), ip(CLI4)));
        assert_eq!(lab.udp(&be6(i), 7001).unwrap(), (name.clone(), ip(CLI6)));
    }

    // A long-lived connection answers repeatedly.
    let mut c = lab.long_conn(&be4(1), 7002).unwrap();
    assert_eq!((c.backend.as_str(), c.client), ("be1", ip(CLI4)));
    for _ in 0..3 {
        assert_eq!(c.ping().unwrap(), ("be1".to_string(), ip(CLI4)));
    }

    // Secondary client addresses work with the *_from helpers.
    lab.add_client_addr("198.18.0.3");
    assert_eq!(
        lab.tcp_from("198.18.0.3", &be4(2), 7000).unwrap(),
        ("be2".to_string(), ip("198.18.0.3"))
    );

    // Nothing listens on 7003: refused, quickly.
    assert!(lab.tcp(&be4(1), 7003).is_err());

    // The LB namespace has no ruleset of its own.
    assert!(!lab.lb.nft_ruleset().contains("table"));

    // Without default routes the backends cannot answer the client any more.
    lab.remove_backend_routes();
    let r = lab
        .cli
        .run(|| tcp_request(ip(&be4(1)), 7000, Duration::from_millis(500)));
    assert!(
        r.is_err(),
        "expected failure without backend routes, got {r:?}"
    );

    // Tools the suite relies on are present.
    require_tool("nft");
    require_tool("conntrack");
    let _ = lab.lb.conntrack_list();
}

#[test]
fn servers_stop_on_drop() {
    let lab = Lab::new(1);
    let s = tcp_server(&lab.be(1).ns, "be1", 7100, TcpMode::KeepOpen);
    let mut c = lab.long_conn(&be4(1), 7100).unwrap();
    assert_eq!(c.ping().unwrap().0, "be1");
    drop(s); // stops the accept loop and the per-connection thread (bounded)
    assert!(lab.tcp(&be4(1), 7100).is_err());
    assert!(
        c.ping().is_err(),
        "connection should be closed by the stopped server"
    );
    // The port can be bound again.
    let _s2 = udp_server(&lab.be(1).ns, "be1", 7100);
    let _s3 = tcp_server(&lab.be(1).ns, "be1", 7100, TcpMode::Close);
    assert_eq!(lab.tcp(&be4(1), 7100).unwrap().0, "be1");
}

#[test]
fn nftlb_lab_binary_serves_and_probes() {
    let lab = Lab::new(1);
    let bin = env!("CARGO_BIN_EXE_nftlb-lab");
    let be = &lab.be(1).ns;
    let mut tcp = Command::new("ip")
        .args([
            "netns",
            "exec",
            be.name(),
            bin,
            "serve",
            "--name",
            "be1",
            "--port",
            "7200",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut udp = Command::new("ip")
        .args([
            "netns",
            "exec",
            be.name(),
            bin,
            "serve",
            "--name",
            "be1",
            "--port",
            "7201",
            "--udp",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(10), || lab.tcp(&be4(1), 7200).is_ok());
    let out = if up {
        let tcp_out = lab.cli.try_exec(&[
            bin,
            "probe",
            "--addr",
            &be4(1),
            "--port",
            "7200",
            "--count",
            "3",
        ]);
        let udp_out = lab.cli.try_exec(&[
            bin,
            "probe",
            "--addr",
            &be6(1),
            "--port",
            "7201",
            "--count",
            "2",
            "--udp",
            "--interval-ms",
            "10",
        ]);
        Some((tcp_out, udp_out))
    } else {
        None
    };
    for c in [&mut tcp, &mut udp] {
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let _ = c.wait();
    }
    let (tcp_out, udp_out) = out.expect("nftlb-lab serve did not come up");
    let t = String::from_utf8_lossy(&tcp_out.stdout);
    assert!(tcp_out.status.success(), "probe failed: {t}");
    assert!(
        t.contains("req 1  -> be1 (backend saw client 198.18.0.2)"),
        "{t}"
    );
    assert!(
        t.contains("summary: 3 requests, 3 ok, 0 failed; be1=3"),
        "{t}"
    );
    let u = String::from_utf8_lossy(&udp_out.stdout);
    assert!(udp_out.status.success(), "udp probe failed: {u}");
    assert!(u.contains("-> be1 (backend saw client 2001:2::2)"), "{u}");
}
