//! nftlb-lab: toy backends and a probe client for demos and manual tests.
//!
//! `nftlb-lab serve --name be1 --port 80 [--udp] [--keep-open]`
//!   TCP: on each connection write `"<name> <client-ip>\n"` and close
//!   (`--keep-open`: keep the connection and answer every received line with it).
//!   UDP: answer every datagram with that line. Listens on `[::]` (dual-stack).
//!
//! `nftlb-lab probe --addr 198.18.0.100 --port 80 --count 10 [--interval-ms 200] [--udp]`
//!   makes COUNT requests and prints one line each, then a per-backend summary.
//!   Exit status 1 if any request failed.

use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "nftlb-lab",
    about = "Toy backends and a probe client for nftlb demos"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a toy backend server (runs until killed)
    Serve {
        /// Name this backend reports
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// Serve UDP instead of TCP
        #[arg(long)]
        udp: bool,
        /// TCP: keep connections open and answer each received line
        #[arg(long)]
        keep_open: bool,
    },
    /// Send requests to a service and show which backend answered
    Probe {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long)]
        udp: bool,
        /// Per-request timeout
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Serve {
            name,
            port,
            udp,
            keep_open,
        } => {
            if udp {
                serve_udp(&name, port)
            } else {
                serve_tcp(&name, port, keep_open)
            }
        }
        Cmd::Probe {
            addr,
            port,
            count,
            interval_ms,
            udp,
            timeout_ms,
        } => return probe(addr, port, count, interval_ms, udp, timeout_ms),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nftlb-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn line(name: &str, peer: &SocketAddr) -> String {
    format!("{name} {}\n", peer.ip().to_canonical())
}

/// `[::]:port` with IPV6_V6ONLY off (the Linux default), so IPv4 clients are accepted too.
fn any(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
}

fn serve_tcp(name: &str, port: u16, keep_open: bool) -> io::Result<()> {
    let l = TcpListener::bind(any(port))?;
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        let Ok(peer) = s.peer_addr() else { continue };
        let reply = line(name, &peer);
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        if !keep_open {
            let _ = s.write_all(reply.as_bytes());
            continue;
        }
        std::thread::spawn(move || {
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    return;
                }
                for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                    if s.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
    }
    Ok(())
}

fn serve_udp(name: &str, port: u16) -> io::Result<()> {
    let s = UdpSocket::bind(any(port))?;
    let mut buf = [0u8; 2048];
    loop {
        match s.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = s.send_to(line(name, &peer).as_bytes(), peer);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
}

fn request(addr: IpAddr, port: u16, udp: bool, timeout: Duration) -> io::Result<String> {
    let dst = SocketAddr::new(addr, port);
    if udp {
        let bind: IpAddr = match addr {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let s = UdpSocket::bind((bind, 0))?;
        s.connect(dst)?;
        s.set_read_timeout(Some(timeout))?;
        s.send(b"ping\n")?;
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    } else {
        let s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut l = String::new();
        BufReader::new(s).take(4096).read_line(&mut l)?;
        if l.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "empty reply"));
        }
        Ok(l.trim().to_string())
    }
}

fn probe(
    addr: IpAddr,
    port: u16,
    count: u32,
    interval_ms: u64,
    udp: bool,
    timeout_ms: u64,
) -> ExitCode {
    let width = count.to_string().len().max(2);
    let mut per_backend: BTreeMap<String, u32> = BTreeMap::new();
    let mut failed = 0;
    for i in 1..=count {
        match request(addr, port, udp, Duration::from_millis(timeout_ms)) {
            Ok(reply) => {
                let mut it = reply.split_whitespace();
                let be = it.next().unwrap_or("?").to_string();
                let seen = it.next().unwrap_or("?");
                println!("req {i:<width$} -> {be} (backend saw client {seen})");
                *per_backend.entry(be).or_insert(0) += 1;
            }
            Err(e) => {
                println!("req {i:<width$} -> FAILED: {e}");
                failed += 1;
            }
        }
        let _ = io::stdout().flush();
        if interval_ms > 0 && i < count {
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
    }
    let dist: Vec<String> = per_backend
        .iter()
        .map(|(b, n)| format!("{b}={n}"))
        .collect();
    println!(
        "summary: {count} requests, {} ok, {failed} failed; {}",
        count - failed,
        if dist.is_empty() {
            "no backend answered".to_string()
        } else {
            dist.join(" ")
        }
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
