//! The dirty-bitmap chain a live backup keeps in QEMU, one per item and
//! vault: bitmap `coffre-cbt-<16 hex of vault and item>-<n>-<job>` records every
//! write since the instant of the point whose generation it is.
//!
//! Each backup, around its instant (the filter going in, which no QMP
//! `transaction` can hold on QEMU 7.2):
//! - just before, adds bitmap *n + 1* (persistent on qcow2, so it survives
//!   a VM restart; a raw node cannot store one, and its chain ends with
//!   the QEMU process);
//! - just after, in one transaction, disables the *base*: the bitmap the
//!   parent point recorded as its generation, which then holds the writes
//!   between the two instants (and the few of the moment between the two
//!   transactions, read once more), and is exported with the point for the
//!   backup to read; and merges into the base the bitmaps of runs that
//!   failed or were killed after the base (their points never reached the
//!   vault), and disables them, so no write is lost.
//!
//! The base and everything older goes only once the new point is committed
//! ([`Plan::after_commit`]); a failed run leaves the chain for the next one
//! to merge. Without a base (the first backup, a VM restarted with a raw
//! disk, a bitmap removed by hand) the backup reads everything, with the
//! reason recorded. A bitmap QEMU reports `inconsistent` (a qcow2's
//! persistent bitmap whose QEMU was killed) is never a base nor merged: a
//! backup whose base it is, or whose base would need it merged, reads
//! everything and warns naming it, and it goes with the old part of the
//! chain once the point is committed. The bitmap's contents are never
//! trusted blindly: the backup audits a sample of the blocks it calls
//! clean (`crate::cbt`).

use serde_json::{Value, json};

use super::node::{BitmapInfo, NodeInfo};

/// The chain of one item in one vault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    prefix: String,
}

/// What one backup does with the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The node the bitmaps are on.
    pub node: String,
    /// The bitmap this backup adds: the new point's generation.
    pub new: String,
    /// The parent's bitmap, read for this backup.
    pub base: Option<String>,
    /// Why there is no base, when the parent recorded one.
    pub why_no_base: Option<String>,
    /// Bitmaps merged into the base (runs whose points never landed).
    pub merged: Vec<String>,
    /// Bitmaps of the chain removed once the new point is committed.
    pub dropped: Vec<String>,
    /// The transaction just before the instant: the new bitmap, which so
    /// records every write after the instant (and a few before).
    pub before: Vec<Value>,
    /// The transaction just after the instant: the base and the bitmaps
    /// merged into it stop recording, so the base holds every write up to
    /// the instant (and a few after). Reading a few blocks too many costs
    /// a little; missing one would lose a write.
    pub after: Vec<Value>,
    /// What the job should be told (inconsistent bitmaps of the chain).
    pub warnings: Vec<String>,
}

impl Chain {
    /// The chain of `item` in vault `vault_id`.
    pub fn of(vault_id: &str, item: &str) -> Chain {
        let h = blake3::hash(format!("{vault_id}/{item}").as_bytes()).to_hex();
        Chain {
            prefix: format!("coffre-cbt-{}-", h.get(..16).unwrap_or_default()),
        }
    }

    /// The number of bitmap `name` in this chain (`<n>` or `<n>-<token>`,
    /// the token 1 to 16 hex digits); `None` when it is not one of the
    /// chain's.
    pub fn number(&self, name: &str) -> Option<u64> {
        let rest = name.strip_prefix(&self.prefix)?;
        let (n, token) = rest.split_once('-').unwrap_or((rest, "0"));
        if n.is_empty() || n.len() > 19 || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if token.is_empty() || token.len() > 16 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        n.parse().ok()
    }

