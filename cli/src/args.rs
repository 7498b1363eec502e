//! Command-line grammar (clap derive). Names here are a public contract:
//! scripts rely on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// coffre: block-level incremental backups of raw disk images.
#[derive(Debug, Parser)]
#[command(name = "coffre", version, about, propagate_version = true)]
pub struct Cli {
    /// Output format of commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Seconds a command that writes to the vault waits for another
    /// writer to finish (default: fail at once with exit code 4).
    #[arg(long, global = true, default_value_t = 0, value_name = "SECS")]
    pub lock_timeout: u64,

    /// Writers go on without a replica that is missing or unwritable,
    /// with a warning; the next `verify --read-data --repair` refills it.
    #[arg(long, global = true)]
    pub degraded_ok: bool,

    /// An encrypted vault's key file (a key-file slot); also
    /// COFFRE_KEY_FILE. Without it: COFFRE_PASSWORD_COMMAND, then a prompt.
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// Stable JSON (documented in the README).
    Json,
}

/// Tiers a restore can read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FromTier {
    /// The instant-restore snapshot.
    Snapshot,
    /// The vault.
    Vault,
    /// The GRS secondary (cross-region restore; works with the primary
    /// gone: give the secondary's directory with --vault, or set
    /// COFFRE_SECONDARY).
    Secondary,
}

/// Formats a restore writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormatArg {
    /// The raw image, sparse.
    Raw,
    /// A qcow2 image (written by qemu-img).
    Qcow2,
}

/// Which copy a read-only command reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CopySource {
    /// The vault directory (and its replicas).
    Primary,
    /// The GRS secondary, on its own.
    Secondary,
}

/// The vault a command works on.
#[derive(Debug, Args)]
pub struct VaultArg {
    /// Vault directory.
    #[arg(long, env = "COFFRE_VAULT", value_name = "DIR")]
    pub vault: PathBuf,
}

/// The points `export` and `mount` read in place.
#[derive(Debug, Args)]
pub struct PointsArg {
    /// Item name.
    #[arg(long)]
    pub item: String,
    /// Point id, unique id prefix, or `latest`.
    #[arg(
        long,
        default_value = "latest",
        value_name = "ID",
        conflicts_with = "all"
    )]
    pub point: String,
    /// Every point of the item, one export (or file) each, named by its
    /// point id.
    #[arg(long)]
    pub all: bool,
    /// Where to read the point from (default: its snapshot while it has
    /// one, else the vault).
    #[arg(long, value_enum, value_name = "TIER")]
    pub from: Option<FromTier>,
    /// Decoded blocks kept in memory per export (or file), e.g. 64M.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = crate::units::parse_size)]
    pub cache: u64,
}

/// Argon2id's cost for a new passphrase slot.
#[derive(Args, Debug, Clone, Default)]
pub struct KdfArgs {
    /// Argon2id memory for a new passphrase (default 64M).
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size)]
    pub kdf_memory: Option<u64>,
    /// Argon2id passes for a new passphrase (default 3).
    #[arg(long, value_name = "N")]
    pub kdf_passes: Option<u32>,
}

