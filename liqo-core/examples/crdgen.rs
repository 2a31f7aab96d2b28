//! Writes every CRD of liqo-rs into `deploy/crds/` (or the directory given as first argument).
//!
//! `cargo run -p liqo-core --example crdgen`

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds"));
    std::fs::create_dir_all(&dir)?;
    for crd in liqo_core::crds::all() {
        let path = dir.join(liqo_core::crds::file_name(&crd));
        std::fs::write(&path, liqo_core::crds::render_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
