//! libnftables in-process: one long-lived context, owned by the writer thread.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_uint};

use super::{summarize_error, Kernel, KernelError};

#[repr(C)]
struct NftCtx {
    _private: [u8; 0],
}

const NFT_CTX_DEFAULT: u32 = 0;
const NFT_CTX_OUTPUT_TERSE: c_uint = 1 << 11;
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

#[link(name = "nftables")]
extern "C" {
    fn nft_ctx_new(flags: u32) -> *mut NftCtx;
    fn nft_ctx_free(ctx: *mut NftCtx);
    fn nft_ctx_output_set_flags(ctx: *mut NftCtx, flags: c_uint);
    fn nft_ctx_buffer_output(ctx: *mut NftCtx) -> c_int;
    fn nft_ctx_buffer_error(ctx: *mut NftCtx) -> c_int;
    fn nft_ctx_get_output_buffer(ctx: *mut NftCtx) -> *const c_char;
    fn nft_ctx_get_error_buffer(ctx: *mut NftCtx) -> *const c_char;
    fn nft_run_cmd_from_buffer(ctx: *mut NftCtx, buf: *const c_char) -> c_int;
    fn nft_ctx_set_dry_run(ctx: *mut NftCtx, dry: bool);
}

/// A libnftables context. Not thread-safe: it lives on one thread (the writer).
pub struct LibKernel {
    ctx: *mut NftCtx,
    nl: super::LazyWriter,
}

// SAFETY: the context is only ever used by the thread that owns the `LibKernel`; moving
// it to that thread once is fine because libnftables keeps no thread-local state.
unsafe impl Send for LibKernel {}

impl LibKernel {
    /// Creates the context with buffered output and error streams.
    pub fn new() -> Result<Self, KernelError> {
        // SAFETY: plain constructor; NULL is checked.
        let ctx = unsafe { nft_ctx_new(NFT_CTX_DEFAULT) };
        if ctx.is_null() {
            return Err(KernelError::Unavailable("nft_ctx_new failed".into()));
        }
        // SAFETY: ctx is a valid context.
        let ok = unsafe { nft_ctx_buffer_output(ctx) == 0 && nft_ctx_buffer_error(ctx) == 0 };
        if !ok {
            // SAFETY: ctx is valid and freed once.
            unsafe { nft_ctx_free(ctx) };
            return Err(KernelError::Unavailable("cannot buffer nft output".into()));
        }
        // Terse: listings leave out set elements (our own memory has them).
        // SAFETY: ctx is valid.
        unsafe { nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_TERSE) };
        Ok(LibKernel {
            ctx,
            nl: Default::default(),
        })
    }

    fn run(&mut self, text: &str) -> Result<String, KernelError> {
        let c = CString::new(text)
            .map_err(|_| KernelError::Rejected("command contains a NUL byte".into()))?;
        // SAFETY: ctx is valid; c outlives the call; buffers are read right after and
        // copied before the next call reuses them.
        unsafe {
            let rc = nft_run_cmd_from_buffer(self.ctx, c.as_ptr());
            let out = read(nft_ctx_get_output_buffer(self.ctx));
            let err = read(nft_ctx_get_error_buffer(self.ctx));
            if rc != 0 {
                return Err(KernelError::Rejected(summarize_error(&err)));
            }
            Ok(out)
        }
    }
}

unsafe fn read(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: libnftables returns a NUL-terminated buffer it owns.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for LibKernel {
    fn drop(&mut self) {
        // SAFETY: ctx is valid and freed exactly once.
        unsafe { nft_ctx_free(self.ctx) };
    }
}

impl Kernel for LibKernel {
    fn apply(&mut self, commands: &str) -> Result<(), KernelError> {
        self.run(commands).map(|_| ())
    }
    fn list(&mut self, command: &str) -> Result<String, KernelError> {
        self.run(command)
    }
    fn check(&mut self, commands: &str) -> Result<(), KernelError> {
        // SAFETY: ctx is valid; dry run is switched off again before returning.
        unsafe { nft_ctx_set_dry_run(self.ctx, true) };
        let r = self.run(commands).map(|_| ());
        // SAFETY: as above.
        unsafe { nft_ctx_set_dry_run(self.ctx, false) };
        r
    }
    fn list_json(&mut self, command: &str) -> Result<serde_json::Value, KernelError> {
        // SAFETY: ctx is valid; flags are restored before returning.
        unsafe { nft_ctx_output_set_flags(self.ctx, NFT_CTX_OUTPUT_JSON) };
        let out = self.run(command);
        // SAFETY: as above.
        unsafe { nft_ctx_output_set_flags(self.ctx, NFT_CTX_OUTPUT_TERSE) };
        serde_json::from_str(&out?)
            .map_err(|e| KernelError::Unavailable(format!("nft printed invalid JSON: {e}")))
    }
    fn name(&self) -> &'static str {
        "libnftables"
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
