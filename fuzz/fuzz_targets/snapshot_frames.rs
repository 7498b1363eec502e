//! Fuzzes the snapshot manifest read at any frame
//! (`coffre_snapshotter::manifest::FrameSource`): a manifest opened, then
//! written over in place, must read each frame as it was or fail.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("coffre-fuzz-frames-{}", std::process::id()));
    coffre_snapshotter::manifest::fuzz_frames_entry(&path, data);
});
