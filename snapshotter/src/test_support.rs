//! Helpers for this crate's unit tests: generated images and chunk
//! snapshots taken of them.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use coffre_vault_store::store::local::read_ahead;

use jiff::Timestamp;

use crate::area::{Area, AreaIdentity};
use crate::capture::{CaptureRequest, capture};
use crate::hooks::Hooks;
use crate::progress::NoProgress;
use crate::source::MemImage;

/// Block size of the test snapshots.
pub const BS: usize = 65536;

/// `len` bytes of xorshift noise (incompressible), seeded.
pub fn noise(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u64::from(seed) + 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A vault directory and a snapshot area for it, under `dir`.
pub fn area_in(dir: &Path) -> (PathBuf, Area) {
    let vault = dir.join("vault");
    std::fs::create_dir(&vault).unwrap();
    let owner = AreaIdentity {
        vault_id: "v".into(),
        vault_name: "v".into(),
    };
    let area = Area::for_image(
        &vault,
        None,
        &owner,
        Some(&dir.join("area")),
        None,
        Path::new("/mem.img"),
    )
    .unwrap();
    (vault, area)
}

/// Captures `image` as job `job` of item `vm` into `area` (a chunk
/// snapshot, blocks of [`BS`]) at second `at`; returns its manifest.
pub fn take_snapshot(area: &Area, vault: &Path, job: &str, image: &[u8], at: i64) -> PathBuf {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let src = MemImage::new("/mem.img", image.to_vec());
    capture(
        &CaptureRequest {
            source: &src,
            area,
            item: "vm",
            job,
            point: job,
            block_size: BS as u32,
            compression_level: 1,
            keys: None,
            created: Timestamp::from_second(at).unwrap(),
            pool: &pool,
            rate_limit: None,
            cancelled: &|| false,
            hooks: &Hooks::default(),
            vault_dir: vault,
            allow_clone: false,
            hint: None,
            sampling: Default::default(),
            parent_point: None,
            taken: None,
        },
        &NoProgress,
    )
    .unwrap()
    .manifest
}

/// Pages of `path` resident in the page cache that hold bytes of `range`.
pub fn resident(path: &Path, range: Range<usize>) -> usize {
    let f = File::open(path).unwrap();
    read_ahead::resident(&f, range.start as u64..range.end as u64).unwrap()
}

/// Drops `path` from the page cache; false when the cache keeps it
/// (tmpfs), which a caller reports as a skip.
pub fn drop_cached(path: &Path) -> bool {
    let f = File::open(path).unwrap();
    read_ahead::drop_cached(&f);
    resident(path, 0..f.metadata().unwrap().len() as usize) == 0
}

/// Cuts the file at `path` to `len` bytes (under a reader, in tests of
/// what a reader does when its image shrinks).
pub fn cut(path: &Path, len: u64) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Runs `f` and returns its result with the number of warnings it logged
/// (on this thread).
pub fn count_warnings<T>(f: impl FnOnce() -> T) -> (T, usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Count(Arc<AtomicUsize>);
    impl tracing::Subscriber for Count {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            if *e.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
    let n = Arc::new(AtomicUsize::new(0));
    let out = tracing::subscriber::with_default(Count(n.clone()), f);
    (out, n.load(Ordering::SeqCst))
}
