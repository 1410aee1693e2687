//! The only code that talks to nftables. One [`Kernel`] value is owned by the writer
//! thread; every change is one transaction, applied atomically by the kernel.

mod cli;
mod fake;
mod ffi;
pub mod live;
pub mod monitor;
pub mod netlink;
pub mod owner;
pub mod verify;

pub use cli::CliKernel;
pub use fake::FakeKernel;
pub use ffi::LibKernel;

/// What went wrong talking to nftables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// nftables refused the transaction; nothing was changed.
    #[error("nftables rejected the transaction: {0}")]
    Rejected(String),
    /// The backend itself could not run (library or binary missing, I/O error).
    #[error("nftables is unavailable: {0}")]
    Unavailable(String),
}

/// An nftables backend: runs a batch of commands as one transaction, or a listing.
pub trait Kernel: Send {
    /// Runs `commands` (nft syntax, one command per line) as one transaction.
    fn apply(&mut self, commands: &str) -> Result<(), KernelError>;
    /// Runs a read-only command (e.g. `list table ip nftlb`) and returns its text
    /// output, without set elements.
    fn list(&mut self, command: &str) -> Result<String, KernelError>;
    /// Checks `commands` against the kernel without applying them (dry run).
    fn check(&mut self, commands: &str) -> Result<(), KernelError>;
    /// Runs a read-only command and returns nft's JSON output (used for what only the
    /// kernel knows: dynamic set elements with their expiry, counters).
    fn list_json(&mut self, command: &str) -> Result<serde_json::Value, KernelError>;
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Applies an element-only batch straight over netlink, in the network namespace this
    /// backend manages, as one transaction. `None`: this backend has no netlink path (the
    /// caller then uses [`Kernel::apply`]).
    fn apply_elements(
        &mut self,
        _batch: &netlink::ElementBatch,
    ) -> Option<Result<(), KernelError>> {
        None
    }
    /// Whether [`Kernel::apply_elements`] is implemented.
    fn has_netlink(&self) -> bool {
        false
    }
    /// Read access to the live data of the tables this backend manages (counters,
    /// learnt elements), usable from other threads than the one that owns the backend.
    fn live(&self) -> std::sync::Arc<dyn live::Live> {
        std::sync::Arc::new(live::NoLive)
    }
}

/// A lazily opened netlink writer for the backends that run in the daemon's own network
/// namespace. After an error whose outcome is unknown the socket is reopened.
#[derive(Default)]
pub(crate) struct LazyWriter(Option<netlink::NetlinkWriter>);

impl LazyWriter {
    pub(crate) fn apply(
        &mut self,
        batch: &netlink::ElementBatch,
    ) -> Option<Result<(), KernelError>> {
        if self.0.is_none() {
            match netlink::NetlinkWriter::new() {
                Ok(w) => self.0 = Some(w),
                Err(e) => {
                    tracing::warn!("netlink writer unavailable: {e}");
                    return None;
                }
            }
        }
        let r = self.0.as_mut()?.apply(batch);
        if matches!(r, Err(KernelError::Unavailable(_))) {
            self.0 = None;
        }
        Some(r)
    }
}

/// Trims nft's error output to its useful lines (it repeats the input with carets).
pub(crate) fn summarize_error(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    let mut out = lines
        .iter()
        .filter(|l| l.contains("Error:"))
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if out.is_empty() {
        out = lines.join("; ");
    }
    if out.len() > 2000 {
        out.truncate(2000);
        out.push_str("...");
    }
    out
}

/// Opens the preferred backend: `kind` is `lib` (libnftables in-process), `cli`
/// (`nft -f -`) or `auto` (lib, falling back to cli if the library cannot start).
pub fn open(kind: &str) -> Result<Box<dyn Kernel>, KernelError> {
    match kind {
        "lib" => Ok(Box::new(LibKernel::new()?)),
        "cli" => Ok(Box::new(CliKernel::new()?)),
        "fake" => Ok(Box::new(FakeKernel::default())),
        _ => match LibKernel::new() {
            Ok(k) => Ok(Box::new(k)),
            Err(e) => {
                tracing::warn!("libnftables unavailable ({e}); using the nft command");
                Ok(Box::new(CliKernel::new()?))
            }
        },
    }
}

/// Optional kernel features some settings need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// nfqueue (`queue`).
    pub queue: bool,
    /// flowtables (`flow-offload`).
    pub flowtable: bool,
}

impl Capabilities {
    /// Asks the kernel, with dry runs in a scratch table that is never created.
    pub fn probe(k: &mut dyn Kernel) -> Capabilities {
        let table = "add table ip nftlb-probe\nadd chain ip nftlb-probe c\n";
        let queue = k
            .check(&format!(
                "{table}add rule ip nftlb-probe c queue num 0 bypass\n"
            ))
            .is_ok();
        let flowtable = k
            .check(&format!(
                "{table}add flowtable ip nftlb-probe f {{ hook ingress priority 0; devices = {{ lo }}; }}\n"
            ))
            .is_ok();
        Capabilities { queue, flowtable }
    }
}
