//! `local` farms: the virtual service is a process on the load balancer itself. Its
//! policies and limits apply, there is no NAT to a backend, and connections the local
//! process opens with a backend's mark leave with that backend's source address.

mod common;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::json;

const VIP: &str = "198.18.0.100";

fn local_farm(extra: serde_json::Value) -> serde_json::Value {
    let mut f = json!({"name":"proxy","family":"ipv4","virtual-addr":VIP,"virtual-ports":"80",
        "protocol":"tcp","mode":"local","backends":[
            {"name":"be1","ip-addr":be4(1),"mark":"0x20","source-addr":"198.18.1.2"}]});
    if let Some(o) = extra.as_object() {
        for (k, v) in o {
            f[k] = v.clone();
        }
    }
    json!({ "farms": [f] })
}

#[test]
fn local_farm_serves_locally_and_applies_its_policies() {
    require_root();
    let lab = Lab::new(1);
    lab.add_vip(VIP);
    lab.add_client_addr("198.18.0.3");
    // The "local process": a server in the load balancer's namespace on the VIP.
    lab.keep(tcp_server(&lab.lb, "local", 80, TcpMode::Close));
    let d = Daemon::start(&lab.lb);
    d.apply(&json!({"policies":[{"name":"bl","elements":[{"data":"198.18.0.3"}]}]}));
    let r = d.apply(&local_farm(json!({"policies":[{"name":"bl"}]})));
    assert_eq!(r["response"], "success", "{r}");

    // Served by the local process, which sees the real client.
    let (who, seen) = lab
        .tcp(VIP, 80)
        .expect("client served by the local process");
    assert_eq!(who, "local");
    assert_eq!(seen, ip("198.18.0.2"));
    // The blacklisted client is dropped.
    assert!(
        lab.tcp_from("198.18.0.3", VIP, 80).is_err(),
        "blacklisted client must not reach the local service"
    );
    // And it is not NATed anywhere: nothing of this farm in the NAT service maps.
    let nat = lab.lb.nft(&["list", "map", "ip", "nftlb", "svcx"]);
    assert!(!nat.contains("farm-proxy"), "{nat}");
}

#[test]
fn connections_with_a_backend_mark_leave_with_its_source_address() {
    require_root();
    let lab = Lab::new(1);
    lab.add_vip(VIP);
    lab.add_lb_back_addr("198.18.1.2");
    lab.serve_tcp(8080);
    let d = Daemon::start(&lab.lb);
    let r = d.apply(&local_farm(json!({})));
    assert_eq!(r["response"], "success", "{r}");

    // A "proxy" in the lb namespace connects to the backend with and without the mark.
    let backend: IpAddr = ip(&be4(1));
    let connect = |mark: Option<u32>| -> (String, IpAddr) {
        lab.lb.run(move || {
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .expect("socket");
            if let Some(m) = mark {
                sock.set_mark(m).expect("SO_MARK");
            }
            let addr = SocketAddr::new(backend, 8080);
            sock.connect_timeout(&addr.into(), Duration::from_secs(2))
                .expect("connect to the backend");
            let stream: TcpStream = sock.into();
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line)
                .expect("greeting");
            let mut parts = line.split_whitespace();
            let name = parts.next().unwrap_or_default().to_string();
            let peer = ip(parts.next().unwrap_or("0.0.0.0"));
            (name, peer)
        })
    };
    let (_, plain) = connect(None);
    assert_eq!(plain, ip("198.18.1.1"), "unmarked: the LB's own address");
    let (name, marked) = connect(Some(0x20));
    assert_eq!(name, "be1");
    assert_eq!(
        marked,
        ip("198.18.1.2"),
        "marked with be1's mark: be1's source-addr"
    );
}
