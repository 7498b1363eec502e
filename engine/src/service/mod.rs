//! The service around the data path, as an Azure Recovery Services vault
//! runs it: backup jobs and their records ([`backup_job`],
//! [`job_record`]), policies ([`policy`], [`policies`]), schedules
//! ([`schedule`]) and the scheduler pass ([`scheduler`]), libvirt domains
//! backed up as one ([`domain_backup`]), retention and
//! expiry ([`retention`], [`prune`]), protected items ([`protection`],
//! [`registry`]) vault settings ([`vault_ops`]) and points copied between vaults
//! ([`vault_copy`]).

pub mod backup_job;
pub mod domain_backup;
pub mod job_record;
pub mod policies;
pub mod policy;
pub mod protection;
pub mod prune;
pub mod registry;
pub mod retention;
pub mod schedule;
pub mod scheduler;
pub mod vault_copy;
pub mod vault_ops;