    /// Plans one backup of `node`, whose parent point recorded bitmap
    /// generation `parent` (`None`: no parent, or one that tracked no
    /// bitmap). The new bitmap's name is never one used before: its number
    /// is past both the node's bitmaps and the parent's, and it carries
    /// `token` (the job's id), so a bitmap recreated after a restart can
    /// never pass for the parent's.
    pub fn plan(&self, node: &NodeInfo, parent: Option<&str>, token: &str) -> Plan {
        let mut ours: Vec<(u64, &BitmapInfo)> = node
            .bitmaps
            .iter()
            .filter_map(|b| Some((self.number(&b.name)?, b)))
            .collect();
        ours.sort_by_key(|(n, _)| *n);
        let last = ours.last().map(|(n, _)| *n);
        let next = last
            .max(parent.and_then(|p| self.number(p)))
            .map_or(1, |n| n.saturating_add(1));
        let token: String = token
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect();
        let new = if token.is_empty() {
            format!("{}{next}", self.prefix)
        } else {
            format!("{}{next}-{token}", self.prefix)
        };
        // QEMU cannot vouch for an inconsistent bitmap (its QEMU was
        // killed while it recorded): never a base, never merged, removed
        // with the old part of the chain.
        let warnings: Vec<String> = ours
            .iter()
            .filter(|(_, b)| b.inconsistent)
            .map(|(_, b)| {
                format!(
                    "dirty bitmap {} on node {} is inconsistent (its QEMU stopped without saving it, e.g. killed): never used, removed once this point is committed",
                    b.name, node.name
                )
            })
            .collect();
        let found = parent.and_then(|p| ours.iter().find(|(_, b)| b.name == p));
        // A later run's bitmap that cannot be merged loses writes the base
        // alone does not hold.
        let unmergeable = found.and_then(|&(base_n, _)| {
            ours.iter()
                .find(|(n, b)| *n > base_n && b.inconsistent)
                .map(|(_, b)| b.name.clone())
        });
        let base = found.filter(|(_, b)| !b.inconsistent && unmergeable.is_none());
        let why_no_base = match (parent, found) {
            (Some(p), Some((_, b))) if b.inconsistent => Some(format!(
                "bitmap {p} of the last backup is inconsistent on node {} (its QEMU stopped without saving it, e.g. killed): it is not used, the backup reads everything",
                node.name
            )),
            (Some(_), Some(_)) => unmergeable.map(|u| {
                format!(
                    "bitmap {u} of a run after the last backup is inconsistent on node {} (its QEMU stopped without saving it, e.g. killed): the writes it recorded are unknown, the backup reads everything",
                    node.name
                )
            }),
            (Some(p), None) if self.number(p).is_some() => Some(format!(
                "bitmap {p} of the last backup is not on node {} any more (the VM was restarted with a disk that cannot store bitmaps, or the bitmap was removed)",
                node.name
            )),
            (Some(p), None) => Some(format!(
                "the last backup recorded {p:?}, not a bitmap of coffre's chain"
            )),
            _ => None,
        };
        let before = vec![json!({
            "type": "block-dirty-bitmap-add",
            "data": { "node": node.name, "name": new, "persistent": node.can_persist_bitmaps() },
        })];
        let mut after = Vec::new();
        let mut merged = Vec::new();
        let mut dropped = Vec::new();
        match base {
            None => dropped.extend(ours.iter().map(|(_, b)| b.name.clone())),
            Some(&(base_n, base_b)) => {
                for &(n, b) in &ours {
                    if n > base_n {
                        // A run after the base whose point never landed:
                        // its writes belong to this backup.
                        after.push(json!({
                            "type": "block-dirty-bitmap-merge",
                            "data": { "node": node.name, "target": base_b.name, "bitmaps": [b.name] },
                        }));
                        merged.push(b.name.clone());
                    }
                    dropped.push(b.name.clone());
                }
                for b in ours
                    .iter()
                    .map(|(_, b)| *b)
                    .filter(|b| b.recording && (b.name == base_b.name || merged.contains(&b.name)))
                {
                    after.push(json!({
                        "type": "block-dirty-bitmap-disable",
                        "data": { "node": node.name, "name": b.name },
                    }));
                }
            }
        }
        Plan {
            node: node.name.clone(),
            new,
            base: base.map(|(_, b)| b.name.clone()),
            why_no_base,
            merged,
            dropped,
            before,
            after,
            warnings,
        }
    }
}

