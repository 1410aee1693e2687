//! Logging set up from `-l` (syslog level) and `-L` (output), with a syslog writer.

use std::ffi::CString;
use std::io::{self, Write};

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// Maps a syslog level (0-7) to the most verbose tracing level shown.
pub fn level(syslog: u8) -> Level {
    match syslog {
        0..=3 => Level::ERROR,
        4 => Level::WARN,
        5 | 6 => Level::INFO,
        _ => Level::DEBUG,
    }
}

/// Writes each formatted event to syslog(3).
#[derive(Clone, Copy)]
struct Syslog;

struct SyslogLine(Vec<u8>);

impl Write for SyslogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        if let Ok(c) = CString::new(text.replace('\0', " ")) {
            // SAFETY: constant format string and a valid NUL-terminated argument.
            unsafe { libc::syslog(libc::LOG_NOTICE, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine;
    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine(Vec::new())
    }
}

/// Installs the global subscriber.
pub fn init(syslog_level: u8, output: u8) {
    let lvl = level(syslog_level);
    let filter = tracing_subscriber::filter::LevelFilter::from_level(lvl);
    let to_syslog = matches!(output, 0 | 3 | 4);
    if to_syslog {
        // SAFETY: a static identity string, opened once.
        unsafe { libc::openlog(c"nftlb".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    }
    let syslog_layer = to_syslog.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(Syslog)
            .with_ansi(false)
            .without_time()
            .with_target(false)
    });
    let stdout_layer = matches!(output, 1 | 3).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(io::stdout)
            .with_ansi(false)
            .with_target(false)
    });
    let stderr_layer = matches!(output, 2 | 4).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(io::stderr)
            .with_ansi(false)
            .with_target(false)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(syslog_layer)
        .with(stdout_layer)
        .with(stderr_layer)
        .try_init();
}
