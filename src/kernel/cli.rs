//! `nft -f -`: the same text through the nft command (fallback and cross-check).

use std::io::Write;
use std::process::{Command, Stdio};

use super::{summarize_error, Kernel, KernelError};

/// Runs the `nft` binary for each transaction.
pub struct CliKernel {
    nft: String,
    nl: super::LazyWriter,
}

impl CliKernel {
    /// Checks that `nft` can be run.
    pub fn new() -> Result<Self, KernelError> {
        let nft = std::env::var("NFTLB_NFT").unwrap_or_else(|_| "nft".into());
        Command::new(&nft)
            .arg("--version")
            .output()
            .map_err(|e| KernelError::Unavailable(format!("cannot run {nft}: {e}")))?;
        Ok(CliKernel {
            nft,
            nl: Default::default(),
        })
    }

    fn run(&self, args: &[&str], stdin: &str) -> Result<String, KernelError> {
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| KernelError::Unavailable(format!("cannot run {}: {e}", self.nft)))?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.as_bytes())
                .map_err(|e| KernelError::Unavailable(format!("writing to nft: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| KernelError::Unavailable(format!("waiting for nft: {e}")))?;
        if !out.status.success() {
            return Err(KernelError::Rejected(summarize_error(
                &String::from_utf8_lossy(&out.stderr),
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Kernel for CliKernel {
    fn apply(&mut self, commands: &str) -> Result<(), KernelError> {
        self.run(&["-f", "-"], commands).map(|_| ())
    }
    fn list(&mut self, command: &str) -> Result<String, KernelError> {
        self.run(&["-t", "-f", "-"], command)
    }
    fn check(&mut self, commands: &str) -> Result<(), KernelError> {
        self.run(&["-c", "-f", "-"], commands).map(|_| ())
    }
    fn list_json(&mut self, command: &str) -> Result<serde_json::Value, KernelError> {
        // With -j, `-f` would read JSON: give the (plain) command as arguments.
        let mut args = vec!["-j"];
        args.extend(command.split_whitespace());
        let out = self.run(&args, "")?;
        serde_json::from_str(&out)
            .map_err(|e| KernelError::Unavailable(format!("nft printed invalid JSON: {e}")))
    }
    fn name(&self) -> &'static str {
        "nft-cli"
    }
    fn apply_elements(
        &mut self,
        batch: &super::netlink::ElementBatch,
    ) -> Option<Result<(), KernelError>> {
        self.nl.apply(batch)
    }
    fn has_netlink(&self) -> bool {
        true
    }
    fn live(&self) -> std::sync::Arc<dyn super::live::Live> {
        std::sync::Arc::new(super::live::NetlinkLive::default())
    }
}
