//! The additional data of a sealed manifest's frames and metadata
//! (`FORMAT.md`, "Sealed snapshot manifest").

use std::path::Path;

/// Label that starts every additional data. Frozen.
pub const AD_LABEL: &[u8] = b"coffre sealed snapshot manifest v1\0";
/// The frame index that stands for the metadata.
pub const META_INDEX: u64 = u64::MAX;

/// The name a manifest at `path` is bound to: `ITEM/JOB.snap` (an
/// interim pass file, `JOB.passN.snap`, is bound to its job's name).
pub fn manifest_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let job = file.split('.').next().unwrap_or_default();
    let item = path
        .parent()
        .and_then(Path::file_name)
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{item}/{job}.snap")
}

/// The additional data of frame `index` (`count` entries) of the
/// manifest `name` whose header is `header`.
pub fn frame_ad(header: &[u8], name: &str, index: u64, count: u32) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_LABEL.len() + header.len() + name.len() + 13);
    ad.extend_from_slice(AD_LABEL);
    ad.extend_from_slice(header);
    ad.extend_from_slice(name.as_bytes());
    ad.push(0);
    ad.extend_from_slice(&index.to_le_bytes());
    ad.extend_from_slice(&count.to_le_bytes());
    ad
}

/// The additional data of the metadata of manifest `name`: its header,
/// its name, [`META_INDEX`], the entry total and the stored bytes (the
/// trailer's fields).
pub fn meta_ad(header: &[u8], name: &str, entries: u64, stored_bytes: u64) -> Vec<u8> {
    let mut ad = frame_ad(header, name, META_INDEX, 0);
    ad.extend_from_slice(&entries.to_le_bytes());
    ad.extend_from_slice(&stored_bytes.to_le_bytes());
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_files_are_bound_to_their_job() {
        assert_eq!(manifest_name(Path::new("/a/vm/0123.snap")), "vm/0123.snap");
        assert_eq!(
            manifest_name(Path::new("/a/vm/0123.pass2.snap")),
            "vm/0123.snap"
        );
        assert_ne!(
            frame_ad(b"h", "vm/1.snap", 0, 1),
            frame_ad(b"h", "vm/1.snap", 1, 1)
        );
        assert_ne!(
            frame_ad(b"h", "vm/1.snap", 0, 1),
            frame_ad(b"h", "db/1.snap", 0, 1)
        );
    }
}