/// `coffre key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the key slots (never a key).
    List {
        #[command(flatten)]
        vault: VaultArg,
    },
    /// Add a key slot: a passphrase (COFFRE_NEW_PASSWORD_COMMAND, or asked
    /// twice) or --new-key-file. The vault is opened with the current key.
    Add {
        #[command(flatten)]
        vault: VaultArg,
        /// The new slot opens with this key file (at least 32 random bytes;
        /// `--generate-key-file` writes one).
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        /// Write a new key file at FILE (32 random bytes, 0600; an existing
        /// file is refused) and make the new slot open with it.
        #[arg(long, value_name = "FILE", conflicts_with = "new_key_file")]
        generate_key_file: Option<PathBuf>,
        /// A note kept with the slot.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Remove a key slot; at least one always remains.
    Remove {
        #[command(flatten)]
        vault: VaultArg,
        /// The slot's id (`coffre key list`).
        #[arg(long)]
        id: String,
    },
    /// Change the passphrase (or key file) that opens the vault: a new
    /// slot replaces the one the current key opened.
    Passwd {
        #[command(flatten)]
        vault: VaultArg,
        /// The new slot opens with this key file instead of a passphrase.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        /// Write a new key file at FILE (32 random bytes, 0600; an existing
        /// file is refused) and make the new slot open with it.
        #[arg(long, value_name = "FILE", conflicts_with = "new_key_file")]
        generate_key_file: Option<PathBuf>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Print the master key as a recovery text, to keep on paper. Refused
    /// when stdout is not a terminal (a pipe or a file would keep the key)
    /// unless --to or --force is given.
    Export {
        #[command(flatten)]
        vault: VaultArg,
        /// Write the recovery text to a new file (0600; an existing file is
        /// refused) instead of printing it.
        #[arg(long, value_name = "FILE")]
        to: Option<PathBuf>,
        /// Print it even when stdout is not a terminal.
        #[arg(long, conflicts_with = "to")]
        force: bool,
    },
    /// Read a recovery text (a file, or stdin with -) and add a slot for a
    /// new passphrase or --new-key-file: when every slot is lost.
    Import {
        #[command(flatten)]
        vault: VaultArg,
        /// The recovery text (`-`: stdin).
        #[arg(long, value_name = "FILE")]
        recovery: PathBuf,
        /// The new slot opens with this key file instead of a passphrase.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        /// Write a new key file at FILE (32 random bytes, 0600; an existing
        /// file is refused) and make the new slot open with it.
        #[arg(long, value_name = "FILE", conflicts_with = "new_key_file")]
        generate_key_file: Option<PathBuf>,
        /// A note kept with the slot.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
}

/// Changed-block tracking options of `coffre backup`.
#[derive(Args, Debug, Clone)]
pub struct CbtArgs {
    /// Read only the extents this list calls changed: `nbdinfo --map=qemu:dirty-bitmap:NAME
    /// --json` output, or coffre's own format (FORMAT.md). Checked and sampled, never trusted
    /// blindly.
    #[arg(long, value_name = "FILE")]
    pub changed_blocks: Option<PathBuf>,
    /// With an NBD source: read only the extents the QEMU dirty bitmap NAME marks
    /// (`qemu:dirty-bitmap:NAME` block status).
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// Share of the blocks a changed-block source calls clean that are re-read and compared with
    /// the parent point (e.g. 1%, 100%).
    #[arg(long, value_name = "PERCENT", default_value = "1%")]
    pub cbt_sample: String,
    /// Re-read at least this many clean blocks.
    #[arg(long, value_name = "BLOCKS", default_value_t = 64)]
    pub cbt_sample_min: u64,
}

/// Worker threads.
#[derive(Debug, Args)]
pub struct ThreadsArg {
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or inspect a vault.
    #[command(subcommand)]
    Vault(VaultCommand),

    /// An encrypted vault's key slots and recovery key.
    #[command(subcommand)]
    Key(KeyCommand),

    /// Back an image up now ("Backup now"): a job with a snapshot and a
    /// transfer phase. An unprotected image is protected under DefaultPolicy.
    Backup {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name (default: the image's file stem).
        #[arg(long)]
        item: Option<String>,
        /// Keep the point until this date (YYYY-MM-DD, kept through that
        /// day, UTC) or instant (RFC 3339), whatever the policy says.
        /// Default: 30 days from now.
        #[arg(long, value_name = "DATE")]
        retain_until: Option<String>,
        /// Limit read throughput, e.g. 50M (bytes per second; K, M, G are binary units).
        #[arg(long, value_name = "RATE", value_parser = crate::units::parse_size)]
        rate_limit: Option<u64>,
        #[command(flatten)]
        threads: ThreadsArg,
        #[command(flatten)]
        cbt: CbtArgs,
        /// A running VM's QEMU monitor (`-qmp unix:SOCKET,server=on,wait=off`):
        /// the drive `--drive` names is backed up at one instant while the
        /// VM keeps running (a fleecing export; see README).
        #[arg(
            long,
            value_name = "SOCKET",
            requires = "drive",
            conflicts_with = "image"
        )]
        qmp: Option<PathBuf>,
        /// With `--qmp`: the drive to back up: a block node name, a drive id
        /// or a device id (see QEMU's `query-named-block-nodes` and
        /// `query-block`); the item name defaults to it.
        #[arg(long, value_name = "NODE", requires = "qmp")]
        drive: Option<String>,
        /// With `--qmp`: the QEMU guest agent's socket. The guest's file
        /// systems are frozen for the instant (milliseconds) and thawed at
        /// once: the point is file-system-consistent.
        #[arg(long, value_name = "SOCKET", requires = "qmp")]
        guest_agent: Option<PathBuf>,
        /// With `--qmp`: the folder for the point in time's overlay (default
        /// $TMPDIR). It must hold every block the guest overwrites during
        /// the backup; when it is full, QEMU drops the point (the backup
        /// fails) and the guest's writes go on. Recorded with the item's
        /// source when the backup protects the item.
        #[arg(long, value_name = "DIR", requires = "qmp")]
        fleece_dir: Option<PathBuf>,
        /// A libvirt domain: every disk is backed up at one instant
        /// (libvirt's pull-mode backup, incremental through checkpoints),
        /// disk vda as item NAME-vda, and so on (see README).
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with_all = ["image", "qmp", "item", "changed_blocks", "bitmap", "guest_agent", "fleece_dir"]
        )]
        domain: Option<String>,
        /// With `--domain`: the libvirt connection URI (default: libvirt's,
        /// e.g. qemu:///system for root).
        #[arg(long, value_name = "URI", requires = "domain")]
        connect: Option<String>,
        /// The disk image: a raw file or block device, or an NBD export
        /// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`),
        /// e.g. `qemu-nbd` over a qcow2 or a libvirt pull-mode backup.
        #[arg(required_unless_present_any = ["qmp", "domain"])]
        image: Option<PathBuf>,
    },

    /// List the recovery points of an item.
    Points {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long)]
        item: String,
        /// Read the points of this copy (default: the primary).
        #[arg(long, value_enum, value_name = "COPY")]
        from: Option<CopySource>,
    },

    /// Restore a recovery point to a new sparse image file, or in place
    /// onto an existing image or block device (changed blocks only), or
    /// live into a running VM (--live).
    ///
    /// --live: the VM runs on the point from the first second. coffre
    /// serves the point over NBD on a private socket, creates FILE as a
    /// qcow2 whose backing is that export, gives it to the VM's device
    /// (--device) through its QEMU monitor (--qmp), starts a VM waiting
    /// with -S, and has QEMU copy every block into FILE (block-stream)
    /// while the guest reads and writes it. It ends when FILE has no
    /// backing left. Killed or interrupted, it loses nothing (guest
    /// writes go to FILE): the VM's reads of blocks not yet copied wait
    /// for --reconnect-delay seconds; run the same command with --resume.
    /// Until the stream completes, the point is held: prune and gc keep
    /// it (and its snapshot); --abandon gives an unfinished one up.
    /// A libvirt domain (--domain, running) instead of --qmp: --device
    /// names one of its disks (vdb), which gets FILE; coffre drives its
    /// QEMU through libvirt's QMP passthrough, which marks the domain
    /// tainted, and its XML keeps naming the disk's old image.
    /// For a raw disk afterwards: qemu-img convert -f qcow2 -O raw FILE
    /// DISK.img.
    Restore {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long)]
        item: String,
        /// Point id, unique id prefix, or `latest`.
        #[arg(long, default_value = "latest", value_name = "ID")]
        point: String,
        /// File to write, or with --in-place the existing file or block
        /// device to overwrite.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Overwrite FILE if it exists (required with --in-place).
        #[arg(long)]
        force: bool,
        /// Write into the existing FILE or block device, reading each block
        /// first and writing only those that differ from the point. The
        /// target is inconsistent until the restore ends; rerun an
        /// interrupted one to finish it. A qcow2 FILE (a VM's disk, the VM
        /// off) is instead replaced whole, atomically. Refused while a VM
        /// or another writer uses FILE.
        #[arg(long)]
        in_place: bool,
        /// Format of the image written: raw (default for a new FILE) or
        /// qcow2 (through qemu-img). In place, default: FILE's own.
        #[arg(long, value_enum, value_name = "FORMAT")]
        format: Option<ImageFormatArg>,
        /// Where to read the point from: its snapshot (instant restore) or
        /// the vault. Default: the snapshot while the point has one.
        #[arg(long, value_enum, value_name = "TIER")]
        from: Option<FromTier>,
        /// Restore a point some of whose chunks have no good copy: write
        /// everything else, fill the damaged blocks with a marker (never
        /// zeros), list them and exit with code 7.
        #[arg(long)]
        allow_damaged: bool,
        /// Permissions of a new FILE, in octal.
        #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode,
              conflicts_with = "in_place")]
        mode: u32,
        #[command(flatten)]
        threads: ThreadsArg,
        /// Restore into a running VM: FILE (a new qcow2) becomes the disk
        /// of --device in the QEMU behind --qmp (or of libvirt domain
        /// --domain), filled while the VM runs.
        #[arg(long, conflicts_with_all = ["in_place", "force", "format", "allow_damaged"])]
        live: bool,
        /// With --live: the VM's QEMU monitor socket (-qmp
        /// unix:SOCKET,server=on,wait=off).
        #[arg(long, value_name = "SOCKET", requires = "live")]
        qmp: Option<PathBuf>,
        /// With --live: a running libvirt domain whose disk --device
        /// (vdb) gets FILE, driven through libvirt's QMP passthrough
        /// (which taints the domain).
        #[arg(
            long = "domain",
            value_name = "NAME",
            requires = "live",
            conflicts_with = "qmp"
        )]
        live_domain: Option<String>,
        /// With --domain: the libvirt connection URI (default: libvirt's).
        #[arg(long = "connect", value_name = "URI", requires = "live_domain")]
        live_connect: Option<String>,
        /// With --live: the id of the VM's disk device that gets FILE as
        /// its drive (an existing device: its drive is changed in place);
        /// an id QEMU does not know creates a virtio-blk-pci device. With
        /// --domain: the target of one of its disks (vdb).
        #[arg(long, value_name = "ID", requires = "live")]
        device: Option<String>,
        /// With --live, a new device: the bus it is plugged into (on q35, a
        /// free pcie-root-port).
        #[arg(
            long,
            value_name = "BUS",
            requires = "device",
            conflicts_with = "live_domain"
        )]
        bus: Option<String>,
        /// With --live: hand the restored disk to the existing device even
        /// though the guest is running. Only for a disk the guest does not
        /// use (not mounted, no I/O): a guest's writeback of the old disk
        /// would corrupt the restored one.
        #[arg(long, requires = "live")]
        swap_running_disk: bool,
        /// With --live: carry on an interrupted live restore of FILE (its
        /// point and socket are read from FILE): serve the export again,
        /// find QEMU's job and follow it to its end. Without --qmp or
        /// --domain, the VM (and without --device, the device), its bus,
        /// reconnect delay and tier are those the earlier run's run file
        /// names.
        #[arg(long, requires = "live")]
        resume: bool,
        /// With --live: write no run file (and remove an earlier run's), so
        /// that `coffre daemon` never resumes this restore on its own
        /// (only --resume does).
        #[arg(long, requires = "live", conflicts_with = "abandon")]
        no_daemon_resume: bool,
        /// With --live: most bytes a second QEMU copies (e.g. 200M;
        /// default: no limit; with --resume, the running job's limit is
        /// changed to RATE, or left as it is without --speed).
        #[arg(long, value_name = "RATE", requires = "live", value_parser = crate::units::parse_size)]
        speed: Option<u64>,
        /// With --live: seconds the VM's reads wait for the export when
        /// coffre is gone, before they fail (default 300).
        #[arg(long, value_name = "SECONDS", requires = "live")]
        reconnect_delay: Option<u64>,
        /// With --live: give up the unfinished live restore into FILE:
        /// its hold goes, so prune and gc may remove its point again.
        /// Refused while FILE still reads blocks through coffre's export
        /// (finish it with --resume, or stop the VM and remove FILE
        /// first) and while a run of it is going.
        #[arg(long, requires = "live",
              conflicts_with_all = ["resume", "qmp", "live_domain", "device", "speed", "reconnect_delay"])]
        abandon: bool,
    },

    /// Serve a recovery point read-only over NBD (qemu-img, nbdinfo,
    /// nbdcopy, QEMU's NBD driver, the kernel's nbd-client) until SIGTERM
    /// or SIGINT, or the idle timeout. Every block is verified as a
    /// restore verifies it; a damaged block is an EIO for that range,
    /// never zeros.
    Export {
        #[command(flatten)]
        vault: VaultArg,
        #[command(flatten)]
        points: PointsArg,
        /// Listen on this Unix socket (made private to its owner; a stale
        /// one left by a killed export is replaced).
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "listen",
            conflicts_with = "listen"
        )]
        socket: Option<PathBuf>,
        /// Listen on this TCP address. Anyone who can reach it reads the
        /// whole disk: NBD has no authentication here; keep it on loopback
        /// or a private network.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Export name (default: the item's name; with --all, the point
        /// ids).
        #[arg(long, value_name = "EXPORT", conflicts_with = "all")]
        name: Option<String>,
        /// Stop after this many seconds without any connection.
        #[arg(long, value_name = "SECONDS")]
        idle_timeout: Option<u64>,
    },

    /// Mount a recovery point read-only through FUSE, as DIR/disk.img
    /// (with --all, DIR/POINT_ID.img for every point), until SIGTERM or
    /// SIGINT; then unmount. Loop-mount the file read-only to take files
    /// back (see README, "File-level recovery"). Every block is verified
    /// as a restore verifies it; a damaged block is an EIO for that read,
    /// never zeros. A dead mount left on DIR by a killed `coffre mount`
    /// is unmounted first.
    Mount {
        #[command(flatten)]
        vault: VaultArg,
        #[command(flatten)]
        points: PointsArg,
        /// Let every user of the machine read the files (mode 0444 and
        /// FUSE's allow_other; a user needs user_allow_other in
        /// /etc/fuse.conf). By default only the user who mounts, as the
        /// vault is theirs alone.
        #[arg(long)]
        allow_other: bool,
        /// An empty folder to mount on.
        dir: PathBuf,
    },

    /// Check that the index and segments agree and every point is complete.
    Verify {
        #[command(flatten)]
        vault: VaultArg,
        /// Also read, decompress and re-hash every chunk on every copy
        /// (scrub).
        #[arg(long)]
        read_data: bool,
        /// With --read-data: rewrite every bad copy of a chunk from a copy
        /// whose hash matches (good copies are never touched).
        #[arg(long, requires = "read_data")]
        repair: bool,
        /// Verify this copy on its own (default: the primary and its
        /// replicas).
        #[arg(long, value_enum, value_name = "COPY")]
        from: Option<CopySource>,
        #[command(flatten)]
        threads: ThreadsArg,
    },

    /// Bring the GRS secondary up to date (incremental and resumable).
    Replicate {
        #[command(flatten)]
        vault: VaultArg,
    },

    /// Manage backup policies.
    #[command(subcommand)]
    Policy(Box<PolicyCommand>),

    /// Protect an image as an item, under a policy (or change its policy,
    /// or resume stopped protection).
    Protect {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long, required_unless_present = "domain")]
        item: Option<String>,
        /// Policy name.
        #[arg(long)]
        policy: String,
        /// Command run before each snapshot, e.g. "virsh domfsfreeze vm1"
        /// (split like a shell would, run without one; "" removes it).
        #[arg(long, value_name = "CMD")]
        pre_snapshot: Option<String>,
        /// Command run after each snapshot, even a failed one, e.g.
        /// "virsh domfsthaw vm1" ("" removes it).
        #[arg(long, value_name = "CMD")]
        post_snapshot: Option<String>,
        /// Seconds each hook may run before it is killed.
        #[arg(long, value_name = "SECS")]
        hook_timeout: Option<u64>,
        /// A libvirt domain: each disk is protected as item NAME-vda, …,
        /// and the scheduler backs the domain up as `backup --domain` does.
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with_all = ["image", "item", "pre_snapshot", "post_snapshot", "hook_timeout"]
        )]
        domain: Option<String>,
        /// With `--domain`: the libvirt connection URI (default: libvirt's).
        #[arg(long, value_name = "URI", requires = "domain")]
        connect: Option<String>,
        /// The raw disk image (file or block device).
        #[arg(required_unless_present = "domain")]
        image: Option<PathBuf>,
    },

    /// Stop protecting an item: keep its points (they never expire), or
    /// with --delete-data soft-delete them (recoverable for 14 days).
    Unprotect {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long)]
        item: String,
        /// Soft-delete the item's data.
        #[arg(long)]
        delete_data: bool,
    },

    /// Bring back a soft-deleted item within its 14 days (protection stays
    /// stopped; `protect` resumes it).
    Undelete {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long)]
        item: String,
    },

    /// List or show protected items.
    #[command(subcommand)]
    Item(ItemCommand),

    /// List jobs, newest last.
    Jobs {
        #[command(flatten)]
        vault: VaultArg,
        /// Only this item.
        #[arg(long)]
        item: Option<String>,
        /// Only this status: InProgress, Completed, CompletedWithWarnings, Failed, Cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only this operation: backup, restore, delete, prune, gc.
        #[arg(long)]
        operation: Option<String>,
        /// Only jobs started since this instant (RFC 3339) or this long ago (e.g. 24h, 7d).
        #[arg(long)]
        since: Option<String>,
    },

    /// Show, wait for or cancel one job.
    #[command(subcommand)]
    Job(JobCommand),

    /// Expire points by their policy (and snapshots, job history, purged items).
    Prune {
        #[command(flatten)]
        vault: VaultArg,
        /// Print what would expire; change nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// Reclaim the space of chunks no point references.
    Gc {
        #[command(flatten)]
        vault: VaultArg,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// One scheduler pass: due backups, then prune and gc (for cron or a
    /// systemd timer).
    RunDue {
        #[command(flatten)]
        vault: VaultArg,
        /// Limit read throughput of backups.
        #[arg(long, value_name = "RATE", value_parser = crate::units::parse_size)]
        rate_limit: Option<u64>,
        #[command(flatten)]
        threads: ThreadsArg,
    },

    /// Measure this machine: BLAKE3, zstd, chunk encode/decode and a whole
    /// backup and restore of a generated image, each next to the machine's
    /// own reference (b3sum, zstd -b, a page-cache read).
    Bench {
        /// Size of the generated image for the end-to-end stages.
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::units::parse_size)]
        size: u64,
        /// zstd level (default: a new vault's).
        #[arg(long)]
        level: Option<i32>,
        /// Block size (default: a new vault's).
        #[arg(long, value_parser = crate::units::parse_size)]
        block_size: Option<u64>,
        /// Where the image and the temporary vault go (default: the
        /// system's temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        threads: ThreadsArg,
    },

    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },

    /// Print the man page, or write one page per command into a directory.
    Man {
        /// Write coffre.1, coffre-backup.1, … here instead of printing coffre.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },

    /// Run backups on schedule, then prune, gc and snapshot expiry, until
    /// SIGTERM or SIGINT.
    Daemon {
        #[command(flatten)]
        vault: VaultArg,
        /// Seconds between schedule checks.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        interval: u64,
        /// Limit read throughput of backups.
        #[arg(long, value_name = "RATE", value_parser = crate::units::parse_size)]
        rate_limit: Option<u64>,
        #[command(flatten)]
        threads: ThreadsArg,
    },
}

