//! Changed-block lists given with `coffre backup --changed-blocks FILE`.
//!
//! Two shapes are accepted (both JSON; `FORMAT.md` specifies them):
//! - the output of `nbdinfo --map=qemu:dirty-bitmap:NAME --json`: an array
//!   of `{offset, length, type, description}` where bit 0 of `type` marks
//!   dirty extents. A `base:allocation` map (descriptions `data`, `hole`,
//!   `zero`) says nothing about change and is refused;
//! - coffre's own: `{"format": "coffre-changed-blocks", "version": 1,
//!   "image_size": N, "generation": G, "since": S, "extents": [{offset,
//!   length}]}` where `generation` and `since` are optional strings.
//!
//! Nothing in the file is trusted: extents that overflow, lie past the
//! image size the file gives, or are not numbers are refused with the
//! file's name and the entry's index.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;

use super::{Hint, HintSource};

/// The `format` value of coffre's own list.
pub const FORMAT_NAME: &str = "coffre-changed-blocks";
/// The version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Largest list file read (a 64 TiB image at 64 KiB granularity is far
/// smaller than this).
pub const MAX_LIST_BYTES: u64 = 256 << 20;

#[derive(Deserialize)]
struct NbdinfoEntry {
    offset: u64,
    length: u64,
    #[serde(rename = "type")]
    kind: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct Extent {
    offset: u64,
    length: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnList {
    format: String,
    version: u32,
    #[serde(default)]
    image_size: Option<u64>,
    #[serde(default)]
    generation: Option<String>,
    #[serde(default)]
    since: Option<String>,
    extents: Vec<Extent>,
}

/// Reads and checks the list at `path`.
pub fn read(path: &Path) -> Result<Hint, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if meta.len() > MAX_LIST_BYTES {
        return Err(format!(
            "it is {} bytes, more than the {MAX_LIST_BYTES} a list may have",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    parse(&bytes)
}

/// Parses a list (either shape).
pub fn parse(bytes: &[u8]) -> Result<Hint, String> {
    let first = bytes
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace())
        .ok_or("it is empty")?;
    match first {
        b'[' => parse_nbdinfo(bytes),
        b'{' => parse_own(bytes),
        _ => Err("it is neither `nbdinfo --map --json` output (an array) nor a coffre changed-block list (an object)".into()),
    }
}

fn extent(i: usize, offset: u64, length: u64, size: Option<u64>) -> Result<Range<u64>, String> {
    let end = offset
        .checked_add(length)
        .ok_or_else(|| format!("extent {i} ({offset}+{length}) overflows"))?;
    if let Some(size) = size
        && end > size
    {
        return Err(format!(
            "extent {i} ({offset}+{length}) ends past the image size {size}"
        ));
    }
    Ok(offset..end)
}

fn parse_nbdinfo(bytes: &[u8]) -> Result<Hint, String> {
    let entries: Vec<NbdinfoEntry> = serde_json::from_slice(bytes)
        .map_err(|e| format!("not nbdinfo --map --json output: {e}"))?;
    let mut dirty = Vec::new();
    let mut end = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let d = e.description.as_str();
        if d.contains("data") || d.contains("hole") || d.contains("zero") {
            return Err(format!(
                "entry {i} is {d:?}: this is a base:allocation map, not a dirty bitmap; run `nbdinfo --map=qemu:dirty-bitmap:NAME --json`"
            ));
        }
        let r = extent(i, e.offset, e.length, None)?;
        end = end.max(r.end);
        if e.kind & 1 == 1 {
            dirty.push(r);
        }
    }
    let mut hint = Hint::new(HintSource::List, dirty);
    // nbdinfo maps the whole export: its end is the image size.
    hint.image_size = (!entries.is_empty()).then_some(end);
    Ok(hint)
}

fn parse_own(bytes: &[u8]) -> Result<Hint, String> {
    let list: OwnList = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a coffre changed-block list: {e}"))?;
    if list.format != FORMAT_NAME {
        return Err(format!(
            "its format is {:?}, not {FORMAT_NAME:?}",
            list.format
        ));
    }
    if list.version != FORMAT_VERSION {
        return Err(format!(
            "it is version {}; this build reads version {FORMAT_VERSION}",
            list.version
        ));
    }
    let dirty = list
        .extents
        .iter()
        .enumerate()
        .map(|(i, e)| extent(i, e.offset, e.length, list.image_size))
        .collect::<Result<Vec<_>, _>>()?;
    let mut hint = Hint::new(HintSource::List, dirty);
    hint.image_size = list.image_size;
    hint.generation = list.generation;
    hint.since = list.since;
    Ok(hint)
}

/// The fuzz target's entry: parses `data` as a list, never panicking, and
/// checks what a parsed hint promises (sorted, disjoint, non-empty
/// extents). True when it parsed.
pub fn fuzz_entry(data: &[u8]) -> bool {
    match parse(data) {
        Ok(h) => {
            let e = h.extents();
            assert!(e.iter().all(|r| r.start < r.end));
            assert!(e.windows(2).all(|w| w[0].end < w[1].start));
            if let Some(size) = h.image_size {
                let blocks = size.div_ceil(65536);
                let _ = h.dirty_mask(65536, 0, blocks.min(4096) as usize);
                let _ = h.sample(
                    65536,
                    blocks.min(1 << 20),
                    super::Sampling::default(),
                    "fuzz",
                );
            }
            true
        }
        Err(_) => false,
    }
}

/// Writes coffre's own list (used by tests, benches and scripts).
pub fn to_json(hint: &Hint) -> String {
    let extents: Vec<serde_json::Value> = hint
        .extents()
        .iter()
        .map(|r| serde_json::json!({"offset": r.start, "length": r.end - r.start}))
        .collect();
    let mut v = serde_json::json!({
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "extents": extents,
    });
    if let Some(map) = v.as_object_mut() {
        if let Some(s) = hint.image_size {
            map.insert("image_size".into(), s.into());
        }
        if let Some(g) = &hint.generation {
            map.insert("generation".into(), g.clone().into());
        }
        if let Some(s) = &hint.since {
            map.insert("since".into(), s.clone().into());
        }
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbdinfo_dirty_bitmap_maps_are_read() {
        let map = br#"[
{ "offset": 0, "length": 1048576, "type": 0, "description": "clean"},
{ "offset": 1048576, "length": 131072, "type": 1, "description": "dirty"},
{ "offset": 1179648, "length": 7208960, "type": 0, "description": "clean"}
]"#;
        let h = parse(map).unwrap();
        assert_eq!(h.extents(), std::slice::from_ref(&(1048576..1179648)));
        assert_eq!(h.image_size, Some(8 << 20));
        assert_eq!(h.since, None);
    }

    #[test]
    fn allocation_maps_and_garbage_are_refused() {
        let alloc = br#"[{ "offset": 0, "length": 4096, "type": 3, "description": "hole,zero"}]"#;
        assert!(parse(alloc).unwrap_err().contains("base:allocation"));
        assert!(parse(b"").unwrap_err().contains("empty"));
        assert!(parse(b"hello").is_err());
        let overflow = br#"[{ "offset": 18446744073709551615, "length": 2, "type": 1}]"#;
        assert!(parse(overflow).unwrap_err().contains("overflows"));
    }

    #[test]
    fn own_lists_round_trip_and_are_checked() {
        let mut h = Hint::new(HintSource::List, vec![0..10, 4096..8192]);
        h.image_size = Some(1 << 20);
        h.generation = Some("g2".into());
        h.since = Some("g1".into());
        assert_eq!(parse(to_json(&h).as_bytes()).unwrap(), h);
        let past = r#"{"format":"coffre-changed-blocks","version":1,"image_size":100,"extents":[{"offset":90,"length":20}]}"#;
        assert!(
            parse(past.as_bytes())
                .unwrap_err()
                .contains("past the image size")
        );
        let v2 = r#"{"format":"coffre-changed-blocks","version":2,"extents":[]}"#;
        assert!(parse(v2.as_bytes()).unwrap_err().contains("version 2"));
        let other = r#"{"format":"something","version":1,"extents":[]}"#;
        assert!(parse(other.as_bytes()).unwrap_err().contains("format"));
    }
}
