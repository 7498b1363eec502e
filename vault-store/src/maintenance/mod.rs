//! The maintenance commands that work on an open vault: rebuilding the
//! index from the copies ([`rebuild`]), replicating to the GRS secondary
//! and repairing copies ([`replicate`]), and garbage collection ([`gc`]).
//! They stand above [`crate::vault`]: each opens or takes a `Vault`.

pub mod gc;
pub mod rebuild;
pub mod replica;
pub mod replicate;
#[cfg(test)]
mod safety_tests;
