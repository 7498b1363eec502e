//! The parts of a segment in an object store (`NAME.seg/OFFSET`, see
//! `store::object`): the part names and the check of a listing, which
//! comes from the bucket and is untrusted. Pure functions, no I/O, built
//! without the object-store client so the fuzz targets reach them.

/// Checks a sorted part list (start, length) of a segment: no part runs
/// past `u64::MAX`, and none starts before the previous one ends (the
/// listing comes from the bucket: untrusted).
pub fn check_part_list(parts: &[(u64, u64)]) -> std::result::Result<(), String> {
    let mut prev_end = 0u64;
    for (i, &(start, len)) in parts.iter().enumerate() {
        let end = start.checked_add(len).ok_or_else(|| {
            format!("part at offset {start} of {len} bytes runs past the largest offset")
        })?;
        if i > 0 && start < prev_end {
            return Err(format!(
                "part at offset {start} overlaps the one before it, which ends at {prev_end}"
            ));
        }
        prev_end = end;
    }
    Ok(())
}

/// The parts of a segment from the listing of its folder (file name,
/// size), sorted by start: only names a part is written under (16
/// lowercase hex digits, [`part_key`]) count; anything else in the folder
/// is not a part. Check the result with [`check_part_list`].
pub fn parts_of_listing<'a>(listing: impl Iterator<Item = (&'a str, u64)>) -> Vec<(u64, u64)> {
    let mut parts: Vec<(u64, u64)> = listing
        .filter(|(name, _)| {
            name.len() == 16 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
        .filter_map(|(name, size)| Some((u64::from_str_radix(name, 16).ok()?, size)))
        .collect();
    parts.sort_unstable();
    parts
}

/// The `part_list` fuzz target's body: `data` as a folder listing, one
/// `NAME SIZE` per line; the parts found and checked. When the check
/// passes, the parts are sorted, disjoint and end before `u64::MAX`.
/// Returns whether it passed.
pub fn fuzz_part_list(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let listing: Vec<(&str, u64)> = text
        .lines()
        .filter_map(|l| {
            let (name, size) = l.split_once(' ')?;
            Some((name, size.parse().ok()?))
        })
        .collect();
    let parts = parts_of_listing(listing.iter().copied());
    if check_part_list(&parts).is_err() {
        return false;
    }
    let mut end = 0u64;
    for (i, &(start, len)) in parts.iter().enumerate() {
        assert!(i == 0 || start >= end, "{parts:?}");
        end = start.checked_add(len).expect("checked");
        assert_eq!(part_key(start).len(), 16);
    }
    true
}

/// The object name of the part that starts at `start`.
pub fn part_key(start: u64) -> String {
    format!("{start:016x}")
}
