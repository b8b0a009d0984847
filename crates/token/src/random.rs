//! Random bytes from the operating system, for key material, ids, secrets and nonces.

/// `N` bytes from the operating system's CSPRNG (`getrandom(2)` on Linux).
///
/// Failure is reported, not panicked on: on Linux it can only happen before the kernel's pool
/// is initialised at boot, and a request that meets it should fail on its own.
pub(crate) fn bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)?;
    Ok(out)
}
