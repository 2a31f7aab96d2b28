//! The allocation file on a full disk and on a read-only file system: a clear error naming the
//! file, the previous content intact, nothing half-written left behind.
//!
//! Needs root (it mounts a small tmpfs of its own, unmounted pass or fail).

use std::{path::PathBuf, process::Command};

use liqo_core::{CidrMapping, ClusterId};
use liqo_net::{
    Allocation,
    store::{AllocationStore, FileStore},
};

/// A 64 KiB tmpfs, unmounted and removed on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("liqo-net-fullfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a mount point");
        let fs = Self(dir);
        fs.mount(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"]);
        fs
    }

    fn mount(&self, args: &[&str]) {
        let out = Command::new("mount")
            .args(args)
            .arg(&self.0)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn alloc(name: &str, remapped: &str) -> Allocation {
    Allocation {
        cluster: name.parse::<ClusterId>().expect("an id"),
        pod: CidrMapping::new(
            "10.244.0.0/16".parse().expect("a CIDR"),
            remapped.parse().expect("a CIDR"),
        )
        .expect("a mapping"),
        external: None,
    }
}

#[tokio::test]
async fn a_full_or_read_only_disk_gives_a_clear_error_and_keeps_the_file() {
    let fs = SmallFs::new();
    let path = fs.0.join("allocations.json");
    let store = FileStore::new(&path);
    store
        .save(&alloc("rome", "10.70.0.0/16"))
        .await
        .expect("first save");
    let before = std::fs::read(&path).expect("the file");

    // Full: everything else on the file system takes the space left.
    let filler = fs.0.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 128 * 1024]);
    let e = store
        .save(&alloc("milan", "10.71.0.0/16"))
        .await
        .expect_err("no space left")
        .to_string();
    assert!(
        e.contains("writing") && e.contains("allocations.json"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&path).expect("the file"),
        before,
        "the old file is intact"
    );
    assert!(
        !fs.0.join("allocations.tmp").exists(),
        "no half-written temporary left"
    );
    assert_eq!(
        store.load().await.expect("still readable"),
        vec![alloc("rome", "10.70.0.0/16")]
    );

    // Read-only: the same.
    std::fs::remove_file(&filler).expect("room again");
    fs.mount(&["-o", "remount,ro"]);
    let e = store
        .save(&alloc("milan", "10.71.0.0/16"))
        .await
        .expect_err("read-only")
        .to_string();
    assert!(
        e.contains("allocations.json") && e.contains("Read-only"),
        "{e}"
    );
    assert_eq!(
        store.load().await.expect("still readable"),
        vec![alloc("rome", "10.70.0.0/16")]
    );

    // Writable again: saving works and keeps both.
    fs.mount(&["-o", "remount,rw"]);
    store
        .save(&alloc("milan", "10.71.0.0/16"))
        .await
        .expect("saves again");
    assert_eq!(store.load().await.expect("readable").len(), 2);
}
