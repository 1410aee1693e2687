//! Extra helpers for the security / feature traffic tests (policies, limits,
//! persistence, helpers, logging, marks): API calls with any method, clients with a
//! source address and short timeouts, parallel connection bursts, held connections,
//! crafted raw TCP segments, observation tables (named nft counters) in a namespace,
//! host sysctl guards, a kernel log reader, and a vsftpd server with a tiny FTP client.

use super::*;
use serde_json::{json, Value};
use std::io::{Seek, SeekFrom};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;

// ---------------------------------------------------------------------------
// API

/// Any method with an optional JSON body; returns (status, JSON body).
pub fn call(d: &Daemon, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let r = d.request(method, path, &[], bytes.as_deref());
    (r.status, r.json())
}

/// Like [`call`] but asserts 200 (with the daemon log tail in the message).
pub fn call_ok(d: &Daemon, method: &str, path: &str, body: Option<&Value>) -> Value {
    let (st, resp) = call(d, method, path, body);
    assert_eq!(
        st,
        200,
        "{method} {path} {} -> {st} {resp}; daemon log tail:\n{}",
        body.map(|b| short(&b.to_string())).unwrap_or_default(),
        tail(&d.log(), 4000)
    );
    resp
}

fn short(s: &str) -> String {
    if s.len() > 600 {
        format!("{}... ({} bytes)", &s[..600], s.len())
    } else {
        s.to_string()
    }
}

/// `{"data": x}` for each element.
pub fn elements(data: &[&str]) -> Value {
    Value::Array(data.iter().map(|d| json!({ "data": d })).collect())
}

/// `{"policies":[{"name":..,"type":..,"family":..,"elements":[..]}]}`
pub fn policy_doc(name: &str, ptype: &str, family: &str, data: &[&str]) -> Value {
    json!({ "policies": [ {
        "name": name, "type": ptype, "family": family, "elements": elements(data)
    } ] })
}

/// `[{"name": p}, ...]`, the form farms and addresses use to attach policies.
pub fn policy_refs(names: &[&str]) -> Value {
    Value::Array(names.iter().map(|n| json!({ "name": n })).collect())
}

/// A JSON value that may be a string or a number, as a u64.
pub fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// GET /policies/NAME and return the policy object.
pub fn get_policy(d: &Daemon, name: &str) -> Value {
    let (st, body) = d.get(&format!("/policies/{name}"));
    assert_eq!(st, 200, "GET /policies/{name} -> {st} {body}");
    let list = body["policies"]
        .as_array()
        .unwrap_or_else(|| panic!("GET /policies/{name}: no policies list: {body}"));
    assert_eq!(list.len(), 1, "GET /policies/{name}: {body}");
    list[0].clone()
}

/// The element whose `data` is `data` (or, for a network, starts with the
/// same address and has the same prefix), if any.
pub fn find_element<'a>(policy: &'a Value, data: &str) -> Option<&'a Value> {
    policy["elements"]
        .as_array()?
        .iter()
        .find(|e| e["data"].as_str() == Some(data))
}

