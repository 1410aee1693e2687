//! An in-memory backend for tests: records transactions and can be told to fail.

use super::{Kernel, KernelError};

/// Records every transaction; `fail_next` makes the next apply fail.
#[derive(Debug, Default)]
pub struct FakeKernel {
    /// Transactions applied so far.
    pub applied: Vec<String>,
    /// When set, the next apply fails with this message (and is not recorded).
    pub fail_next: Option<String>,
}

impl Kernel for FakeKernel {
    fn apply(&mut self, commands: &str) -> Result<(), KernelError> {
        if let Some(msg) = self.fail_next.take() {
            return Err(KernelError::Rejected(msg));
        }
        self.applied.push(commands.to_string());
        Ok(())
    }
    fn list(&mut self, _command: &str) -> Result<String, KernelError> {
        Err(KernelError::Rejected("No such file or directory".into()))
    }
    fn name(&self) -> &'static str {
        "fake"
    }
}
