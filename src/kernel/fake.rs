//! An in-memory backend for tests: records transactions and can be told to fail.

use super::{Kernel, KernelError};

/// Records every transaction; `fail_next` makes the next apply fail.
#[derive(Debug, Default)]
pub struct FakeKernel {
    /// Transactions applied so far.
    pub applied: Vec<String>,
    /// While non-zero, applies fail (and are not recorded); each failure counts down.
    pub failures: usize,
}

impl Kernel for FakeKernel {
    fn apply(&mut self, commands: &str) -> Result<(), KernelError> {
        if self.failures > 0 {
            self.failures -= 1;
            return Err(KernelError::Rejected(
                "Error: Could not process rule: Operation not supported".into(),
            ));
        }
        self.applied.push(commands.to_string());
        Ok(())
    }
    fn list(&mut self, _command: &str) -> Result<String, KernelError> {
        Err(KernelError::Rejected("No such file or directory".into()))
    }
    /// Like the kernels this project targets: no nfqueue, no flowtables.
    fn check(&mut self, commands: &str) -> Result<(), KernelError> {
        if commands.contains(" queue ") || commands.contains("flowtable") {
            return Err(KernelError::Rejected(
                "Error: Could not process rule: No such file or directory".into(),
            ));
        }
        Ok(())
    }
    fn list_json(&mut self, _command: &str) -> Result<serde_json::Value, KernelError> {
        Err(KernelError::Rejected("No such file or directory".into()))
    }
    fn name(&self) -> &'static str {
        "fake"
    }
}