/// The element data strings of a policy (sorted).
pub fn element_data(policy: &Value) -> Vec<String> {
    let mut v: Vec<String> = policy["elements"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["data"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// (counter-packets, counter-bytes) of an element; panics if missing.
pub fn element_counters(policy: &Value, data: &str) -> (u64, u64) {
    let e = find_element(policy, data)
        .unwrap_or_else(|| panic!("element {data} not in policy: {policy}"));
    let p = as_u64(&e["counter-packets"])
        .unwrap_or_else(|| panic!("element {data} has no numeric counter-packets: {e}"));
    let b = as_u64(&e["counter-bytes"])
        .unwrap_or_else(|| panic!("element {data} has no numeric counter-bytes: {e}"));
    (p, b)
}

/// GET /farms/NAME/sessions -> the sessions array.
pub fn sessions(d: &Daemon, farm: &str) -> Vec<Value> {
    let (st, body) = d.get(&format!("/farms/{farm}/sessions"));
    assert_eq!(st, 200, "GET /farms/{farm}/sessions -> {st} {body}");
    body["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("GET /farms/{farm}/sessions: no sessions list: {body}"))
        .clone()
}

/// The session of `client` in a sessions list.
pub fn session_of<'a>(list: &'a [Value], client: &str) -> Option<&'a Value> {
    list.iter().find(|s| s["client"].as_str() == Some(client))
}

// ---------------------------------------------------------------------------
// clients

/// One TCP request from `src` (or the default address) with its own timeout.
pub fn try_tcp(
    ns: &NetNs,
    src: Option<&str>,
    dst: &str,
    port: u16,
    timeout: Duration,
) -> io::Result<(String, IpAddr)> {
    let s = src.map(ip);
    let a = ip(dst);
    ns.run(move || tcp_request_from(s, a, port, timeout))
}

/// Asserts that a request from `src` to `dst:port` is answered; returns the backend.
pub fn served(lab: &Lab, src: &str, dst: &str, port: u16, what: &str) -> String {
    match try_tcp(&lab.cli, Some(src), dst, port, TIMEOUT) {
        Ok((name, _)) => name,
        Err(e) => panic!("{what}: {src} -> {dst}:{port} must be served, got {e}"),
    }
}

/// Asserts that a request from `src` to `dst:port` fails (within `timeout`).
pub fn refused(lab: &Lab, src: &str, dst: &str, port: u16, what: &str) {
    let r = try_tcp(&lab.cli, Some(src), dst, port, Duration::from_millis(700));
    assert!(
        r.is_err(),
        "{what}: {src} -> {dst}:{port} must NOT be served, got {r:?}"
    );
}

/// `n` connection attempts started at the same time from `src` (parallel threads in
/// `ns`), each with `timeout`. Returns the results in thread order.
pub fn burst(
    ns: &NetNs,
    src: Option<&str>,
    dst: &str,
    port: u16,
    n: usize,
    timeout: Duration,
) -> Vec<io::Result<(String, IpAddr)>> {
    let s = src.map(ip);
    let a = ip(dst);
    ns.run(move || {
        // Threads created here inherit this thread's network namespace.
        let start = Arc::new(std::sync::Barrier::new(n));
        let hs: Vec<_> = (0..n)
            .map(|_| {
                let start = start.clone();
                thread::spawn(move || {
                    start.wait();
                    tcp_request_from(s, a, port, timeout)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("burst thread panicked"))
            .collect()
    })
}

/// A long-lived connection to a keep-open server, from a chosen source address.
pub struct Held {
    reader: BufReader<TcpStream>,
    /// Backend that answered the greeting.
    pub backend: String,
}

impl Held {
    /// Sends a line and reads the reply line.
    pub fn ping(&mut self) -> io::Result<String> {
        self.reader.get_mut().write_all(b"ping\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.split_whitespace().next().unwrap_or("").to_string())
    }

    /// Closes the connection with an RST (SO_LINGER 0).
    pub fn abort(self) {
        let s = Socket::from(self.reader.into_inner());
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s);
    }

    /// Orderly close.
    pub fn close(self) {
        let s = self.reader.into_inner();
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Opens a held connection from `src` to `dst:port` (greeting read).
pub fn hold(
    ns: &NetNs,
    src: Option<&str>,
    dst: &str,
    port: u16,
    timeout: Duration,
) -> io::Result<Held> {
    let s = src.map(ip);
    let a = ip(dst);
    ns.run(move || {
        let dst = SocketAddr::new(a, port);
        let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(s) = s {
            sock.bind(&SocketAddr::new(s, 0).into())?;
        }
        sock.connect_timeout(&dst.into(), timeout)?;
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let backend = line
            .split_whitespace()
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"))?
            .to_string();
        Ok(Held { reader, backend })
    })
}

/// Number of established TCP sockets with local port `port` in `ns` (IPv4 and IPv6).
pub fn established_on_port(ns: &NetNs, port: u16) -> usize {
    let out = ns.exec(&[
        "ss",
        "-Htn",
        "state",
        "established",
        &format!("( sport = :{port} )"),
    ]);
    out.lines().filter(|l| !l.trim().is_empty()).count()
}

// ---------------------------------------------------------------------------
// raw TCP segments

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < data.len() {
        sum += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    if i < data.len() {
        sum += (data[i] as u32) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 20-byte TCP header with a correct checksum for the IPv4 pseudo-header.
pub fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
    h[8..12].copy_from_slice(&0x0badcafeu32.to_be_bytes()); // ack
    h[12] = 5 << 4; // data offset
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
    let c = csum_fold(csum_add(csum_add(0, &pseudo), &h));
    h[16..18].copy_from_slice(&c.to_be_bytes());
    h
}

/// Sends one crafted TCP segment from `src:sport` to `dst:dport` out of `ns`
/// through a raw socket (the kernel adds the IPv4 header).
pub fn send_raw_tcp(ns: &NetNs, src: &str, dst: &str, sport: u16, dport: u16, flags: u8) {
    let (s, d): (Ipv4Addr, Ipv4Addr) = (
        src.parse().expect("IPv4 source"),
        dst.parse().expect("IPv4 destination"),
    );
    ns.run(move || {
        let sock =
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).expect("raw TCP socket");
        sock.bind(&SocketAddr::new(IpAddr::V4(s), 0).into())
            .expect("bind raw socket");
        let seg = tcp_segment(s, d, sport, dport, flags);
        sock.send_to(&seg, &SocketAddr::new(IpAddr::V4(d), 0).into())
            .expect("send raw segment");
    });
}

// ---------------------------------------------------------------------------
// observation tables (our own nft table in a namespace, never named nftlb)

/// Loads an nft script into `ns` (`nft -f FILE`), panicking with nft's stderr.
pub fn nft_load(ns: &NetNs, script: &str) {
    let path = std::env::temp_dir().join(format!(
        "nlbt-{}-{}.nft",
        std::process::id(),
        COUNTER_SEC.fetch_add(1, Ordering::SeqCst)
    ));
    fs::write(&path, script).expect("write nft script");
    let out = ns.try_exec(&["nft", "-f", path.to_str().unwrap()]);
    let _ = fs::remove_file(&path);
    assert!(
        out.status.success(),
        "nft -f failed in {}: {}\nscript:\n{script}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

static COUNTER_SEC: AtomicUsize = AtomicUsize::new(0);

/// Packets of the named counter `name` in `table` (family `fam`) of `ns`.
pub fn nft_counter(ns: &NetNs, fam: &str, table: &str, name: &str) -> u64 {
    let out = ns.nft(&["list", "counter", fam, table, name]);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "packets")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no packets in counter {name}: {out}"))
}

// ---------------------------------------------------------------------------
// host sysctl (root namespace) with restore

/// Sets a root-namespace sysctl and restores the old value on drop.
pub struct HostSysctl {
    path: String,
    old: String,
}

impl HostSysctl {
    pub fn set(key: &str, value: &str) -> HostSysctl {
        let path = format!("/proc/sys/{key}");
        let old = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
            .trim()
            .to_string();
        fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}={value}: {e}"));
        HostSysctl { path, old }
    }
}

impl Drop for HostSysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!("warning: cannot restore {} to {}: {e}", self.path, self.old);
        }
    }
}

// ---------------------------------------------------------------------------
// kernel log

/// Reads kernel log records written after [`Kmsg::open`].
pub struct Kmsg {
    f: File,
}

impl Kmsg {
    pub fn open() -> Kmsg {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .expect("open /dev/kmsg");
        f.seek(SeekFrom::End(0)).expect("seek /dev/kmsg to the end");
        Kmsg { f }
    }

    /// All records available now (message text only).
    pub fn read_new(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            match self.f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    // "prio,seq,usec,flags;message\n continuation..."
                    let msg = rec.split_once(';').map(|(_, m)| m).unwrap_or(&rec);
                    out.push(msg.lines().next().unwrap_or("").to_string());
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => continue, // overwritten
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("read /dev/kmsg: {e}"),
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// FTP: vsftpd server (by PID) and a minimal passive-mode client

/// A vsftpd process in a namespace serving `file.txt` anonymously, killed (by PID) on drop.
pub struct Vsftpd {
    child: Option<Child>,
    dir: PathBuf,
    /// Content of `file.txt`.
    pub content: String,
}

impl Vsftpd {
    pub fn start(ns: &NetNs, pasv_min: u16, pasv_max: u16) -> Vsftpd {
        let bin = require_tool("vsftpd");
        let dir = std::env::temp_dir().join(format!(
            "nlbt-{}-{}-ftp",
            std::process::id(),
            COUNTER_SEC.fetch_add(1, Ordering::SeqCst)
        ));
        let root = dir.join("root");
        let empty = dir.join("empty");
        fs::create_dir_all(&root).expect("ftp root");
        fs::create_dir_all(&empty).expect("ftp empty dir");
        use std::os::unix::fs::PermissionsExt;
        for d in [&dir, &root, &empty] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let content: String = (0..200)
            .map(|i| format!("line {i} of the nlbt ftp test file\n"))
            .collect();
        fs::write(root.join("file.txt"), &content).expect("write ftp file");
        fs::set_permissions(root.join("file.txt"), fs::Permissions::from_mode(0o644))
            .expect("chmod file");
        let conf = format!(
            "listen=YES\nlisten_ipv6=NO\nlisten_port=21\nbackground=NO\n\
             anonymous_enable=YES\nno_anon_password=YES\nanon_root={root}\n\
             local_enable=NO\nwrite_enable=NO\nanon_upload_enable=NO\n\
             pasv_enable=YES\npasv_min_port={pasv_min}\npasv_max_port={pasv_max}\n\
             pasv_promiscuous=YES\nport_enable=NO\nconnect_from_port_20=NO\n\
             secure_chroot_dir={empty}\nseccomp_sandbox=NO\nisolate=NO\nisolate_network=NO\n\
             xferlog_enable=NO\nvsftpd_log_file={dir}/vsftpd.log\ndual_log_enable=NO\n\
             syslog_enable=NO\nuse_localtime=NO\nhide_ids=YES\nssl_enable=NO\n\
             idle_session_timeout=30\ndata_connection_timeout=10\nmax_clients=50\n",
            root = root.display(),
            empty = empty.display(),
            dir = dir.display(),
        );
        let conf_path = dir.join("vsftpd.conf");
        fs::write(&conf_path, conf).expect("write vsftpd.conf");
        fs::set_permissions(&conf_path, fs::Permissions::from_mode(0o600)).expect("chmod conf");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .arg(&bin)
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn vsftpd");
        let mut v = Vsftpd {
            child: Some(child),
            dir,
            content,
        };
        // Ready when the control port answers with a 220 greeting inside the namespace.
        let ok = wait_until(Duration::from_secs(10), || {
            if let Some(Ok(Some(_))) = v.child.as_mut().map(|c| c.try_wait()) {
                return true;
            }
            ns.run(|| {
                let Ok(s) = TcpStream::connect_timeout(
                    &SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 21),
                    Duration::from_millis(300),
                ) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("220")
            })
        });
        if let Some(Ok(Some(st))) = v.child.as_mut().map(|c| c.try_wait()) {
            let mut err = String::new();
            if let Some(mut e) = v.child.take().and_then(|mut c| c.stderr.take()) {
                let _ = e.read_to_string(&mut err);
            }
            panic!("vsftpd exited at start-up ({st}): {err}");
        }
        assert!(ok, "vsftpd did not answer on port 21 within 10 s");
        v
    }
}

impl Drop for Vsftpd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Outcome of a passive-mode download.
#[derive(Debug)]
pub enum FtpResult {
    /// The file's content.
    Data(String),
    /// The control connection worked but the data connection failed: (PASV reply, error).
    DataFailed(String, String),
}

fn ftp_reply(r: &mut BufReader<TcpStream>) -> io::Result<(u32, String)> {
    // Multi-line replies: "123-..." until "123 ...".
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("FTP control closed (after {all:?})"),
            ));
        }
        all.push_str(&line);
        if line.len() >= 4 && line.as_bytes()[3] == b' ' {
            if let Ok(code) = line[..3].parse::<u32>() {
                return Ok((code, all));
            }
        }
    }
}

fn ftp_cmd(r: &mut BufReader<TcpStream>, cmd: &str, want: u32) -> io::Result<String> {
    r.get_mut().write_all(format!("{cmd}\r\n").as_bytes())?;
    let (code, text) = ftp_reply(r)?;
    if code / 100 != want / 100 {
        return Err(io::Error::other(format!(
            "FTP {cmd:?}: expected {want}, got {text:?}"
        )));
    }
    Ok(text)
}

/// Parses `227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)`.
pub fn parse_pasv(reply: &str) -> Option<SocketAddr> {
    let inner = reply.split_once('(')?.1.split_once(')')?.0;
    let n: Vec<u16> = inner
        .split(',')
        .map(|x| x.trim().parse().ok())
        .collect::<Option<Vec<u16>>>()?;
    if n.len() != 6 || n.iter().any(|&x| x > 255) {
        return None;
    }
    let addr = Ipv4Addr::new(n[0] as u8, n[1] as u8, n[2] as u8, n[3] as u8);
    Some(SocketAddr::new(IpAddr::V4(addr), n[4] * 256 + n[5]))
}

/// Logs in anonymously at `server:21` from inside `ns`, enters passive mode, connects
/// to the address the PASV reply names (as real clients do) and retrieves `file`.
/// Control-channel errors are returned as `Err`; a failed data connection as
/// `Ok(FtpResult::DataFailed)`.
pub fn ftp_get(ns: &NetNs, server: &str, file: &str) -> io::Result<FtpResult> {
    let a = ip(server);
    let file = file.to_string();
    ns.run(move || {
        let t = Duration::from_secs(3);
        let s = TcpStream::connect_timeout(&SocketAddr::new(a, 21), t)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        let mut r = BufReader::new(s);
        let (code, text) = ftp_reply(&mut r)?;
        if code != 220 {
            return Err(io::Error::other(format!("FTP greeting: {text:?}")));
        }
        ftp_cmd(&mut r, "USER anonymous", 331).or_else(|e| {
            // Some servers log anonymous in directly.
            if e.to_string().contains("230") {
                Ok(String::new())
            } else {
                Err(e)
            }
        })?;
        ftp_cmd(&mut r, "PASS nlbt@example.invalid", 230)?;
        ftp_cmd(&mut r, "TYPE I", 200)?;
        let pasv = ftp_cmd(&mut r, "PASV", 227)?;
        let data_addr = parse_pasv(&pasv)
            .ok_or_else(|| io::Error::other(format!("cannot parse PASV reply {pasv:?}")))?;
        let data = match TcpStream::connect_timeout(&data_addr, Duration::from_millis(1500)) {
            Ok(d) => d,
            Err(e) => {
                let _ = r.get_mut().write_all(b"QUIT\r\n");
                return Ok(FtpResult::DataFailed(
                    pasv.trim().to_string(),
                    e.to_string(),
                ));
            }
        };
        data.set_read_timeout(Some(t))?;
        r.get_mut()
            .write_all(format!("RETR {file}\r\n").as_bytes())?;
        let (code, text) = ftp_reply(&mut r)?;
        if code != 150 && code != 125 {
            return Err(io::Error::other(format!("RETR: {text:?}")));
        }
        let mut content = String::new();
        let mut data = data;
        data.read_to_string(&mut content)?;
        let (code, text) = ftp_reply(&mut r)?;
        if code != 226 {
            return Err(io::Error::other(format!("after transfer: {text:?}")));
        }
        let _ = r.get_mut().write_all(b"QUIT\r\n");
        Ok(FtpResult::Data(content))
    })
}

/// Like [`call`] with a custom timeout (for big documents): raw HTTP to the daemon's
/// API from inside `ns` (the namespace the daemon runs in).
pub fn call_slow(
    ns: &NetNs,
    d: &Daemon,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{API_PORT}\r\nKey: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        d.key,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), API_PORT);
    ns.run(move || http_exchange(addr, &req, timeout))
}
