//! The FUSE file system of `coffre mount`: one read-only folder holding
//! one file per served point, whose reads go to the point's
//! [`PointImage::read_at`] (verified blocks; a damaged block is `EIO`,
//! never zeros).
//!
//! fuser wants a `'static` file system, and the images borrow the open
//! vault: [`ImageFs`] holds only the names and sizes, and hands each read
//! (with its reply) over a channel to [`serve_reads`], which runs on the
//! caller's scoped threads beside the images.

use std::ffi::OsStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use coffre_engine::access::{Kind, PointImage};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

/// How long the kernel may keep names and attributes: nothing changes
/// while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Reads waiting for a thread; the kernel keeps a few in flight.
const QUEUE: usize = 256;

/// One file of the folder.
#[derive(Clone, Debug)]
pub struct FileSpec {
    /// Its name (checked: no `/`, not `.` or `..`).
    pub name: String,
    pub size: u64,
    /// The point's instant (the file's times).
    pub time: SystemTime,
}

/// Who owns the files and who may read them.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// 0o400, or 0o444 when other users are let in.
    pub file_mode: u16,
}

/// A request handed to the reading threads.
pub enum ReadJob {
    /// Bytes of a file.
    Read {
        file: usize,
        offset: u64,
        size: u32,
        reply: ReplyData,
    },
    /// `SEEK_DATA` or `SEEK_HOLE` (`data`), from the block map alone.
    Seek {
        file: usize,
        offset: u64,
        data: bool,
        reply: ReplyLseek,
    },
}

impl ReadJob {
    fn fail(self, err: Errno) {
        match self {
            ReadJob::Read { reply, .. } => reply.error(err),
            ReadJob::Seek { reply, .. } => reply.error(err),
        }
    }
}

/// Counters of the mount.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub reads: AtomicU64,
    pub bytes: AtomicU64,
    pub failed: AtomicU64,
}

/// The file system fuser serves.
pub struct ImageFs {
    files: Vec<FileSpec>,
    owner: Owner,
    jobs: SyncSender<ReadJob>,
}

/// The inode of file `i`: the root is 1.
fn ino_of(i: usize) -> INodeNo {
    INodeNo(i as u64 + 2)
}

impl ImageFs {
    /// The file system and the receiving end of its reads.
    pub fn new(files: Vec<FileSpec>, owner: Owner) -> (ImageFs, Receiver<ReadJob>) {
        let (jobs, rx) = std::sync::mpsc::sync_channel(QUEUE);
        (ImageFs { files, owner, jobs }, rx)
    }

    /// Gives `job` to the reading threads: a full queue waits (the
    /// kernel's requests in flight are bounded); a closed one means the
    /// mount is stopping.
    fn hand_over(&self, job: ReadJob) {
        if let Err(e) = self.jobs.try_send(job) {
            match e {
                TrySendError::Full(job) => {
                    if let Err(e) = self.jobs.send(job) {
                        e.0.fail(Errno::EIO);
                    }
                }
                TrySendError::Disconnected(job) => job.fail(Errno::EIO),
            }
        }
    }

    fn file_of(&self, ino: INodeNo) -> Option<usize> {
        let i = usize::try_from(ino.0.checked_sub(2)?).ok()?;
        (i < self.files.len()).then_some(i)
    }

