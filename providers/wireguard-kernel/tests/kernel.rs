//! The kernel backend against the running kernel, inside a private network namespace (needs
//! root, as CI runs). Where the module is missing, creating the interface must fail with an
//! error that says so; where it is present, the interface must come and go.

use liqo_fabric_wireguard::WireGuardBackend;
use liqo_wireguard_kernel::Kernel;
use nix::sched::{CloneFlags, unshare};

#[test]
fn creates_the_interface_or_says_the_module_is_missing() {
    let (created, exists_after_create, removed, exists_after_remove) = std::thread::spawn(|| {
        // Only this thread moves to the new namespace; it disappears with the thread.
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) needs root");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let nl = liqo_net::routes::Netlink::connect().unwrap();
            let created = Kernel.create("lqkern0").await;
            let exists = nl.link_index("lqkern0").await.unwrap().is_some();
            let removed = Kernel.remove("lqkern0").await;
            let after = nl.link_index("lqkern0").await.unwrap().is_some();
            (created, exists, removed, after)
        })
    })
    .join()
    .unwrap();
    let module = std::path::Path::new("/sys/module/wireguard").exists();
    match created {
        Ok(()) => {
            assert!(module, "created a wireguard link without the module?");
            assert!(exists_after_create);
        }
        Err(e) => {
            assert!(!module, "the module is loaded but creation failed: {e}");
            assert_eq!(
                e.to_string(),
                "wireguard-kernel backend: creating interface lqkern0: kernel WireGuard is not available (module missing): use the userspace backend"
            );
            assert!(!exists_after_create, "nothing half-made");
        }
    }
    removed.unwrap();
    assert!(!exists_after_remove);
    let e = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(Kernel.create("name-that-is-too-long"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("interface name \"name-that-is-too-long\""),
        "{e}"
    );
}
