//! Tests of the snapshot area: numbering, refusals of folders others own
//! or may change, locks, space and mount points.

use std::os::unix::fs::PermissionsExt;

use super::checks::{check_root_owner, current_euid};
use super::*;

fn owner(id: &str) -> AreaIdentity {
    AreaIdentity {
        vault_id: id.into(),
        vault_name: "prod".into(),
    }
}

#[test]
fn areas_are_numbered_per_vault_and_remembered() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join(AREAS_ROOT);
    let a = default_dir(&base, &owner("A"), None).unwrap();
    let b = default_dir(&base, &owner("B"), None).unwrap();
    assert_eq!(a, base.join("prod_1"));
    assert_eq!(b, base.join("prod_2"));
    assert_eq!(default_dir(&base, &owner("A"), None).unwrap(), a);
    let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let vault = t.path().join("vault");
    std::fs::create_dir(&vault).unwrap();
    remember(&vault, &a, None).unwrap();
    remember(&vault, &a, None).unwrap();
    assert_eq!(Area::known_of(&vault, "A", None), vec![Area::at(&a)]);
    // A listed folder that is not the vault's area is left alone.
    let planted = t.path().join("home");
    std::fs::create_dir(&planted).unwrap();
    remember(&vault, &planted, None).unwrap();
    remember(&vault, &b, None).unwrap();
    assert_eq!(Area::known_of(&vault, "A", None), vec![Area::at(&a)]);
    assert_eq!(Area::known_of(&vault, "B", None), vec![Area::at(&b)]);
    let id = std::fs::read(a.join(AREA_FILE)).unwrap();
    let list = std::fs::read(vault.join(AREA_LIST_FILE)).unwrap();
    assert_eq!(fuzz_entry(&id), (true, false));
    assert_eq!(fuzz_entry(&list), (false, true));
    assert_eq!(fuzz_entry(&id[..id.len() - 1]), (false, false));
}

#[test]
fn a_chosen_area_of_another_vault_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("area");
    claim(&dir, &owner("A"), None).unwrap();
    let err = claim(&dir, &owner("B"), None).unwrap_err().to_string();
    assert!(err.contains("snapshot area of vault prod (A)"), "{err}");
}

#[test]
fn a_non_empty_folder_is_not_taken_over() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("home");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("thesis.tex"), b"years of work").unwrap();
    assert!(check_choice(&dir, "A", None).is_err());
    let err = claim(&dir, &owner("A"), None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SnapError::AreaRefused { .. }), "{msg}");
    assert!(msg.contains(s(&dir)) && msg.contains("non-empty"), "{msg}");
    assert!(!dir.join(AREA_FILE).exists());
    // An empty folder is claimed, and is an area from then on.
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    claim(&empty, &owner("A"), None).unwrap();
    std::fs::write(empty.join("vm"), b"").unwrap();
    claim(&empty, &owner("A"), None).unwrap();
}

#[test]
fn a_root_of_areas_others_could_change_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join(AREAS_ROOT);
    std::fs::create_dir(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = default_dir(&base, &owner("A"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains(s(&base)) && err.contains("mode 777"), "{err}");
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let me = current_euid();
    check_root_owner(&base, me).unwrap();
    let err = check_root_owner(&base, me.wrapping_add(1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("owned by uid") && err.contains(s(&base)),
        "{err}"
    );
    // A planted symlink is no root of areas.
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    let err = default_dir(&link, &owner("A"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a directory"), "{err}");
    default_dir(&base, &owner("A"), None).unwrap();
}

#[test]
fn a_chosen_area_others_own_or_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let vault = t.path().join("vault");
    std::fs::create_dir(&vault).unwrap();
    let chosen = |dir: &Path| {
        Area::for_image(
            &vault,
            None,
            &owner("A"),
            Some(dir),
            None,
            Path::new("/img"),
        )
    };
    // Mode 0777: anyone could swap its item folders for symlinks.
    let open = t.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = chosen(&open).unwrap_err();
    assert!(matches!(err, SnapError::AreaRefused { .. }), "{err}");
    assert!(err.to_string().contains("mode 777") && err.to_string().contains(s(&open)));
    assert!(check_choice(&open, "A", None).is_err());
    assert_eq!(
        std::fs::metadata(&open).unwrap().permissions().mode() & 0o777,
        0o777,
        "the folder was changed"
    );
    // Owned by another user.
    if current_euid() == 0 {
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = chosen(&theirs).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert!(!theirs.join(AREA_FILE).exists());
    }
    // A symlink to a good folder is refused, and its target untouched.
    let target = t.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = chosen(&link).unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
    assert!(!target.join(AREA_FILE).exists());
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // A new folder, and a private one, are fine.
    chosen(&t.path().join("new")).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
    chosen(&open).unwrap();
    assert!(Area::known_of(&vault, "A", None).len() == 2);
}

#[test]
fn an_item_folder_that_is_a_symlink_or_a_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let area = Area::at(t.path().join("area"));
    claim(area.dir(), &owner("A"), None).unwrap();
    let elsewhere = t.path().join("etc");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, area.dir().join("vm")).unwrap();
    let err = area.check_unlocked("vm").unwrap_err();
    assert!(matches!(err, SnapError::AreaRefused { .. }), "{err}");
    std::fs::write(area.dir().join("db"), b"").unwrap();
    let err = area.check_unlocked("db").unwrap_err().to_string();
    assert!(err.contains("file"), "{err}");
    area.check_unlocked("ok").unwrap();
}

#[test]
fn an_item_name_that_leaves_the_area_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let area = Area::at(t.path().join("area"));
    claim(area.dir(), &owner("A"), None).unwrap();
    for bad in ["../x", "/tmp/x", "a/b"] {
        let err = area.check_unlocked(bad).unwrap_err();
        assert!(matches!(err, SnapError::BadName(_)), "{err}");
        assert_eq!(area.bytes_used(bad), 0);
    }
    assert!(!t.path().join("x").exists());
}

#[test]
fn a_read_only_area_is_locked() {
    let t = tempfile::tempdir().unwrap();
    let area = Area::at(t.path().join("area"));
    claim(area.dir(), &owner("A"), None).unwrap();
    area.check_unlocked("vm").unwrap();
    std::fs::set_permissions(area.dir(), std::fs::Permissions::from_mode(0o500)).unwrap();
    let err = area.check_unlocked("vm").unwrap_err();
    std::fs::set_permissions(area.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let msg = err.to_string();
    assert!(matches!(err, SnapError::AreaLocked { .. }), "{msg}");
    assert!(
        msg.contains("read-only directory") && msg.contains(s(area.dir())),
        "{msg}"
    );
}

#[test]
fn the_space_check_names_the_numbers() {
    let t = tempfile::tempdir().unwrap();
    let area = Area::at(t.path());
    area.check_space(1, Path::new("/img")).unwrap();
    let err = area.check_space(u64::MAX, Path::new("/img")).unwrap_err();
    assert!(err.is_no_space());
    assert!(err.to_string().contains("/img"), "{err}");
}

#[test]
fn the_mount_point_is_an_ancestor_on_the_same_device() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("img");
    std::fs::write(&f, b"x").unwrap();
    let m = mount_point(&f);
    assert!(f.starts_with(&m) || std::fs::canonicalize(&f).unwrap().starts_with(&m));
    let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
    assert_eq!(dev(&m), dev(&f));
    if let Some(up) = m.parent() {
        assert_ne!(dev(up), dev(&m));
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
