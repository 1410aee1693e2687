//! Command line: the original nftlb's flags with the same meaning, plus long forms and
//! `--state-file`.

use std::path::PathBuf;

use clap::Parser;

/// nftables layer-4 load balancer daemon (nftlb-compatible).
#[derive(Debug, Clone, Parser)]
#[command(name = "nftlb", version, about, long_about = None)]
pub struct Args {
    /// Log level, syslog numbering 0 (emerg) to 7 (debug).
    #[arg(short = 'l', long = "log", default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=7))]
    pub log_level: u8,
    /// Log output: 0 syslog, 1 stdout, 2 stderr, 3 syslog+stdout, 4 syslog+stderr.
    #[arg(short = 'L', long = "log-output", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=4))]
    pub log_output: u8,
    /// JSON configuration loaded at start (same format as API bodies).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// API key (not empty); NFTLB_SERVER_KEY takes precedence. A random key is generated if neither is given.
    #[arg(short = 'k', long = "key")]
    pub key: Option<String>,
    /// Apply the configuration file and exit (no API server).
    #[arg(short = 'e', long = "exit")]
    pub exit: bool,
    /// Run in the background.
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Default listen address ::1 instead of 127.0.0.1.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Listen address (default 127.0.0.1, or ::1 with -6).
    #[arg(short = 'H', long = "host")]
    pub host: Option<String>,
    /// Listen port.
    #[arg(short = 'P', long = "port", default_value_t = 5555)]
    pub port: u16,
    /// Accepted for compatibility; every request is always one atomic transaction.
    #[arg(short = 'S', long = "serial")]
    pub serial: bool,
    /// Conntrack mark bit meaning "masquerade this flow" (hexadecimal).
    #[arg(short = 'm', long = "masquerade-mark", default_value = "0x80000000")]
    pub masquerade_mark: String,
    /// Where the desired state is persisted across restarts.
    #[arg(long = "state-file", default_value = "/var/lib/nftlb/state.json")]
    pub state_file: PathBuf,
    /// nftables backend: auto (libnftables, else the nft command), lib or cli.
    #[arg(long = "nft-backend", default_value = "auto", value_parser = ["auto", "lib", "cli"])]
    pub nft_backend: String,
}

impl Args {
    /// The masquerade mark as a number: one or more bits, hexadecimal.
    pub fn masquerade_mark(&self) -> Result<u32, String> {
        let m = crate::model::Mark::parse(&self.masquerade_mark)
            .map_err(|e| format!("-m '{}': {e}", self.masquerade_mark))?;
        // Buckets live in the conntrack-mark values below the mark's lowest bit.
        if m.0.trailing_zeros() < 20 {
            return Err(format!(
                "-m '{}': the masquerade mark must be 0x100000 or a higher bit (the bits below it number the scheduling buckets)",
                self.masquerade_mark
            ));
        }
        Ok(m.0)
    }

    /// The API key: NFTLB_SERVER_KEY if set and non-empty, else `-k`; `None` when neither
    /// is given (a key is then generated). A key that no client could send (empty, with
    /// spaces around it or control characters) is an error naming where it came from: an
    /// empty key would let every request through.
    pub fn explicit_key(&self) -> Result<Option<String>, String> {
        let (key, from) = match std::env::var("NFTLB_SERVER_KEY") {
            Ok(k) if !k.is_empty() => (k, "NFTLB_SERVER_KEY"),
            _ => match &self.key {
                Some(k) => (k.clone(), "-k/--key"),
                None => return Ok(None),
            },
        };
        if key.is_empty() {
            return Err(format!(
                "{from}: the API key is empty; give a non-empty key (or neither -k nor NFTLB_SERVER_KEY, and one is generated)"
            ));
        }
        if key.trim() != key || key.chars().any(|c| c.is_control()) {
            return Err(format!(
                "{from}: the API key has spaces around it or control characters, which no client can send in a Key header"
            ));
        }
        Ok(Some(key))
    }

    /// The address to listen on.
    pub fn listen_host(&self) -> String {
        match &self.host {
            Some(h) => h.clone(),
            None if self.ipv6 => "::1".into(),
            None => "127.0.0.1".into(),
        }
    }
}

/// A 24-character key of printable ASCII from the operating system's CSPRNG
/// (about 157 bits).
pub fn generate_key() -> Result<String, String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| format!("cannot generate a key: {e}"))?;
    Ok(raw
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect())
}
