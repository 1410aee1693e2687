//! The `nftlb` daemon.

use std::io::Write;
use std::process::ExitCode;

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

    let key = match args.explicit_key() {
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

    let (tx, mut rx) = mpsc::channel::<Job>(1024);
    let writer = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || {
            while let Some((req, reply)) = rx.blocking_recv() {
                let r = engine.handle(&req);
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
                let req = nftlb::engine::Request {
                    method: "VERIFY".into(),
                    path: String::new(),
                    body: Vec::new(),
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
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(%addr, "API listening");
        axum::serve(listener, api::router(key, tx))
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| format!("server error: {e}"))
    })?;
    // The server has answered every request it accepted, so the writer is idle; it and
    // the network watcher end with the process.
    drop(writer);
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

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