/// A path, or "" (which means: the default).
fn any_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// Parses an octal file mode such as `600` or `0640`.
fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode such as 600 or 0640"))
}

/// Policy fields shared by `policy create` and `policy set`.
#[derive(Debug, Args, Clone, Default)]
pub struct PolicyFields {
    /// daily or weekly.
    #[arg(long, value_name = "daily|weekly")]
    pub schedule: Option<String>,
    /// Local time of the backups, HH:MM.
    #[arg(long, value_name = "HH:MM")]
    pub time: Option<String>,
    /// IANA time zone (default UTC).
    #[arg(long, value_name = "ZONE")]
    pub timezone: Option<String>,
    /// Weekly schedule: the days it runs. Daily schedule: the days whose
    /// points are weekly points (default sun).
    #[arg(long, value_delimiter = ',', value_name = "DAYS")]
    pub weekdays: Option<Vec<String>>,
    /// Days instant-restore snapshots are kept: 1-5 (daily schedule,
    /// default 2); exactly 5 for a weekly schedule.
    #[arg(long, value_name = "N")]
    pub instant_restore_days: Option<u32>,
    /// Days daily points are kept (7-9999); required for a daily schedule,
    /// refused for a weekly one.
    #[arg(long, value_name = "DAYS")]
    pub daily_retention: Option<u32>,
    /// Weeks weekly points are kept (1-5163).
    #[arg(long, value_name = "WEEKS")]
    pub weekly_retention: Option<u32>,
    /// Weekdays whose points are weekly points (must be schedule days).
    #[arg(long, value_delimiter = ',', value_name = "DAYS")]
    pub weekly_retention_days: Option<Vec<String>>,
    /// Months monthly points are kept (1-1188).
    #[arg(long, value_name = "MONTHS")]
    pub monthly_retention: Option<u32>,
    /// Monthly points by day of the month: 1-28 or last.
    #[arg(long, value_delimiter = ',', value_name = "DAYS")]
    pub monthly_days: Option<Vec<String>>,
    /// Monthly points by week of the month: first, second, third, fourth, last.
    #[arg(long, value_delimiter = ',', value_name = "WEEKS")]
    pub monthly_weeks: Option<Vec<String>>,
    /// … and weekday.
    #[arg(long, value_delimiter = ',', value_name = "DAYS")]
    pub monthly_weekdays: Option<Vec<String>>,
    /// Years yearly points are kept (1-99).
    #[arg(long, value_name = "YEARS")]
    pub yearly_retention: Option<u32>,
    /// Months whose points are yearly points (default jan).
    #[arg(long, value_delimiter = ',', value_name = "MONTHS")]
    pub yearly_months: Option<Vec<String>>,
    /// Yearly points by day of the month: 1-28 or last.
    #[arg(long, value_delimiter = ',', value_name = "DAYS")]
    pub yearly_days: Option<Vec<String>>,
    /// Yearly points by week of the month.
    #[arg(long, value_delimiter = ',', value_name = "WEEKS")]
    pub yearly_weeks: Option<Vec<String>>,
    /// … and weekday.
    #[arg(long, value_delimiter = ',', value_name = "DAYS")]
    pub yearly_weekdays: Option<Vec<String>>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a policy from flags or from a JSON file.
    Create {
        #[command(flatten)]
        vault: VaultArg,
        /// Policy name.
        #[arg(long, required_unless_present = "from_file")]
        name: Option<String>,
        /// Read the whole policy from a JSON file (see README, "Policy JSON").
        #[arg(long, value_name = "FILE", conflicts_with = "name")]
        from_file: Option<PathBuf>,
        #[command(flatten)]
        fields: PolicyFields,
    },
    /// Change fields of a policy; its items' points follow the new rules
    /// at the next prune.
    Set {
        #[command(flatten)]
        vault: VaultArg,
        /// Policy name.
        #[arg(long, required_unless_present = "from_file")]
        name: Option<String>,
        /// Replace the whole policy with a JSON file.
        #[arg(long, value_name = "FILE", conflicts_with = "name")]
        from_file: Option<PathBuf>,
        #[command(flatten)]
        fields: PolicyFields,
    },
    /// Show one policy.
    Show {
        #[command(flatten)]
        vault: VaultArg,
        /// Policy name.
        #[arg(long)]
        name: String,
    },
    /// List policies.
    List {
        #[command(flatten)]
        vault: VaultArg,
    },
    /// Delete a policy no item is protected under.
    Delete {
        #[command(flatten)]
        vault: VaultArg,
        /// Policy name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ItemCommand {
    /// List items with policy, last backup, next run, points and bytes.
    List {
        #[command(flatten)]
        vault: VaultArg,
    },
    /// Show one item.
    Show {
        #[command(flatten)]
        vault: VaultArg,
        /// Item name.
        #[arg(long)]
        item: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show one job (id or unique prefix).
    Show {
        #[command(flatten)]
        vault: VaultArg,
        /// Job id.
        id: String,
    },
    /// Wait until a job ends. Exit 0 Completed, 10 CompletedWithWarnings,
    /// 11 Failed or Cancelled, 9 on timeout.
    Wait {
        #[command(flatten)]
        vault: VaultArg,
        /// Job id.
        id: String,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Cancel a backup job during its snapshot phase.
    Cancel {
        #[command(flatten)]
        vault: VaultArg,
        /// Job id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Create a new vault.
    Create {
        #[command(flatten)]
        vault: VaultArg,
        /// Vault name: 2-50 characters, a letter first, then letters, digits or hyphens.
        #[arg(long)]
        name: Option<String>,
        /// Block size: a power of two from 64K to 4M (default 64K).
        #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size)]
        block_size: Option<u64>,
        /// zstd level, 0 (store raw) to 19 (default 1).
        #[arg(long, value_name = "N")]
        compression_level: Option<i32>,
        /// Storage redundancy: LRS or GRS (default: GRS when a secondary
        /// is given, else LRS).
        #[arg(long, value_name = "LRS|GRS")]
        redundancy: Option<String>,
        /// An LRS replica directory: a synchronous copy, on another disk
        /// (repeat for more copies).
        #[arg(long = "replica", value_name = "DIR", value_parser = any_path)]
        replicas: Vec<PathBuf>,
        /// The GRS secondary directory: an asynchronous copy in a second
        /// location (`coffre replicate`, and the daemon).
        #[arg(long, env = "COFFRE_SECONDARY", value_name = "DIR", value_parser = any_path)]
        secondary: Option<PathBuf>,
        /// Keep every item's instant-restore snapshots in DIR (default: in
        /// `.coffre-snapshots/VAULT_N` at the root of each image's
        /// filesystem, where reflink clones work).
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        snapshot_area: Option<PathBuf>,
        /// Keep the vault in object storage: azure://ACCOUNT/CONTAINER[/PREFIX]
        /// or s3://BUCKET[/PREFIX]; --vault is then this host's cache.
        /// Credentials come from the usual AZURE_* or AWS_* variables.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// Encrypt the vault: aes-256-gcm, chacha20-poly1305 or none
        /// (default: aes-256-gcm in object storage, none for a local
        /// vault). Fixed for the vault's life.
        #[arg(long, value_name = "CIPHER")]
        encryption: Option<String>,
        /// Write a new key file at FILE (32 random bytes, 0600; an existing
        /// file is refused) and make the vault's first key slot open with
        /// it, instead of --key-file or a passphrase.
        #[arg(long, value_name = "FILE", requires = "encryption")]
        generate_key_file: Option<PathBuf>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Attach this host to a vault in object storage that another host
    /// created: --vault is a new, empty cache directory.
    Attach {
        #[command(flatten)]
        vault: VaultArg,
        /// The vault's store URL (azure://…, s3://…).
        #[arg(long, value_name = "URL")]
        store: String,
    },
    /// Change a vault setting. Redundancy is locked once an item is protected.
    Set {
        #[command(flatten)]
        vault: VaultArg,
        /// Storage redundancy: LRS or GRS.
        #[arg(long, value_name = "LRS|GRS")]
        redundancy: Option<String>,
        /// Keep instant-restore snapshots in DIR ("" goes back to the
        /// default, next to each image).
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        snapshot_area: Option<PathBuf>,
        /// Add (or re-add) an LRS replica; it is filled from a good copy.
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        add_replica: Vec<PathBuf>,
        /// Stop writing to a replica (its directory is left as it is).
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        remove_replica: Vec<PathBuf>,
        /// Set or replace the GRS secondary; `coffre replicate` fills it.
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        secondary: Option<PathBuf>,
    },
    /// Rebuild the index (a cache) from one copy: the vault directory or
    /// a replica.
    RebuildIndex {
        #[command(flatten)]
        vault: VaultArg,
        /// The copy to read (default: the vault directory).
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        from: Option<PathBuf>,
    },
    /// Show settings, items, points and space used.
    Show {
        #[command(flatten)]
        vault: VaultArg,
    },
    /// Copy recovery points into another vault, oldest first, re-chunked
    /// for its key and block size (e.g. an unencrypted vault into a new
    /// encrypted one). Points the destination holds already are skipped:
    /// an interrupted copy is completed by running it again.
    Copy {
        /// The source vault (opened read-only; its key: --key-file,
        /// COFFRE_KEY_FILE, COFFRE_PASSWORD_COMMAND or a prompt).
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        from: PathBuf,
        /// The destination vault, created first with `coffre vault create`
        /// (which chooses its encryption and block size).
        #[arg(long, value_name = "DIR", value_parser = any_path)]
        to: PathBuf,
        /// The destination's key file; also COFFRE_TO_KEY_FILE. Without
        /// it: COFFRE_TO_PASSWORD_COMMAND, then a prompt.
        #[arg(long, value_name = "FILE")]
        to_key_file: Option<PathBuf>,
        /// Copy only this item (repeat for more; default: every item but
        /// the soft-deleted ones).
        #[arg(long, value_name = "NAME")]
        item: Vec<String>,
        /// List what would be copied; copy nothing.
        #[arg(long)]
        dry_run: bool,
        /// Limit read throughput, e.g. 50M (bytes per second of the
        /// source points; K, M, G are binary units).
        #[arg(long, value_name = "RATE", value_parser = crate::units::parse_size)]
        rate_limit: Option<u64>,
        #[command(flatten)]
        threads: ThreadsArg,
    },
}
