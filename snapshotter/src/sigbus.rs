//! Survives images that shrink under a memory mapping.
//!
//! Touching a mapped page beyond the end of a file raises SIGBUS, which
//! would kill the process. While a window of an image is mapped, its
//! address range is registered here. A SIGBUS inside a registered range is
//! answered by mapping a zero page over the faulting page (so the reader
//! carries on, reading zeros) and flagging the range; the reader checks the
//! flag after using the window and reports the source as changed. A SIGBUS
//! anywhere else is handed back to the previous handler.
//!
//! This is the one piece of process-wide state in coffre: a signal handler
//! can only find its data through statics. The registry is a fixed array of
//! atomics, so the handler never allocates or locks.

use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const SLOTS: usize = 64;

struct Slot {
    used: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[expect(
    clippy::declare_interior_mutable_const,
    reason = "array initialiser for the static below"
)]
const EMPTY: Slot = Slot {
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
static PREVIOUS: OnceLock<PrevAction> = OnceLock::new();
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);

struct PrevAction(libc::sigaction);
// SAFETY: a plain C struct that is only read after initialisation.
unsafe impl Sync for PrevAction {}
unsafe impl Send for PrevAction {}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in REGISTRY.iter() {
        if !slot.used.load(Ordering::Acquire) {
            continue;
        }
        let (start, end) = (
            slot.start.load(Ordering::Acquire),
            slot.end.load(Ordering::Acquire),
        );
        if addr >= start && addr < end {
            let page_addr = addr & !(page - 1);
            // SAFETY: replaces one page of our own registered mapping with
            // an anonymous zero page; mmap is a plain system call.
            let r = unsafe {
                libc::mmap(
                    page_addr as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: restore the previous disposition; the faulting instruction
    // runs again and the fault goes where it would have gone.
    if let Some(prev) = PREVIOUS.get() {
        // SAFETY: restoring a sigaction previously returned by the kernel.
        unsafe { libc::sigaction(libc::SIGBUS, &prev.0, std::ptr::null_mut()) };
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid value to fill in; the
        // handler has the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut prev) == 0 {
                let _ = PREVIOUS.set(PrevAction(prev));
            }
        }
    });
}

/// A registered address range; unregistered on drop.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Registers `[ptr, ptr + len)`. With every slot taken the range is not
    /// guarded (a fault would then kill the process, as without the guard).
    pub fn new(ptr: *const u8, len: usize) -> Guard {
        install();
        for (i, slot) in REGISTRY.iter().enumerate() {
            if slot
                .used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.faulted.store(false, Ordering::Release);
                slot.start.store(ptr as usize, Ordering::Release);
                slot.end.store(ptr as usize + len, Ordering::Release);
                return Guard { slot: Some(i) };
            }
        }
        tracing::warn!("all SIGBUS guard slots in use; mapping is unguarded");
        Guard { slot: None }
    }

    /// True when a SIGBUS hit the range since registration.
    pub fn faulted(&self) -> bool {
        self.slot
            .and_then(|i| REGISTRY.get(i))
            .is_some_and(|s| s.faulted.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.and_then(|i| REGISTRY.get(i)) {
            slot.start.store(0, Ordering::Release);
            slot.end.store(0, Ordering::Release);
            slot.used.store(false, Ordering::Release);
        }
    }
}