    fn root_attr(&self) -> FileAttr {
        let time = self
            .files
            .iter()
            .map(|f| f.time)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind: FileType::Directory,
            // r-x for whoever may read the files.
            perm: self.owner.file_mode | ((self.owner.file_mode & 0o444) >> 2),
            nlink: 2,
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, i: usize) -> FileAttr {
        let f = &self.files[i];
        FileAttr {
            ino: ino_of(i),
            size: f.size,
            blocks: f.size.div_ceil(512),
            atime: f.time,
            mtime: f.time,
            ctime: f.time,
            crtime: f.time,
            kind: FileType::RegularFile,
            perm: self.owner.file_mode,
            nlink: 1,
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for ImageFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self.files.iter().position(|f| OsStr::new(&f.name) == name) {
            Some(i) => reply.entry(&TTL, &self.file_attr(i), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &self.root_attr());
        }
        match self.file_of(ino) {
            Some(i) => reply.attr(&TTL, &self.file_attr(i)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.file_of(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // The bytes never change while mounted: the page cache may keep
        // them across opens.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.file_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let len = self.files[file].size;
        if offset >= len || size == 0 {
            return reply.data(&[]);
        }
        // `len - offset` fits: it is at most `size`, a u32, when smaller.
        let size = u32::try_from(u64::from(size).min(len - offset)).unwrap_or(size);
        self.hand_over(ReadJob::Read {
            file,
            offset,
            size,
            reply,
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(file) = self.file_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            // The kernel answers the others itself.
            _ => return reply.error(Errno::EINVAL),
        };
        match u64::try_from(offset) {
            Ok(offset) if offset < self.files[file].size => self.hand_over(ReadJob::Seek {
                file,
                offset,
                data,
                reply,
            }),
            _ => reply.error(Errno::ENXIO),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
        ]
        .into_iter()
        .chain(
            self.files
                .iter()
                .enumerate()
                .map(|(i, f)| (ino_of(i), FileType::RegularFile, f.name.as_str())),
        );
        // An entry's offset is where the next read starts.
        for (n, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(ino, n as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks: u64 = self.files.iter().map(|f| f.size.div_ceil(4096)).sum();
        reply.statfs(
            blocks,
            0,
            0,
            self.files.len() as u64 + 1,
            0,
            4096,
            255,
            4096,
        );
    }
}

/// Answers the reads of `jobs` from `images` (file `i` is `images[i]`)
/// until every sender is gone. Run it on a few threads at once.
pub fn serve_reads(jobs: &Mutex<Receiver<ReadJob>>, images: &[PointImage<'_>], stats: &ReadStats) {
    let mut buf = Vec::new();
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        match job {
            ReadJob::Read {
                file,
                offset,
                size,
                reply,
            } => {
                let Some(image) = images.get(file) else {
                    reply.error(Errno::EIO);
                    continue;
                };
                buf.resize(size as usize, 0);
                stats.reads.fetch_add(1, Ordering::Relaxed);
                // The image names the point and the block in its log line.
                match image.read_at(offset, &mut buf) {
                    Ok(()) => {
                        stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                        reply.data(&buf);
                    }
                    Err(_) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        reply.error(Errno::EIO);
                    }
                }
            }
            ReadJob::Seek {
                file,
                offset,
                data,
                reply,
            } => match images.get(file).map(|i| seek(i, offset, data)) {
                Some(Ok(Some(at))) => reply.offset(i64::try_from(at).unwrap_or(i64::MAX)),
                Some(Ok(None)) => reply.error(Errno::ENXIO),
                _ => reply.error(Errno::EIO),
            },
        }
    }
}

/// Bytes of block map looked at per step of a seek.
const SEEK_STEP: u64 = 1 << 30;

/// The first data byte (`data`) or hole byte at or after `offset`: a hole
/// is a run of zero blocks, and the end of the image is one. `None`: no
/// data after `offset`.
fn seek(image: &PointImage<'_>, offset: u64, data: bool) -> coffre_engine::Result<Option<u64>> {
    let size = image.size();
    let mut at = offset;
    while at < size {
        let len = SEEK_STEP.min(size - at);
        for (n, kind) in image.extents(at, len)? {
            if (kind == Kind::Data) == data {
                return Ok(Some(at));
            }
            at += n;
        }
    }
    Ok((!data).then_some(size))
}

/// A file name for a point id: refused when it could leave the folder.
pub fn checked_name(name: &str) -> Option<String> {
    (!name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255)
        .then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_folder_are_refused() {
        for bad in ["", ".", "..", "a/b", "/x", "a\0b"] {
            assert_eq!(checked_name(bad), None, "{bad:?}");
        }
        assert_eq!(
            checked_name("20260101T000000Z-1a2b.img").as_deref(),
            Some("20260101T000000Z-1a2b.img")
        );
        assert_eq!(checked_name(&"x".repeat(256)), None);
    }
}
