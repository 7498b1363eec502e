//! Dispatch: one arm per command, calling the module that owns it.
//! Arrows run one way: `main` → `commands` → `*_cmd` → `ctx`.

use std::process::ExitCode;

use crate::args::{Cli, Command, CopySource, FromTier, ImageFormatArg, VaultCommand};
use crate::ctx::Ctx;
use crate::vault_cmd::{CreateArgs, SetArgs};
use coffre_engine::RestoreOptions;
use coffre_engine::restore::{ImageFormat, RestoreFrom};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::from_cli(&cli)?;
    let fmt = ctx.fmt;
    let clock = &*ctx.clock;
    match cli.command {
        Command::Vault(VaultCommand::Create {
            vault,
            name,
            block_size,
            compression_level,
            redundancy,
            replicas,
            secondary,
            snapshot_area,
            store,
            encryption,
            generate_key_file,
            kdf,
        }) => crate::vault_cmd::create(
            fmt,
            &vault.vault,
            CreateArgs {
                name,
                block_size,
                compression_level,
                redundancy,
                snapshot_area,
                replicas,
                secondary,
                store,
                encryption,
                generate_key_file,
                kdf,
            },
            &ctx.keys,
            clock,
        ),
        Command::Key(cmd) => crate::key_cmd::run(&ctx, cmd),
        Command::Vault(VaultCommand::Attach { vault, store }) => {
            crate::vault_cmd::attach(&ctx, &vault.vault, &store)
        }
        Command::Vault(VaultCommand::Show { vault }) => crate::vault_cmd::show(&ctx, &vault.vault),
        Command::Vault(VaultCommand::Set {
            vault,
            redundancy,
            snapshot_area,
            add_replica,
            remove_replica,
            secondary,
        }) => crate::vault_cmd::set(
            &ctx,
            &vault.vault,
            SetArgs {
                redundancy,
                snapshot_area,
                add_replica,
                remove_replica,
                secondary,
            },
        ),
        Command::Vault(VaultCommand::Copy {
            from,
            to,
            to_key_file,
            item,
            dry_run,
            rate_limit,
            threads,
        }) => crate::copy_cmd::run(
            &ctx,
            crate::copy_cmd::CopyArgs {
                from,
                to,
                to_key_file,
                items: item,
                dry_run,
                rate_limit,
                threads: threads.threads,
            },
        ),
        Command::Vault(VaultCommand::RebuildIndex { vault, from }) => {
            crate::vault_cmd::rebuild_index(&ctx, &vault.vault, from.as_deref())
        }
        Command::Replicate { vault } => crate::replicate_cmd::run(&ctx, &vault.vault),
        Command::Backup {
            vault,
            item,
            retain_until,
            rate_limit,
            threads,
            cbt,
            qmp,
            drive,
            guest_agent,
            fleece_dir,
            domain,
            connect,
            image,
        } => {
            let args = crate::backup_cmd::BackupArgs {
                item,
                retain_until: retain_until.as_deref(),
                rate_limit,
                threads: threads.threads,
                cbt: &cbt,
            };
            if connect.is_some() && domain.is_none() {
                anyhow::bail!("--connect goes with --domain NAME");
            }
            if let Some(domain) = domain {
                return crate::domain_cmd::backup(
                    &ctx,
                    &vault.vault,
                    args,
                    &domain,
                    connect.as_deref(),
                );
            }
            match (qmp, drive, image) {
                (Some(socket), Some(drive), _) => {
                    let absolute = |p: std::path::PathBuf| std::path::absolute(&p).unwrap_or(p);
                    let target = coffre_engine::snapshotter::vm::live::QmpTarget {
                        socket: absolute(socket),
                        drive,
                        agent: guest_agent.map(absolute),
                        fleece: fleece_dir.map(absolute),
                    };
                    crate::backup_cmd::run_qmp(&ctx, &vault.vault, args, target)
                }
                (_, _, Some(image)) => crate::backup_cmd::run(&ctx, &vault.vault, args, &image),
                _ => anyhow::bail!("give an image, or --qmp SOCKET --drive NODE"),
            }
        }
        Command::Points { vault, item, from } => {
            let dir = crate::ctx::copy_dir(&ctx, &vault.vault, from)?;
            crate::point_cmd::list(&ctx, &dir, &item)
        }
        Command::Restore {
            vault,
            item,
            to,
            from,
            live: true,
            abandon: true,
            ..
        } => crate::live_cmd::abandon(&ctx, &tier_dir(&ctx, &vault.vault, from)?, &item, &to),
        Command::Restore {
            vault,
            item,
            point,
            to,
            force: _,
            in_place: _,
            format: _,
            from,
            mode,
            threads: _,
            allow_damaged: _,
            live: true,
            qmp,
            live_domain,
            live_connect,
            device,
            bus,
            swap_running_disk,
            resume,
            no_daemon_resume,
            speed,
            reconnect_delay,
            abandon: false,
        } => {
            // A --resume without the VM takes it, and the device, from the
            // run file the earlier run wrote (this user's, checked).
            let earlier = (resume && qmp.is_none() && live_domain.is_none())
                .then(|| {
                    crate::daemon_live::earlier_run(&vault.vault, &item, &to, device.as_deref())
                })
                .transpose()?;
            // Its tier too: a resume from another tier would hold the point
            // there and leave the first tier's hold behind.
            let from = match &earlier {
                Some(run) => crate::daemon_live::tier_of(run, from)?,
                None => from,
            };
            let vm = match (qmp, live_domain, &earlier) {
                (Some(q), None, _) => coffre_engine::access::live::LiveVm::Qmp(q),
                (None, Some(name), _) => coffre_engine::access::live::LiveVm::Domain {
                    name,
                    connect: live_connect,
                },
                (None, None, Some(run)) => crate::daemon_live::vm_of(run)?,
                _ => anyhow::bail!("--live needs --qmp SOCKET or --domain NAME"),
            };
            let device = match (device, &earlier) {
                // (The run file's bus is that of the same device only.)
                (Some(id), _) => coffre_engine::snapshotter::vm::stream::DeviceChoice {
                    id,
                    bus: bus.or(earlier.as_ref().and_then(|r| r.bus.clone())),
                    swap_running: swap_running_disk,
                },
                (None, None) if resume => anyhow::bail!(
                    "--live --resume needs --device ID with --qmp or --domain (leave all three out to take them from the earlier run's run file)"
                ),
                // The earlier run's consent to swap a running disk is not
                // carried over: --swap-running-disk is asked again.
                (None, Some(run)) => coffre_engine::snapshotter::vm::stream::DeviceChoice {
                    swap_running: swap_running_disk,
                    ..crate::daemon_live::device_of(run)
                },
                (None, None) => anyhow::bail!("--live needs --device ID"),
            };
            let reconnect_delay = reconnect_delay
                .or(earlier.as_ref().map(|r| r.reconnect_delay))
                .unwrap_or(coffre_engine::access::live::DEFAULT_RECONNECT_DELAY);
            if let Some(run) = &earlier {
                eprintln!(
                    "restore --live: resuming with {}, device {}, from {}, as the earlier run's run file says",
                    match (&run.qmp, &run.domain) {
                        (Some(q), _) => format!("QEMU monitor {}", q.display()),
                        (None, d) => format!("domain {}", d.as_deref().unwrap_or("?")),
                    },
                    device.id,
                    run.from.as_deref().unwrap_or("the default tier")
                );
            }
            let rerun = (!no_daemon_resume)
                .then(|| {
                    crate::daemon_live::run_file(
                        &vault.vault,
                        from,
                        &item,
                        &to,
                        &vm,
                        &device,
                        reconnect_delay,
                    )
                })
                .flatten();
            crate::live_cmd::run(
                &ctx,
                &tier_dir(&ctx, &vault.vault, from)?,
                &item,
                &point,
                coffre_engine::access::live::LiveOptions {
                    target: to,
                    vm,
                    device,
                    resume,
                    speed,
                    reconnect_delay,
                    mode,
                    access: coffre_engine::access::AccessOptions {
                        from: crate::export_cmd::served_from(from),
                        ..Default::default()
                    },
                    poll: std::time::Duration::from_millis(250),
                    now: ctx.now(),
                    rerun,
                    unattended: false,
                },
            )
        }
        Command::Restore {
            vault,
            item,
            point,
            to,
            force,
            in_place,
            format,
            from,
            mode,
            threads,
            allow_damaged,
            ..
        } => crate::restore_cmd::run(
            &ctx,
            &tier_dir(&ctx, &vault.vault, from)?,
            &item,
            &point,
            RestoreOptions {
                target: to,
                force,
                in_place,
                mode,
                from: match from {
                    None => RestoreFrom::Auto,
                    Some(FromTier::Snapshot) => RestoreFrom::Snapshot,
                    Some(FromTier::Vault | FromTier::Secondary) => RestoreFrom::Vault,
                },
                threads: threads.threads,
                allow_damaged,
                format: format.map(|f| match f {
                    ImageFormatArg::Raw => ImageFormat::Raw,
                    ImageFormatArg::Qcow2 => ImageFormat::Qcow2,
                }),
            },
        ),
        Command::Export {
            vault,
            points,
            socket,
            listen,
            name,
            idle_timeout,
        } => crate::export_cmd::run(
            &ctx,
            &tier_dir(&ctx, &vault.vault, points.from)?,
            crate::export_cmd::ExportArgs {
                points,
                socket,
                listen,
                name,
                idle_timeout,
            },
        ),
        Command::Mount {
            vault,
            points,
            allow_other,
            dir,
        } => crate::mount_cmd::run(
            &ctx,
            &tier_dir(&ctx, &vault.vault, points.from)?,
            crate::mount_cmd::MountArgs {
                points,
                allow_other,
                dir,
            },
        ),
        Command::Verify {
            vault,
            read_data,
            repair,
            from,
            threads,
        } => crate::verify_cmd::run(
            &ctx,
            &crate::ctx::copy_dir(&ctx, &vault.vault, from)?,
            read_data,
            repair,
            threads.threads,
        ),
        Command::Policy(cmd) => crate::policy_cmd::run(&ctx, *cmd),
        Command::Protect {
            domain: None,
            connect: Some(_),
            ..
        } => anyhow::bail!("--connect goes with --domain NAME"),
        Command::Protect {
            vault,
            item,
            policy,
            pre_snapshot,
            post_snapshot,
            hook_timeout,
            domain,
            connect,
            image,
        } => match (domain, item, image) {
            (Some(domain), _, _) => {
                crate::domain_cmd::protect(&ctx, &vault.vault, &domain, connect.as_deref(), &policy)
            }
            (None, Some(item), Some(image)) => crate::item_cmd::protect(
                &ctx,
                &vault.vault,
                &item,
                &policy,
                &image,
                crate::item_cmd::hooks_from(
                    &ctx,
                    &vault.vault,
                    &item,
                    pre_snapshot,
                    post_snapshot,
                    hook_timeout,
                )?,
            ),
            _ => anyhow::bail!("give --item NAME and an image, or --domain NAME"),
        },
        Command::Unprotect {
            vault,
            item,
            delete_data,
        } => crate::item_cmd::unprotect(&ctx, &vault.vault, &item, delete_data),
        Command::Undelete { vault, item } => crate::item_cmd::undelete(&ctx, &vault.vault, &item),
        Command::Item(cmd) => crate::item_cmd::run(&ctx, cmd),
        Command::Jobs {
            vault,
            item,
            status,
            operation,
            since,
        } => crate::job_cmd::list(
            &ctx,
            &vault.vault,
            item.as_deref(),
            status.as_deref(),
            operation.as_deref(),
            since.as_deref(),
        ),
        Command::Job(cmd) => crate::job_cmd::run(&ctx, cmd),
        Command::Prune { vault, dry_run } => {
            crate::maintenance_cmd::prune(&ctx, &vault.vault, dry_run)
        }
        Command::Gc { vault, dry_run } => crate::maintenance_cmd::gc(&ctx, &vault.vault, dry_run),
        Command::RunDue {
            vault,
            rate_limit,
            threads,
        } => crate::maintenance_cmd::run_due(&ctx, &vault.vault, rate_limit, threads.threads),
        Command::Bench {
            size,
            level,
            block_size,
            dir,
            threads,
        } => crate::bench_cmd::run(&ctx, size, level, block_size, dir, threads.threads),
        Command::Completions { shell } => crate::docs_cmd::completions(shell),
        Command::Man { dir } => crate::docs_cmd::man(dir.as_deref()),
        Command::Daemon {
            vault,
            interval,
            rate_limit,
            threads,
        } => crate::daemon::run(&ctx, &vault.vault, interval, rate_limit, threads.threads),
    }
}

/// The directory of the copy a point is read from: the GRS secondary's
/// with `--from secondary`, else the vault's.
pub(crate) fn tier_dir(
    ctx: &crate::ctx::Ctx,
    dir: &std::path::Path,
    from: Option<FromTier>,
) -> anyhow::Result<std::path::PathBuf> {
    crate::ctx::copy_dir(
        ctx,
        dir,
        (from == Some(FromTier::Secondary)).then_some(CopySource::Secondary),
    )
}
