//! The `nftlb` daemon.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::mpsc;

use nftlb::api::{self, Job};
use nftlb::cli::{generate_key, Args};
use nftlb::engine::{Engine, EngineConfig};
use nftlb::store::Store;
use nftlb::{kernel, logging};

/// jemalloc returns freed memory to the system and fragments less than glibc's malloc
/// under the daemon's pattern (a large burst for a bulk load, then small changes).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nftlb: {e}");
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration file's text, checked to be JSON (the engine applies it object by
/// object).
fn read_config(args: &Args) -> Result<Option<Vec<u8>>, String> {
    let Some(path) = &args.config else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map(|_| Some(bytes))
        .map_err(|e| format!("{}: the structure is invalid: {e}", path.display()))
}

fn run(args: Args) -> Result<(), String> {
    logging::init(args.log_level, args.log_output);
    let cfg = EngineConfig {
        masquerade_mark: args.masquerade_mark()?,
    };
    if args.serial {
        tracing::info!("-S accepted: every request is one atomic transaction regardless");
    }
    let config = read_config(&args)?;

    if args.exit {
        if config.is_none() {
            return Err("-e needs a configuration file (-c FILE)".into());
        }
        let k = kernel::open(&args.nft_backend).map_err(|e| e.to_string())?;
        let mut engine = Engine::new(k, None, cfg);
        engine.start(config.as_deref(), false)?;
        return Ok(());
    }

    let key = match args.explicit_key()? {
        Some(k) => k,
        None => {
            let k = generate_key()?;
            println!("Key: {k}");
            let _ = std::io::stdout().flush();
            k
        }
    };
    if args.daemon {
        // SAFETY: called before any thread is started.
        match unsafe { libc::fork() } {
            -1 => return Err("fork failed".into()),
            0 => {
                // SAFETY: detaching from the terminal's session in the child.
                unsafe { libc::setsid() };
                detach_stdio(args.log_output);
            }
            _ => return Ok(()),
        }
    }
    // Until the handlers are installed (after start-up), these are ignored rather than
    // fatal.
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: setting a signal's disposition to "ignore".
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let (limit, nofile) = api::connection_limit();

    // One daemon per state file (the kernel's owner marker covers one per table).
    let store = Store::new(&args.state_file);
    let _lock = store.lock()?;
    let k = kernel::open(&args.nft_backend).map_err(|e| e.to_string())?;
    tracing::info!(backend = k.name(), "nftables backend ready");
    let mut engine = Engine::new(k, Some(store), cfg);
    // Test knob: cut large loads into smaller kernel transactions (crash tests).
    if let Some(n) = std::env::var("NFTLB_TEST_ELEMENT_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        engine.set_element_batch_commands(n);
    }
    engine.start(config.as_deref(), true)?;

    let reads = engine.reads();
    let (tx, mut rx) = mpsc::channel::<Job>(1024);
    let busy = Arc::new(AtomicBool::new(false));
    let writer_busy = busy.clone();
    let writer = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || {
            while let Some((req, reply)) = rx.blocking_recv() {
                writer_busy.store(true, Ordering::Release);
                let r = engine.handle(&req);
                writer_busy.store(false, Ordering::Release);
                let _ = reply.send(r);
            }
        })
        .map_err(|e| format!("cannot start the writer thread: {e}"))?;

    // Re-render when interfaces, addresses or neighbours change (DSR, stateless DNAT).
    let refresh = tx.clone();
    std::thread::Builder::new()
        .name("netwatch".into())
        .spawn(move || {
            nftlb::netinfo::watch(move || {
                let (reply, _) = tokio::sync::oneshot::channel();
                let req = nftlb::engine::Request {
                    method: "REFRESH".into(),
                    path: String::new(),
                    body: Vec::new(),
                };
                let _ = refresh.blocking_send((req, reply));
            })
        })
        .map_err(|e| format!("cannot start the network watcher: {e}"))?;

    // Changes to our tables that the daemon did not make: check and repair them.
    let verify = tx.clone();
    std::thread::Builder::new()
        .name("nftmonitor".into())
        .spawn(move || {
            let e = nftlb::kernel::monitor::watch(move |f| {
                tracing::warn!(by = %f.by, what = ?f.what, "our tables were changed from outside");
                let (reply, _) = tokio::sync::oneshot::channel();
                // The sets whose elements were touched, one `family name` a line; `*`
                // when they are not known.
                let body = match &f.sets {
                    Some(sets) => sets.iter().map(|(fam, n)| format!("{fam} {n}\n")).collect(),
                    None => "*\n".to_string(),
                };
                let req = nftlb::engine::Request {
                    method: "VERIFY".into(),
                    path: String::new(),
                    body: body.into_bytes(),
                };
                let _ = verify.blocking_send((req, reply));
            });
            tracing::error!("the nftables monitor stopped: {e}; changes made from outside are no longer repaired");
        })
        .map_err(|e| format!("cannot start the nftables monitor: {e}"))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let host = args.listen_host();
    let addr = if host.contains(':') {
        format!("[{host}]:{}", args.port)
    } else {
        format!("{host}:{}", args.port)
    };
    let config_path = args.config.clone();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let stop = signals(config_path, tx.clone())?;
        tracing::info!(%addr, connections = limit, nofile, "API listening");
        api::serve(listener, api::router(key, tx, reads), limit, stop).await;
        Ok::<(), String>(())
    })?;
    // The server has answered the requests it could within its grace; a change the
    // writer is still applying gets what is left of the deadline. The writer and the
    // watchers end with the process.
    let deadline = STOP_AT.get().copied().unwrap_or_else(Instant::now) + api::SHUTDOWN_DEADLINE
        - Duration::from_millis(300);
    while busy.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if busy.load(Ordering::Acquire) {
        tracing::warn!(
            "exiting while a change is being applied; the next start brings the kernel back to the saved state"
        );
    }
    drop(writer);
    rt.shutdown_timeout(Duration::from_millis(100));
    tracing::info!("shutting down; rules stay in place");
    Ok(())
}