impl Plan {
    /// The commands that end the old part of the chain once the new point
    /// is committed: every bitmap but the new one.
    pub fn after_commit(&self) -> Vec<Value> {
        self.dropped
            .iter()
            .map(|name| json!({ "node": self.node, "name": name }))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn node(driver: &str, bitmaps: &[(&str, bool)]) -> NodeInfo {
        NodeInfo {
            name: "disk0".into(),
            size: 1 << 20,
            driver: driver.into(),
            bitmaps: bitmaps
                .iter()
                .map(|(n, rec)| BitmapInfo {
                    name: n.to_string(),
                    recording: *rec,
                    persistent: true,
                    busy: false,
                    inconsistent: false,
                })
                .collect(),
        }
    }

    fn kinds(p: &Plan) -> Vec<String> {
        p.before
            .iter()
            .chain(&p.after)
            .map(|a| {
                let d = &a["data"];
                format!(
                    "{} {}",
                    a["type"].as_str().unwrap(),
                    d["name"].as_str().or(d["target"].as_str()).unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn chains_are_per_vault_and_item_and_numbers_are_strict() {
        let c = Chain::of("v1", "vm");
        assert_ne!(c, Chain::of("v2", "vm"));
        assert_ne!(c, Chain::of("v1", "vm2"));
        let name = format!("{}12", c.prefix);
        assert_eq!(c.number(&name), Some(12));
        assert_eq!(c.number(&format!("{}12-00ff", c.prefix)), Some(12));
        for bad in [
            "",
            "x",
            "+1",
            "1 ",
            "99999999999999999999",
            "1-",
            "1-xyz",
            "1-00000000000000000",
        ] {
            assert_eq!(c.number(&format!("{}{bad}", c.prefix)), None, "{bad:?}");
        }
        assert_eq!(c.number("coffre-cbt-0000000000000000-1"), None);
    }

    #[test]
    fn a_first_backup_starts_the_chain_and_a_second_reads_the_first() {
        let c = Chain::of("v", "vm");
        let p = c.plan(&node("qcow2", &[("other", true)]), None, "");
        assert_eq!(p.new, format!("{}1", c.prefix));
        assert_eq!((p.base.as_deref(), p.why_no_base.as_deref()), (None, None));
        assert_eq!(p.before[0]["data"]["persistent"], true);
        assert!(p.dropped.is_empty(), "another tool's bitmap is never ours");

        let first = p.new.clone();
        let p = c.plan(&node("qcow2", &[(&first, true)]), Some(&first), "");
        assert_eq!(p.base.as_deref(), Some(first.as_str()));
        assert_eq!(p.new, format!("{}2", c.prefix));
        assert_eq!(
            kinds(&p),
            [
                format!("block-dirty-bitmap-add {}2", c.prefix),
                format!("block-dirty-bitmap-disable {first}")
            ]
        );
        assert_eq!(p.dropped, [first]);
        assert_eq!(p.after_commit()[0]["node"], "disk0");
    }

    #[test]
    fn failed_runs_after_the_base_are_merged_and_older_bitmaps_dropped() {
        let c = Chain::of("v", "vm");
        let n = |i: u32| format!("{}{i}", c.prefix);
        // 1: an old bitmap a crash after commit left; 2: the base (disabled
        // by the failed run 3, whose bitmap records since).
        let p = c.plan(
            &node("qcow2", &[(&n(1), false), (&n(2), false), (&n(3), true)]),
            Some(&n(2)),
            "",
        );
        assert_eq!(p.base, Some(n(2)));
        assert_eq!(p.new, n(4));
        assert_eq!(p.merged, [n(3)]);
        assert_eq!(p.dropped, [n(1), n(2), n(3)]);
        assert_eq!(
            kinds(&p),
            [
                format!("block-dirty-bitmap-add {}", n(4)),
                format!("block-dirty-bitmap-merge {}", n(2)),
                format!("block-dirty-bitmap-disable {}", n(3)),
            ]
        );
    }

    #[test]
    fn a_lost_base_means_a_full_read_with_the_reason_and_raw_cannot_persist() {
        let c = Chain::of("v", "vm");
        let gone = format!("{}5", c.prefix);
        let p = c.plan(&node("raw", &[]), Some(&gone), "ab12");
        assert_eq!(
            p.new,
            format!("{}6-ab12", c.prefix),
            "past the parent's number"
        );
        assert!(p.base.is_none());
        assert!(
            p.why_no_base
                .as_deref()
                .unwrap()
                .contains("not on node disk0"),
            "{p:?}"
        );
        assert_eq!(p.before[0]["data"]["persistent"], false);
        let p = c.plan(&node("raw", &[]), Some("foreign"), "");
        assert!(p.why_no_base.unwrap().contains("not a bitmap of coffre's"));
    }

    #[test]
    fn an_inconsistent_bitmap_is_never_a_base_nor_merged_and_is_dropped() {
        let c = Chain::of("v", "vm");
        let n = |i: u32| format!("{}{i}", c.prefix);
        let with = |bitmaps: &[(String, bool, bool)]| NodeInfo {
            bitmaps: bitmaps
                .iter()
                .map(|(name, rec, bad)| BitmapInfo {
                    name: name.clone(),
                    recording: *rec,
                    persistent: true,
                    busy: false,
                    inconsistent: *bad,
                })
                .collect(),
            ..node("qcow2", &[])
        };
        // The parent's bitmap is inconsistent: a full read, dropped later.
        let p = c.plan(&with(&[(n(2), false, true)]), Some(&n(2)), "");
        assert!(p.base.is_none());
        assert!(
            p.why_no_base.as_deref().unwrap().contains("inconsistent"),
            "{p:?}"
        );
        assert_eq!(p.dropped, [n(2)]);
        assert_eq!(kinds(&p), [format!("block-dirty-bitmap-add {}", n(3))]);
        assert!(p.warnings[0].contains(&n(2)), "{:?}", p.warnings);
        // A failed run's bitmap after the base is inconsistent: the base
        // alone misses its writes, so it is no base either.
        let p = c.plan(
            &with(&[(n(2), false, false), (n(3), true, true)]),
            Some(&n(2)),
            "",
        );
        assert!(p.base.is_none());
        assert!(p.why_no_base.as_deref().unwrap().contains(&n(3)), "{p:?}");
        assert!(p.merged.is_empty());
        assert_eq!(p.dropped, [n(2), n(3)]);
        // An old inconsistent bitmap before a sound base is only dropped.
        let p = c.plan(
            &with(&[(n(1), false, true), (n(2), true, false)]),
            Some(&n(2)),
            "",
        );
        assert_eq!(p.base, Some(n(2)));
        assert_eq!(p.dropped, [n(1), n(2)]);
        assert_eq!(p.warnings.len(), 1);
    }
}
