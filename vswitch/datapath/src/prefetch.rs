//! Software prefetch: asks the CPU to start loading (into L2) a cache line a
//! lookup will read soon, so a batch of lookups waits for memory once, in
//! parallel, instead of once per lookup in turn.
//!
//! The one unsafe operation of the datapath (see docs/decisions.md): the
//! intrinsic is `unsafe` only because it takes a raw pointer.
#![allow(unsafe_code)]

/// Hints that the cache line holding `p` will be read soon. Any address is
/// fine, even a dangling one: nothing is read, and nothing can fault.
#[inline(always)]
pub(crate) fn read<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint, not a memory access: it never faults and
    // changes no program state whatever the address (unmapped, freed or
    // misaligned), so no pointer value can make it unsound.
    unsafe {
        use core::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T1>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