/// Points stdin, and stdout/stderr unless logs go there (`-L`), at /dev/null, so that the
/// parent's pipes and terminal are released.
fn detach_stdio(log_output: u8) {
    // SAFETY: plain open/dup2/close on file descriptors we own.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return;
        }
        libc::dup2(fd, 0);
        if !matches!(log_output, 1 | 3) {
            libc::dup2(fd, 1);
        }
        if !matches!(log_output, 2 | 4) {
            libc::dup2(fd, 2);
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

/// When the stop signal came.
static STOP_AT: OnceLock<Instant> = OnceLock::new();

/// Installs the signal handlers; the future completes on SIGTERM, SIGINT or SIGQUIT.
/// SIGHUP applies the `-c` file again (as a POST of it, through the writer); SIGUSR1 and
/// SIGUSR2 are logged and ignored.
fn signals(
    config: Option<PathBuf>,
    writer: mpsc::Sender<Job>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let on = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| format!("cannot handle {name}: {e}"))
    };
    let mut term = on(SignalKind::terminate(), "SIGTERM")?;
    let mut int = on(SignalKind::interrupt(), "SIGINT")?;
    let mut quit = on(SignalKind::quit(), "SIGQUIT")?;
    let mut hup = on(SignalKind::hangup(), "SIGHUP")?;
    let mut usr1 = on(SignalKind::user_defined1(), "SIGUSR1")?;
    let mut usr2 = on(SignalKind::user_defined2(), "SIGUSR2")?;
    Ok(async move {
        let name = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = quit.recv() => break "SIGQUIT",
                _ = hup.recv() => reload(config.clone(), writer.clone()),
                _ = usr1.recv() => tracing::info!("SIGUSR1 received: it has no meaning here, ignored"),
                _ = usr2.recv() => tracing::info!("SIGUSR2 received: it has no meaning here, ignored"),
            }
        };
        let _ = STOP_AT.set(Instant::now());
        tracing::info!(
            "{name} received: stopping (requests being handled get {} s, the process exits within {} s)",
            api::SHUTDOWN_GRACE.as_secs(),
            api::SHUTDOWN_DEADLINE.as_secs()
        );
    })
}

/// SIGHUP: the `-c` file applied again through the writer, like a POST of it.
fn reload(config: Option<PathBuf>, writer: mpsc::Sender<Job>) {
    let Some(path) = config else {
        tracing::info!("SIGHUP received: no configuration file (-c) was given, nothing to reload");
        return;
    };
    tracing::info!(file = %path.display(), "SIGHUP received: applying the configuration file again");
    tokio::spawn(async move {
        let file = path.display();
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("SIGHUP: cannot read {file}: {e}; nothing changed");
                return;
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = nftlb::engine::Request {
            method: "POST".into(),
            path: "/farms".into(),
            body,
        };
        if writer.send((req, tx)).await.is_err() {
            tracing::error!("SIGHUP: the writer has stopped; {file} not applied");
            return;
        }
        match rx.await {
            Ok(r) if r.status == 200 => {
                tracing::info!("SIGHUP: {file} applied: {}", r.body)
            }
            Ok(r) => tracing::error!(
                status = r.status,
                "SIGHUP: {file} was not applied (nothing changed): {}",
                r.body
            ),
            Err(_) => tracing::error!("SIGHUP: the writer has stopped; {file} not applied"),
        }
    });
}
