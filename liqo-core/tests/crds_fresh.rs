//! The CRD files in `deploy/crds/` must match the Rust types: regenerate with
//! `cargo run -p liqo-core --example crdgen` after changing a CRD.

use std::path::PathBuf;

#[test]
fn deploy_crds_are_up_to_date() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let mut expected_files = vec![];
    for crd in liqo_core::crds::all() {
        let name = liqo_core::crds::file_name(&crd);
        let want = liqo_core::crds::render_yaml(&crd).unwrap();
        let path = dir.join(&name);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is stale or missing: run `cargo run -p liqo-core --example crdgen`",
            path.display()
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "deploy/crds holds a file no CRD generates"
    );
}
